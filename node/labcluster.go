package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/stemflow/stemflow/internal/etcdembed"
	"github.com/stemflow/stemflow/internal/netem"
	"github.com/stemflow/stemflow/relay"
)

// Lab is the WAN lab (`stemflow dev --lab FILE`): the datacenters a profile
// names, in one process, linked as a full mesh, each node's overlay on a
// netem.Conn that impairs what it sends to each peer. Links, and which
// datacenters run, change at run time (SetLink, Kill, Start, and the
// /api/v1/lab routes every node of the lab serves).
//
// One goroutine owns the lab's state and runs every change in turn; the
// methods hand it requests and wait for the reply. Close stops it and every
// node.
type Lab struct {
	cfg     DevConfig
	profile string // the profile's file, for the banner and the API

	reqs   chan func()
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	// etcd is the lab's embedded etcd member: it lives on when a
	// datacenter is killed, as a real cluster outside the datacenter would.
	etcd    *etcdembed.Server
	etcdTmp string

	// rateMu guards rates: each link's rate cap as set, which the nodes
	// publish as the link's capacity (read from their measurement
	// goroutines, which must not wait for the lab's goroutine).
	rateMu sync.Mutex
	rates  map[[2]string]Rate
	// probeBW: the nodes measure bandwidth rather than publish rates
	// (LabProfile.ProbeBandwidth).
	probeBW bool

	// Owned by the run goroutine (and by Close once it has stopped).
	dcs   []*labDC
	links map[[2]string]LabLink // every pair of the mesh, names in order
	after []func()              // slow work of the last request, run after its reply
	// killed waits for the control planes of killed nodes to finish.
	killed []func()
}

// labDC is one datacenter of the lab. Its ports and identity stay the same
// across a kill and a start.
type labDC struct {
	name                    string
	id                      relay.Identity
	httpPort, rtspPort, rtp int
	overlay                 netip.AddrPort
	conn                    *netem.Conn // nil while killed
	node                    *Node       // nil while killed
}

// Errors the lab's callers branch on.
var (
	// ErrLabUnknownDC: the datacenter is not in the lab.
	ErrLabUnknownDC = errors.New("datacenter is not in the lab")
	// ErrLabState: the datacenter is already up (start) or down (kill).
	ErrLabState = errors.New("datacenter is already in that state")
	// ErrLabClosed: the lab is shutting down.
	ErrLabClosed = errors.New("lab is shutting down")
)

// StartLab starts the datacenters of a lab profile (cfg.DCs is ignored)
// linked as a full mesh, impairs the links the profile lists, and returns
// once every node serves HTTP and every link of the mesh is up. profile
// names the profile's file in the banner and in GET /api/v1/lab.
func StartLab(ctx context.Context, cfg DevConfig, p *LabProfile, profile string) (*Lab, error) {
	cfg.DCs = slices.Clone(p.Datacenters)
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	ca, err := relay.NewClusterCA()
	if err != nil {
		return nil, err
	}
	lctx, cancel := context.WithCancel(context.Background())
	l := &Lab{cfg: cfg, profile: profile, reqs: make(chan func()), ctx: lctx, cancel: cancel,
		done: make(chan struct{}), links: map[[2]string]LabLink{}}
	for i, a := range cfg.DCs {
		for _, b := range cfg.DCs[i+1:] {
			k := pairKey(a, b)
			l.links[k] = LabLink{Between: []string{k[0], k[1]}}
		}
	}
	l.rates = map[[2]string]Rate{}
	l.probeBW = p.ProbeBandwidth
	for _, ln := range p.Links {
		k := pairKey(ln.Between[0], ln.Between[1])
		ln.Between = []string{k[0], k[1]}
		l.links[k] = ln
		l.rates[k] = ln.Rate
	}
	started := false
	defer func() {
		if !started {
			l.closeNodes()
			l.closeEtcd()
		}
	}()
	if l.etcd, l.etcdTmp, err = startDevEtcd(ctx, cfg); err != nil {
		return nil, err
	}
	for i, dc := range cfg.DCs {
		id, err := ca.Issue(dc)
		if err != nil {
			return nil, err
		}
		d := &labDC{name: dc, id: id, httpPort: cfg.HTTPPort + i, rtspPort: cfg.RTSPPort + i, rtp: cfg.firstRTP() + 2*i}
		if cfg.FreePorts {
			d.httpPort, d.rtspPort = 0, 0
			if d.rtp, err = freeUDPPair(cfg.Bind); err != nil {
				return nil, err
			}
		}
		if err := l.bind(d); err != nil {
			return nil, fmt.Errorf("datacenter %s: %w", dc, err)
		}
		l.dcs = append(l.dcs, d)
	}
	for _, d := range l.dcs { // now that every overlay address is known
		for _, peer := range l.dcs {
			if peer != d {
				l.impair(d, peer)
			}
		}
	}
	for _, d := range l.dcs {
		if err := l.startNode(d); err != nil {
			return nil, fmt.Errorf("datacenter %s: %w", d.name, err)
		}
	}
	if err := l.waitMesh(ctx); err != nil {
		return nil, err
	}
	started = true
	go l.run()
	return l, nil
}

