// Package whep is Stemflow's WebRTC egress: a WHEP server that plays any
// stream of the relay hub to browsers and other WebRTC viewers.
//
// POST /whep/{stream} with an SDP offer subscribes a new viewer: the server
// answers 201 Created with the SDP answer (all ICE candidates included, no
// trickle) and the session URL /whep/{stream}/{id} in Location; DELETE on it
// ends the viewer. The answer holds only codecs the stream has, with payload
// types the viewer offered. For an H264 stream it picks the viewer's
// packetization-mode=1 H264 format, preferring 42e01f, whatever profile the
// stream is: browsers offer no High profile but decode it.
//
// A new viewer is sent the stream's cached GOP once it is connected (SRTP
// running), paced by relay.Pacer: the keyframe first, the rest at 4× the
// stream's own rate, then live packets with nothing lost or reordered, so
// that a viewer whose socket has the kernel's default receive buffer loses
// nothing to the burst.
//
// The forward path is built for many viewers per stream: each viewer has its
// own bounded relay.Queue, drained by the viewer's own goroutine into its own
// webrtc.TrackLocal (a slow viewer drops and counts its own packets and
// holds back nobody); the per-packet path does not allocate; pion's default
// NACK responder (1024 packets per PeerConnection) is replaced by one
// retransmission cache per stream track shared by the node's viewers.
package whep

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/pion/interceptor"
	"github.com/pion/webrtc/v4"

	"github.com/stemflow/stemflow/internal/rtc"
	"github.com/stemflow/stemflow/relay"
)

// Prefix is the path the server answers under; mount it with
// mux.Handle(whep.Prefix, srv).
const Prefix = "/whep/"

const proto = "whep"

// Config configures a Server.
type Config struct {
	Hub *relay.Hub
	RTC *rtc.Engine
	// Token, when set, is the bearer token viewers must present. Empty lets
	// anyone watch.
	Token  string
	Logger *slog.Logger
	// QueueSize is the number of packets a viewer may lag behind before its
	// packets are dropped (default 1024). The GOP replay does not go through
	// the queue (the viewer takes it from the hub once connected); the queue
	// holds the live packets that wait behind the paced replay (about a
	// quarter of the GOP: ~150 packets for 2 s at 4 Mbit/s, ~1000 for a GOP
	// at the hub's 4096-packet limit) and a slow viewer's lag. It holds
	// pointers to pooled buffers in a ring that grows with what is queued
	// and is let go once a burst has drained (see viewerQueue).
	QueueSize int
	// SubscribeTimeout bounds the wait for a stream's description, which
	// may come from another datacenter (default 5s).
	SubscribeTimeout time.Duration
	// ConnectTimeout is how long a viewer may take to connect (default 15s).
	ConnectTimeout time.Duration
}

// Server is the WHEP endpoint. It implements http.Handler for every path
// under Prefix and is safe for concurrent use. Each viewer is owned by one
// goroutine; Close ends them all and waits.
type Server struct {
	cfg Config
	ep  *rtc.Endpoint[*viewer]

	mu     sync.Mutex // guards the following fields
	caches map[*relay.Stream]*streamCache
	// Totals of the viewers that have ended (those with ended set), so that
	// Stats counts every viewer once.
	endedSent, endedDropped, endedResent, endedKeyReqs, endedWriteErrs uint64
}

var _ http.Handler = (*Server)(nil)

// ErrServerClosed is the reason viewers end when the server closes.
var ErrServerClosed = errors.New("whep: server closed")

// New returns a WHEP server playing streams of cfg.Hub.
func New(cfg Config) *Server {
	if cfg.QueueSize <= 0 {
		cfg.QueueSize = 1024
	}
	if cfg.SubscribeTimeout <= 0 {
		cfg.SubscribeTimeout = 5 * time.Second
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = 15 * time.Second
	}
	s := &Server{
		cfg:    cfg,
		caches: make(map[*relay.Stream]*streamCache),
	}
	s.ep = rtc.NewEndpoint(rtc.EndpointConfig[*viewer]{
		Name: proto, Verb: "watch", Doing: "watching", Elsewhere: "watch from another node",
		Token: cfg.Token, Logger: cfg.Logger, ErrClosed: ErrServerClosed, Start: s.play,
	})
	return s
}

// Close ends every viewer and waits for them.
func (s *Server) Close() error { return s.ep.Close() }

