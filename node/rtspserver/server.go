// Package rtspserver runs a node's one RTSP port. Publishers (ANNOUNCE,
// RECORD) go to ingest/rtsp and readers (DESCRIBE, SETUP, PLAY) to
// egress/rtsp, which share a single gortsplib.Server; the configured cameras
// are pulled with ingest/rtsp sources.
//
// Ports: RTSP on Config.Address (TCP, also carrying interleaved RTP with
// "-rtsp_transport tcp"). RTP over UDP uses the RTSP port + 1000 and RTCP the
// RTSP port + 1001 on the same IP (8554 → 9554 and 9555). gortsplib needs an
// even RTP port, so the RTSP port must be even; several nodes on one host
// need RTSP ports at least 2 apart (8554, 8556, ...). Config.UDPRTPAddress
// and UDPRTCPAddress override the derivation; DisableUDP turns UDP off.
package rtspserver

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bluenviron/gortsplib/v4"
	"github.com/bluenviron/gortsplib/v4/pkg/base"

	egress "github.com/stemflow/stemflow/egress/rtsp"
	ingest "github.com/stemflow/stemflow/ingest/rtsp"
	"github.com/stemflow/stemflow/relay"
)

// UDP ports are derived from the RTSP port by these offsets.
const (
	RTPPortOffset  = 1000
	RTCPPortOffset = 1001
)

// Config configures a Server.
type Config struct {
	// Address is the RTSP listen address, e.g. "127.0.0.1:8554". Its port
	// must be even unless UDP is disabled or its addresses are given.
	Address string
	// Hub is the node's relay hub. Required.
	Hub    *relay.Hub
	Logger *slog.Logger
	// Sources maps stream names to rtsp:// camera URLs to pull and publish.
	Sources map[string]string
	// UDPRTPAddress and UDPRTCPAddress override the derived UDP ports.
	UDPRTPAddress, UDPRTCPAddress string
	// DisableUDP serves RTSP over TCP only.
	DisableUDP bool
	// PublishToken, when set, is the password RTSP publishers must give
	// (with any user name, in RTSP Basic or Digest authentication; ffmpeg:
	// rtsp://user:TOKEN@host:8554/name). Readers need none.
	PublishToken string
	// SubscribeTimeout is how long a DESCRIBE waits for a stream from
	// another datacenter (default 5s).
	SubscribeTimeout time.Duration
}

// Server is a node's RTSP server. New starts it; Close stops it.
type Server struct {
	log     *slog.Logger
	rtsp    *gortsplib.Server
	ingest  *ingest.Handler
	egress  *egress.Egress
	sources []*ingest.Source
	addr    string
}