func pairKey(a, b string) [2]string { return [2]string{min(a, b), max(a, b)} }

// bind opens d's overlay socket (on its old port after a kill) and wraps it
// in a netem.Conn impairing what d sends to each peer bound so far.
func (l *Lab) bind(d *labDC) error {
	addr := &net.UDPAddr{IP: net.ParseIP(l.cfg.Bind), Port: int(d.overlay.Port())}
	udp, err := net.ListenUDP("udp", addr)
	if err != nil {
		return fmt.Errorf("overlay: %w", err)
	}
	d.overlay = udp.LocalAddr().(*net.UDPAddr).AddrPort()
	d.conn = netem.New(udp)
	for _, peer := range l.dcs {
		if peer != d {
			l.impair(d, peer)
		}
	}
	return nil
}

// impair sets what d sends to peer as their link says.
func (l *Lab) impair(d, peer *labDC) {
	if d.conn == nil {
		return
	}
	// The link was validated when it was set.
	_ = d.conn.Set(peer.overlay, l.links[pairKey(d.name, peer.name)].Impairment())
}

// startNode starts d's node on its bound netem.Conn, its neighbours every
// other datacenter of the lab. A node dials the neighbours that sort after
// it and the others dial it, so a restarted node is redialled too.
func (l *Lab) startNode(d *labDC) error {
	nb := map[string]string{}
	for _, o := range l.dcs {
		if o != d {
			nb[o.name] = o.overlay.String()
		}
	}
	nc, err := l.cfg.nodeConfig(d.name, &d.id, d.httpPort, d.rtspPort, d.rtp, nb)
	if err != nil {
		return err
	}
	nc.Overlay.Listen = d.overlay.String()
	nc.Etcd.Endpoints = []string{l.etcd.ClientURL()}
	nc.Manager = true // every datacenter runs a manager candidate
	name := d.name
	if !l.probeBW {
		nc.capacity = func(peer string) int64 { return l.rate(name, peer) }
	}
	nc.overlayConn = d.conn
	nc.extraRoutes = l.routes
	n, err := Start(nc, l.cfg.Logger)
	if err != nil {
		d.conn.Close()
		d.conn = nil
		return err
	}
	d.node = n
	// Keep the ports a free-port lab was given, for a start after a kill.
	if d.httpPort == 0 {
		d.httpPort = n.HTTPAddr().(*net.TCPAddr).Port
	}
	if _, p, err := net.SplitHostPort(n.RTSPAddr()); err == nil && d.rtspPort == 0 {
		d.rtspPort, _ = strconv.Atoi(p)
	}
	return nil
}

