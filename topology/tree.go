package topology

import (
	"cmp"
	"math"
	"slices"
	"time"
)

// This file computes relay trees: pure functions of the measured overlay and
// the streams' demands, with no I/O, so that the manager, tests and
// benchmarks run the same code.
//
// Each stream gets a tree rooted at its origin that reaches every datacenter
// subscribed to it. The cost of a tree is the sum of the costs of its links
// (a link's cost is its one-way delay plus a penalty for its loss), which is
// what a relay tree spends; a subscriber's delivery delay is the delay of its
// path from the origin, which must stay within Params.DelayBound. Minimising
// cost under a delay bound is the delay-constrained Steiner tree problem; we
// grow each tree with the Takahashi–Matsuyama heuristic (attach the
// subscriber nearest to the tree by its cheapest path, repeat), a
// 2-approximation of the unconstrained optimum that costs well under a
// millisecond for tens of datacenters. Links carry at most their capacity
// minus Params.Headroom, counting the load other streams' trees already put
// on them, and a datacenter feeds at most Params.MaxChildren children per
// tree. Streams are placed in a fixed order (highest bitrate first, then by
// name) and ties between equal paths break by datacenter name, so the same
// input always gives the same trees.

// Datacenter is one node of the overlay graph.
type Datacenter struct {
	Name string
	// Down datacenters carry nothing.
	Down bool
}

// Link is one direction of an overlay link, as measured by its sending end.
type Link struct {
	From, To string
	// Delay is the one-way delay (half the measured RTT).
	Delay time.Duration
	// Loss is the fraction of packets lost, 0 to 1.
	Loss float64
	// CapacityKbps is the link's available bandwidth; 0 means unknown,
	// which is treated as unlimited.
	CapacityKbps float64
	// CommittedKbps is load on the link that these trees do not account
	// for (other traffic).
	CommittedKbps float64
	// Down links carry nothing.
	Down bool
}

// StreamDemand is what one stream needs from the overlay.
type StreamDemand struct {
	Name        string
	Origin      string
	BitrateKbps float64
	// Subscribers are the datacenters that want the stream (its origin
	// may be among them).
	Subscribers []string
}

// Params tune the computation. Zero fields take the defaults below.
type Params struct {
	// Headroom is the fraction of each link's capacity kept free so that a
	// reroute does not overload it (default 0.1).
	Headroom float64
	// MaxChildren caps how many datacenters one datacenter feeds in one
	// tree (default 8).
	MaxChildren int
	// DelayBound is the longest delivery delay a subscriber should see
	// (default 300 ms, the budget inside the overlay). A subscriber that no
	// path reaches within it is reached by its fastest path and listed in
	// Tree.OverBound.
	DelayBound time.Duration
	// LossCost is what 1 % of loss on a link costs, in delay (default
	// 5 ms): between two equally fast paths, the cleaner one wins.
	LossCost time.Duration
	// Margin is how much cheaper (as a fraction) a new tree must be to
	// replace a stream's previous tree that is still valid (default 0.1):
	// noise in the measurements must not make trees flap.
	Margin float64
}

func (p Params) withDefaults() Params {
	if p.Headroom <= 0 {
		p.Headroom = 0.1
	}
	if p.MaxChildren <= 0 {
		p.MaxChildren = 8
	}
	if p.DelayBound <= 0 {
		p.DelayBound = 300 * time.Millisecond
	}
	if p.LossCost <= 0 {
		p.LossCost = 5 * time.Millisecond
	}
	if p.Margin <= 0 {
		p.Margin = 0.1
	}
	return p
}

// Tree is a stream's relay tree.
type Tree struct {
	Stream string
	Origin string
	// Parent maps every datacenter in the tree but the origin to the one
	// it receives the stream from.
	Parent map[string]string
	// Backup maps datacenters in the tree to a second parent to switch to
	// when their parent fails: a neighbour whose own path from the origin
	// avoids the parent (a datacenter of the tree, or one that subscribes
	// upstream when the switch comes). Missing where the graph allows none.
	Backup map[string]string
	// Delay is each subscriber's delivery delay along the tree.
	Delay map[string]time.Duration
	// Cost is the sum of the tree's link costs, in milliseconds.
	Cost float64
	// OverBound lists subscribers reached later than Params.DelayBound
	// (no path was fast enough); Unreached those no path reaches at all.
	OverBound, Unreached []string
}

