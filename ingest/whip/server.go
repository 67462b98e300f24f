// Package whip is Stemflow's WebRTC ingest: a WHIP server (RFC 9725) that
// lets a browser, OBS or any WHIP client publish a stream into the relay hub.
//
// POST /whip/{stream} with an SDP offer creates a session: the server answers
// 201 Created with the SDP answer (all ICE candidates included, no trickle)
// and the session URL /whip/{stream}/{id} in Location, publishes the stream
// to the hub at once and writes every RTP packet it receives into it. DELETE
// on the session URL ends the stream; PATCH is answered 405 (no trickle ICE,
// no ICE restart). The relay carries H264 (packetization-mode=1, any
// profile), VP8 and Opus; H264 is preferred over VP8 when both are offered,
// because every egress can carry it.
package whip

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/pion/interceptor"
	"github.com/pion/interceptor/pkg/nack"
	"github.com/pion/interceptor/pkg/report"
	"github.com/pion/webrtc/v4"

	"github.com/stemflow/stemflow/internal/rtc"
	"github.com/stemflow/stemflow/relay"
)

// Prefix is the path the server answers under; mount it with
// mux.Handle(whip.Prefix, srv).
const Prefix = "/whip/"

const (
	proto          = "whip"
	answerTimeout  = 10 * time.Second
	connectTimeout = 15 * time.Second
)

// Config configures a Server.
type Config struct {
	Hub *relay.Hub
	RTC *rtc.Engine
	// Token, when set, is the bearer token publishers must present
	// (Authorization: Bearer <token>). Empty lets anyone publish.
	Token  string
	Logger *slog.Logger
	// ConnectTimeout is how long a session may take to connect before it is
	// dropped and its stream ended (default 15s).
	ConnectTimeout time.Duration
}

// Server is the WHIP endpoint. It implements http.Handler for every path
// under Prefix and is safe for concurrent use. Each session is owned by one
// goroutine; Close ends them all and waits.
type Server struct {
	cfg Config
	log *slog.Logger

	ctx    context.Context
	cancel context.CancelCauseFunc
	wg     sync.WaitGroup

	mu       sync.Mutex // guards the following fields
	sessions map[string]*session
}

var _ http.Handler = (*Server)(nil)

// ErrServerClosed is the reason sessions end when the server closes.
var ErrServerClosed = errors.New("whip: server closed")

// New returns a WHIP server publishing into cfg.Hub.
func New(cfg Config) *Server {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = connectTimeout
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	return &Server{
		cfg:      cfg,
		log:      cfg.Logger.With("component", "whip"),
		ctx:      ctx,
		cancel:   cancel,
		sessions: make(map[string]*session),
	}
}

// Close ends every session (and so its stream) and waits for them.
func (s *Server) Close() error {
	s.cancel(ErrServerClosed)
	s.wg.Wait()
	return nil
}

// Sessions returns the number of live sessions.
func (s *Server) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}

// ServeHTTP routes POST /whip/{stream}, DELETE and PATCH /whip/{stream}/{id}
// and OPTIONS on both.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rest, ok := strings.CutPrefix(r.URL.Path, Prefix)
	if !ok {
		rtc.WriteError(w, rtc.Errorf(http.StatusNotFound, "whip: %s is not a WHIP URL: POST to %s{stream}", r.URL.Path, Prefix))
		return
	}
	stream, id, isSession := strings.Cut(rest, "/")
	if isSession {
		rtc.SetCORS(w.Header(), "DELETE, PATCH, OPTIONS")
		switch r.Method {
		case http.MethodOptions:
			w.WriteHeader(http.StatusNoContent)
		case http.MethodDelete:
			s.handleDelete(w, r, stream, id)
		case http.MethodPatch:
			w.Header().Set("Allow", "DELETE, OPTIONS")
			rtc.WriteError(w, rtc.Errorf(http.StatusMethodNotAllowed,
				"whip: this server does not support trickle ICE or ICE restarts: every candidate is in the answer"))
		default:
			w.Header().Set("Allow", "DELETE, OPTIONS")
			rtc.WriteError(w, rtc.Errorf(http.StatusMethodNotAllowed, "whip: %s is not allowed on a session: use DELETE to stop publishing", r.Method))
		}
		return
	}
	rtc.SetCORS(w.Header(), "POST, OPTIONS")
	switch r.Method {
	case http.MethodOptions:
		w.Header().Set("Accept-Post", "application/sdp")
		w.WriteHeader(http.StatusNoContent)
	case http.MethodPost:
		s.handlePost(w, r, stream)
	default:
		w.Header().Set("Allow", "POST, OPTIONS")
		rtc.WriteError(w, rtc.Errorf(http.StatusMethodNotAllowed, "whip: %s is not allowed: POST an SDP offer to publish", r.Method))
	}
}

func (s *Server) handlePost(w http.ResponseWriter, r *http.Request, stream string) {
	answer, sess, err := s.publish(r.Context(), w, r, stream)
	if err != nil {
		var he *rtc.HTTPError
		if !errors.As(err, &he) {
			s.log.Warn("publish failed", "stream", stream, "remote", r.RemoteAddr, "err", err)
		}
		rtc.WriteError(w, err)
		return
	}
	w.Header().Set("Location", Prefix+stream+"/"+sess.id)
	w.Header().Set("ETag", `"`+sess.id+`"`)
	w.Header().Set("Content-Type", "application/sdp")
	w.WriteHeader(http.StatusCreated)
	_, _ = w.Write([]byte(answer))
}

