package relay

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sort"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
)

// OverlayConfig configures a node's links to its neighbours.
type OverlayConfig struct {
	// Listen is the UDP address the node's QUIC endpoint binds, for
	// accepting links and dialing them ("127.0.0.1:0" picks a port).
	Listen string
	// Conn, when set, is used instead of binding Listen, e.g. the WAN lab's
	// netem.Conn. The caller owns it: Close leaves it open.
	Conn net.PacketConn
	// Neighbours maps neighbour datacenter names to their overlay addresses.
	// A node dials the neighbours whose names sort after its own and accepts
	// the others, so each pair gets exactly one connection; the address of a
	// neighbour that dials is not used. A node accepts links only from its
	// neighbours: list each link on both of its ends.
	Neighbours map[string]string
	Identity   Identity
	Logger     *slog.Logger
}

// Overlay is a node's QUIC endpoint: it keeps one link per neighbour up,
// redialing lost ones. Close stops it and waits for its goroutines.
type Overlay struct {
	hub *Hub
	cfg OverlayConfig
	log *slog.Logger
	tr  *quic.Transport
	ln  *quic.Listener
	own net.PacketConn // the socket bound for Listen, closed by Close; nil with cfg.Conn

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	warned peerWarnings
}

// peerWarnInterval is how often a problem with one peer is logged at WARN;
// repeats in between (a misconfigured peer redials every few seconds) go to
// DEBUG.
const peerWarnInterval = time.Minute

// peerWarnings rate-limits warnings about peers.
type peerWarnings struct {
	mu   sync.Mutex           // guards last
	last map[string]time.Time // peer → when it was last warned about
}

// level returns WARN for the first problem with peer in a peerWarnInterval,
// DEBUG for the repeats.
func (w *peerWarnings) level(peer string, now time.Time) slog.Level {
	w.mu.Lock()
	defer w.mu.Unlock()
	if t, ok := w.last[peer]; ok && now.Sub(t) < peerWarnInterval {
		return slog.LevelDebug
	}
	if w.last == nil {
		w.last = make(map[string]time.Time)
	}
	w.last[peer] = now
	return slog.LevelWarn
}

// warnPeer logs a problem with a peer at WARN once per peer per
// peerWarnInterval, at DEBUG otherwise.
func (o *Overlay) warnPeer(peer, msg string, args ...any) {
	o.log.Log(context.Background(), o.warned.level(peer, time.Now()), msg, append([]any{"peer", peer}, args...)...)
}

// refusal is why a peer is refused a link: it is not who its certificate
// says, or not a configured neighbour.
type refusal struct {
	msg          string
	notNeighbour bool
}

func (r *refusal) Error() string { return r.msg }

func quicConfig() *quic.Config {
	return &quic.Config{
		EnableDatagrams:      true,
		KeepAlivePeriod:      time.Second,
		MaxIdleTimeout:       5 * time.Second,
		HandshakeIdleTimeout: 3 * time.Second,
		// One channel per chat room and neighbour (channel.go): far more
		// than quic-go's default of 100 streams.
		MaxIncomingStreams: maxChannels,
	}
}

