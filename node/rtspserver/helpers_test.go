package rtspserver

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"

	"github.com/stemflow/stemflow/relay"
)

func testLogger(t *testing.T) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// logBuffer collects a server's log lines for assertions (and echoes them
// to stderr with -v).
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if testing.Verbose() {
		os.Stderr.Write(p)
	}
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Logger returns a debug-level logger writing into l.
func (l *logBuffer) Logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// startServer starts a server on a free even port of 127.0.0.1 (UDP on the
// port + 1000 and + 1001).
func startServer(t *testing.T, hub *relay.Hub, sources map[string]string) *Server {
	t.Helper()
	return startServerConfig(t, Config{Hub: hub, Logger: testLogger(t), Sources: sources})
}

// startServerConfig starts a server with cfg on a free even port of
// 127.0.0.1 (cfg.Address is overwritten).
func startServerConfig(t *testing.T, cfg Config) *Server {
	t.Helper()
	var lastErr error
	for range 30 {
		port := 20000 + 2*rand.IntN(10000)
		cfg.Address = "127.0.0.1:" + strconv.Itoa(port)
		s, err := New(cfg)
		if err == nil {
			t.Cleanup(s.Close)
			return s
		}
		lastErr = err
	}
	t.Fatalf("no free port: %v", lastErr)
	return nil
}

func newHub(t *testing.T, dc string) *relay.Hub {
	h := relay.NewHub(relay.Config{Datacenter: dc, Logger: testLogger(t)})
	t.Cleanup(h.Close)
	return h
}

// ffmpeg is a running ffmpeg process.
type ffmpeg struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	stderr bytes.Buffer
	stdout bytes.Buffer
	done   chan struct{}
	err    error
}

func (f *ffmpeg) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.stderr.Write(p)
}

// Stderr returns what ffmpeg printed on stderr so far.
func (f *ffmpeg) Stderr() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.stderr.String()
}

// wait waits for ffmpeg to exit, at most d.
func (f *ffmpeg) wait(t *testing.T, d time.Duration) error {
	t.Helper()
	select {
	case <-f.done:
		return f.err
	case <-time.After(testutil.Scale(d)):
		t.Fatalf("ffmpeg still running after %s: %s\nstderr:\n%s", testutil.Scale(d), f.cmd, f.Stderr())
		return nil
	}
}

// startFFmpeg runs ffmpeg with args; it is killed at the end of the test or
// after a minute at most.
func startFFmpeg(t *testing.T, args ...string) *ffmpeg {
	t.Helper()
	if _, err := exec.LookPath("ffmpeg"); err != nil {
		t.Skip("ffmpeg not installed")
	}
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(time.Minute))
	f := &ffmpeg{done: make(chan struct{})}
	f.cmd = exec.CommandContext(ctx, "ffmpeg", append([]string{"-hide_banner", "-nostdin", "-y"}, args...)...)
	f.cmd.Stderr = f
	f.cmd.Stdout = &f.stdout
	if err := f.cmd.Start(); err != nil {
		cancel()
		t.Fatalf("ffmpeg: %v", err)
	}
	go func() {
		f.err = f.cmd.Wait()
		cancel()
		close(f.done)
	}()
	t.Cleanup(func() {
		cancel()
		<-f.done
		if t.Failed() {
			t.Logf("ffmpeg %s\nstderr:\n%s", strings.Join(f.cmd.Args[1:], " "), tail(f.Stderr(), 3000))
		}
	})
	return f
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// publishArgs are ffmpeg arguments publishing H264 (High profile, SPS/PPS in
// the SDP only, default 1472-byte packets) and Opus to url for secs seconds.
func publishArgs(url, transport string, secs int) []string {
	args := []string{"-re",
		"-f", "lavfi", "-i", "testsrc=size=640x360:rate=30",
		"-f", "lavfi", "-i", "sine=frequency=440",
		"-t", strconv.Itoa(secs),
		// testsrc is RGB: without yuv420p libx264 picks High 4:4:4, which
		// browsers do not decode.
		"-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "60", "-preset", "veryfast",
		"-c:a", "libopus",
		"-f", "rtsp"}
	if transport != "" {
		args = append(args, "-rtsp_transport", transport)
	}
	return append(args, url)
}

// subscribe waits until the stream is live on hub and subscribes to it.
func subscribe(t *testing.T, hub *relay.Hub, name string, d time.Duration) (*relay.Subscription, *relay.Queue) {
	t.Helper()
	deadline := time.Now().Add(testutil.Scale(d))
	for {
		q := relay.NewQueue(8192)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		sub, err := hub.Subscribe(ctx, name, q)
		cancel()
		if err == nil {
			t.Cleanup(func() { sub.Close(); q.Drain() })
			return sub, q
		}
		if time.Now().After(deadline) {
			t.Fatalf("stream %q not live after %s: %v", name, testutil.Scale(d), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
