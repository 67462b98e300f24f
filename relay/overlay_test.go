package relay

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
)

// logRecorder is a slog.Handler that keeps every record, for tests that
// assert on what a node logs.
type logRecorder struct {
	mu    *sync.Mutex
	lines *[]string // "LEVEL msg k=v ..."
	attrs []slog.Attr
}

func newLogRecorder() *logRecorder {
	return &logRecorder{mu: new(sync.Mutex), lines: new([]string)}
}

func (r *logRecorder) Enabled(context.Context, slog.Level) bool { return true }

func (r *logRecorder) Handle(_ context.Context, rec slog.Record) error {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s", rec.Level, rec.Message)
	for _, a := range r.attrs {
		fmt.Fprintf(&b, " %s", a)
	}
	rec.Attrs(func(a slog.Attr) bool { fmt.Fprintf(&b, " %s", a); return true })
	r.mu.Lock()
	*r.lines = append(*r.lines, b.String())
	r.mu.Unlock()
	return nil
}

func (r *logRecorder) WithAttrs(as []slog.Attr) slog.Handler {
	c := *r
	c.attrs = append(append([]slog.Attr(nil), r.attrs...), as...)
	return &c
}

func (r *logRecorder) WithGroup(string) slog.Handler { return r }

// matching returns the lines that contain every one of the words.
func (r *logRecorder) matching(words ...string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, l := range *r.lines {
		ok := true
		for _, w := range words {
			ok = ok && strings.Contains(l, w)
		}
		if ok {
			out = append(out, l)
		}
	}
	return out
}

// overlayNode starts a hub and its overlay for datacenter dc, with the
// identity issued for certName.
func overlayNode(t *testing.T, ca *ClusterCA, dc, certName string, log *slog.Logger, nb map[string]string) (*Hub, *Overlay) {
	t.Helper()
	h := NewHub(Config{Datacenter: dc, Logger: log})
	id, err := ca.Issue(certName)
	if err != nil {
		t.Fatal(err)
	}
	o, err := StartOverlay(h, OverlayConfig{Listen: "127.0.0.1:0", Neighbours: nb, Identity: id})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.Close(); h.Close() })
	return h, o
}

// TestOverlayRefusesPeerThatIsNoNeighbour: a node with a valid cluster
// certificate that is not among the configured neighbours gets no link, and
// the refusing node says which datacenter it refused. Before, the link came
// up and the stranger could announce and subscribe.
func TestOverlayRefusesPeerThatIsNoNeighbour(t *testing.T) {
	testutil.CheckLeaks(t)
	ca, err := NewClusterCA()
	if err != nil {
		t.Fatal(err)
	}
	rec, arec := newLogRecorder(), newLogRecorder()
	c, co := overlayNode(t, ca, "c", "c", slog.New(rec), map[string]string{"b": "127.0.0.1:1"})
	a, _ := overlayNode(t, ca, "a", "a", slog.New(arec), map[string]string{"c": co.Addr().String()})
	testutil.WaitFor(t, "c to refuse a twice", func() bool { return len(rec.matching("not a configured neighbour")) >= 2 })
	if n := len(c.Links()) + len(a.Links()); n != 0 {
		t.Fatalf("%d links up between a and c, which are no neighbours of each other", n)
	}
	lines := rec.matching("WARN", "not a configured neighbour")
	if len(lines) != 1 || !strings.Contains(lines[0], "peer=a") || !strings.Contains(lines[0], "overlay.neighbours") {
		t.Fatalf("c logged %q at WARN, want one line naming peer a and overlay.neighbours", lines)
	}
	// The dialer is told why, once, and never sees a link come up.
	if got := arec.matching("WARN", "refused", "peer=c", "not a neighbour of datacenter c"); len(got) != 1 {
		t.Fatalf("a logged %q at WARN, want one line with c's reason", arec.matching("WARN"))
	}
	t.Logf("c: %s\na: %s", lines[0], arec.matching("WARN")[0])
	if up := arec.matching("link up"); len(up) != 0 {
		t.Fatalf("a saw the refused link come up: %q", up)
	}
}