// StartOverlay binds the node's QUIC endpoint and starts linking to the
// neighbours.
func StartOverlay(h *Hub, cfg OverlayConfig) (*Overlay, error) {
	if cfg.Logger == nil {
		cfg.Logger = h.cfg.Logger
	}
	conn, own := cfg.Conn, net.PacketConn(nil)
	if conn == nil {
		addr, err := net.ResolveUDPAddr("udp", cfg.Listen)
		if err != nil {
			return nil, fmt.Errorf("overlay listen address %q: %w", cfg.Listen, err)
		}
		udp, err := net.ListenUDP("udp", addr)
		if err != nil {
			return nil, fmt.Errorf("overlay: %w", err)
		}
		conn, own = udp, udp
	}
	tr := &quic.Transport{Conn: conn}
	ln, err := tr.Listen(cfg.Identity.serverConfig(), quicConfig())
	if err != nil {
		if own != nil {
			own.Close()
		}
		return nil, fmt.Errorf("overlay: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	o := &Overlay{hub: h, cfg: cfg, log: cfg.Logger.With("component", "overlay"), tr: tr, ln: ln, own: own, ctx: ctx, cancel: cancel}
	o.wg.Add(1)
	go o.accept()
	names := make([]string, 0, len(cfg.Neighbours))
	for name := range cfg.Neighbours {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if name > h.cfg.Datacenter {
			o.wg.Add(1)
			go o.dialLoop(name, cfg.Neighbours[name])
		}
	}
	return o, nil
}

// Addr returns the UDP address of the node's QUIC endpoint.
func (o *Overlay) Addr() net.Addr { return o.tr.Conn.LocalAddr() }

// Close closes every link and the endpoint, and the socket it bound for
// Listen (quic-go leaves a Transport's Conn open).
func (o *Overlay) Close() {
	o.cancel()
	o.ln.Close()
	o.wg.Wait()
	o.tr.Close()
	if o.own != nil {
		o.own.Close()
	}
}

func (o *Overlay) accept() {
	defer o.wg.Done()
	for {
		conn, err := o.ln.Accept(o.ctx)
		if err != nil {
			return
		}
		o.wg.Add(1)
		go func() {
			defer o.wg.Done()
			o.serveAccepted(conn)
		}()
	}
}

func (o *Overlay) serveAccepted(conn *quic.Conn) {
	peer, err := peerName(conn.ConnectionState().TLS)
	if err != nil {
		conn.CloseWithError(1, err.Error())
		return
	}
	ctx, cancel := context.WithTimeout(o.ctx, 3*time.Second)
	ctl, err := conn.AcceptStream(ctx)
	cancel()
	if err != nil {
		conn.CloseWithError(1, "no control stream")
		return
	}
	br := bufio.NewReader(ctl)
	if err := o.handshake(ctl, br, peer, true); err != nil {
		msg := "refused link"
		if r := (*refusal)(nil); errors.As(err, &r) && r.notNeighbour {
			msg = "refused link from a datacenter that is not a configured neighbour"
		}
		o.warnPeer(peer, msg, "err", err)
		conn.CloseWithError(1, err.Error())
		return
	}
	o.runLink(conn, ctl, br, peer)
}

// dialLoop keeps a link to one neighbour up.
func (o *Overlay) dialLoop(peer, addr string) {
	defer o.wg.Done()
	backoff := 100 * time.Millisecond
	for o.ctx.Err() == nil {
		start := time.Now()
		err := o.dialOnce(peer, addr)
		if o.ctx.Err() != nil {
			return
		}
		if time.Since(start) > 5*time.Second {
			backoff = 100 * time.Millisecond
		}
		if refused(err) {
			o.warnPeer(peer, "link to neighbour refused", "err", err)
		} else {
			o.log.Debug("link to neighbour ended, redialing", "peer", peer, "err", err, "in", backoff)
		}
		select {
		case <-time.After(backoff):
		case <-o.ctx.Done():
			return
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

func (o *Overlay) dialOnce(peer, addr string) error {
	udpAddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(o.ctx, 3*time.Second)
	defer cancel()
	conn, err := o.tr.Dial(ctx, udpAddr, o.cfg.Identity.clientConfig(peer), quicConfig())
	if err != nil {
		return err
	}
	ctl, err := conn.OpenStreamSync(ctx)
	if err != nil {
		conn.CloseWithError(1, "")
		return err
	}
	br := bufio.NewReader(ctl)
	if err := o.handshake(ctl, br, peer, false); err != nil {
		conn.CloseWithError(1, err.Error())
		return err
	}
	return o.runLink(conn, ctl, br, peer)
}

// handshake exchanges hellos and checks the peer is who its certificate
// says and a configured neighbour. The accepting side reads the dialer's
// hello first and answers only if it accepts the peer, so a refused dialer
// learns why from the connection's close reason and never sees a link up.
func (o *Overlay) handshake(ctl *quic.Stream, br *bufio.Reader, peer string, accepting bool) error {
	hello := appendControl(nil, &controlMsg{Type: msgHello, Version: wireVersion, Datacenter: o.hub.cfg.Datacenter})
	ctl.SetDeadline(time.Now().Add(3 * time.Second))
	defer ctl.SetDeadline(time.Time{})
	if !accepting {
		if _, err := ctl.Write(hello); err != nil {
			return err
		}
	}
	m, err := readControl(br, func(b []byte) error { _, err := io.ReadFull(br, b); return err })
	if err != nil {
		return fmt.Errorf("reading hello: %w", err)
	}
	if m.Type != msgHello {
		return fmt.Errorf("expected hello, got message type %d", m.Type)
	}
	if m.Version != wireVersion {
		return fmt.Errorf("peer speaks wire version %d, this node %d", m.Version, wireVersion)
	}
	if m.Datacenter != peer {
		return &refusal{msg: fmt.Sprintf("peer says it is datacenter %q but its certificate names %q: give it the certificate made for %q (stemflow certs)",
			m.Datacenter, peer, m.Datacenter)}
	}
	if peer == o.hub.cfg.Datacenter {
		return errors.New("peer has this node's own datacenter name")
	}
	if _, ok := o.cfg.Neighbours[peer]; !ok {
		return &refusal{notNeighbour: true, msg: fmt.Sprintf("datacenter %s is not a neighbour of datacenter %s: list each in the other's overlay.neighbours to link them",
			peer, o.hub.cfg.Datacenter)}
	}
	if accepting {
		if _, err := ctl.Write(hello); err != nil {
			return err
		}
	}
	return nil
}

func (o *Overlay) runLink(conn *quic.Conn, ctl *quic.Stream, br *bufio.Reader, peer string) error {
	l := newLink(o.hub, conn, ctl, peer)
	stop := context.AfterFunc(o.ctx, func() { l.close(errors.New("overlay closing")) })
	defer stop()
	return l.run(br)
}

// refused reports whether a dial failed because one side will not link to
// the other, rather than because the neighbour is unreachable: a mismatched
// identity either way, a certificate that is not the one it should be
// (wrong datacenter, other CA), or the neighbour refusing us (its reason is
// in err).
func refused(err error) bool {
	var verr *tls.CertificateVerificationError
	var herr x509.HostnameError
	var uerr x509.UnknownAuthorityError
	var aerr *quic.ApplicationError
	var rerr *refusal
	return errors.As(err, &rerr) ||
		errors.As(err, &verr) || errors.As(err, &herr) || errors.As(err, &uerr) ||
		errors.As(err, &aerr) && aerr.Remote && aerr.ErrorCode == 1
}
