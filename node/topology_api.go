package node

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"time"

	"github.com/stemflow/stemflow/relay"
	"github.com/stemflow/stemflow/topology/store"
)

// GET /api/v1/topology: the overlay as the control plane sees it — the
// datacenters, the measured links, the manager that leads and every
// stream's tree — read from etcd on each request. Without etcd, or when
// etcd does not answer in time, the node answers 200 with what it knows by
// itself (source "local"): its own links and the path of each stream to
// it. docs/api.md documents the keys.

// topologySource is the control plane's state the topology API reads;
// *store.Store implements it.
type topologySource interface {
	Leader(ctx context.Context) (string, error)
	ListNodes(ctx context.Context) ([]store.Node, error)
	ListLinks(ctx context.Context) ([]store.Link, error)
	ListStreams(ctx context.Context) ([]store.Stream, error)
	ListRoutes(ctx context.Context) ([]store.Route, error)
}

var _ topologySource = (*store.Store)(nil)

// localTopology is what the node knows without etcd; *relay.Hub implements
// it.
type localTopology interface {
	Links() []relay.LinkStats
	Streams() []relay.StreamInfo
}

// topologyReadTimeout bounds the etcd reads of one request: past it the
// answer falls back to the local view, so that the /topology page keeps
// drawing while etcd is away.
const topologyReadTimeout = time.Second

// Sources of a topology answer (the "source" key).
const (
	topologyFromEtcd  = "etcd"
	topologyFromLocal = "local"
)

// apiTopology is the body of GET /api/v1/topology.
type apiTopology struct {
	Datacenter string `json:"datacenter"`
	// Source is "etcd" or "local"; EtcdError says why a node that has etcd
	// answered from its local view.
	Source    string            `json:"source"`
	EtcdError string            `json:"etcd_error,omitempty"`
	Leader    string            `json:"leader"`
	Nodes     []apiTopologyNode `json:"nodes"`
	Links     []apiTopologyLink `json:"links"`
	Trees     []apiTree         `json:"trees"`
}

type apiTopologyNode struct {
	DC string `json:"dc"`
	Up bool   `json:"up"`
	// Nodes are the ids of the datacenter's registered nodes (etcd only).
	Nodes []string `json:"nodes"`
}

// apiTopologyLink is one direction of a link, as its sending end measured
// it.
type apiTopologyLink struct {
	From          string  `json:"from"`
	To            string  `json:"to"`
	RTTMs         float64 `json:"rtt_ms"`
	JitterMs      float64 `json:"jitter_ms"`
	Loss          float64 `json:"loss"` // fraction, 0 to 1
	BandwidthKbps float64 `json:"bandwidth_kbps"`
	Down          bool    `json:"down"`
	// Streams counts the trees that send over this direction of the link,
	// LoadKbps sums their bitrates (those known): the link's load.
	Streams  int        `json:"streams"`
	LoadKbps float64    `json:"load_kbps"`
	Updated  *time.Time `json:"updated,omitempty"`
}

type apiTree struct {
	Stream  string `json:"stream"`
	Origin  string `json:"origin"`
	Version int64  `json:"version"` // 0: no route yet
	// BitrateKbps is the stream's measured rate (0: unknown).
	BitrateKbps float64 `json:"bitrate_kbps"`
	// Edges run from the origin outwards, parents before children.
	Edges []apiTreeEdge `json:"edges"`
	// Backup maps a datacenter to the parent it switches to by itself when
	// its parent dies.
	Backup map[string]string `json:"backup"`
}

// apiTreeEdge is one hop of a tree with the measured delay of its link
// (null when no measurement of the link is known).
type apiTreeEdge struct {
	From  string   `json:"from"`
	To    string   `json:"to"`
	RTTMs *float64 `json:"rtt_ms"`
	// DelayMs is the one-way delay estimated as half the RTT.
	DelayMs *float64 `json:"delay_ms"`
}

