package rtc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/pion/ice/v4"
	"github.com/pion/interceptor"
	"github.com/pion/transport/v5/packetio"
	"github.com/pion/transport/v5/stdnet"
	"github.com/pion/webrtc/v4"
)

// Config says where WebRTC media may flow.
type Config struct {
	// IPs are the host IPs ICE may gather candidates on, e.g. ["127.0.0.1"]
	// in development or the node's public IP in production. No other address
	// of the machine is ever offered to a peer. At least one is required.
	IPs []string
	// NAT1To1IPs, when set, replace the host candidates' addresses in SDP:
	// one external IP for all of IPs, or one per entry of IPs, in order.
	NAT1To1IPs []string
	// UDPPort, when > 0, makes every PeerConnection share one UDP port per IP
	// (an ICE UDP mux). 0 gives each PeerConnection its own ephemeral port.
	UDPPort int
	// Logger receives pion's warnings and errors. Default slog.Default().
	Logger *slog.Logger
}

// ErrIPNotLocal is returned by New for a configured IP that no network
// interface of this machine has.
var ErrIPNotLocal = errors.New("is not assigned to any network interface of this machine")

// Engine builds pion APIs restricted to the configured IPs. It is safe for
// concurrent use. Close it after every PeerConnection built from it is closed.
type Engine struct {
	cfg     Config
	log     *slog.Logger
	setting webrtc.SettingEngine
	mux     ice.UDPMux // nil unless cfg.UDPPort > 0
}

// New checks cfg and returns an Engine. With cfg.UDPPort > 0 it listens on
// that UDP port on every configured IP.
func New(cfg Config) (*Engine, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if len(cfg.IPs) == 0 {
		return nil, errors.New("rtc: no IPs configured: set the IPs WebRTC may use, e.g. 127.0.0.1")
	}
	if cfg.UDPPort < 0 || cfg.UDPPort > 65535 {
		return nil, fmt.Errorf("rtc: UDP port %d out of range: use 0 (ephemeral) or 1-65535", cfg.UDPPort)
	}
	ips := make([]net.IP, 0, len(cfg.IPs))
	v4, v6, loopback := false, false, false
	for _, s := range cfg.IPs {
		ip := net.ParseIP(s)
		if ip == nil || ip.IsUnspecified() {
			return nil, fmt.Errorf("rtc: IP %q is not a host IP address: give each IP WebRTC may use, e.g. 127.0.0.1", s)
		}
		if ip.To4() != nil {
			v4 = true
		} else {
			v6 = true
		}
		loopback = loopback || ip.IsLoopback()
		ips = append(ips, ip)
	}
	ifaces, err := interfacesOf(ips)
	if err != nil {
		return nil, err
	}

	log := cfg.Logger.With("component", "rtc")
	e := &Engine{cfg: cfg, log: log}
	se := &e.setting
	se.LoggerFactory = &logFactory{log: log}
	// One view of the machine's interfaces for every PeerConnection, instead
	// of a netlink dump kept by each (~7 KB per PeerConnection).
	sharedNet, err := stdnet.NewNet()
	if err != nil {
		return nil, fmt.Errorf("rtc: list network interfaces: %w", err)
	}
	se.SetNet(sharedNet)
	se.SetInterfaceFilter(func(name string) bool { return slices.Contains(ifaces, name) })
	se.SetIPFilter(func(ip net.IP) bool {
		return slices.ContainsFunc(ips, func(x net.IP) bool { return x.Equal(ip) })
	})
	se.SetIncludeLoopbackCandidate(loopback)
	se.SetICEMulticastDNSMode(ice.MulticastDNSModeDisabled)
	var nets []webrtc.NetworkType
	if v4 {
		nets = append(nets, webrtc.NetworkTypeUDP4)
	}
	if v6 {
		nets = append(nets, webrtc.NetworkTypeUDP6)
	}
	se.SetNetworkTypes(nets)
	se.SetICETimeouts(5*time.Second, 10*time.Second, 2*time.Second)
	if err := setNAT(se, cfg); err != nil {
		return nil, err
	}
	if cfg.UDPPort > 0 {
		muxes := make([]ice.UDPMux, 0, len(ips))
		closeAll := func() {
			for _, m := range muxes {
				_ = m.Close()
			}
		}
		for _, ip := range ips {
			conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: ip, Port: cfg.UDPPort})
			if err != nil {
				closeAll()
				return nil, fmt.Errorf("rtc: listen on UDP %s: %w (is the port free?)",
					net.JoinHostPort(ip.String(), fmt.Sprint(cfg.UDPPort)), err)
			}
			muxes = append(muxes, ice.NewUDPMuxDefault(ice.UDPMuxParams{
				UDPConn: conn,
				Logger:  se.LoggerFactory.NewLogger("udpmux"),
			}))
		}
		if len(muxes) == 1 {
			e.mux = muxes[0]
		} else {
			e.mux = ice.NewMultiUDPMuxDefault(muxes...)
		}
		se.SetICEUDPMux(e.mux)
	}
	return e, nil
}