// Stats are the server's counters.
type Stats struct {
	Viewers int
	// PacketsSent counts RTP packets written to viewers, retransmissions
	// excluded.
	PacketsSent uint64
	// PacketsDropped counts packets dropped because a viewer's queue was
	// full (the viewer was too slow).
	PacketsDropped uint64
	// Retransmissions counts packets resent from the cache on NACK.
	Retransmissions uint64
	// KeyframeRequests counts PLIs and FIRs received from viewers.
	KeyframeRequests uint64
	// WriteErrors counts packets lost because writing them to a viewer's
	// connection failed (a send error, or SRTP not running).
	WriteErrors uint64
}

// Stats returns the server's counters, summed over live and ended viewers.
func (s *Server) Stats() Stats {
	live := s.ep.Sessions()
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Stats{
		PacketsSent:      s.endedSent,
		PacketsDropped:   s.endedDropped,
		Retransmissions:  s.endedResent,
		KeyframeRequests: s.endedKeyReqs,
		WriteErrors:      s.endedWriteErrs,
	}
	for _, v := range live {
		if v.ended {
			continue // in the totals already
		}
		st.Viewers++
		st.PacketsSent += v.sent.Load()
		st.PacketsDropped += v.q.Dropped()
		st.Retransmissions += v.resent.Load()
		st.KeyframeRequests += v.keyReqs.Load()
		st.WriteErrors += v.writeErrs.Load()
	}
	return st
}

// ServeHTTP routes POST /whep/{stream}, DELETE and PATCH /whep/{stream}/{id}
// and OPTIONS on both.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.ep.ServeHTTP(w, r) }

// play starts a viewer for an authorized POST of offer to a valid stream
// name (the rtc.Endpoint checked both). Its user errors are
// *rtc.HTTPError.
func (s *Server) play(ctx context.Context, rs *rtc.Session, offer *rtc.Offer) (*viewer, string, error) {
	stream := rs.Stream()
	q := newViewerQueue(s.cfg.QueueSize)
	sctx, cancel := context.WithTimeout(ctx, s.cfg.SubscribeTimeout)
	sub, err := s.cfg.Hub.Subscribe(sctx, stream, q)
	cancel()
	if err != nil {
		return nil, "", subscribeError(stream, err)
	}
	fail := func(err error) (*viewer, string, error) {
		sub.Close()
		q.Drain()
		return nil, "", err
	}

	desc := sub.Description()
	choices, err := chooseCodecs(stream, desc, offer)
	if err != nil {
		return fail(err)
	}
	cache, err := s.acquireCache(ctx, stream, sub)
	if err != nil {
		return fail(err)
	}
	v := newViewer(s, rs, sub, q, cache)
	m := &webrtc.MediaEngine{}
	for _, c := range choices {
		fb := []webrtc.RTCPFeedback(nil)
		if c.track.Kind == relay.KindVideo {
			fb = []webrtc.RTCPFeedback{rtc.FeedbackNACK, rtc.FeedbackPLI, rtc.FeedbackFIR}
		}
		if err := m.RegisterCodec(c.codec.Parameters(fb...), rtc.CodecType(c.track.Kind)); err != nil {
			s.releaseCache(cache)
			return fail(rtc.Errorf(http.StatusBadRequest, "whep: offer's %s codec: %v", c.codec.MimeType, err))
		}
		v.addTrack(c.index, c.track, c.codec)
	}
	ir, err := egressInterceptors()
	if err != nil {
		s.releaseCache(cache)
		return fail(err)
	}
	// pion keeps the remote description for the viewer's lifetime: only
	// the formats sent stay in it.
	keep := make(map[int]uint8, len(choices))
	for _, c := range choices {
		keep[c.section] = c.codec.PayloadType
	}
	answer, err := v.start(ctx, s.cfg.RTC.NewSenderAPI(m, ir, v.handleRTCP), rtc.TrimOffer(offer.SDP, keep))
	if err != nil {
		s.releaseCache(cache)
		return fail(err)
	}
	return v, answer, nil
}

func subscribeError(stream string, err error) error {
	switch {
	case errors.Is(err, relay.ErrStreamNotFound):
		return rtc.Errorf(http.StatusNotFound, "whep: stream %q is not live: start publishing it, or check the name", stream)
	case errors.Is(err, context.DeadlineExceeded):
		return rtc.Errorf(http.StatusGatewayTimeout, "whep: stream %q did not start within the subscribe timeout: try again", stream)
	case errors.Is(err, relay.ErrClosed):
		return rtc.Errorf(http.StatusServiceUnavailable, "whep: the node is shutting down: watch from another node")
	case errors.Is(err, context.Canceled):
		return rtc.Errorf(http.StatusServiceUnavailable, "whep: request canceled")
	}
	return rtc.Errorf(http.StatusNotFound, "whep: stream %q: %v", stream, err)
}

