package rtsp

import (
	"errors"
	"log/slog"
	"strings"
	"sync"

	"github.com/bluenviron/gortsplib/v4"
	"github.com/bluenviron/gortsplib/v4/pkg/base"
	"github.com/pion/rtp"

	"github.com/stemflow/stemflow/relay"
)

// Config configures a Handler.
type Config struct {
	// Hub receives the published streams. Required.
	Hub *relay.Hub
	// Token, when set, is the password publishers must give, with any user
	// name, in RTSP Basic or Digest authentication: ffmpeg and OBS take it
	// in the URL, rtsp://user:TOKEN@host:8554/x. Empty lets anyone publish.
	Token  string
	Logger *slog.Logger
}

// Handler accepts RTSP publishers (ANNOUNCE, SETUP, RECORD) on a
// gortsplib.Server and publishes their streams into the hub under the URL's
// path: rtsp://host:8554/x publishes stream "x". The server's handler calls
// the On* methods; they are safe for concurrent use.
type Handler struct {
	hub   *relay.Hub
	log   *slog.Logger
	token string

	mu         sync.Mutex // guards the following fields
	sessions   map[*gortsplib.ServerSession]*ingestStream
	challenged map[*gortsplib.ServerConn]challenge
	closed     bool
}

// NewHandler returns a Handler publishing into cfg.Hub.
func NewHandler(cfg Config) *Handler {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Handler{
		hub:        cfg.Hub,
		log:        log.With("component", "ingest/rtsp"),
		token:      cfg.Token,
		sessions:   make(map[*gortsplib.ServerSession]*ingestStream),
		challenged: make(map[*gortsplib.ServerConn]challenge),
	}
}

// OnAnnounce checks the publisher's credentials and the announced stream,
// and publishes it into the hub. Missing or wrong credentials (when a token
// is set) are refused with 401, a stream with no H264, VP8 or Opus track
// with 415, a name that is live (here or in another datacenter) or invalid
// with 403, all with a reason phrase saying what to do.
func (h *Handler) OnAnnounce(ctx *gortsplib.ServerHandlerOnAnnounceCtx) (*base.Response, error) {
	name := strings.TrimPrefix(ctx.Path, "/")
	log := h.log.With("stream", name, "remote", ctx.Conn.NetConn().RemoteAddr().String())
	if res, err := h.authorize(ctx, log); res != nil {
		return res, err
	}
	if err := relay.ValidateStreamName(name); err != nil {
		// Not 400: ffmpeg prints the reason phrase only for codes above 400.
		log.Info("publisher refused", "error", err)
		return refusal(base.StatusForbidden, "rtsp: "+err.Error()+" (publish to rtsp://host:port/<name>)"), nil
	}
	tracks, skipped, err := plan(ctx.Description)
	if err != nil {
		log.Info("publisher refused", "error", err)
		return refusal(base.StatusUnsupportedMediaType, "rtsp: "+err.Error()), nil
	}
	if skipped != "" {
		log.Warn("publishing only the supported tracks", "skipped", skipped, "supported", supportedCodecs)
	}
	session := ctx.Session
	st, err := newIngestStream(h.hub, name, tracks, log, func(err error) {
		log.Warn("cannot publish the stream: ending the RTSP session", "error", err)
		session.Close()
	})
	if err == nil {
		err = st.start()
	}
	if err != nil {
		log.Info("publisher refused", "error", err)
		switch {
		case errors.Is(err, relay.ErrStreamExists):
			return refusal(base.StatusForbidden, "rtsp: "+err.Error()+": pick another name or stop the other publisher"), nil
		case errors.Is(err, relay.ErrClosed):
			return refusal(base.StatusServiceUnavailable, "rtsp: server is shutting down: retry on another node"), nil
		}
		return refusal(base.StatusInternalServerError, "rtsp: "+err.Error()), nil
	}

	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		st.close()
		return refusal(base.StatusServiceUnavailable, "rtsp: server is shutting down: retry on another node"), nil
	}
	h.sessions[session] = st
	h.mu.Unlock()
	log.Info("RTSP publisher announced", "tracks", len(tracks))
	return &base.Response{StatusCode: base.StatusOK}, nil
}

// OnSetup accepts the SETUP of a session that announced a stream.
func (h *Handler) OnSetup(ctx *gortsplib.ServerHandlerOnSetupCtx) (*base.Response, *gortsplib.ServerStream, error) {
	if h.stream(ctx.Session) == nil {
		return refusal(base.StatusBadRequest, "rtsp: SETUP for recording without a successful ANNOUNCE"), nil, nil
	}
	return &base.Response{StatusCode: base.StatusOK}, nil, nil
}

// OnRecord starts forwarding the session's packets into the hub.
func (h *Handler) OnRecord(ctx *gortsplib.ServerHandlerOnRecordCtx) (*base.Response, error) {
	st := h.stream(ctx.Session)
	if st == nil {
		return refusal(base.StatusBadRequest, "rtsp: RECORD without a successful ANNOUNCE"), nil
	}
	for _, t := range st.tracks {
		ctx.Session.OnPacketRTP(t.media, t.format, func(pkt *rtp.Packet) { st.handle(t, pkt) })
	}
	return &base.Response{StatusCode: base.StatusOK}, nil
}

// OnSessionClose ends the stream of a publishing session, if it is one.
func (h *Handler) OnSessionClose(ctx *gortsplib.ServerHandlerOnSessionCloseCtx) {
	h.mu.Lock()
	st := h.sessions[ctx.Session]
	delete(h.sessions, ctx.Session)
	h.mu.Unlock()
	if st == nil {
		return
	}
	st.close()
	st.log.Info("RTSP publisher left", "reason", ctx.Error, "packets", st.packetsIn.Load(), "errors", st.errorsIn.Load())
}

// Close ends every publication and refuses new ones. The gortsplib.Server
// should be closed first.
func (h *Handler) Close() {
	h.mu.Lock()
	h.closed = true
	streams := make([]*ingestStream, 0, len(h.sessions))
	for ss, st := range h.sessions {
		streams = append(streams, st)
		delete(h.sessions, ss)
	}
	h.mu.Unlock()
	for _, st := range streams {
		st.close()
	}
}

func (h *Handler) stream(ss *gortsplib.ServerSession) *ingestStream {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.sessions[ss]
}

// refusal returns an RTSP error response whose reason phrase is msg, so that
// clients show it (ffmpeg prints "method ANNOUNCE failed: 415 <msg>"). The
// phrase is kept on one line and under 250 bytes.
func refusal(code base.StatusCode, msg string) *base.Response {
	msg = strings.NewReplacer("\r", " ", "\n", " ").Replace(msg)
	if len(msg) > 250 {
		msg = msg[:247] + "..."
	}
	return &base.Response{StatusCode: code, StatusMessage: msg}
}