// topologyAPI serves GET /api/v1/topology.
type topologyAPI struct {
	dc string
	// source returns the control plane's state, nil while the node runs
	// without etcd (a node connects to etcd after it starts serving).
	source func() topologySource
	local  localTopology
	// measured, when set, returns this node's own smoothed measurements of
	// its links (from its datacenter), for the local view.
	measured func() []store.Link
}

var _ http.Handler = (*topologyAPI)(nil)

func (a *topologyAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, a.view(r.Context()))
}

// view builds the answer: from etcd when the node has it and it answers,
// else from the local view with the reason.
func (a *topologyAPI) view(ctx context.Context) apiTopology {
	if src := a.etcd(); src != nil {
		ctx, cancel := context.WithTimeout(ctx, topologyReadTimeout)
		defer cancel()
		v, err := a.fromEtcd(ctx, src)
		if err == nil {
			return v
		}
		v = a.fromLocal()
		if errors.Is(err, context.DeadlineExceeded) {
			err = fmt.Errorf("etcd did not answer within %v: %w", topologyReadTimeout, err)
		}
		v.EtcdError = err.Error() + " (showing what this node knows by itself; check that etcd runs and that this node reaches it)"
		return v
	}
	return a.fromLocal()
}

func (a *topologyAPI) etcd() topologySource {
	if a.source == nil {
		return nil
	}
	return a.source()
}

func (a *topologyAPI) fromEtcd(ctx context.Context, src topologySource) (apiTopology, error) {
	leader, err := src.Leader(ctx)
	if err != nil {
		return apiTopology{}, err
	}
	nodes, err := src.ListNodes(ctx)
	if err != nil {
		return apiTopology{}, err
	}
	links, err := src.ListLinks(ctx)
	if err != nil {
		return apiTopology{}, err
	}
	streams, err := src.ListStreams(ctx)
	if err != nil {
		return apiTopology{}, err
	}
	routes, err := src.ListRoutes(ctx)
	if err != nil {
		return apiTopology{}, err
	}

	g := newTopologyGraph()
	for _, n := range nodes {
		d := g.dc(n.DC)
		d.Up = true
		d.Nodes = append(d.Nodes, n.Node)
	}
	for _, l := range links {
		g.dc(l.From)
		g.dc(l.To)
		v := apiTopologyLink{
			From: l.From, To: l.To,
			RTTMs: l.RTTMs, JitterMs: l.JitterMs, Loss: l.Loss, BandwidthKbps: l.BandwidthKbps, Down: l.Down,
		}
		if !l.Updated.IsZero() {
			u := l.Updated.UTC()
			v.Updated = &u
		}
		g.addLink(v)
	}
	if leader != "" {
		g.dc(leader)
	}
	published := map[string]store.Stream{}
	for _, st := range streams {
		published[st.Name] = st
	}
	routed := map[string]bool{}
	for _, rt := range routes {
		routed[rt.Stream] = true
		g.dc(rt.Origin)
		edges := treeEdges(rt.Origin, rt.Parent)
		backup := map[string]string{}
		for dc, b := range rt.Backup {
			g.dc(dc)
			g.dc(b)
			backup[dc] = b
		}
		g.addTree(rt.Stream, rt.Origin, rt.Version, published[rt.Stream].BitrateKbps, edges, backup)
	}
	// A published stream without a route (nobody outside its origin
	// watches it, or no manager runs) flows as announcements lead it: its
	// tree is the path this node knows to itself, if any.
	hops := map[string][]string{}
	for _, s := range a.local.Streams() {
		hops[s.Name] = s.Hops
	}
	for _, st := range streams {
		if !routed[st.Name] {
			g.dc(st.OriginDC)
			g.addTree(st.Name, st.OriginDC, 0, st.BitrateKbps, pathEdges(hops[st.Name]), map[string]string{})
		}
	}
	// A stream the overlay announces that etcd does not list (its origin
	// node runs without etcd, or has not claimed it yet) is shown the same
	// way.
	for _, s := range a.local.Streams() {
		if _, ok := published[s.Name]; !ok && !routed[s.Name] {
			g.addTree(s.Name, s.Origin, 0, 0, pathEdges(s.Hops), map[string]string{})
		}
	}
	out := g.result(a.dc, topologyFromEtcd)
	out.Leader = leader
	return out, nil
}