// Edges returns the tree's links as (parent, child) pairs sorted by child.
func (t *Tree) Edges() [][2]string {
	out := make([][2]string, 0, len(t.Parent))
	for c, p := range t.Parent {
		out = append(out, [2]string{p, c})
	}
	slices.SortFunc(out, func(a, b [2]string) int { return cmp.Compare(a[1], b[1]) })
	return out
}

// Problem is the input of Compute.
type Problem struct {
	Datacenters []Datacenter
	Links       []Link
	Streams     []StreamDemand
	// Previous holds the trees in use, by stream name: a stream keeps its
	// tree while it is valid and not beaten by Params.Margin.
	Previous map[string]*Tree
}

// Compute returns one tree per stream, in the order of p.Streams. A stream
// whose origin is unknown or down gets a tree with every subscriber
// unreached.
func Compute(p Problem, params Params) []*Tree {
	pl := NewPlanner(p.Datacenters, p.Links, params)
	order := make([]int, len(p.Streams))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int {
		sa, sb := &p.Streams[a], &p.Streams[b]
		if c := cmp.Compare(sb.BitrateKbps, sa.BitrateKbps); c != 0 {
			return c
		}
		return cmp.Compare(sa.Name, sb.Name)
	})
	out := make([]*Tree, len(p.Streams))
	for _, i := range order {
		s := &p.Streams[i]
		out[i] = pl.Place(s, p.Previous[s.Name])
	}
	return out
}

// Planner places trees one at a time on one snapshot of the overlay,
// keeping account of the load each placed tree puts on the links: the
// manager places every stream after a measurement round (Compute), and
// re-places one stream when its subscribers change. It is not safe for
// concurrent use.
type Planner struct{ g *graph }

// NewPlanner returns a planner for the overlay as measured, with no load
// placed yet.
func NewPlanner(dcs []Datacenter, links []Link, params Params) *Planner {
	return &Planner{g: newGraph(dcs, links, params.withDefaults())}
}

// Place computes a stream's tree, keeping prev (the tree in use, or nil)
// when it is still valid and a new tree would not be cheaper by the margin,
// and adds the tree's load to its links.
func (pl *Planner) Place(s *StreamDemand, prev *Tree) *Tree { return pl.g.place(s, prev) }

// Release takes a placed tree's load off its links again, before the
// stream is placed anew or ends.
func (pl *Planner) Release(t *Tree, bitrateKbps float64) {
	g := pl.g
	for child, parent := range t.Parent {
		c, ok1 := g.index[child]
		p, ok2 := g.index[parent]
		if ok1 && ok2 && g.resid[p*g.n+c] < inf {
			g.resid[p*g.n+c] += bitrateKbps
		}
	}
}

const inf = math.MaxFloat64

// graph is the overlay with dense indices, all-pairs cheapest paths and the
// residual capacity left by the trees placed so far.
type graph struct {
	params Params
	names  []string
	index  map[string]int
	n      int
	cost   []float64 // n×n link cost in ms, inf where no usable link
	delay  []float64 // n×n link delay in ms
	// delayIn is delay transposed: delayIn[v*n+u] is the delay of u→v,
	// so that a scan of v's incoming links reads one row.
	delayIn []float64
	resid   []float64 // n×n capacity left in kbps (inf when unknown)
	dist    []float64 // n×n cheapest path cost
	pdelay  []float64 // n×n delay along the cheapest path
	next    []int32   // n×n first hop on the cheapest path, -1 if none

	scratch [2]*building // see newBuilding
	// Scratch space reused by every stream placed (see place, attach).
	subs  []int
	path  []int
	reach []float64
}