// interfacesOf returns the names of the network interfaces holding ips, or
// an error naming an IP no interface holds.
func interfacesOf(ips []net.IP) ([]string, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("rtc: list network interfaces: %w", err)
	}
	var names []string
	for _, ip := range ips {
		found := false
		for _, ifc := range ifs {
			addrs, err := ifc.Addrs()
			if err != nil {
				continue
			}
			for _, a := range addrs {
				if n, ok := a.(*net.IPNet); ok && n.IP.Equal(ip) {
					found = true
					if !slices.Contains(names, ifc.Name) {
						names = append(names, ifc.Name)
					}
				}
			}
		}
		if !found {
			return nil, fmt.Errorf("rtc: IP %s %w: "+
				"configure an address the node owns (announce a public address that maps to it as a NAT 1:1 IP)", ip, ErrIPNotLocal)
		}
	}
	return names, nil
}

func setNAT(se *webrtc.SettingEngine, cfg Config) error {
	switch n := len(cfg.NAT1To1IPs); {
	case n == 0:
		return nil
	case n == 1:
		return se.SetICEAddressRewriteRules(webrtc.ICEAddressRewriteRule{
			External:        cfg.NAT1To1IPs,
			AsCandidateType: webrtc.ICECandidateTypeHost,
			Mode:            webrtc.ICEAddressRewriteReplace,
		})
	case n == len(cfg.IPs):
		rules := make([]webrtc.ICEAddressRewriteRule, n)
		for i := range rules {
			rules[i] = webrtc.ICEAddressRewriteRule{
				External:        []string{cfg.NAT1To1IPs[i]},
				Local:           cfg.IPs[i],
				AsCandidateType: webrtc.ICECandidateTypeHost,
				Mode:            webrtc.ICEAddressRewriteReplace,
			}
		}
		return se.SetICEAddressRewriteRules(rules...)
	default:
		return fmt.Errorf("rtc: %d NAT 1:1 IPs for %d IPs: give one external IP, or one per IP in the same order",
			n, len(cfg.IPs))
	}
}

// NewAPI returns a pion API with the engine's ICE restrictions, the given
// media engine and interceptors. m and ir may be shared by many
// PeerConnections: pion copies the media engine per PeerConnection and
// builds interceptors per PeerConnection from the registry.
func (e *Engine) NewAPI(m *webrtc.MediaEngine, ir *interceptor.Registry) *webrtc.API {
	return webrtc.NewAPI(
		webrtc.WithSettingEngine(e.setting),
		webrtc.WithMediaEngine(m),
		webrtc.WithInterceptorRegistry(ir),
	)
}

// RTCPHandler takes one RTCP packet (not a compound: each of its packets
// in turn) that a peer addressed to ssrc: one of the PeerConnection's RTP
// senders, or any other SSRC the packet names (a report about the peer's
// own stream, say), which the handler ignores. It runs on pion's SRTCP
// reading goroutine of the PeerConnection, one packet after the other, and
// must not keep pkt after it returns. What it writes (retransmissions,
// say) goes out through the PeerConnection's SRTP session, not the SRTCP
// session it is called from.
type RTCPHandler func(ssrc uint32, pkt []byte)

