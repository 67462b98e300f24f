package node

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/stemflow/stemflow/relay"
	"github.com/stemflow/stemflow/topology"
)

// DevConfig configures a development cluster: several datacenters in one
// process on one address.
type DevConfig struct {
	DCs  []string // default a, b, c
	Bind string   // default 127.0.0.1
	// HTTPPort and RTSPPort are the base ports: datacenter i listens on
	// base+i (defaults 8080 and 8554).
	HTTPPort, RTSPPort int
	// PublishToken, when set, is required of WHIP publishers.
	PublishToken string
	Logger       *slog.Logger
}

// Cluster is a running development cluster.
type Cluster struct {
	cfg   DevConfig
	Nodes []*Node
}

// StartDev starts the datacenters of a development cluster linked in a
// static chain (a–b–c), with certificates from a CA made in memory, and
// returns once every node serves HTTP and every overlay link is up.
func StartDev(ctx context.Context, cfg DevConfig) (*Cluster, error) {
	if len(cfg.DCs) == 0 {
		cfg.DCs = []string{"a", "b", "c"}
	}
	if cfg.Bind == "" {
		cfg.Bind = "127.0.0.1"
	}
	if cfg.HTTPPort == 0 {
		cfg.HTTPPort = 8080
	}
	if cfg.RTSPPort == 0 {
		cfg.RTSPPort = 8554
	}
	if cfg.Logger == nil {
		cfg.Logger = NewLogger("info")
	}
	ca, err := relay.NewClusterCA()
	if err != nil {
		return nil, err
	}
	neighbours := topology.Chain(cfg.DCs)
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
		nc := &Config{Datacenter: dc, identity: &id}
		nc.HTTP.Listen = net.JoinHostPort(cfg.Bind, strconv.Itoa(cfg.HTTPPort+i))
		nc.RTSP.Listen = net.JoinHostPort(cfg.Bind, strconv.Itoa(cfg.RTSPPort+i))
		// RTP over UDP needs an even port and the next one: 9554+2i, 9555+2i
		// with the default base, clear of the RTSP ports.
		rtp := cfg.RTSPPort + 1000 + 2*i
		rtp += rtp % 2
		nc.RTSP.RTPAddress = net.JoinHostPort(cfg.Bind, strconv.Itoa(rtp))
		nc.RTSP.RTCPAddress = net.JoinHostPort(cfg.Bind, strconv.Itoa(rtp+1))
		nc.Overlay.Listen = net.JoinHostPort(cfg.Bind, "0")
		nc.Overlay.Neighbours = map[string]string{}
		for _, nb := range neighbours[dc] {
			if addr, ok := overlayAddrs[nb]; ok {
				nc.Overlay.Neighbours[nb] = addr
			}
		}
		nc.WebRTC.IPs = []string{cfg.Bind}
		nc.Auth.PublishToken = cfg.PublishToken
		nc.SetDefaults()
		if err := nc.Validate(); err != nil {
			c.Close()
			return nil, fmt.Errorf("datacenter %s: %w", dc, err)
		}
		n, err := Start(nc, cfg.Logger)
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("datacenter %s: %w", dc, err)
		}
		c.Nodes[i] = n
		overlayAddrs[dc] = n.OverlayAddr().String()
	}
	// Ready when every link of the chain is up.
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

// HTTPURL returns the base URL of datacenter i's HTTP server.
func (c *Cluster) HTTPURL(i int) string {
	return "http://" + c.Nodes[i].HTTPAddr().String()
}

// RTSPURL returns the RTSP URL of a stream at datacenter i.
func (c *Cluster) RTSPURL(i int, stream string) string {
	return fmt.Sprintf("rtsp://%s/%s", net.JoinHostPort(c.cfg.Bind, strconv.Itoa(c.cfg.RTSPPort+i)), stream)
}

// Datacenters returns the cluster's datacenter names.
func (c *Cluster) Datacenters() []string { return c.cfg.DCs }

// Close stops every node.
func (c *Cluster) Close() {
	for _, n := range c.Nodes {
		if n != nil {
			n.Close()
		}
	}
}