func newGraph(dcs []Datacenter, links []Link, params Params) *graph {
	g := &graph{params: params, index: make(map[string]int, len(dcs))}
	sorted := slices.Clone(dcs)
	slices.SortFunc(sorted, func(a, b Datacenter) int { return cmp.Compare(a.Name, b.Name) })
	for _, d := range sorted {
		if _, dup := g.index[d.Name]; dup || d.Down {
			continue
		}
		g.index[d.Name] = len(g.names)
		g.names = append(g.names, d.Name)
	}
	n := len(g.names)
	g.n = n
	g.cost = make([]float64, n*n)
	g.delay = make([]float64, n*n)
	g.resid = make([]float64, n*n)
	for i := range g.cost {
		g.cost[i], g.delay[i] = inf, inf
	}
	lossCost := float64(params.LossCost) / float64(time.Millisecond)
	for _, l := range links {
		u, ok1 := g.index[l.From]
		v, ok2 := g.index[l.To]
		if !ok1 || !ok2 || u == v || l.Down {
			continue
		}
		d := float64(l.Delay) / float64(time.Millisecond)
		c := d + lossCost*100*l.Loss
		if c >= g.cost[u*n+v] {
			continue // a duplicate entry: keep the better one
		}
		g.cost[u*n+v], g.delay[u*n+v] = c, d
		g.resid[u*n+v] = inf
		if l.CapacityKbps > 0 {
			g.resid[u*n+v] = max(0, l.CapacityKbps*(1-params.Headroom)-l.CommittedKbps)
		}
	}
	g.delayIn = make([]float64, n*n)
	for u := range n {
		for v := range n {
			g.delayIn[v*n+u] = g.delay[u*n+v]
		}
	}
	g.reach = make([]float64, n)
	g.shortestPaths()
	return g
}

// shortestPaths fills dist and next by Floyd–Warshall: O(n³), about a
// millisecond for 100 datacenters. Ties prefer the lower-numbered (by name)
// first hop so that every run picks the same paths.
func (g *graph) shortestPaths() {
	n := g.n
	g.dist = slices.Clone(g.cost)
	g.pdelay = slices.Clone(g.delay)
	g.next = make([]int32, n*n)
	for u := range n {
		for v := range n {
			g.next[u*n+v] = -1
			if g.cost[u*n+v] < inf {
				g.next[u*n+v] = int32(v)
			}
		}
		g.dist[u*n+u], g.pdelay[u*n+u] = 0, 0
		g.next[u*n+u] = int32(u)
	}
	for k := range n {
		rowK := g.dist[k*n : k*n+n]
		delayK := g.pdelay[k*n : k*n+n]
		for u := range n {
			duk := g.dist[u*n+k]
			if duk == inf || u == k {
				continue
			}
			rowU := g.dist[u*n : u*n+n]
			nextU := g.next[u*n : u*n+n]
			delayU := g.pdelay[u*n : u*n+n]
			hop, puk := nextU[k], delayU[k]
			for v, dkv := range rowK {
				if dkv == inf {
					continue
				}
				d := duk + dkv
				if d < rowU[v] || d == rowU[v] && hop < nextU[v] && v != u {
					rowU[v] = d
					nextU[v] = hop
					delayU[v] = puk + delayK[v]
				}
			}
		}
	}
}

// building is one tree under construction, by datacenter index.
type building struct {
	g        *graph
	bitrate  float64
	origin   int
	parent   []int32   // -1: not in the tree; the origin is its own parent
	depth    []float64 // delivery delay in ms
	children []int32
	want     []bool // subscribed
	members  []int  // datacenters in the tree but the origin, in order of joining
	pending  []int  // scratch for grow
}

// newBuilding returns an empty tree rooted at origin. The graph keeps two
// (the fresh tree and the previous one of the stream being placed) and
// reuses them for every stream: a full recompute would otherwise allocate
// most of its memory here.
func (g *graph) newBuilding(slot int, origin int, bitrate float64) *building {
	b := g.scratch[slot]
	if b == nil {
		b = &building{g: g, parent: make([]int32, g.n), depth: make([]float64, g.n),
			children: make([]int32, g.n), want: make([]bool, g.n)}
		g.scratch[slot] = b
	}
	b.bitrate, b.origin = bitrate, origin
	for i := range b.parent {
		b.parent[i] = -1
	}
	clear(b.depth)
	clear(b.children)
	clear(b.want)
	b.members = b.members[:0]
	b.parent[origin] = int32(origin)
	return b
}

func (b *building) in(v int) bool { return b.parent[v] >= 0 }

// usable reports whether the tree may add link u→v.
func (b *building) usable(u, v int) bool {
	g := b.g
	return g.cost[u*g.n+v] < inf && g.resid[u*g.n+v] >= b.bitrate
}