func (s *Server) handleDelete(w http.ResponseWriter, r *http.Request, stream, id string) {
	if err := rtc.CheckBearer(r, s.cfg.Token, proto); err != nil {
		rtc.WriteError(w, err)
		return
	}
	s.mu.Lock()
	sess := s.sessions[id]
	s.mu.Unlock()
	if sess == nil || sess.stream != stream {
		rtc.WriteError(w, rtc.Errorf(http.StatusNotFound, "whip: no session %s for stream %q: it has ended or never existed", id, stream))
		return
	}
	sess.cancel(errDeleted)
	<-sess.done
	w.WriteHeader(http.StatusOK)
}

var (
	errDeleted    = errors.New("publisher sent DELETE")
	errNotStarted = errors.New("session not started")
)

// publish does the work of a POST. Its user errors are *rtc.HTTPError.
func (s *Server) publish(ctx context.Context, w http.ResponseWriter, r *http.Request, stream string) (string, *session, error) {
	if err := rtc.CheckBearer(r, s.cfg.Token, proto); err != nil {
		return "", nil, err
	}
	if err := relay.ValidateStreamName(stream); err != nil {
		return "", nil, rtc.Errorf(http.StatusBadRequest, "whip: bad stream name in the URL: %v", err)
	}
	offer, err := rtc.ReadOffer(w, r, proto)
	if err != nil {
		return "", nil, err
	}
	video, audio := chooseCodecs(offer)
	if video == nil && audio == nil {
		return "", nil, rtc.Errorf(http.StatusBadRequest,
			"whip: offer has no %s: publish with one of these codecs", rtc.SupportedCodecs)
	}

	sess := newSession(s, stream)
	started := false
	defer func() {
		if !started {
			sess.cancel(errNotStarted) // release the context
		}
	}()
	var desc relay.Description
	m := &webrtc.MediaEngine{}
	for _, c := range []*rtc.Codec{video, audio} {
		if c == nil {
			continue
		}
		t := c.Track()
		sess.trackOf[t.Kind] = len(desc.Tracks)
		desc.Tracks = append(desc.Tracks, t)
		params := c.Parameters(rtc.FeedbackNACK, rtc.FeedbackPLI, rtc.FeedbackFIR)
		if err := m.RegisterCodec(params, rtc.CodecType(t.Kind)); err != nil {
			return "", nil, rtc.Errorf(http.StatusBadRequest, "whip: offer's %s codec: %v", t.MimeType, err)
		}
	}
	ir, err := ingestInterceptors(m)
	if err != nil {
		return "", nil, err
	}

	sess.pub, err = s.cfg.Hub.Publish(stream, desc, relay.PublishOptions{OnKeyframeRequest: sess.requestKeyframe})
	switch {
	case errors.Is(err, relay.ErrStreamExists):
		return "", nil, rtc.Errorf(http.StatusConflict, "whip: %v: stop the other publisher or pick another stream name", err)
	case errors.Is(err, relay.ErrClosed):
		return "", nil, rtc.Errorf(http.StatusServiceUnavailable, "whip: the node is shutting down: publish to another node")
	case err != nil:
		return "", nil, rtc.Errorf(http.StatusBadRequest, "whip: %v", err)
	}

	answer, err := sess.start(ctx, s.cfg.RTC.NewAPI(m, ir), offer.SDP)
	if err != nil {
		sess.pub.Close()
		return "", nil, err
	}
	started = true
	return answer, sess, nil
}

// chooseCodecs picks the codec the publisher will send in its first video
// and first audio section: its most preferred H264 with
// packetization-mode=1, else VP8; Opus for audio.
func chooseCodecs(o *rtc.Offer) (video, audio *rtc.Codec) {
	for i := range o.Media {
		m := &o.Media[i]
		if m.Direction != "sendonly" && m.Direction != "sendrecv" {
			continue
		}
		switch {
		case m.Kind == relay.KindVideo && video == nil:
			for _, mime := range []string{relay.MimeH264, relay.MimeVP8} {
				for j := range m.Codecs {
					if c := &m.Codecs[j]; video == nil && c.MimeType == mime && c.Supported() {
						video = c
					}
				}
			}
		case m.Kind == relay.KindAudio && audio == nil:
			for j := range m.Codecs {
				if c := &m.Codecs[j]; audio == nil && c.MimeType == relay.MimeOpus && c.Supported() {
					audio = c
				}
			}
		}
	}
	return video, audio
}

// ingestInterceptors returns what a publisher's PeerConnection needs: NACKs
// to recover lost packets, receiver reports, and transport-wide congestion
// control feedback so that browsers raise their bitrate. No NACK responder:
// an ingest sends no media.
func ingestInterceptors(m *webrtc.MediaEngine) (*interceptor.Registry, error) {
	ir := &interceptor.Registry{}
	gen, err := nack.NewGeneratorInterceptor()
	if err != nil {
		return nil, fmt.Errorf("whip: nack generator: %w", err)
	}
	ir.Add(gen)
	rr, err := report.NewReceiverInterceptor()
	if err != nil {
		return nil, fmt.Errorf("whip: receiver reports: %w", err)
	}
	ir.Add(rr)
	if err := webrtc.ConfigureTWCCSender(m, ir); err != nil {
		return nil, fmt.Errorf("whip: transport-cc: %w", err)
	}
	return ir, nil
}
