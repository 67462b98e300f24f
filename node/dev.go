package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/stemflow/stemflow/internal/etcdembed"
	"github.com/stemflow/stemflow/relay"
)

// DevConfig configures a development cluster: several datacenters in one
// process on one address. Its fields are the flags of `stemflow dev`, and
// Validate's messages name those flags.
type DevConfig struct {
	DCs  []string // --dcs; default a, b, c
	Bind string   // --bind; default 127.0.0.1
	// HTTPPort and RTSPPort (--http-port, --rtsp-port) are the base ports:
	// datacenter i listens on base+i (defaults 8080 and 8554). RTP and RTCP
	// over UDP take the pair RTSPPort+1000+2i (rounded up to even) and the
	// port after it.
	HTTPPort, RTSPPort int
	// FreePorts makes every listener take a port the system picks (HTTP and
	// RTSP on port 0, RTP/RTCP on a free even/odd pair), so that tests run
	// beside a `stemflow dev` and each other. HTTPPort and RTSPPort are then
	// ignored; HTTPURL and RTSPURL report the ports taken.
	FreePorts bool
	// PublishToken, when set, is required of WHIP publishers.
	PublishToken string
	// EtcdDataDir (--data-dir) is where the cluster's embedded etcd member
	// keeps the control plane's state; empty means a temporary directory
	// removed at Close. The member listens on two free ports of Bind;
	// Cluster.EtcdURL reports its client URL.
	EtcdDataDir string
	// ChatDataDir is where each datacenter keeps its chat history (in
	// DIR/DC); empty means EtcdDataDir/chat, or memory only when that is
	// empty too.
	ChatDataDir string
	// Chat is every datacenter's chat config (its DataDir is ignored: see
	// ChatDataDir).
	Chat   ChatConfig
	Logger *slog.Logger
}

// Dev port layout: RTP over UDP starts this far above the base RTSP port.
const devRTPOffset = 1000

func (cfg *DevConfig) setDefaults() {
	if len(cfg.DCs) == 0 {
		cfg.DCs = []string{"a", "b", "c"}
	}
	if cfg.Bind == "" {
		cfg.Bind = "127.0.0.1"
	}
	if cfg.HTTPPort == 0 && !cfg.FreePorts {
		cfg.HTTPPort = 8080
	}
	if cfg.RTSPPort == 0 && !cfg.FreePorts {
		cfg.RTSPPort = 8554
	}
	if cfg.Logger == nil {
		cfg.Logger = NewLogger("info")
	}
}

// firstRTP returns the RTP port of datacenter 0: RTP needs an even port.
func (cfg *DevConfig) firstRTP() int {
	p := cfg.RTSPPort + devRTPOffset
	return p + p%2
}

// Validate checks the cluster's address and port ranges before anything
// starts, naming the flag at fault. Zero ports are out of range: StartDev
// fills in defaults before it validates.
func (cfg DevConfig) Validate() error {
	n := len(cfg.DCs)
	if n == 0 {
		n = 3
	}
	if ip := net.ParseIP(cfg.Bind); ip == nil || ip.IsUnspecified() {
		return fmt.Errorf("--bind %q: give an IP address of this machine, e.g. 127.0.0.1 (browsers are offered it for WebRTC, so not 0.0.0.0)", cfg.Bind)
	}
	if cfg.FreePorts {
		return nil
	}
	lastHTTP, lastRTSP := cfg.HTTPPort+n-1, cfg.RTSPPort+n-1
	if cfg.HTTPPort < 1 || lastHTTP > 65535 {
		return fmt.Errorf("--http-port %d: %s out of range (1–65535)", cfg.HTTPPort, portRange(cfg.HTTPPort, lastHTTP))
	}
	if cfg.RTSPPort < 1 || lastRTSP > 65535 {
		return fmt.Errorf("--rtsp-port %d: %s out of range (1–65535)", cfg.RTSPPort, portRange(cfg.RTSPPort, lastRTSP))
	}
	if rtp := cfg.firstRTP(); rtp+2*n-1 > 65535 {
		return fmt.Errorf("--rtsp-port %d: RTSP over UDP would use ports %d–%d (RTP and RTCP from the RTSP port +%d), out of range (1–65535): use an --rtsp-port of at most %d",
			cfg.RTSPPort, rtp, rtp+2*n-1, devRTPOffset, 65535-devRTPOffset-2*n+1)
	}
	if cfg.HTTPPort <= lastRTSP && cfg.RTSPPort <= lastHTTP {
		return fmt.Errorf("--http-port %d and --rtsp-port %d overlap: HTTP uses ports %s and RTSP %s (datacenter i uses port+i): keep them at least %d apart",
			cfg.HTTPPort, cfg.RTSPPort, span(cfg.HTTPPort, lastHTTP), span(cfg.RTSPPort, lastRTSP), n)
	}
	return nil
}