// place computes the tree of one stream and commits its load to the links.
func (g *graph) place(s *StreamDemand, prev *Tree) *Tree {
	origin, ok := g.index[s.Origin]
	if !ok {
		return &Tree{Stream: s.Name, Origin: s.Origin, Parent: map[string]string{}, Backup: map[string]string{},
			Delay: map[string]time.Duration{}, Unreached: sortedUnique(s.Subscribers)}
	}
	// Indices follow names in order, so sorted indices are sorted names.
	subs := g.subs[:0]
	var unknown []string
	for _, name := range s.Subscribers {
		if v, ok := g.index[name]; ok {
			subs = append(subs, v)
		} else {
			unknown = append(unknown, name)
		}
	}
	slices.Sort(subs)
	subs = slices.Compact(subs)
	g.subs = subs
	fresh := g.newBuilding(0, origin, s.BitrateKbps)
	fresh.grow(subs)
	best := fresh
	if prev != nil && prev.Origin == s.Origin {
		if kept := g.fromPrevious(prev, origin, s.BitrateKbps); kept != nil {
			kept.prune(subs)
			kept.grow(subs)
			if kept.valid(subs) && fresh.cost() >= kept.cost()*(1-g.params.Margin) {
				best = kept
			}
		}
	}
	best.commit()
	t := best.tree(s, subs)
	if len(unknown) > 0 {
		t.Unreached = append(t.Unreached, unknown...)
		slices.Sort(t.Unreached)
		t.Unreached = slices.Compact(t.Unreached)
	}
	return t
}

// grow attaches every subscriber not yet in the tree, nearest first.
func (b *building) grow(subs []int) {
	for _, v := range subs {
		b.want[v] = true
	}
	pending := b.pending[:0]
	defer func() { b.pending = pending[:0] }()
	for _, v := range subs {
		if !b.in(v) {
			pending = append(pending, v)
		}
	}
	for len(pending) > 0 {
		bestI, from, ok := b.nearest(pending)
		if !ok {
			return // the rest cannot be reached at all
		}
		b.attach(from, pending[bestI])
		pending = slices.Delete(pending, bestI, bestI+1) // attached, or unreachable
		pending = slices.DeleteFunc(pending, b.in)
	}
}

// nearest picks the pending subscriber closest to the tree and the tree
// node to reach it from: the cheapest path whose delivery delay stays
// within the bound, else the fastest path from the origin.
func (b *building) nearest(pending []int) (idx, from int, ok bool) {
	g, n := b.g, b.g.n
	bound := float64(b.g.params.DelayBound) / float64(time.Millisecond)
	bestCost, bestI, bestFrom := inf, -1, -1
	for i, s := range pending {
		for j := -1; j < len(b.members); j++ {
			t := b.origin
			if j >= 0 {
				t = b.members[j]
			}
			if int(b.children[t]) >= g.params.MaxChildren {
				continue
			}
			d := g.dist[t*n+s]
			if d >= bestCost || d == inf {
				continue
			}
			if b.depth[t]+b.pathDelay(t, s) > bound {
				continue
			}
			bestCost, bestI, bestFrom = d, i, t
		}
	}
	if bestI >= 0 {
		return bestI, bestFrom, true
	}
	// Nothing within the bound: take the subscriber nearest the origin by
	// its own fastest path.
	for i, s := range pending {
		if d := g.dist[b.origin*n+s]; d < bestCost {
			bestCost, bestI = d, i
		}
	}
	if bestI < 0 {
		return 0, 0, false
	}
	return bestI, b.origin, true
}

// pathDelay is the delay of the cheapest path from u to v.
func (b *building) pathDelay(u, v int) float64 { return b.g.pdelay[u*b.g.n+v] }

// pathAvoids reports whether the cheapest path from u to v exists and
// runs through neither x nor y.
func (g *graph) pathAvoids(u, v, x, y int) bool {
	for {
		if u == x || u == y {
			return false
		}
		if u == v {
			return true
		}
		h := int(g.next[u*g.n+v])
		if h < 0 {
			return false
		}
		u = h
	}
}

// attach adds the cheapest path from tree node from to s. When the path
// runs through a link without capacity for the stream, or a datacenter that
// cannot take another child, a search over what is usable finds another.
func (b *building) attach(from, s int) {
	path := b.g.pathTo(from, s)
	if path == nil || !b.pathUsable(path) {
		if path = b.searchPath(s); path == nil {
			return // unreachable under the constraints
		}
	}
	for i := 0; i+1 < len(path); i++ {
		u, v := path[i], path[i+1]
		d := b.depth[u] + b.g.delay[u*b.g.n+v]
		switch {
		case !b.in(v):
			b.setParent(v, u, d)
		case d < b.depth[v] && !b.isAncestor(v, u) && int(b.children[u]) < b.g.params.MaxChildren:
			b.setParent(v, u, d) // a faster way in for a node already fed
		}
	}
}