// egressInterceptors returns no interceptor: each track sends its own RTCP
// sender reports from the writing goroutine (outTrack.write) and NACKs are
// answered from the shared per-stream cache. pion's report interceptor
// cost each viewer a goroutine and per-stream state (~6 KB of RSS).
func egressInterceptors() (*interceptor.Registry, error) {
	return &interceptor.Registry{}, nil
}

// choice is a stream track and the offered codec it is sent as, in the
// offer's media section (0-based) section.
type choice struct {
	index   int
	track   relay.Track
	codec   *rtc.Codec
	section int
}

// chooseCodecs matches the first video and first audio track of the stream
// with the offer's first receiving section of the same kind. A kind the offer
// has no section for is not sent; a section that lacks the track's codec is
// an error.
func chooseCodecs(stream string, desc relay.Description, o *rtc.Offer) ([]choice, error) {
	var out []choice
	for _, kind := range []relay.Kind{relay.KindVideo, relay.KindAudio} {
		idx := desc.TrackOf(kind)
		if idx < 0 {
			continue
		}
		t := desc.Tracks[idx]
		var media *rtc.Media
		section := -1
		for i := range o.Media {
			if m := &o.Media[i]; m.Kind == kind && (m.Direction == "recvonly" || m.Direction == "sendrecv") {
				media, section = m, i
				break
			}
		}
		if media == nil {
			continue
		}
		c := pickCodec(t, media)
		if c == nil {
			want := t.MimeType
			if t.MimeType == relay.MimeH264 {
				want = "H264 with packetization-mode=1"
			}
			return nil, rtc.Errorf(http.StatusBadRequest,
				"whep: stream %q sends %s but the offer's %s section does not offer %s: offer that codec to play this stream",
				stream, t.MimeType, kind, want)
		}
		out = append(out, choice{index: idx, track: t, codec: c, section: section})
	}
	if len(out) == 0 {
		return nil, rtc.Errorf(http.StatusBadRequest,
			"whep: the offer has no receiving audio or video section for stream %q: add recvonly transceivers", stream)
	}
	return out, nil
}

// pickCodec returns the offered codec to send track t as: the same codec;
// for H264, one with packetization-mode=1, preferably profile-level-id
// 42e01f, then any constrained-baseline or baseline one, then any.
func pickCodec(t relay.Track, m *rtc.Media) *rtc.Codec {
	var best *rtc.Codec
	bestRank := -1
	for i := range m.Codecs {
		c := &m.Codecs[i]
		if c.MimeType != t.MimeType || !c.Supported() {
			continue
		}
		rank := 0
		if t.MimeType == relay.MimeH264 {
			switch plid := c.ProfileLevelID(); {
			case plid == "42e01f":
				rank = 3
			case strings.HasPrefix(plid, "42e0"):
				rank = 2
			case strings.HasPrefix(plid, "42"):
				rank = 1
			}
		}
		if rank > bestRank {
			best, bestRank = c, rank
		}
	}
	return best
}

// acquireCache returns the shared retransmission cache of the viewer's
// stream, subscribing it when it is the stream's first viewer here.
func (s *Server) acquireCache(ctx context.Context, stream string, viewerSub *relay.Subscription) (*streamCache, error) {
	st := viewerSub.Stream()
	s.mu.Lock()
	if c := s.caches[st]; c != nil {
		c.refs++
		s.mu.Unlock()
		return c, nil
	}
	s.mu.Unlock()

	c := newStreamCache(viewerSub.Description())
	c.stream = st
	sub, err := s.cfg.Hub.Subscribe(ctx, stream, c)
	if err != nil {
		c.close()
		return nil, subscribeError(stream, err)
	}
	c.sub = sub
	if sub.Stream() != st {
		// The stream ended and started again between the two subscriptions.
		c.close()
		return nil, rtc.Errorf(http.StatusServiceUnavailable, "whep: stream %q restarted: try again", stream)
	}
	s.mu.Lock()
	if old := s.caches[st]; old != nil {
		old.refs++
		s.mu.Unlock()
		c.close()
		return old, nil
	}
	c.refs = 1
	s.caches[st] = c
	s.mu.Unlock()
	return c, nil
}

func (s *Server) releaseCache(c *streamCache) {
	s.mu.Lock()
	c.refs--
	last := c.refs == 0
	if last {
		delete(s.caches, c.stream)
	}
	s.mu.Unlock()
	if last {
		c.close()
	}
}