// portRange says "ports 8080–8082 are" or "port 8080 is".
func portRange(first, last int) string {
	if first == last {
		return fmt.Sprintf("port %d is", first)
	}
	return "ports " + span(first, last) + " are"
}

// span says "8080–8082", or "8080" for one port.
func span(first, last int) string {
	if first == last {
		return strconv.Itoa(first)
	}
	return fmt.Sprintf("%d–%d", first, last)
}

// Cluster is a running development cluster.
type Cluster struct {
	cfg   DevConfig
	Nodes []*Node

	etcd    *etcdembed.Server
	etcdTmp string // the member's temporary data directory, if any
}

// StartDev starts the datacenters of a development cluster linked as a full
// mesh (every pair of datacenters has an overlay link), with certificates
// from a CA made in memory, and an embedded etcd member for the control
// plane (started beside the nodes, so it adds little to the start-up; each
// node connects to it once it serves, with a topology manager candidate
// beside it: one leads and computes every stream's tree), and returns once
// every node serves
// HTTP, every overlay link is up and etcd serves.
func StartDev(ctx context.Context, cfg DevConfig) (*Cluster, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	type etcdResult struct {
		srv *etcdembed.Server
		tmp string
		err error
	}
	etcdCh := make(chan etcdResult, 1)
	go func() {
		srv, tmp, err := startDevEtcd(ctx, cfg)
		etcdCh <- etcdResult{srv, tmp, err}
	}()
	c, err := startMesh(ctx, cfg)
	r := <-etcdCh
	if err == nil && r.err != nil {
		c.Close()
		c, err = nil, r.err
	}
	if err != nil {
		if r.srv != nil {
			r.srv.Close()
		}
		if r.tmp != "" {
			os.RemoveAll(r.tmp)
		}
		return nil, err
	}
	c.etcd, c.etcdTmp = r.srv, r.tmp
	for _, n := range c.Nodes {
		if err := n.startControl(EtcdConfig{Endpoints: []string{c.etcd.ClientURL()}}, true); err != nil {
			c.Close()
			return nil, err
		}
	}
	return c, nil
}

// startDevEtcd starts the cluster's etcd member.
func startDevEtcd(ctx context.Context, cfg DevConfig) (srv *etcdembed.Server, tmp string, err error) {
	dir := cfg.EtcdDataDir
	if dir == "" {
		if tmp, err = os.MkdirTemp("", "stemflow-dev-etcd-"); err != nil {
			return nil, "", fmt.Errorf("etcd: %w", err)
		}
		dir = tmp
	} else if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, "", fmt.Errorf("--data-dir: %w", err)
	}
	srv, err = etcdembed.StartFree(ctx, cfg.Bind, dir)
	if err != nil {
		if tmp != "" {
			os.RemoveAll(tmp)
		}
		return nil, "", err
	}
	return srv, tmp, nil
}

