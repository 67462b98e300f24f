package rtc

import (
	"context"
	"fmt"
	"log/slog"
	"sync"

	"github.com/pion/logging"
)

// logFactory hands pion a logger that writes to slog. pion's errors become
// warnings and its warnings debug lines: pion logs expected events (a peer
// that went away, a packet for a closed stream) at those levels.
// Loggers are cached by scope: pion asks for a dozen per PeerConnection.
type logFactory struct {
	log     *slog.Logger
	loggers sync.Map // scope → *pionLogger
}

func (f *logFactory) NewLogger(scope string) logging.LeveledLogger {
	if l, ok := f.loggers.Load(scope); ok {
		return l.(*pionLogger)
	}
	l, _ := f.loggers.LoadOrStore(scope, &pionLogger{log: f.log.With("pion", scope)})
	return l.(*pionLogger)
}

type pionLogger struct{ log *slog.Logger }

func (l *pionLogger) logf(level slog.Level, format string, args ...any) {
	if !l.log.Enabled(context.Background(), level) {
		return
	}
	l.log.Log(context.Background(), level, fmt.Sprintf(format, args...))
}

func (l *pionLogger) Trace(msg string)                  {}
func (l *pionLogger) Tracef(format string, args ...any) {}
func (l *pionLogger) Debug(msg string)                  { l.logf(slog.LevelDebug-4, "%s", msg) }
func (l *pionLogger) Debugf(format string, args ...any) { l.logf(slog.LevelDebug-4, format, args...) }
func (l *pionLogger) Info(msg string)                   { l.logf(slog.LevelDebug, "%s", msg) }
func (l *pionLogger) Infof(format string, args ...any)  { l.logf(slog.LevelDebug, format, args...) }
func (l *pionLogger) Warn(msg string)                   { l.logf(slog.LevelDebug, "%s", msg) }
func (l *pionLogger) Warnf(format string, args ...any)  { l.logf(slog.LevelDebug, format, args...) }
func (l *pionLogger) Error(msg string)                  { l.logf(slog.LevelWarn, "%s", msg) }
func (l *pionLogger) Errorf(format string, args ...any) { l.logf(slog.LevelWarn, format, args...) }
