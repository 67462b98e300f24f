package rtc

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"sync"

	"github.com/stemflow/stemflow/relay"
)

// Runner owns one started session.
type Runner interface {
	// Run owns the session from the moment its answer is ready until the
	// session's context ends or the session ends by itself (cancelling its
	// context with the reason). It releases everything the session holds
	// before it returns.
	Run()
}

// EndpointConfig configures an Endpoint. Name, Verb, Doing and Elsewhere
// word the messages clients see.
type EndpointConfig[S Runner] struct {
	// Name is the protocol, e.g. "whip": the endpoint answers under
	// /whip/ and its messages start with "whip: ".
	Name string
	// Verb is what a client POSTs an offer to do, e.g. "publish".
	Verb string
	// Doing is what a client DELETEs its session to stop, e.g. "publishing".
	Doing string
	// Elsewhere is what a client should do when the server is shutting
	// down, e.g. "publish to another node".
	Elsewhere string
	// Token, when set, is the bearer token every POST and DELETE must
	// present. Empty lets anyone in.
	Token string
	// Logger is where the endpoint and its sessions log, with the attribute
	// component=Name added. Default slog.Default().
	Logger *slog.Logger
	// ErrClosed is the reason sessions end with when the endpoint closes.
	ErrClosed error
	// Start sets up session s for the offer of an authorized POST to a
	// valid stream name: its PeerConnection (s.NewPeerConnection, s.Answer)
	// and whatever it takes from the hub. It returns the session's Runner
	// and the SDP answer. On error it releases all it took; errors meant
	// for the client are *HTTPError, others are logged and answered 500.
	Start func(ctx context.Context, s *Session, offer *Offer) (S, string, error)
}

// Endpoint is the HTTP front end and session table WHIP and WHEP share. It
// answers POST /{name}/{stream} with an SDP offer by starting a session
// (201 Created, the answer, the session URL in Location), DELETE on
// /{name}/{stream}/{id} by ending it, PATCH with 405 (no trickle ICE, no
// ICE restart) and OPTIONS on both with CORS headers.
//
// It is safe for concurrent use. Each started session runs its Runner in
// its own goroutine; Close ends them all and waits.
type Endpoint[S Runner] struct {
	cfg    EndpointConfig[S]
	prefix string

	ctx    context.Context
	cancel context.CancelCauseFunc
	wg     sync.WaitGroup

	certs certStore // the DTLS certificate of the endpoint's sessions

	mu       sync.Mutex // guards the following fields
	sessions map[string]entry[S]
}

type entry[S Runner] struct {
	s   *Session
	run S
}

var _ http.Handler = (*Endpoint[Runner])(nil)

var (
	errDeleted    = errors.New("client sent DELETE")
	errNotStarted = errors.New("session not started")
)

// NewEndpoint returns an Endpoint serving cfg.Name's paths.
func NewEndpoint[S Runner](cfg EndpointConfig[S]) *Endpoint[S] {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	cfg.Logger = cfg.Logger.With("component", cfg.Name)
	ctx, cancel := context.WithCancelCause(context.Background())
	return &Endpoint[S]{
		cfg:      cfg,
		prefix:   "/" + cfg.Name + "/",
		ctx:      ctx,
		cancel:   cancel,
		sessions: make(map[string]entry[S]),
	}
}

// Close ends every session with cfg.ErrClosed and waits for their Runners.
// Later POSTs are answered 503.
func (e *Endpoint[S]) Close() error {
	e.cancel(e.cfg.ErrClosed)
	e.wg.Wait()
	return nil
}

// Len returns the number of live sessions.
func (e *Endpoint[S]) Len() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.sessions)
}

// Sessions returns the Runners of the live sessions, in no order.
func (e *Endpoint[S]) Sessions() []S {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]S, 0, len(e.sessions))
	for _, en := range e.sessions {
		out = append(out, en.run)
	}
	return out
}