// NewSenderAPI is NewAPI for PeerConnections that only send media: the
// RTCP a peer sends is handed to handle as it is decrypted, instead of
// being queued for each RTP sender until RTPSender.Read takes it. That
// saves each sender its reading goroutine and buffers (~7 KB of RSS per
// sender), and bounds what a peer's RTCP to SSRCs nobody reads costs: pion
// queues it, unread, up to 100 KB per SSRC. RTPSender.Read then returns
// nothing until the sender stops; its SetReadDeadline still waits until
// SRTP runs. Incoming RTP (not expected) is queued as pion does.
func (e *Engine) NewSenderAPI(m *webrtc.MediaEngine, ir *interceptor.Registry, handle RTCPHandler) *webrtc.API {
	se := e.setting
	se.BufferFactory = func(t packetio.BufferPacketType, ssrc uint32) io.ReadWriteCloser {
		if t == packetio.RTCPBufferPacket {
			return &rtcpSink{ssrc: ssrc, handle: handle, closed: make(chan struct{})}
		}
		b := packetBuffer{packetio.NewBuffer()}
		b.SetLimitSize(rtpBufferLimit)
		return b
	}
	return webrtc.NewAPI(
		webrtc.WithSettingEngine(se),
		webrtc.WithMediaEngine(m),
		webrtc.WithInterceptorRegistry(ir),
	)
}

// rtcpSink is the buffer of one SRTCP read stream of a sender API: it hands
// each packet written to it to the handler.
type rtcpSink struct {
	ssrc   uint32
	handle RTCPHandler
	once   sync.Once
	closed chan struct{}
}

// Write hands pkt to the handler.
func (s *rtcpSink) Write(pkt []byte) (int, error) {
	s.handle(s.ssrc, pkt)
	return len(pkt), nil
}

// Read returns io.EOF once the stream closes: the handler took every
// packet.
func (s *rtcpSink) Read([]byte) (int, error) {
	<-s.closed
	return 0, io.EOF
}

func (s *rtcpSink) Close() error {
	s.once.Do(func() { close(s.closed) })
	return nil
}

// rtpBufferLimit bounds what is queued of an incoming RTP stream, as pion's
// own buffer does (srtp's srtpBufferSize).
const rtpBufferLimit = 1000 * 1000

// packetBuffer is a packetio.Buffer as an io.ReadWriteCloser, as pion's
// SRTP read streams use it.
type packetBuffer struct{ *packetio.Buffer }

func (b packetBuffer) Read(p []byte) (int, error) {
	n, _, err := b.Buffer.Read(p, nil)
	return n, err
}

func (b packetBuffer) Write(p []byte) (int, error) { return b.Buffer.Write(p, nil) }

func (b packetBuffer) ReadWithAttributes(p []byte, a packetio.Attributes) (int, packetio.Attributes, error) {
	return b.Buffer.Read(p, a)
}

func (b packetBuffer) WriteWithAttributes(p []byte, a packetio.Attributes) (int, error) {
	return b.Buffer.Write(p, a)
}

// IPs returns the configured IPs.
func (e *Engine) IPs() []string { return slices.Clone(e.cfg.IPs) }

// Close releases the shared UDP port, if any.
func (e *Engine) Close() error {
	if e.mux != nil {
		return e.mux.Close()
	}
	return nil
}

// ErrOfferRejected wraps pion's reason for refusing an offer: the offer is
// at fault (no ICE credentials, no DTLS fingerprint, ...).
var ErrOfferRejected = errors.New("offer rejected")

// Answer applies offer to pc, creates and sets the answer and waits until ICE
// gathering is complete (no trickle ICE), so that the returned SDP holds every
// candidate. It gives up when ctx ends.
func Answer(ctx context.Context, pc *webrtc.PeerConnection, offer string) (string, error) {
	if err := pc.SetRemoteDescription(webrtc.SessionDescription{Type: webrtc.SDPTypeOffer, SDP: offer}); err != nil {
		return "", fmt.Errorf("%w: %v", ErrOfferRejected, err)
	}
	answer, err := pc.CreateAnswer(nil)
	if err != nil {
		return "", fmt.Errorf("create answer: %w", err)
	}
	gathered := webrtc.GatheringCompletePromise(pc)
	if err := pc.SetLocalDescription(answer); err != nil {
		return "", fmt.Errorf("set answer: %w", err)
	}
	select {
	case <-gathered:
	case <-ctx.Done():
		return "", fmt.Errorf("gather ICE candidates: %w", context.Cause(ctx))
	}
	return pc.LocalDescription().SDP, nil
}
