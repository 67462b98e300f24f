package rtctest

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"

	"github.com/stemflow/stemflow/relay"
)

// Quiet is a logger that drops everything.
var Quiet = slog.New(slog.DiscardHandler)

// NewHub returns a relay hub of datacenter "a" that logs nothing, closed
// when the test ends.
func NewHub(t testing.TB) *relay.Hub {
	t.Helper()
	hub := relay.NewHub(relay.Config{Datacenter: "a", Logger: Quiet})
	t.Cleanup(hub.Close)
	return hub
}

// Serve serves h under prefix on a loopback HTTP server, closed when the
// test ends, and returns its URL (http://127.0.0.1:port).
func Serve(t testing.TB, prefix string, h http.Handler) string {
	t.Helper()
	mux := http.NewServeMux()
	mux.Handle(prefix, h)
	hs := httptest.NewServer(mux)
	t.Cleanup(hs.Close)
	return hs.URL
}

// Context returns a context that ends after d (scaled) or when the test
// ends.
func Context(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(d))
	t.Cleanup(cancel)
	return ctx
}
