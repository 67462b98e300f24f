// Package testutil holds what every network test needs: timeouts that stretch
// on slow machines and under the race detector, a watchdog that dumps every
// goroutine instead of hanging, a goroutine-leak check, polling, free ports
// and quiet loggers. It is for tests and benchmarks only.
package testutil

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Scale stretches a test timeout by $STEMFLOW_TEST_SCALE (default 1) and by 3
// more under the race detector, so that slow CI machines do not flake.
func Scale(d time.Duration) time.Duration {
	f := 1.0
	if s := os.Getenv("STEMFLOW_TEST_SCALE"); s != "" {
		if v, err := strconv.ParseFloat(s, 64); err == nil && v > 0 {
			f = v
		}
	}
	if RaceEnabled {
		f *= 3
	}
	return time.Duration(float64(d) * f)
}

// Watchdog fails the test with every goroutine's stack when it runs longer
// than d (scaled), instead of hanging until go test's global timeout.
func Watchdog(t testing.TB, d time.Duration) {
	t.Helper()
	d = Scale(d)
	name := t.Name()
	timer := time.AfterFunc(d, func() {
		buf := make([]byte, 1<<20)
		n := runtime.Stack(buf, true)
		fmt.Fprintf(os.Stderr, "watchdog: %s still running after %v\n%s\n", name, d, buf[:n])
		panic("watchdog: " + name + " timed out")
	})
	t.Cleanup(func() { timer.Stop() })
}

// WaitFor polls cond every 10 ms and fails the test when it is still false
// after 10 seconds (scaled).
func WaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	WaitForWithin(t, 10*time.Second, what, cond)
}

// WaitForWithin is WaitFor with its own timeout (scaled).
func WaitForWithin(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(Scale(d))
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// CheckLeaks fails the test when goroutines started during it are still
// running a few seconds after its other cleanups ran. Call it first in the
// test so that its cleanup runs last.
func CheckLeaks(t testing.TB) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(Scale(5 * time.Second))
		for {
			n := runtime.NumGoroutine()
			if n <= before {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("goroutine leak: %d goroutines before the test, %d after:\n%s", before, n, interesting(buf))
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// interesting drops the testing framework's own goroutines from a dump.
func interesting(dump []byte) []byte {
	var out bytes.Buffer
	for g := range bytes.SplitSeq(dump, []byte("\n\n")) {
		s := string(g)
		if strings.Contains(s, "testing.(*T).Run") || strings.Contains(s, "testing.tRunner") && !strings.Contains(s, "stemflow") ||
			strings.Contains(s, "runtime.Stack") {
			continue
		}
		out.Write(g)
		out.WriteString("\n\n")
	}
	return out.Bytes()
}

// Logger returns a logger that writes to stderr at debug level when the test
// runs with -v, and discards everything otherwise.
func Logger() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// FreePort returns a TCP port of 127.0.0.1 that was free a moment ago, for
// servers whose configuration takes a port rather than a listener.
func FreePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