// New starts the RTSP server and the camera sources. Its errors do not say
// "rtsp:"; callers add that.
func New(cfg Config) (*Server, error) {
	if cfg.Hub == nil {
		return nil, errors.New("no relay hub")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	host, portStr, err := net.SplitHostPort(cfg.Address)
	if err != nil {
		return nil, fmt.Errorf("address %q: %v (want host:port, e.g. 127.0.0.1:8554)", cfg.Address, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return nil, fmt.Errorf("address %q: port %q is not a number", cfg.Address, portStr)
	}
	rtpAddr, rtcpAddr := cfg.UDPRTPAddress, cfg.UDPRTCPAddress
	if cfg.DisableUDP {
		rtpAddr, rtcpAddr = "", ""
	} else if (rtpAddr == "") != (rtcpAddr == "") {
		return nil, fmt.Errorf("UDP RTP address %q and RTCP address %q: set both (RTCP port = RTP port + 1, RTP port even) or neither", rtpAddr, rtcpAddr)
	} else if rtpAddr == "" {
		if port == 0 || port%2 != 0 || port+RTCPPortOffset > 65535 {
			return nil, fmt.Errorf("address %q: the RTSP port must be even and at most %d, because the UDP ports are derived from it (RTP = port+%d, RTCP = port+%d); "+
				"or set the UDP addresses, or disable UDP", cfg.Address, 65535-RTCPPortOffset, RTPPortOffset, RTCPPortOffset)
		}
		rtpAddr = net.JoinHostPort(host, strconv.Itoa(port+RTPPortOffset))
		rtcpAddr = net.JoinHostPort(host, strconv.Itoa(port+RTCPPortOffset))
	}

	s := &Server{log: log.With("component", "rtspserver"), addr: cfg.Address}
	var bound net.Listener
	s.ingest = ingest.NewHandler(ingest.Config{Hub: cfg.Hub, Token: cfg.PublishToken, Logger: log})
	s.rtsp = &gortsplib.Server{
		RTSPAddress:    cfg.Address,
		UDPRTPAddress:  rtpAddr,
		UDPRTCPAddress: rtcpAddr,
		// Room for a GOP replay to a new reader.
		WriteQueueSize: 4096,
		// The relay carries packets of up to 1500 bytes; ingest makes them
		// at most relay.OverlayPacketSize.
		MaxPacketSize: 1472,
		Listen: func(network, address string) (net.Listener, error) {
			l, err := net.Listen(network, address)
			bound = l
			return l, err
		},
	}
	s.egress = egress.New(egress.Config{Hub: cfg.Hub, Server: s.rtsp, Logger: log, SubscribeTimeout: cfg.SubscribeTimeout})
	s.rtsp.Handler = &handler{s: s}
	if err := s.rtsp.Start(); err != nil {
		return nil, fmt.Errorf("cannot listen on %s (UDP %s, %s): %w", cfg.Address, rtpAddr, rtcpAddr, err)
	}
	if bound != nil {
		s.addr = bound.Addr().String() // port 0 was given: report the real one
	}

	names := make([]string, 0, len(cfg.Sources))
	for name := range cfg.Sources {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		src, err := ingest.NewSource(ingest.SourceConfig{Hub: cfg.Hub, Name: name, URL: cfg.Sources[name], Logger: log})
		if err != nil {
			s.Close()
			return nil, err
		}
		s.sources = append(s.sources, src)
	}
	s.log.Info("RTSP server listening", "address", s.addr, "udp_rtp", rtpAddr, "udp_rtcp", rtcpAddr, "sources", len(names))
	return s, nil
}

// Addr returns the RTSP listen address.
func (s *Server) Addr() string { return s.addr }

// Close stops the sources and the server, ends the streams published through
// it, disconnects its readers, and waits for every goroutine.
func (s *Server) Close() {
	for _, src := range s.sources {
		src.Close()
	}
	s.rtsp.Close()
	s.ingest.Close()
	s.egress.Close()
}

// handler dispatches the gortsplib server's callbacks to ingest and egress.
type handler struct {
	s *Server

	mu        sync.Mutex // guards lastLog
	lastLog   map[string]time.Time
	lost      atomic.Uint64
	writeErrs atomic.Uint64
}

var (
	_ gortsplib.ServerHandlerOnConnClose        = (*handler)(nil)
	_ gortsplib.ServerHandlerOnDescribe         = (*handler)(nil)
	_ gortsplib.ServerHandlerOnAnnounce         = (*handler)(nil)
	_ gortsplib.ServerHandlerOnSetup            = (*handler)(nil)
	_ gortsplib.ServerHandlerOnPlay             = (*handler)(nil)
	_ gortsplib.ServerHandlerOnRecord           = (*handler)(nil)
	_ gortsplib.ServerHandlerOnSessionClose     = (*handler)(nil)
	_ gortsplib.ServerHandlerOnPacketsLost      = (*handler)(nil)
	_ gortsplib.ServerHandlerOnDecodeError      = (*handler)(nil)
	_ gortsplib.ServerHandlerOnStreamWriteError = (*handler)(nil)
)

func (h *handler) OnConnClose(ctx *gortsplib.ServerHandlerOnConnCloseCtx) {
	h.s.ingest.OnConnClose(ctx)
}

func (h *handler) OnDescribe(ctx *gortsplib.ServerHandlerOnDescribeCtx) (*base.Response, *gortsplib.ServerStream, error) {
	return h.s.egress.OnDescribe(ctx)
}

func (h *handler) OnAnnounce(ctx *gortsplib.ServerHandlerOnAnnounceCtx) (*base.Response, error) {
	return h.s.ingest.OnAnnounce(ctx)
}

func (h *handler) OnSetup(ctx *gortsplib.ServerHandlerOnSetupCtx) (*base.Response, *gortsplib.ServerStream, error) {
	if ctx.Session.State() == gortsplib.ServerSessionStatePreRecord {
		return h.s.ingest.OnSetup(ctx)
	}
	return h.s.egress.OnSetup(ctx)
}

func (h *handler) OnPlay(ctx *gortsplib.ServerHandlerOnPlayCtx) (*base.Response, error) {
	return h.s.egress.OnPlay(ctx)
}

func (h *handler) OnRecord(ctx *gortsplib.ServerHandlerOnRecordCtx) (*base.Response, error) {
	return h.s.ingest.OnRecord(ctx)
}

func (h *handler) OnResponse(sc *gortsplib.ServerConn, res *base.Response) {
	h.s.egress.OnResponse(sc, res)
}

func (h *handler) OnSessionClose(ctx *gortsplib.ServerHandlerOnSessionCloseCtx) {
	h.s.ingest.OnSessionClose(ctx)
	h.s.egress.OnSessionClose(ctx)
}

// OnPacketsLost counts RTP packets lost on the way from publishers.
func (h *handler) OnPacketsLost(ctx *gortsplib.ServerHandlerOnPacketsLostCtx) {
	n := h.lost.Add(ctx.Lost)
	h.limited("lost", func() { h.s.log.Warn("RTP packets lost from RTSP publishers", "lost_total", n) })
}

// OnDecodeError logs undecodable packets, at most once per 10 s.
func (h *handler) OnDecodeError(ctx *gortsplib.ServerHandlerOnDecodeErrorCtx) {
	h.limited("decode", func() { h.s.log.Warn("undecodable RTP/RTCP packet from an RTSP client", "error", ctx.Error) })
}

// OnStreamWriteError counts packets a slow RTSP reader could not take.
func (h *handler) OnStreamWriteError(ctx *gortsplib.ServerHandlerOnStreamWriteErrorCtx) {
	n := h.writeErrs.Add(1)
	h.limited("write", func() {
		h.s.log.Warn("RTSP reader too slow: packets dropped", "error", ctx.Error, "dropped_total", n)
	})
}

// limited runs log at most once per 10 s per key.
func (h *handler) limited(key string, log func()) {
	now := time.Now()
	h.mu.Lock()
	if h.lastLog == nil {
		h.lastLog = make(map[string]time.Time)
	}
	ok := now.Sub(h.lastLog[key]) >= 10*time.Second
	if ok {
		h.lastLog[key] = now
	}
	h.mu.Unlock()
	if ok {
		log()
	}
}