// ServeHTTP routes POST /{name}/{stream}, DELETE and PATCH
// /{name}/{stream}/{id} and OPTIONS on both.
func (e *Endpoint[S]) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	name := e.cfg.Name
	rest, ok := strings.CutPrefix(r.URL.Path, e.prefix)
	if !ok {
		WriteError(w, Errorf(http.StatusNotFound, "%s: %s is not a %s URL: POST to %s{stream}",
			name, r.URL.Path, strings.ToUpper(name), e.prefix))
		return
	}
	stream, id, isSession := strings.Cut(rest, "/")
	if isSession {
		SetCORS(w.Header(), "DELETE, PATCH, OPTIONS")
		switch r.Method {
		case http.MethodOptions:
			w.WriteHeader(http.StatusNoContent)
		case http.MethodDelete:
			e.handleDelete(w, r, stream, id)
		case http.MethodPatch:
			w.Header().Set("Allow", "DELETE, OPTIONS")
			WriteError(w, Errorf(http.StatusMethodNotAllowed,
				"%s: this server does not support trickle ICE or ICE restarts: every candidate is in the answer", name))
		default:
			w.Header().Set("Allow", "DELETE, OPTIONS")
			WriteError(w, Errorf(http.StatusMethodNotAllowed, "%s: %s is not allowed on a session: use DELETE to stop %s",
				name, r.Method, e.cfg.Doing))
		}
		return
	}
	SetCORS(w.Header(), "POST, OPTIONS")
	switch r.Method {
	case http.MethodOptions:
		w.Header().Set("Accept-Post", "application/sdp")
		w.WriteHeader(http.StatusNoContent)
	case http.MethodPost:
		e.handlePost(w, r, stream)
	default:
		w.Header().Set("Allow", "POST, OPTIONS")
		WriteError(w, Errorf(http.StatusMethodNotAllowed, "%s: %s is not allowed: POST an SDP offer to %s",
			name, r.Method, e.cfg.Verb))
	}
}

func (e *Endpoint[S]) handlePost(w http.ResponseWriter, r *http.Request, stream string) {
	s, answer, err := e.start(r.Context(), w, r, stream)
	if err != nil {
		var he *HTTPError
		if !errors.As(err, &he) {
			e.cfg.Logger.Warn(e.cfg.Verb+" failed", "stream", stream, "remote", r.RemoteAddr, "err", err)
		}
		WriteError(w, err)
		return
	}
	w.Header().Set("Location", e.prefix+stream+"/"+s.id)
	w.Header().Set("ETag", `"`+s.id+`"`)
	w.Header().Set("Content-Type", "application/sdp")
	w.WriteHeader(http.StatusCreated)
	_, _ = w.Write([]byte(answer))
}

// start does the work of a POST. Its user errors are *HTTPError.
func (e *Endpoint[S]) start(ctx context.Context, w http.ResponseWriter, r *http.Request, stream string) (*Session, string, error) {
	name := e.cfg.Name
	if err := CheckBearer(r, e.cfg.Token, name); err != nil {
		return nil, "", err
	}
	if err := relay.ValidateStreamName(stream); err != nil {
		return nil, "", Errorf(http.StatusBadRequest, "%s: bad stream name in the URL: %v", name, err)
	}
	offer, err := ReadOffer(w, r, name)
	if err != nil {
		return nil, "", err
	}

	s := e.newSession(stream)
	run, answer, err := e.cfg.Start(ctx, s, offer)
	if err != nil {
		s.cancel(errNotStarted) // release the context
		return nil, "", err
	}
	e.mu.Lock()
	if e.ctx.Err() != nil {
		e.mu.Unlock()
		// The session's context has ended with the endpoint's: Run
		// releases what Start took and returns at once.
		run.Run()
		return nil, "", Errorf(http.StatusServiceUnavailable, "%s: the server is shutting down: %s", name, e.cfg.Elsewhere)
	}
	e.sessions[s.id] = entry[S]{s: s, run: run}
	e.wg.Add(1)
	e.mu.Unlock()
	go e.run(s, run)
	return s, answer, nil
}

// run runs a registered session and takes it off the table when it ends.
func (e *Endpoint[S]) run(s *Session, run S) {
	defer e.wg.Done()
	defer close(s.done)
	run.Run()
	e.mu.Lock()
	delete(e.sessions, s.id)
	e.mu.Unlock()
}

func (e *Endpoint[S]) handleDelete(w http.ResponseWriter, r *http.Request, stream, id string) {
	if err := CheckBearer(r, e.cfg.Token, e.cfg.Name); err != nil {
		WriteError(w, err)
		return
	}
	e.mu.Lock()
	en, ok := e.sessions[id]
	e.mu.Unlock()
	if !ok || en.s.stream != stream {
		WriteError(w, Errorf(http.StatusNotFound, "%s: no session %s for stream %q: it has ended or never existed",
			e.cfg.Name, id, stream))
		return
	}
	en.s.cancel(errDeleted)
	<-en.s.done
	w.WriteHeader(http.StatusOK)
}

func (e *Endpoint[S]) newSession(stream string) *Session {
	ctx, cancel := context.WithCancelCause(e.ctx)
	return &Session{
		id:        NewSessionID(),
		stream:    stream,
		proto:     e.cfg.Name,
		log:       e.cfg.Logger,
		certs:     &e.certs,
		ctx:       ctx,
		cancel:    cancel,
		done:      make(chan struct{}),
		connected: make(chan struct{}),
	}
}
