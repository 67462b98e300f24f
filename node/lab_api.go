package node

import (
	"context"
	"errors"
	"io"
	"net/http"
	"slices"
)

// The WAN lab's runtime API, served by every node of a lab (and by no node
// of a real deployment); the README's "WAN lab" section shows it.

// apiLab is the body of GET /api/v1/lab.
type apiLab struct {
	Profile     string      `json:"profile"`
	Datacenters []apiLabDC  `json:"datacenters"`
	Links       []apiLabLnk `json:"links"`
}

type apiLabDC struct {
	Name string `json:"name"`
	// Up: the datacenter's node runs (false after a kill).
	Up   bool   `json:"up"`
	HTTP string `json:"http"`
	// LinksUp names the datacenters it has an overlay link to now.
	LinksUp []string `json:"links_up"`
}

// apiLabLnk is a link of the mesh as set: the LabLink fields, and how the
// impairment reads.
type apiLabLnk struct {
	LabLink
	Impairment string `json:"impairment"`
}

func (l *Lab) routes(mux *http.ServeMux) {
	mux.HandleFunc("GET /api/v1/lab", l.serveState)
	mux.HandleFunc("POST /api/v1/lab/links", l.serveSetLink)
	mux.HandleFunc("POST /api/v1/lab/dcs/{dc}/kill", l.serveKill)
	mux.HandleFunc("POST /api/v1/lab/dcs/{dc}/start", l.serveStart)
}

// State returns what GET /api/v1/lab shows.
func (l *Lab) state(ctx context.Context) (apiLab, error) {
	out := apiLab{Profile: l.profile, Datacenters: []apiLabDC{}, Links: []apiLabLnk{}}
	var nodes []*Node
	err := l.do(ctx, func() {
		for i, d := range l.dcs {
			out.Datacenters = append(out.Datacenters, apiLabDC{Name: d.name, Up: d.node != nil, HTTP: l.HTTPURL(i), LinksUp: []string{}})
			nodes = append(nodes, d.node)
		}
		for _, k := range l.pairsLocked() {
			ln := l.links[k]
			out.Links = append(out.Links, apiLabLnk{LabLink: ln, Impairment: describeLink(ln)})
		}
	})
	if err != nil {
		return apiLab{}, err
	}
	for i, n := range nodes { // off the lab's goroutine: a hub's links take its lock
		if n == nil {
			continue
		}
		for _, ls := range n.Hub().Links() {
			out.Datacenters[i].LinksUp = append(out.Datacenters[i].LinksUp, ls.Peer)
		}
		slices.Sort(out.Datacenters[i].LinksUp)
	}
	return out, nil
}

func (l *Lab) serveState(w http.ResponseWriter, r *http.Request) {
	st, err := l.state(r.Context())
	if err != nil {
		labError(w, err)
		return
	}
	writeJSON(w, st)
}

// maxLabBody bounds a POST /api/v1/lab/links body.
const maxLabBody = 64 << 10

func (l *Lab) serveSetLink(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxLabBody))
	if err != nil {
		http.Error(w, "lab: reading the body: "+err.Error()+` (send JSON like {"between":["a","c"],"delay":"30ms"})`, http.StatusBadRequest)
		return
	}
	ln, err := DecodeLabLink(body)
	if err != nil {
		http.Error(w, err.Error()+` (send JSON like {"between":["a","c"],"delay":"30ms","jitter":"2ms","loss":0.5,"rate":"4mbit","down":false}; fields left out mean unimpaired)`, http.StatusBadRequest)
		return
	}
	set, err := l.SetLink(r.Context(), ln)
	if err != nil {
		labError(w, err)
		return
	}
	writeJSON(w, apiLabLnk{LabLink: set, Impairment: describeLink(set)})
}

func (l *Lab) serveKill(w http.ResponseWriter, r *http.Request) {
	dc := r.PathValue("dc")
	if err := l.Kill(r.Context(), dc); err != nil {
		labError(w, err)
		return
	}
	writeJSON(w, apiLabDC{Name: dc, Up: false, HTTP: l.HTTPURL(slices.Index(l.cfg.DCs, dc)), LinksUp: []string{}})
}

func (l *Lab) serveStart(w http.ResponseWriter, r *http.Request) {
	dc := r.PathValue("dc")
	if err := l.Start(r.Context(), dc); err != nil {
		labErrorOr(w, err, http.StatusInternalServerError)
		return
	}
	// Its links come up as the redial loops reach it: GET /api/v1/lab.
	writeJSON(w, apiLabDC{Name: dc, Up: true, HTTP: l.HTTPURL(slices.Index(l.cfg.DCs, dc)), LinksUp: []string{}})
}

// labError answers a lab request that failed, with a status by what was
// wrong.
func labError(w http.ResponseWriter, err error) { labErrorOr(w, err, http.StatusBadRequest) }

// labErrorOr is labError with the status of errors of no known kind.
func labErrorOr(w http.ResponseWriter, err error, code int) {
	switch {
	case errors.Is(err, ErrLabUnknownDC):
		code = http.StatusNotFound
	case errors.Is(err, ErrLabState):
		code = http.StatusConflict
	case errors.Is(err, ErrLabClosed):
		code = http.StatusServiceUnavailable
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		code = http.StatusServiceUnavailable
	}
	http.Error(w, "lab: "+err.Error(), code)
}
