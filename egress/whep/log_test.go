package whep

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pion/rtp"

	"github.com/stemflow/stemflow/internal/rtc/rtctest"
	"github.com/stemflow/stemflow/internal/testutil"
)

// logBuffer collects log output from many goroutines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) lines(msg string) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for line := range strings.SplitSeq(b.buf.String(), "\n") {
		if strings.Contains(line, `msg="`+msg+`"`) {
			out = append(out, line)
		}
	}
	return out
}

func TestViewerJoinAndLeaveLoggedAtInfo(t *testing.T) {
	var logs logBuffer
	e := setupLogger(t, slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo})))
	startSource(t, e.hub, "logged", sourceOptions{})
	v := e.view(t, "logged", rtctest.ViewOptions{})
	testutil.WaitFor(t, "video", func() bool { return len(v.Video()) > 50 })
	id := v.Session[strings.LastIndex(v.Session, "/")+1:]
	if status, err := v.Delete(e.ctx); err != nil || status != 200 {
		t.Fatalf("DELETE: %d %v", status, err)
	}
	joined, left := logs.lines("WHEP viewer joined"), logs.lines("WHEP viewer left")
	if len(joined) != 1 || !strings.Contains(joined[0], "level=INFO") || !strings.Contains(joined[0], "stream=logged") ||
		!strings.Contains(joined[0], "session="+id) || !strings.Contains(joined[0], "remote=127.0.0.1:") {
		t.Errorf("join logged as %q, want one INFO line with the stream, session %s and remote address", joined, id)
	}
	if len(left) != 1 || !strings.Contains(left[0], "level=INFO") || !strings.Contains(left[0], "session="+id) ||
		!strings.Contains(left[0], `reason="client sent DELETE"`) || !strings.Contains(left[0], "sent=") ||
		strings.Contains(left[0], "sent=0 ") || !strings.Contains(left[0], "dropped=0") {
		t.Errorf("leave logged as %q, want one INFO line with the reason, packets sent and dropped", left)
	}
}

// failingWriter stands for a connection whose sends fail.
type failingWriter struct{}

var errSend = errors.New("sendto: no buffer space available")

func (failingWriter) WriteRTP(*rtp.Header, []byte) (int, error) { return 0, errSend }
func (failingWriter) Write([]byte) (int, error)                 { return 0, errSend }

func TestWriteFailuresCounted(t *testing.T) {
	e := setup(t)
	startSource(t, e.hub, "wf", sourceOptions{})
	v := e.view(t, "wf", rtctest.ViewOptions{})
	testutil.WaitFor(t, "video", func() bool { return len(v.Video()) > 10 })
	if st := e.srv.Stats(); st.WriteErrors != 0 {
		t.Fatalf("stats = %+v: write errors before any failed", st)
	}
	sv := e.serverViewer(t, v)
	b := *sv.tracks[0].bound.Load()
	b.w = failingWriter{}
	sv.tracks[0].bound.Store(&b)
	testutil.WaitFor(t, "failed writes to be counted", func() bool { return e.srv.Stats().WriteErrors >= 50 })
	time.Sleep(100 * time.Millisecond)
	if st := e.srv.Stats(); st.PacketsDropped != 0 {
		t.Errorf("stats = %+v: failed writes counted as queue drops", st)
	}
}