func (b *building) setParent(v, u int, depth float64) {
	if old := b.parent[v]; old >= 0 {
		b.children[old]--
	} else {
		b.members = append(b.members, v)
	}
	b.parent[v] = int32(u)
	b.children[u]++
	b.setDepth(v, depth)
}

// setDepth sets v's delivery delay and updates its subtree.
func (b *building) setDepth(v int, depth float64) {
	b.depth[v] = depth
	n := b.g.n
	for _, c := range b.members {
		if c != v && int(b.parent[c]) == v {
			b.setDepth(c, depth+b.g.delay[v*n+c])
		}
	}
}

// isAncestor reports whether a is on the tree path from the origin to v
// (v included).
func (b *building) isAncestor(a, v int) bool {
	for {
		if v == a {
			return true
		}
		if v == b.origin || b.parent[v] < 0 {
			return false
		}
		v = int(b.parent[v])
	}
}

// pathTo returns the cheapest path from u to v, or nil. The slice is
// scratch space, valid until the next call.
func (g *graph) pathTo(u, v int) []int {
	if g.next[u*g.n+v] < 0 {
		return nil
	}
	path := append(g.path[:0], u)
	for u != v {
		u = int(g.next[u*g.n+v])
		path = append(path, u)
	}
	g.path = path
	return path
}

func (b *building) pathUsable(path []int) bool {
	if int(b.children[path[0]]) >= b.g.params.MaxChildren {
		return false
	}
	for i := 0; i+1 < len(path); i++ {
		if !b.usable(path[i], path[i+1]) {
			return false
		}
	}
	return true
}

// searchPath finds the cheapest usable path from the tree to s (Dijkstra
// from every tree node that can take a child, O(n²)), or nil.
func (b *building) searchPath(s int) []int {
	g, n := b.g, b.g.n
	dist := make([]float64, n)
	prev := make([]int32, n)
	done := make([]bool, n)
	for v := range n {
		dist[v], prev[v] = inf, -1
		if b.in(v) && int(b.children[v]) < g.params.MaxChildren {
			dist[v] = 0
		}
	}
	for {
		u := -1
		for v := range n {
			if !done[v] && dist[v] < inf && (u < 0 || dist[v] < dist[u]) {
				u = v
			}
		}
		if u < 0 {
			return nil
		}
		if u == s {
			break
		}
		done[u] = true
		for v := range n {
			if done[v] || b.in(v) || !b.usable(u, v) {
				continue // paths through the tree start at the tree
			}
			if d := dist[u] + g.cost[u*n+v]; d < dist[v] {
				dist[v], prev[v] = d, int32(u)
			}
		}
	}
	var path []int
	for v := s; ; v = int(prev[v]) {
		path = append(path, v)
		if prev[v] < 0 {
			break
		}
	}
	slices.Reverse(path)
	return path
}

// prune drops datacenters that neither want the stream nor feed one that
// does.
func (b *building) prune(subs []int) {
	for _, v := range subs {
		b.want[v] = true
	}
	for changed := true; changed; {
		changed = false
		for _, v := range b.members {
			if b.in(v) && !b.want[v] && b.children[v] == 0 {
				b.children[b.parent[v]]--
				b.parent[v] = -1
				changed = true
			}
		}
	}
	b.members = slices.DeleteFunc(b.members, func(v int) bool { return !b.in(v) })
}

// fromPrevious rebuilds a previous tree on the current graph, or returns
// nil when one of its datacenters or links is gone or over capacity.
func (g *graph) fromPrevious(prev *Tree, origin int, bitrate float64) *building {
	b := g.newBuilding(1, origin, bitrate)
	for child, parent := range prev.Parent {
		c, ok1 := g.index[child]
		p, ok2 := g.index[parent]
		if !ok1 || !ok2 || !b.usable(p, c) || c == origin {
			return nil
		}
		b.parent[c] = int32(p)
		b.children[p]++
		b.members = append(b.members, c)
	}
	slices.Sort(b.members)
	if int(b.children[origin]) > g.params.MaxChildren {
		return nil
	}
	for _, v := range b.members {
		if int(b.children[v]) > g.params.MaxChildren {
			return nil
		}
		// Walk up to the origin; more steps than members is a loop.
		u, steps := v, 0
		for u != origin && b.parent[u] >= 0 && steps <= len(b.members) {
			u, steps = int(b.parent[u]), steps+1
		}
		if u != origin {
			return nil // not a tree rooted at the origin
		}
	}
	b.setDepth(origin, 0)
	return b
}

