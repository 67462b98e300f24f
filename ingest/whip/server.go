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
	ep  *rtc.Endpoint[*session]
}

var _ http.Handler = (*Server)(nil)

// ErrServerClosed is the reason sessions end when the server closes.
var ErrServerClosed = errors.New("whip: server closed")

// New returns a WHIP server publishing into cfg.Hub.
func New(cfg Config) *Server {
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = connectTimeout
	}
	s := &Server{cfg: cfg}
	s.ep = rtc.NewEndpoint(rtc.EndpointConfig[*session]{
		Name: proto, Verb: "publish", Doing: "publishing", Elsewhere: "publish to another node",
		Token: cfg.Token, Logger: cfg.Logger, ErrClosed: ErrServerClosed, Start: s.publish,
	})
	return s
}

// Close ends every session (and so its stream) and waits for them.
func (s *Server) Close() error { return s.ep.Close() }

// Sessions returns the number of live sessions.
func (s *Server) Sessions() int { return s.ep.Len() }

// ServeHTTP routes POST /whip/{stream}, DELETE and PATCH /whip/{stream}/{id}
// and OPTIONS on both.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.ep.ServeHTTP(w, r) }

// publish starts a session for an authorized POST of offer to a valid
// stream name (the rtc.Endpoint checked both). Its user errors are
// *rtc.HTTPError.
func (s *Server) publish(ctx context.Context, rs *rtc.Session, offer *rtc.Offer) (*session, string, error) {
	video, audio := chooseCodecs(offer)
	if video == nil && audio == nil {
		if receivesOnly(offer) {
			// WHEP is mounted beside WHIP at /whep/ (node/).
			return nil, "", rtc.Errorf(http.StatusBadRequest, "whip: the offer only receives media (a=recvonly); "+
				"a WHIP publisher must send (sendonly or sendrecv): did you mean WHEP at /whep/%s?", rs.Stream())
		}
		return nil, "", rtc.Errorf(http.StatusBadRequest,
			"whip: offer has no %s: publish with one of these codecs", rtc.SupportedCodecs)
	}

	sess := newSession(s, rs)
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
			return nil, "", rtc.Errorf(http.StatusBadRequest, "whip: offer's %s codec: %v", t.MimeType, err)
		}
	}
	ir, err := ingestInterceptors(m)
	if err != nil {
		return nil, "", err
	}

	sess.pub, err = s.cfg.Hub.Publish(rs.Stream(), desc, relay.PublishOptions{OnKeyframeRequest: sess.requestKeyframe})
	switch {
	case errors.Is(err, relay.ErrStreamExists):
		return nil, "", rtc.Errorf(http.StatusConflict, "whip: %v: stop the other publisher or pick another stream name", err)
	case errors.Is(err, relay.ErrClosed):
		return nil, "", rtc.Errorf(http.StatusServiceUnavailable, "whip: the node is shutting down: publish to another node")
	case err != nil:
		return nil, "", rtc.Errorf(http.StatusBadRequest, "whip: %v", err)
	}

	answer, err := sess.start(ctx, s.cfg.RTC.NewAPI(m, ir), offer.SDP)
	if err != nil {
		sess.pub.Close()
		return nil, "", err
	}
	return sess, answer, nil
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

// receivesOnly reports whether no audio or video section of o sends and
// at least one receives: a viewer's offer (WHEP) sent to WHIP.
func receivesOnly(o *rtc.Offer) bool {
	recv := false
	for _, m := range o.Media {
		if m.Kind == 0 {
			continue
		}
		switch m.Direction {
		case "sendonly", "sendrecv":
			return false
		case "recvonly":
			recv = true
		}
	}
	return recv
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