// waitMesh waits until every node has a link to every other.
func (l *Lab) waitMesh(ctx context.Context) error {
	for {
		ready := true
		for _, d := range l.dcs {
			if len(d.node.Hub().Links()) < len(l.dcs)-1 {
				ready = false
			}
		}
		if ready {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("overlay links did not come up: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// run owns the lab's state: it runs each request in turn.
func (l *Lab) run() {
	defer close(l.done)
	for {
		select {
		case fn := <-l.reqs:
			fn()
			for _, f := range l.after {
				f()
			}
			l.after = nil
		case <-l.ctx.Done():
			return
		}
	}
}

// do runs fn on the lab's goroutine and waits for it, or for ctx.
func (l *Lab) do(ctx context.Context, fn func()) error {
	ran := make(chan struct{})
	select {
	case l.reqs <- func() { fn(); close(ran) }:
	case <-ctx.Done():
		return ctx.Err()
	case <-l.ctx.Done():
		return ErrLabClosed
	}
	<-ran // fn is short, or says it is done before its slow part
	return nil
}

func (l *Lab) dcLocked(name string) (*labDC, error) {
	for _, d := range l.dcs {
		if d.name == name {
			return d, nil
		}
	}
	return nil, fmt.Errorf("%w: %q (it has %s)", ErrLabUnknownDC, name, strings.Join(l.cfg.DCs, ", "))
}

// SetLink impairs the link between two datacenters, both ways, from now on,
// and returns it as set. Fields left zero mean unimpaired.
func (l *Lab) SetLink(ctx context.Context, ln LabLink) (LabLink, error) {
	if len(ln.Between) != 2 || ln.Between[0] == ln.Between[1] {
		return LabLink{}, fmt.Errorf("between must name two different datacenters, got %v", ln.Between)
	}
	for _, dc := range ln.Between {
		if !slices.Contains(l.cfg.DCs, dc) {
			return LabLink{}, fmt.Errorf("between: %w: %q (it has %s)", ErrLabUnknownDC, dc, strings.Join(l.cfg.DCs, ", "))
		}
	}
	if err := ln.Validate(l.cfg.DCs); err != nil {
		return LabLink{}, err
	}
	k := pairKey(ln.Between[0], ln.Between[1])
	ln.Between = []string{k[0], k[1]}
	l.rateMu.Lock()
	l.rates[k] = ln.Rate
	l.rateMu.Unlock()
	err := l.do(ctx, func() {
		l.links[k] = ln
		a, _ := l.dcLocked(k[0])
		b, _ := l.dcLocked(k[1])
		l.impair(a, b)
		l.impair(b, a)
	})
	if err != nil {
		return LabLink{}, err
	}
	l.cfg.Logger.Info("lab: link set", "between", k[0]+"–"+k[1], "impairment", describeLink(ln))
	return ln, nil
}

// Kill stops a datacenter's node abruptly, as if its process died: its
// netem.Conn goes dead first, so that nothing it says on closing (QUIC's
// CONNECTION_CLOSE included) reaches its peers, which notice only when the
// link idles out. Kill returns once the datacenter is dead to the network;
// its node finishes closing on the lab's goroutine right after, so a kill
// asked of the node being killed can still be answered.
func (l *Lab) Kill(ctx context.Context, dc string) error {
	var err error
	derr := l.do(ctx, func() {
		var d *labDC
		if d, err = l.dcLocked(dc); err != nil {
			return
		}
		if d.node == nil {
			err = fmt.Errorf("%w: datacenter %s is not running (start it with POST /api/v1/lab/dcs/%s/start)", ErrLabState, dc, dc)
			return
		}
		d.conn.SetDead(true)
		n, conn := d.node, d.conn
		d.node, d.conn = nil, nil
		// The slow part runs on this goroutine after the reply: later
		// requests wait for it, so a start finds the ports free.
		l.after = append(l.after, func() {
			l.killed = append(l.killed, n.kill())
			conn.Close()
			l.cfg.Logger.Info("lab: datacenter killed", "dc", dc)
		})
	})
	return errors.Join(derr, err)
}

// Start brings a killed datacenter back, on the same ports with the same
// identity; its neighbours' redial loops and its own reconnect the links.
func (l *Lab) Start(ctx context.Context, dc string) error {
	var err error
	derr := l.do(ctx, func() {
		var d *labDC
		if d, err = l.dcLocked(dc); err != nil {
			return
		}
		if d.node != nil {
			err = fmt.Errorf("%w: datacenter %s is running already", ErrLabState, dc)
			return
		}
		if err = l.bind(d); err != nil {
			err = fmt.Errorf("datacenter %s: %w", dc, err)
			return
		}
		err = l.startNode(d)
		if errors.Is(err, syscall.EADDRINUSE) && l.cfg.FreePorts {
			// A free-port lab's HTTP, RTSP or RTP port was taken by
			// another process while d was down: d's neighbours only
			// need its overlay address, so it takes new ones.
			l.cfg.Logger.Info("lab: a port of the datacenter was taken while it was down; it starts on new ones", "dc", dc, "err", err)
			d.httpPort, d.rtspPort = 0, 0
			if d.rtp, err = freeUDPPair(l.cfg.Bind); err == nil {
				if err = l.bind(d); err == nil {
					err = l.startNode(d)
				}
			}
		}
		if err != nil {
			err = fmt.Errorf("datacenter %s: %w", dc, err)
			return
		}
		l.cfg.Logger.Info("lab: datacenter started", "dc", dc)
	})
	return errors.Join(derr, err)
}

// closeNodes stops every running node and its conn.
// They close at once, each in a goroutine: a node's close may wait on etcd.
func (l *Lab) closeNodes() {
	var wg sync.WaitGroup
	for _, d := range l.dcs {
		if d.node != nil {
			wg.Go(d.node.Close)
		}
	}
	wg.Wait()
	for _, d := range l.dcs {
		d.node = nil
		if d.conn != nil {
			d.conn.Close()
			d.conn = nil
		}
	}
}

// closeEtcd stops the lab's etcd member and removes its temporary data.
func (l *Lab) closeEtcd() {
	if l.etcd != nil {
		l.etcd.Close()
		l.etcd = nil
	}
	if l.etcdTmp != "" {
		os.RemoveAll(l.etcdTmp)
		l.etcdTmp = ""
	}
}

// Close stops every node of the lab, then its etcd member.
func (l *Lab) Close() {
	l.cancel()
	<-l.done
	for _, f := range l.after { // a kill's close that did not get to run
		f()
	}
	l.after = nil
	l.closeNodes()
	for _, wait := range l.killed {
		wait()
	}
	l.killed = nil
	l.closeEtcd()
}

// rate returns the rate cap of the link between two datacenters, in bits
// per second (0: none).
func (l *Lab) rate(a, b string) int64 {
	l.rateMu.Lock()
	defer l.rateMu.Unlock()
	return int64(l.rates[pairKey(a, b)])
}

// EtcdURL returns the client URL of the lab's embedded etcd member.
func (l *Lab) EtcdURL() string { return l.etcd.ClientURL() }

// Node returns the running node of a datacenter, or nil while it is killed.
func (l *Lab) Node(dc string) *Node {
	var n *Node
	l.do(context.Background(), func() {
		if d, err := l.dcLocked(dc); err == nil {
			n = d.node
		}
	})
	return n
}

// Profile returns the profile's file.
func (l *Lab) Profile() string { return l.profile }

// Datacenters returns the lab's datacenter names, in the profile's order.
func (l *Lab) Datacenters() []string { return l.cfg.DCs }

// HTTPURL returns the base URL of datacenter i's HTTP server; it stays the
// same across a kill and a start.
func (l *Lab) HTTPURL(i int) string {
	return "http://" + net.JoinHostPort(l.cfg.Bind, strconv.Itoa(l.dcs[i].httpPort))
}

// RTSPURL returns the RTSP URL of a stream at datacenter i.
func (l *Lab) RTSPURL(i int, stream string) string {
	return fmt.Sprintf("rtsp://%s/%s", net.JoinHostPort(l.cfg.Bind, strconv.Itoa(l.dcs[i].rtspPort)), stream)
}

// ImpairedLinks returns the links that are impaired now, in order.
func (l *Lab) ImpairedLinks() []LabLink {
	var out []LabLink
	l.do(context.Background(), func() { out = l.impairedLocked() })
	return out
}

func (l *Lab) impairedLocked() []LabLink {
	var out []LabLink
	for _, k := range l.pairsLocked() {
		if ln := l.links[k]; ln.Impairment() != (netem.Impairment{}) {
			out = append(out, ln)
		}
	}
	return out
}

func (l *Lab) pairsLocked() [][2]string {
	keys := make([][2]string, 0, len(l.links))
	for k := range l.links {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b [2]string) int { return strings.Compare(a[0]+"\x00"+a[1], b[0]+"\x00"+b[1]) })
	return keys
}

// DescribeLink says how a link is impaired, e.g. "delay 30ms ± 2ms, loss
// 0.5 %, rate 4mbit", or "down", or "unimpaired".
func DescribeLink(ln LabLink) string { return describeLink(ln) }

func describeLink(ln LabLink) string {
	if ln.Down {
		return "down"
	}
	var parts []string
	if ln.Delay > 0 {
		d := "delay " + time.Duration(ln.Delay).String()
		if ln.Jitter > 0 {
			d += " ± " + time.Duration(ln.Jitter).String()
		}
		parts = append(parts, d)
	}
	if ln.Loss > 0 {
		parts = append(parts, fmt.Sprintf("loss %g %%", ln.Loss))
	}
	if ln.Rate > 0 {
		r, _ := ln.Rate.MarshalText()
		parts = append(parts, "rate "+string(r))
	}
	if len(parts) == 0 {
		return "unimpaired"
	}
	return strings.Join(parts, ", ")
}
