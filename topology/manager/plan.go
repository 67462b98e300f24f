package manager

import (
	"cmp"
	"maps"
	"slices"
	"time"

	"github.com/stemflow/stemflow/topology"
	"github.com/stemflow/stemflow/topology/store"
)

// state is what the manager knows of the overlay, kept from the batches of
// store.WatchTopology. It is owned by the manager's goroutine.
type state struct {
	nodes   map[[2]string]bool // (dc, node) registered
	dcs     map[string]int     // live nodes per datacenter
	links   map[[2]string]store.Link
	streams map[string]store.Stream
	subs    map[string]map[string]bool // stream → subscribed datacenters
}

func newState() *state {
	return &state{nodes: map[[2]string]bool{}, dcs: map[string]int{}, links: map[[2]string]store.Link{},
		streams: map[string]store.Stream{}, subs: map[string]map[string]bool{}}
}

// apply makes one change; it reports whether the change can alter a tree
// (a rewritten value that says the same does not count).
func (st *state) apply(ev store.TopologyEvent) bool {
	switch ev.Kind {
	case store.KindNode:
		k := [2]string{ev.Node.DC, ev.Node.Node}
		if ev.Deleted {
			if !st.nodes[k] {
				return false
			}
			delete(st.nodes, k)
			if st.dcs[k[0]]--; st.dcs[k[0]] <= 0 {
				delete(st.dcs, k[0])
			}
			return true
		}
		if st.nodes[k] {
			return false // a node's value changed, not its being there
		}
		st.nodes[k] = true
		st.dcs[k[0]]++
		return true
	case store.KindLink:
		k := [2]string{ev.Link.From, ev.Link.To}
		if ev.Deleted {
			_, had := st.links[k]
			delete(st.links, k)
			return had
		}
		old, had := st.links[k]
		st.links[k] = ev.Link
		return !had || !sameMeasurement(old, ev.Link)
	case store.KindStream:
		if ev.Deleted {
			_, had := st.streams[ev.Stream.Name]
			delete(st.streams, ev.Stream.Name)
			return had
		}
		old, had := st.streams[ev.Stream.Name]
		st.streams[ev.Stream.Name] = ev.Stream
		return !had || old.OriginDC != ev.Stream.OriginDC || old.BitrateKbps != ev.Stream.BitrateKbps
	case store.KindSubscription:
		s, dc := ev.Subscription.Stream, ev.Subscription.DC
		if ev.Deleted {
			if !st.subs[s][dc] {
				return false
			}
			if delete(st.subs[s], dc); len(st.subs[s]) == 0 {
				delete(st.subs, s)
			}
			return true
		}
		if st.subs[s][dc] {
			return false
		}
		if st.subs[s] == nil {
			st.subs[s] = map[string]bool{}
		}
		st.subs[s][dc] = true
		return true
	}
	return false
}

// sameMeasurement reports whether two values of one link plan the same.
func sameMeasurement(a, b store.Link) bool {
	return a.RTTMs == b.RTTMs && a.Loss == b.Loss && a.BandwidthKbps == b.BandwidthKbps && a.Down == b.Down
}

// problem turns the state into the planner's input: datacenters with a live
// node, their links that are up (delay half the measured RTT, capacity the
// measured bandwidth), and the streams whose origin is live, with their
// subscribers. prev holds the routes in use, for hysteresis.
func (st *state) problem(prev map[string]store.Route, defaultKbps float64) topology.Problem {
	var p topology.Problem
	p.Datacenters = make([]topology.Datacenter, 0, len(st.dcs))
	for _, dc := range slices.Sorted(maps.Keys(st.dcs)) {
		p.Datacenters = append(p.Datacenters, topology.Datacenter{Name: dc})
	}
	p.Links = make([]topology.Link, 0, len(st.links))
	for _, l := range st.links {
		if l.Down || st.dcs[l.From] == 0 || st.dcs[l.To] == 0 {
			continue
		}
		p.Links = append(p.Links, topology.Link{From: l.From, To: l.To,
			Delay:        time.Duration(l.RTTMs / 2 * float64(time.Millisecond)),
			Loss:         l.Loss,
			CapacityKbps: l.BandwidthKbps})
	}
	// Neither the links' nor the streams' order matters: the planner
	// indexes datacenters by name, a link appears once per direction, and
	// streams are placed by bitrate and name.
	p.Streams = make([]topology.StreamDemand, 0, len(st.streams))
	p.Previous = make(map[string]*topology.Tree, len(prev))
	for name := range st.streams {
		d, ok := st.demand(name, defaultKbps)
		if !ok {
			continue
		}
		p.Streams = append(p.Streams, d)
		if t := previous(prev, name); t != nil {
			p.Previous[name] = t
		}
	}
	return p
}

// demand is one stream's demand; ok is false when the stream is unknown or
// its origin has no live node (its key goes with that node's lease soon).
func (st *state) demand(name string, defaultKbps float64) (topology.StreamDemand, bool) {
	s, ok := st.streams[name]
	if !ok || st.dcs[s.OriginDC] == 0 {
		return topology.StreamDemand{}, false
	}
	rate := s.BitrateKbps
	if rate <= 0 {
		rate = defaultKbps
	}
	d := topology.StreamDemand{Name: name, Origin: s.OriginDC, BitrateKbps: rate}
	d.Subscribers = make([]string, 0, len(st.subs[name]))
	for dc := range st.subs[name] {
		d.Subscribers = append(d.Subscribers, dc) // the planner sorts them
	}
	return d, true
}