// fromLocal is what the node knows by itself: its links (both directions:
// RTT is symmetric, loss is what arrived from the peer with gaps) and each
// stream's path from its origin to this node. Datacenters on a path or at
// the far end of a link count as up.
func (a *topologyAPI) fromLocal() apiTopology {
	g := newTopologyGraph()
	g.dc(a.dc).Up = true
	for _, l := range a.local.Links() {
		// A silent neighbour (no sign of life for the relay's DeadAfter)
		// is down, its links too, long before its connection times out.
		d := g.dc(l.Peer)
		d.Up = d.Up || !l.Silent
		rtt := float64(l.RTT) / float64(time.Millisecond)
		var loss float64
		if n := l.PacketsReceived + l.HopLost; n > 0 {
			loss = float64(l.HopLost) / float64(n)
		}
		g.addLink(apiTopologyLink{From: a.dc, To: l.Peer, RTTMs: rtt, Down: l.Silent})
		g.addLink(apiTopologyLink{From: l.Peer, To: a.dc, RTTMs: rtt, Loss: loss, Down: l.Silent})
	}
	// The node's own measurements, when it makes them, replace the
	// outgoing direction: smoothed, with jitter, loss and bandwidth.
	if a.measured != nil {
		for _, m := range a.measured() {
			if m.From != a.dc || m.To == "" {
				continue
			}
			g.dc(m.To)
			l := apiTopologyLink{From: m.From, To: m.To, RTTMs: m.RTTMs, JitterMs: m.JitterMs, Loss: m.Loss, BandwidthKbps: m.BandwidthKbps, Down: m.Down}
			if !m.Updated.IsZero() {
				u := m.Updated.UTC()
				l.Updated = &u
			}
			g.addLink(l)
		}
	}
	for _, s := range a.local.Streams() {
		for _, dc := range s.Hops {
			g.dc(dc).Up = true
		}
		g.addTree(s.Name, s.Origin, 0, 0, pathEdges(s.Hops), map[string]string{})
	}
	return g.result(a.dc, topologyFromLocal)
}

// pathEdges are the hops of a path as edges.
func pathEdges(path []string) [][2]string {
	var edges [][2]string
	for i := 1; i < len(path); i++ {
		edges = append(edges, [2]string{path[i-1], path[i]})
	}
	return edges
}

// treeEdges orders a route's parent map as edges from the origin outwards
// (breadth first, children by name); edges not reachable from the origin
// (a route being rewritten) follow, sorted.
func treeEdges(origin string, parent map[string]string) [][2]string {
	children := map[string][]string{}
	for dc, p := range parent {
		children[p] = append(children[p], dc)
	}
	for _, c := range children {
		sort.Strings(c)
	}
	var out [][2]string
	seen := map[string]bool{origin: true}
	queue := []string{origin}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range children[p] {
			if seen[c] {
				continue
			}
			seen[c] = true
			out = append(out, [2]string{p, c})
			queue = append(queue, c)
		}
	}
	var rest [][2]string
	for dc, p := range parent {
		if !seen[dc] {
			rest = append(rest, [2]string{p, dc})
		}
	}
	sort.Slice(rest, func(i, j int) bool {
		if rest[i][0] != rest[j][0] {
			return rest[i][0] < rest[j][0]
		}
		return rest[i][1] < rest[j][1]
	})
	return append(out, rest...)
}