// valid reports whether every reachable subscriber is in the tree within
// the bound wherever the bound can be met.
func (b *building) valid(subs []int) bool {
	g, n := b.g, b.g.n
	bound := float64(g.params.DelayBound) / float64(time.Millisecond)
	for _, s := range subs {
		if !b.in(s) {
			if g.dist[b.origin*n+s] < inf {
				return false
			}
			continue
		}
		if b.depth[s] > bound && b.pathDelay(b.origin, s) <= bound {
			return false
		}
	}
	return true
}

func (b *building) cost() float64 {
	total := 0.0
	for _, v := range b.members {
		total += b.g.cost[int(b.parent[v])*b.g.n+v]
	}
	return total
}

// commit takes the stream's bitrate off the capacity of the tree's links.
func (b *building) commit() {
	g := b.g
	for _, v := range b.members {
		if e := int(b.parent[v])*g.n + v; g.resid[e] < inf {
			g.resid[e] -= b.bitrate
		}
	}
}

func (b *building) tree(s *StreamDemand, subs []int) *Tree {
	g := b.g
	t := &Tree{Stream: s.Name, Origin: s.Origin, Parent: make(map[string]string, len(b.members)),
		Backup: make(map[string]string, len(b.members)), Delay: make(map[string]time.Duration, len(subs)), Cost: b.cost()}
	bound := float64(g.params.DelayBound) / float64(time.Millisecond)
	// reach is how fast each datacenter gets the stream: by its tree
	// path, or outside the tree by its path from the origin (backup).
	for u := range g.n {
		if b.in(u) {
			g.reach[u] = b.depth[u]
		} else {
			g.reach[u] = g.pdelay[b.origin*g.n+u]
		}
	}
	for _, v := range b.members {
		t.Parent[g.names[v]] = g.names[b.parent[v]]
		if bk := b.backup(v); bk >= 0 {
			t.Backup[g.names[v]] = g.names[bk]
		}
	}
	for _, s := range subs {
		switch {
		case !b.in(s):
			t.Unreached = append(t.Unreached, g.names[s])
		default:
			t.Delay[g.names[s]] = time.Duration(b.depth[s] * float64(time.Millisecond))
			if b.depth[s] > bound {
				t.OverBound = append(t.OverBound, g.names[s])
			}
		}
	}
	return t
}

// backup picks v's second parent, the one v switches to when its parent
// fails: a datacenter linked to v that gets the stream without going
// through v's parent or v itself, fastest first. A datacenter of the tree
// qualifies by its tree path; one outside the tree by its fastest path
// from the origin (it then subscribes upstream itself when v switches).
//
// It scans v's incoming links by the delay at which each neighbour would
// hand the stream on (g.reach, filled by tree): first for the fastest
// neighbour alone, which usually qualifies, else again checking the path
// conditions for each neighbour faster than the best so far. Ties go to
// the lower index (name), as in one ascending scan.
func (b *building) backup(v int) int {
	g, n := b.g, b.g.n
	p := int(b.parent[v])
	in := g.delayIn[v*n : v*n+n]
	reach := g.reach[:len(in)]
	// Neither v nor its parent is a candidate: out of reach for the scan
	// (inf plus a delay is not below inf).
	rv, rp := reach[v], reach[p]
	reach[v], reach[p] = inf, inf
	defer func() { reach[v], reach[p] = rv, rp }()
	best, bestD := -1, inf
	for u, dl := range in {
		if d := reach[u] + dl; d < bestD {
			best, bestD = u, d
		}
	}
	if best < 0 || b.backupOK(v, p, best) {
		return best
	}
	best, bestD = -1, inf
	for u, dl := range in {
		if d := reach[u] + dl; d < bestD && b.backupOK(v, p, u) {
			best, bestD = u, d
		}
	}
	return best
}

// backupOK reports whether u, linked to v, may feed v when v's parent p
// fails.
func (b *building) backupOK(v, p, u int) bool {
	if b.in(u) {
		// Not fed through v, nor through v's parent (unless that is the
		// origin, without which there is no stream anyway).
		return !b.isAncestor(v, u) && (p == b.origin || !b.isAncestor(p, u))
	}
	avoid := p
	if p == b.origin {
		avoid = v
	}
	return b.g.pathAvoids(b.origin, u, v, avoid)
}

func sortedUnique(s []string) []string {
	out := slices.Clone(s)
	slices.Sort(out)
	return slices.Compact(out)
}