// previous is the tree a route in use describes, or nil.
func previous(routes map[string]store.Route, name string) *topology.Tree {
	rt, ok := routes[name]
	if !ok {
		return nil
	}
	return &topology.Tree{Stream: name, Origin: rt.Origin, Parent: rt.Parent}
}

// planner keeps the trees placed on one snapshot of the overlay, with the
// load each puts on the links, so that a change of one stream's
// subscribers or bitrate re-places that stream alone. A change of nodes or
// links needs a full recompute. It is owned by the manager's goroutine.
type planner struct {
	params      topology.Params
	defaultKbps float64
	pl          *topology.Planner // nil before the first full recompute
	placed      map[string]placedTree
	// unreached counts the subscribers the placed trees do not reach (no
	// path, or no capacity left on any), overBound those reached later
	// than Params.DelayBound.
	unreached, overBound int
}

type placedTree struct {
	tree *topology.Tree
	kbps float64
}

func (p *planner) count(t *topology.Tree, sign int) {
	p.unreached += sign * len(t.Unreached)
	p.overBound += sign * len(t.OverBound)
}

func newPlanner(params topology.Params, defaultKbps float64) *planner {
	return &planner{params: params, defaultKbps: defaultKbps}
}

// full places every stream afresh on the overlay as it is now, the routes
// in use as previous trees (Compute's order: highest bitrate first, then
// by name), and returns the routes to write (the streams whose tree
// changed, each one version above the route in use) and the streams whose
// routes to delete (the stream ended). A stream whose origin datacenter has
// no live node keeps its route: its key goes with the node's lease, and
// the route then.
func (p *planner) full(st *state, routes map[string]store.Route, now time.Time) (puts []store.Route, deletes []string) {
	prob := st.problem(routes, p.defaultKbps)
	slices.SortFunc(prob.Streams, func(a, b topology.StreamDemand) int {
		return cmp.Or(cmp.Compare(b.BitrateKbps, a.BitrateKbps), cmp.Compare(a.Name, b.Name))
	})
	p.pl = topology.NewPlanner(prob.Datacenters, prob.Links, p.params)
	p.placed = make(map[string]placedTree, len(prob.Streams))
	p.unreached, p.overBound = 0, 0
	for i := range prob.Streams {
		d := &prob.Streams[i]
		t := p.pl.Place(d, prob.Previous[d.Name])
		p.placed[d.Name] = placedTree{tree: t, kbps: d.BitrateKbps}
		p.count(t, 1)
		if rt, changed := routeOf(t, routes, now); changed {
			puts = append(puts, rt)
		}
	}
	for name := range routes {
		if _, live := st.streams[name]; !live {
			deletes = append(deletes, name)
		}
	}
	slices.SortFunc(puts, func(a, b store.Route) int { return cmp.Compare(a.Stream, b.Stream) })
	slices.Sort(deletes)
	return puts, deletes
}

// streams re-places the named streams alone, keeping every other tree and
// its load; before any full recompute it does one.
func (p *planner) streams(st *state, routes map[string]store.Route, names map[string]bool, now time.Time) (puts []store.Route, deletes []string) {
	if p.pl == nil {
		return p.full(st, routes, now)
	}
	for _, name := range slices.Sorted(maps.Keys(names)) {
		if old, ok := p.placed[name]; ok {
			p.pl.Release(old.tree, old.kbps)
			p.count(old.tree, -1)
			delete(p.placed, name)
		}
		d, ok := st.demand(name, p.defaultKbps)
		if !ok {
			if _, live := st.streams[name]; !live {
				if _, had := routes[name]; had {
					deletes = append(deletes, name)
				}
			}
			continue
		}
		t := p.pl.Place(&d, previous(routes, name))
		p.placed[name] = placedTree{tree: t, kbps: d.BitrateKbps}
		p.count(t, 1)
		if rt, changed := routeOf(t, routes, now); changed {
			puts = append(puts, rt)
		}
	}
	return puts, deletes
}

// routeOf is the route for tree t, one version above the route in use;
// changed is false when the route in use says the same.
func routeOf(t *topology.Tree, routes map[string]store.Route, now time.Time) (store.Route, bool) {
	old, had := routes[t.Stream]
	if had && old.Origin == t.Origin && maps.Equal(old.Parent, t.Parent) && maps.Equal(old.Backup, t.Backup) {
		return old, false
	}
	return store.Route{Stream: t.Stream, Version: old.Version + 1, Origin: t.Origin,
		Parent: t.Parent, Backup: t.Backup, Computed: now}, true
}

// plan is a full recompute on a planner of its own.
func plan(st *state, routes map[string]store.Route, params topology.Params, defaultKbps float64, now time.Time) (puts []store.Route, deletes []string) {
	return newPlanner(params, defaultKbps).full(st, routes, now)
}
