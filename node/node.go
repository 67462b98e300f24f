// Package node wires one Stemflow node together by hand: the relay hub and
// its overlay links, the ingest and egress protocols, and the HTTP server
// with the player pages. It also runs several datacenters in one process for
// `stemflow dev`.
package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	egresschat "github.com/stemflow/stemflow/egress/chat"
	"github.com/stemflow/stemflow/egress/whep"
	"github.com/stemflow/stemflow/ingest/whip"
	"github.com/stemflow/stemflow/internal/rtc"
	"github.com/stemflow/stemflow/node/rtspserver"
	"github.com/stemflow/stemflow/relay"
	"github.com/stemflow/stemflow/relay/chat"
	"github.com/stemflow/stemflow/topology/manager"
	"github.com/stemflow/stemflow/topology/store"
)

// Node is one running node. Close stops everything it started.
type Node struct {
	cfg     *Config
	log     *slog.Logger
	baseLog *slog.Logger // log without the node's attributes
	hub     *relay.Hub
	ovl     *relay.Overlay
	rtc     *rtc.Engine
	whip    *whip.Server
	whep    *whep.Server
	rtsp    *rtspserver.Server

	chat      *chat.Service // chat.go
	chatWS    *egresschat.Server
	chatStore *chat.Store

	httpLn  net.Listener
	httpSrv *http.Server
	wg      sync.WaitGroup

	ctlMu sync.Mutex // guards ctl
	ctl   *control   // the control plane in etcd; nil without etcd
}

// NewLogger returns the text logger every component derives its own from.
func NewLogger(level string) *slog.Logger {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		l = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l}))
}

// Start starts a node. On error, whatever was started is stopped again.
func Start(cfg *Config, log *slog.Logger) (n *Node, err error) {
	if log == nil {
		log = NewLogger(cfg.Log.Level)
	}
	base := log
	log = log.With("dc", cfg.Datacenter)
	started := &Node{cfg: cfg, log: log, baseLog: base}
	n = started
	defer func() {
		if err != nil {
			started.Close() // n is nil by now: the error returns set it
		}
	}()

	id := cfg.identity
	if id == nil {
		loaded, err := relay.LoadIdentity(cfg.Overlay.TLS.CA, cfg.Overlay.TLS.Cert, cfg.Overlay.TLS.Key)
		if err != nil {
			return nil, fmt.Errorf("overlay.tls: %w", err)
		}
		if err := loaded.Check(cfg.Datacenter); err != nil {
			return nil, fmt.Errorf("overlay.tls.cert %s %w", cfg.Overlay.TLS.Cert, err)
		}
		id = &loaded
	}
	n.hub = relay.NewHub(relay.Config{Datacenter: cfg.Datacenter, Logger: log, Claim: n.claim})
	if err := n.startChat(); err != nil {
		return nil, err
	}
	n.ovl, err = relay.StartOverlay(n.hub, relay.OverlayConfig{
		Listen:     cfg.Overlay.Listen,
		Conn:       cfg.overlayConn,
		Neighbours: cfg.Overlay.Neighbours,
		Identity:   *id,
		Logger:     log,
	})
	if err != nil {
		return nil, err
	}
	log.Info("overlay listening", "address", n.ovl.Addr().String(), "neighbours", len(cfg.Overlay.Neighbours))

	n.rtc, err = rtc.New(rtc.Config{IPs: cfg.WebRTC.IPs, NAT1To1IPs: cfg.WebRTC.NAT1To1IPs, UDPPort: cfg.WebRTC.UDPPort, Logger: log})
	if errors.Is(err, rtc.ErrIPNotLocal) {
		return nil, fmt.Errorf("webrtc.ips: %w (list this machine's own addresses there; public addresses that map to them go in webrtc.nat_1to1_ips)", err)
	} else if err != nil {
		return nil, fmt.Errorf("webrtc: %w", err)
	}
	n.whip = whip.New(whip.Config{Hub: n.hub, RTC: n.rtc, Token: cfg.Auth.PublishToken, Logger: log})
	n.whep = whep.New(whep.Config{Hub: n.hub, RTC: n.rtc, Logger: log})

	n.rtsp, err = rtspserver.New(rtspserver.Config{
		Address:        cfg.RTSP.Listen,
		UDPRTPAddress:  cfg.RTSP.RTPAddress,
		UDPRTCPAddress: cfg.RTSP.RTCPAddress,
		DisableUDP:     !cfg.RTSPOverUDP(),
		Hub:            n.hub,
		Sources:        cfg.RTSP.Sources,
		PublishToken:   cfg.Auth.PublishToken,
		Logger:         log,
	})
	if err != nil {
		return nil, fmt.Errorf("rtsp: %w", err)
	}

	n.httpLn, err = net.Listen("tcp", cfg.HTTP.Listen)
	if err != nil {
		return nil, fmt.Errorf("http: %w", err)
	}
	n.httpSrv = &http.Server{
		Handler:           n.routes(),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		if err := n.httpSrv.Serve(n.httpLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("http server stopped", "err", err)
		}
	}()
	log.Info("HTTP listening", "address", n.httpLn.Addr().String())
	if len(cfg.Etcd.Endpoints) > 0 {
		if err := n.startControl(cfg.Etcd, cfg.Manager); err != nil {
			return nil, err
		}
	}
	log.Info("node ready", "http", n.httpLn.Addr().String(), "rtsp", n.rtsp.Addr(), "overlay", n.ovl.Addr().String())
	return n, nil
}