// TestOverlayIdentityMismatchWarnsOncePerMinute: a node started as b with
// a's certificate redials its neighbour every few seconds at most; the
// neighbour logs the mismatch, naming both names, at WARN once, and the
// repeats at DEBUG.
func TestOverlayIdentityMismatchWarnsOncePerMinute(t *testing.T) {
	testutil.CheckLeaks(t)
	ca, err := NewClusterCA()
	if err != nil {
		t.Fatal(err)
	}
	rec, brec := newLogRecorder(), newLogRecorder()
	c, co := overlayNode(t, ca, "c", "c", slog.New(rec), map[string]string{"b": "127.0.0.1:1"})
	overlayNode(t, ca, "b", "a", slog.New(brec), map[string]string{"c": co.Addr().String()})
	// The dialer backs off 100, 200, 400 ms...: three attempts in a second.
	testutil.WaitFor(t, "three refused attempts", func() bool { return len(rec.matching("refused link")) >= 3 })
	if len(c.Links()) != 0 {
		t.Fatal("c linked to a node whose certificate names another datacenter")
	}
	all := rec.matching("refused link")
	warns := rec.matching("WARN", "refused link")
	if len(warns) != 1 {
		t.Fatalf("c logged %d of %d refusals at WARN, want 1:\n%s", len(warns), len(all), strings.Join(all, "\n"))
	}
	if !strings.Contains(warns[0], `"b"`) || !strings.Contains(warns[0], `"a"`) {
		t.Fatalf("the warning does not name both the hello's and the certificate's datacenter: %s", warns[0])
	}
	t.Logf("c: %s\nb: %q", warns[0], brec.matching("WARN"))
	if got := brec.matching("WARN", "refused", "certificate names"); len(got) != 1 {
		t.Fatalf("b logged %q at WARN, want one line with c's reason", brec.matching("WARN"))
	}
}

// TestOverlayDialerWarnsOnceAboutWrongCertificate: a neighbour that presents
// another datacenter's certificate fails the dialer's TLS check; the dialer
// says so at WARN once, not on every redial.
func TestOverlayDialerWarnsOnceAboutWrongCertificate(t *testing.T) {
	testutil.CheckLeaks(t)
	ca, err := NewClusterCA()
	if err != nil {
		t.Fatal(err)
	}
	rec := newLogRecorder()
	_, co := overlayNode(t, ca, "c", "x", quietLogger(), map[string]string{"b": "127.0.0.1:1"})
	b, _ := overlayNode(t, ca, "b", "b", slog.New(rec), map[string]string{"c": co.Addr().String()})
	testutil.WaitFor(t, "three refused dials", func() bool { return len(rec.matching("refused", "peer=c")) >= 3 })
	if len(b.Links()) != 0 {
		t.Fatal("b linked to a neighbour with another datacenter's certificate")
	}
	warns := rec.matching("WARN", "refused", "peer=c")
	t.Logf("b: %q", warns)
	if len(warns) != 1 || !strings.Contains(warns[0], "x") {
		t.Fatalf("b logged %d lines at WARN, want 1 naming the certificate's datacenter:\n%s", len(warns), strings.Join(rec.matching("peer=c"), "\n"))
	}
}

func TestPeerWarningsOncePerInterval(t *testing.T) {
	var w peerWarnings
	t0 := time.Now()
	steps := []struct {
		peer string
		at   time.Duration
		want slog.Level
	}{
		{"a", 0, slog.LevelWarn},
		{"a", 2 * time.Second, slog.LevelDebug},
		{"b", 2 * time.Second, slog.LevelWarn},
		{"a", 59 * time.Second, slog.LevelDebug},
		{"a", 61 * time.Second, slog.LevelWarn},
		{"a", 62 * time.Second, slog.LevelDebug},
	}
	for _, s := range steps {
		if got := w.level(s.peer, t0.Add(s.at)); got != s.want {
			t.Fatalf("peer %s at %v: %v, want %v", s.peer, s.at, got, s.want)
		}
	}
}
