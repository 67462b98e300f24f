// Package player serves Stemflow's web pages: the list of live streams, a
// WHEP player, a WHIP browser publisher and a live map of the overlay. The HTML, CSS and JavaScript are
// embedded in the binary and use no third-party code.
//
// The pages talk to the node only through its public HTTP API (WHIP on
// /whip/{stream}, WHEP on /whep/{stream}, the stream list on /api/v1/streams,
// the overlay on /api/v1/topology, the chat beside the video on the
// WebSocket /chat/{room}: chat.html, chat.js),
// so the package depends on nothing but the standard library and the relay's
// stream-name rule.
package player

import (
	"bytes"
	"embed"
	"html/template"
	"io/fs"
	"net/http"
	"path"
	"strings"
	"time"

	"github.com/stemflow/stemflow/relay"
)

//go:embed assets
var assets embed.FS

// pages are parsed once; every page shares layout.html.
var pages = template.Must(template.ParseFS(assets, "assets/*.html"))

// startTime is the modification time given to embedded static files, so that
// browsers can revalidate them with If-Modified-Since across one process life.
var startTime = time.Now()

// pageData is what the page templates see.
type pageData struct {
	Title  string // page title suffix
	Page   string // "index", "watch", "publish" or "topology": selects the script
	Stream string // stream name, empty on the index page
}

// Handler returns the handler for the player pages:
//
//	GET /                   list of live streams and a form to publish a new one
//	GET /watch/{stream}     WHEP player
//	GET /publish/{stream}   WHIP publisher (?autostart=1 publishes camera and microphone at once)
//	GET /topology           live map of the overlay (?stream=NAME highlights that stream's tree)
//	GET /static/{file}      the pages' CSS and JavaScript
//
// Every other path answers 404, so a node can mount the handler at "/" and
// register /whip/, /whep/, /api/ and /healthz with more specific patterns.
// The handler is stateless and safe for concurrent use.
func Handler() http.Handler {
	static, err := fs.Sub(assets, "assets/static")
	if err != nil {
		panic(err) // the embedded tree is fixed at build time
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		render(w, "index.html", pageData{Title: "Live streams", Page: "index"})
	})
	mux.HandleFunc("GET /watch/{stream}", streamPage("watch.html", "watch", "Watch "))
	mux.HandleFunc("GET /publish/{stream}", streamPage("publish.html", "publish", "Publish "))
	mux.HandleFunc("GET /topology", func(w http.ResponseWriter, r *http.Request) {
		render(w, "topology.html", pageData{Title: "Topology", Page: "topology"})
	})
	mux.HandleFunc("GET /static/{file}", func(w http.ResponseWriter, r *http.Request) {
		name := r.PathValue("file")
		b, err := fs.ReadFile(static, name)
		if err != nil || strings.HasPrefix(name, ".") {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Cache-Control", "no-cache")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		// ServeContent sets Content-Type from the extension (.css, .js, .svg).
		http.ServeContent(w, r, path.Base(name), startTime, bytes.NewReader(b))
	})
	return mux
}

// streamPage serves a page about one stream, after checking the stream name.
func streamPage(tmpl, page, title string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		name := r.PathValue("stream")
		if err := relay.ValidateStreamName(name); err != nil {
			http.Error(w, "invalid stream name in the address: "+err.Error(), http.StatusNotFound)
			return
		}
		render(w, tmpl, pageData{Title: title + name, Page: page, Stream: name})
	}
}

// render executes a page template into a buffer first, so that a template
// error becomes a clean 500 rather than half a page.
func render(w http.ResponseWriter, tmpl string, data pageData) {
	var buf bytes.Buffer
	if err := pages.ExecuteTemplate(&buf, tmpl, data); err != nil {
		http.Error(w, "player: cannot render page: "+err.Error(), http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Content-Type-Options", "nosniff")
	w.Write(buf.Bytes())
}
