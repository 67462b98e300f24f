package player

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestHandler(t *testing.T) {
	srv := httptest.NewServer(Handler())
	t.Cleanup(srv.Close)

	tests := []struct {
		path        string
		status      int
		contentType string // prefix
		contains    string
	}{
		{"/", 200, "text/html; charset=utf-8", `<script src="/static/index.js">`},
		{"/watch/x", 200, "text/html; charset=utf-8", `data-stream="x"`},
		{"/watch/cam-1.main_~", 200, "text/html; charset=utf-8", `<video id="video" muted autoplay playsinline>`},
		{"/watch/cam-1.main_~", 200, "text/html; charset=utf-8", `href="/topology?stream=cam-1.main_~"`},
		{"/publish/x", 200, "text/html; charset=utf-8", `<script src="/static/publish.js">`},
		{"/publish/x?autostart=1", 200, "text/html; charset=utf-8", `data-page="publish"`},
		{"/static/style.css", 200, "text/css; charset=utf-8", ":root"},
		{"/static/common.js", 200, "text/javascript; charset=utf-8", "const stemflow"},
		{"/static/watch.js", 200, "text/javascript; charset=utf-8", "window.stemflowStats"},
		{"/static/publish.js", 200, "text/javascript; charset=utf-8", "window.stemflowPublish"},
		{"/static/index.js", 200, "text/javascript; charset=utf-8", "/api/v1/streams"},
		{"/static/favicon.svg", 200, "image/svg+xml", "<svg"},
		{"/topology", 200, "text/html; charset=utf-8", `<script src="/static/topology.js">`},
		{"/topology?stream=x", 200, "text/html; charset=utf-8", `<svg id="map"`},
		{"/static/topology.js", 200, "text/javascript; charset=utf-8", "/api/v1/topology"},

		{"/nope", 404, "text/plain", ""},
		{"/index.html", 404, "text/plain", ""},
		{"/watch", 404, "text/plain", ""},
		{"/watch/", 404, "text/plain", ""},
		{"/watch/a/b", 404, "text/plain", ""},
		{"/topology/x", 404, "text/plain", ""},
		{"/watch/bad%20name", 404, "text/plain", "invalid stream name"},
		{"/publish/", 404, "text/plain", ""},
		{"/static/", 404, "text/plain", ""},
		{"/static/missing.js", 404, "text/plain", ""},
		{"/static/../player.go", 404, "text/plain", ""},
		// The node serves these with more specific patterns; the player must not.
		{"/whip/x", 404, "text/plain", ""},
		{"/whep/x", 404, "text/plain", ""},
		{"/api/v1/streams", 404, "text/plain", ""},
		{"/healthz", 404, "text/plain", ""},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			res, err := http.Get(srv.URL + tt.path)
			if err != nil {
				t.Fatal(err)
			}
			body, err := io.ReadAll(res.Body)
			res.Body.Close()
			if err != nil {
				t.Fatal(err)
			}
			if res.StatusCode != tt.status {
				t.Fatalf("status %d, want %d; body %q", res.StatusCode, tt.status, body)
			}
			if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, tt.contentType) {
				t.Errorf("Content-Type %q, want %q", ct, tt.contentType)
			}
			if !strings.Contains(string(body), tt.contains) {
				t.Errorf("body does not contain %q:\n%s", tt.contains, body)
			}
		})
	}
}

func TestHandlerMethods(t *testing.T) {
	srv := httptest.NewServer(Handler())
	t.Cleanup(srv.Close)

	res, err := http.Post(srv.URL+"/watch/x", "text/plain", strings.NewReader("x"))
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /watch/x: status %d, want 405", res.StatusCode)
	}

	req, _ := http.NewRequest(http.MethodHead, srv.URL+"/static/style.css", nil)
	res, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Errorf("HEAD /static/style.css: status %d, want 200", res.StatusCode)
	}
}

// TestStreamPageLinks checks that a stream page links to its sibling page.
func TestStreamPageLinks(t *testing.T) {
	rec := httptest.NewRecorder()
	Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/watch/a~b", nil))
	if rec.Code != 200 {
		t.Fatalf("status %d", rec.Code)
	}
	if !strings.Contains(rec.Body.String(), `href="/publish/a~b"`) {
		t.Errorf("publish link missing:\n%s", rec.Body.String())
	}
}