// startMesh starts the nodes linked as a full mesh and waits for their
// links.
func startMesh(ctx context.Context, cfg DevConfig) (*Cluster, error) {
	ca, err := relay.NewClusterCA()
	if err != nil {
		return nil, err
	}
	neighbours := map[string][]string{}
	for _, a := range cfg.DCs {
		for _, b := range cfg.DCs {
			if a != b {
				neighbours[a] = append(neighbours[a], b)
			}
		}
	}
	c := &Cluster{cfg: cfg, Nodes: make([]*Node, len(cfg.DCs))}
	overlayAddrs := map[string]string{}
	// Start the later datacenters first: a node dials the neighbours whose
	// names sort after its own, so their addresses must be known.
	order := make([]int, len(cfg.DCs))
	for i := range order {
		order[i] = i
	}
	for i := 0; i < len(order); i++ {
		for j := i + 1; j < len(order); j++ {
			if cfg.DCs[order[j]] > cfg.DCs[order[i]] {
				order[i], order[j] = order[j], order[i]
			}
		}
	}
	for _, i := range order {
		dc := cfg.DCs[i]
		id, err := ca.Issue(dc)
		if err != nil {
			c.Close()
			return nil, err
		}
		n, err := c.startNode(i, id, neighbours[dc], overlayAddrs)
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("datacenter %s: %w", dc, err)
		}
		c.Nodes[i] = n
		overlayAddrs[dc] = n.OverlayAddr().String()
	}
	// Ready when every link of the mesh is up.
	for {
		ready := true
		for i, n := range c.Nodes {
			if len(n.Hub().Links()) < len(neighbours[cfg.DCs[i]]) {
				ready = false
			}
		}
		if ready {
			return c, nil
		}
		select {
		case <-ctx.Done():
			c.Close()
			return nil, fmt.Errorf("overlay links did not come up: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// startNode starts datacenter i. With FreePorts it retries when a port it
// found free was taken before the node bound it.
func (c *Cluster) startNode(i int, id relay.Identity, neighbours []string, overlayAddrs map[string]string) (*Node, error) {
	cfg := &c.cfg
	for attempt := 1; ; attempt++ {
		httpPort, rtspPort, rtp := cfg.HTTPPort+i, cfg.RTSPPort+i, cfg.firstRTP()+2*i
		if cfg.FreePorts {
			var err error
			httpPort, rtspPort = 0, 0
			if rtp, err = freeUDPPair(cfg.Bind); err != nil {
				return nil, err
			}
		}
		nb := map[string]string{}
		for _, dc := range neighbours {
			addr, ok := overlayAddrs[dc]
			if !ok {
				// Not started yet: it sorts before dc and dials it, so its
				// address is not used; listed, dc accepts its link.
				addr = net.JoinHostPort(cfg.Bind, "0")
			}
			nb[dc] = addr
		}
		nc, err := cfg.nodeConfig(cfg.DCs[i], &id, httpPort, rtspPort, rtp, nb)
		if err != nil {
			return nil, err
		}
		n, err := Start(nc, cfg.Logger)
		if err != nil && cfg.FreePorts && attempt < 3 && errors.Is(err, syscall.EADDRINUSE) {
			continue
		}
		return n, err
	}
}

// nodeConfig is the config of one datacenter of a dev cluster.
func (cfg *DevConfig) nodeConfig(dc string, id *relay.Identity, httpPort, rtspPort, rtp int, neighbours map[string]string) (*Config, error) {
	nc := &Config{Datacenter: dc, identity: id}
	nc.HTTP.Listen = net.JoinHostPort(cfg.Bind, strconv.Itoa(httpPort))
	nc.RTSP.Listen = net.JoinHostPort(cfg.Bind, strconv.Itoa(rtspPort))
	nc.RTSP.RTPAddress = net.JoinHostPort(cfg.Bind, strconv.Itoa(rtp))
	nc.RTSP.RTCPAddress = net.JoinHostPort(cfg.Bind, strconv.Itoa(rtp+1))
	nc.Overlay.Listen = net.JoinHostPort(cfg.Bind, "0")
	nc.Overlay.Neighbours = neighbours
	nc.WebRTC.IPs = []string{cfg.Bind}
	nc.Auth.PublishToken = cfg.PublishToken
	nc.Chat = cfg.Chat
	nc.Chat.DataDir = ""
	if dir := cfg.chatDir(); dir != "" {
		nc.Chat.DataDir = filepath.Join(dir, dc)
	}
	nc.SetDefaults()
	if err := nc.Validate(); err != nil {
		return nil, err
	}
	return nc, nil
}

// chatDir is the directory of the datacenters' chat stores, "" for none.
func (cfg *DevConfig) chatDir() string {
	if cfg.ChatDataDir != "" {
		return cfg.ChatDataDir
	}
	if cfg.EtcdDataDir != "" {
		return filepath.Join(cfg.EtcdDataDir, "chat")
	}
	return ""
}

// freeUDPPair returns an even UDP port of ip that, with the port after it,
// was free a moment ago: RTP and RTCP over UDP need such a pair.
func freeUDPPair(ip string) (int, error) {
	for range 200 {
		a, err := net.ListenPacket("udp", net.JoinHostPort(ip, "0"))
		if err != nil {
			return 0, fmt.Errorf("finding free UDP ports for RTP: %w", err)
		}
		p := a.LocalAddr().(*net.UDPAddr).Port
		if p%2 != 0 || p == 65535 {
			a.Close()
			continue
		}
		b, err := net.ListenPacket("udp", net.JoinHostPort(ip, strconv.Itoa(p+1)))
		a.Close()
		if err != nil {
			continue
		}
		b.Close()
		return p, nil
	}
	return 0, fmt.Errorf("found no free even/odd UDP port pair on %s for RTP and RTCP", ip)
}

// HTTPURL returns the base URL of datacenter i's HTTP server.
func (c *Cluster) HTTPURL(i int) string {
	return "http://" + c.Nodes[i].HTTPAddr().String()
}

// RTSPURL returns the RTSP URL of a stream at datacenter i.
func (c *Cluster) RTSPURL(i int, stream string) string {
	return fmt.Sprintf("rtsp://%s/%s", c.Nodes[i].RTSPAddr(), stream)
}

// Datacenters returns the cluster's datacenter names.
func (c *Cluster) Datacenters() []string { return c.cfg.DCs }

// EtcdURL returns the client URL of the cluster's embedded etcd member.
func (c *Cluster) EtcdURL() string {
	if c.etcd == nil {
		return ""
	}
	return c.etcd.ClientURL()
}

// Close stops every node, then the etcd member (removing its data unless
// it lives in EtcdDataDir).
func (c *Cluster) Close() {
	for _, n := range c.Nodes {
		if n != nil {
			n.Close()
		}
	}
	if c.etcd != nil {
		c.etcd.Close()
		c.etcd = nil
	}
	if c.etcdTmp != "" {
		os.RemoveAll(c.etcdTmp)
		c.etcdTmp = ""
	}
}
