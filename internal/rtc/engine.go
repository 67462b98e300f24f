package rtc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"time"

	"github.com/pion/ice/v4"
	"github.com/pion/interceptor"
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