// startControl connects the node to the control plane in etcd (once), with
// a manager candidate beside it when runManager is set. It does not wait
// for etcd: an unreachable etcd is logged and retried while media flows.
func (n *Node) startControl(e EtcdConfig, runManager bool) error {
	capacity := n.cfg.capacity
	if capacity == nil {
		capacity = func(peer string) int64 { return int64(n.cfg.Overlay.Capacity[peer]) }
	}
	ctl, err := startControl(controlConfig{
		DC:   n.cfg.Datacenter,
		Etcd: e,
		Hub:  n.hub,
		Log:  n.log,
		Addresses: map[string]string{
			"overlay": n.ovl.Addr().String(),
			"http":    n.httpLn.Addr().String(),
			"rtsp":    n.rtsp.Addr(),
		},
		Capacity:     capacity,
		MeasureEvery: n.cfg.measureEvery,
		Manager:      runManager,
		ManagerLog:   n.baseLog,
	})
	if err != nil {
		return err
	}
	n.ctlMu.Lock()
	n.ctl = ctl
	n.ctlMu.Unlock()
	return nil
}

// claim is the hub's Config.Claim: with etcd, a stream published here is
// claimed there first, so that of two datacenters publishing one name at
// once exactly one wins.
func (n *Node) claim(stream string) (release func(), err error) {
	if c := n.control(); c != nil {
		return c.claim(stream)
	}
	return func() {}, nil
}

func (n *Node) control() *control {
	n.ctlMu.Lock()
	defer n.ctlMu.Unlock()
	return n.ctl
}

// Store returns the node's connection to the control plane's etcd, or nil
// when the node runs without etcd. It is safe for concurrent use and lives
// until Close.
func (n *Node) Store() *store.Store {
	if c := n.control(); c != nil {
		return c.st
	}
	return nil
}

// Measurements returns the node's current, smoothed measurements of its
// links to its neighbours (one direction: from this node's datacenter),
// sorted by neighbour; nil without etcd. What etcd holds is the last of
// these published past hysteresis.
func (n *Node) Measurements() []store.Link {
	if c := n.control(); c != nil {
		return c.meter.measurements()
	}
	return nil
}

// Manager returns the status of the manager candidate running beside the
// node; ok is false when the node runs none.
func (n *Node) Manager() (st manager.Status, ok bool) {
	if c := n.control(); c != nil && c.mgr != nil {
		return c.mgr.Status(), true
	}
	return manager.Status{}, false
}

// Hub returns the node's relay hub.
func (n *Node) Hub() *relay.Hub { return n.hub }

// HTTPAddr returns the address the HTTP server listens on.
func (n *Node) HTTPAddr() net.Addr { return n.httpLn.Addr() }

// RTSPAddr returns the address (host:port) the RTSP server listens on.
func (n *Node) RTSPAddr() string { return n.rtsp.Addr() }

// OverlayAddr returns the UDP address of the node's overlay endpoint.
func (n *Node) OverlayAddr() net.Addr { return n.ovl.Addr() }

// Close stops the node: the control plane first (its lease revoked, so its
// streams, subscriptions and links leave etcd at once), then HTTP, the
// protocols and the relay.
func (n *Node) Close() { n.close(false) }

// kill stops the node as if its process died: its etcd client closes
// first, so its lease and its manager's election session expire instead of
// being revoked (the lab's kill). The control plane's goroutines finish in
// the background (their etcd calls on the closed client take up to a few
// seconds to give up); wait for them with the returned function.
func (n *Node) kill() (wait func()) {
	c := n.control()
	if c != nil {
		c.abort()
	}
	n.closeMedia()
	if c == nil {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.close(true)
	}()
	return func() { <-done }
}

func (n *Node) close(abrupt bool) {
	if c := n.control(); c != nil {
		c.close(abrupt)
	}
	n.closeMedia()
}

// closeMedia stops everything but the control plane.
func (n *Node) closeMedia() {
	if n.httpSrv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		n.httpSrv.Shutdown(ctx)
		cancel()
		n.httpSrv.Close()
	} else if n.httpLn != nil {
		n.httpLn.Close()
	}
	n.wg.Wait()
	n.closeChat()
	if n.rtsp != nil {
		n.rtsp.Close()
	}
	if n.whip != nil {
		n.whip.Close()
	}
	if n.whep != nil {
		n.whep.Close()
	}
	if n.ovl != nil {
		n.ovl.Close()
	}
	if n.hub != nil {
		n.hub.Close()
	}
	if n.rtc != nil {
		n.rtc.Close()
	}
}