// topologyGraph collects datacenters, links and trees, then resolves each
// tree edge's delay and each link's load.
type topologyGraph struct {
	dcs   map[string]*apiTopologyNode
	links map[[2]string]*apiTopologyLink
	order [][2]string
	trees []apiTree
	edges [][][2]string // per tree
}

func newTopologyGraph() *topologyGraph {
	return &topologyGraph{dcs: map[string]*apiTopologyNode{}, links: map[[2]string]*apiTopologyLink{}}
}

func (g *topologyGraph) dc(name string) *apiTopologyNode {
	d, ok := g.dcs[name]
	if !ok {
		d = &apiTopologyNode{DC: name, Nodes: []string{}}
		g.dcs[name] = d
	}
	return d
}

func (g *topologyGraph) addLink(l apiTopologyLink) {
	k := [2]string{l.From, l.To}
	if _, ok := g.links[k]; !ok {
		g.order = append(g.order, k)
	}
	g.links[k] = &l
}

func (g *topologyGraph) addTree(stream, origin string, version int64, kbps float64, edges [][2]string, backup map[string]string) {
	for _, e := range edges {
		g.dc(e[0])
		g.dc(e[1])
	}
	g.trees = append(g.trees, apiTree{Stream: stream, Origin: origin, Version: version, BitrateKbps: kbps, Backup: backup})
	g.edges = append(g.edges, edges)
}

// rtt is the measured RTT between two datacenters: the link in that
// direction, else the reverse one (RTT is a round trip).
func (g *topologyGraph) rtt(from, to string) (float64, bool) {
	if l, ok := g.links[[2]string{from, to}]; ok && !l.Down {
		return l.RTTMs, true
	}
	if l, ok := g.links[[2]string{to, from}]; ok && !l.Down {
		return l.RTTMs, true
	}
	return 0, false
}

func (g *topologyGraph) result(dc, source string) apiTopology {
	out := apiTopology{
		Datacenter: dc,
		Source:     source,
		Nodes:      make([]apiTopologyNode, 0, len(g.dcs)),
		Links:      make([]apiTopologyLink, 0, len(g.links)),
		Trees:      make([]apiTree, 0, len(g.trees)),
	}
	for i, t := range g.trees {
		t.Edges = make([]apiTreeEdge, 0, len(g.edges[i]))
		for _, e := range g.edges[i] {
			edge := apiTreeEdge{From: e[0], To: e[1]}
			if rtt, ok := g.rtt(e[0], e[1]); ok {
				delay := rtt / 2
				edge.RTTMs, edge.DelayMs = &rtt, &delay
			}
			if l, ok := g.links[e]; ok {
				l.Streams++
				l.LoadKbps += t.BitrateKbps
			}
			t.Edges = append(t.Edges, edge)
		}
		out.Trees = append(out.Trees, t)
	}
	sort.Slice(out.Trees, func(i, j int) bool { return out.Trees[i].Stream < out.Trees[j].Stream })
	for _, d := range g.dcs {
		if d.DC == "" {
			continue
		}
		sort.Strings(d.Nodes)
		out.Nodes = append(out.Nodes, *d)
	}
	sort.Slice(out.Nodes, func(i, j int) bool { return out.Nodes[i].DC < out.Nodes[j].DC })
	for _, k := range g.order {
		out.Links = append(out.Links, *g.links[k])
	}
	sort.Slice(out.Links, func(i, j int) bool {
		if out.Links[i].From != out.Links[j].From {
			return out.Links[i].From < out.Links[j].From
		}
		return out.Links[i].To < out.Links[j].To
	})
	return out
}

// topologyAPI returns the node's GET /api/v1/topology handler.
func (n *Node) topologyAPI() *topologyAPI {
	return &topologyAPI{
		dc:    n.cfg.Datacenter,
		local: n.hub,
		source: func() topologySource {
			if st := n.Store(); st != nil { // a nil *store.Store is no source
				return st
			}
			return nil
		},
		measured: n.Measurements,
	}
}
