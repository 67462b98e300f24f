package relay

import (
	"slices"
	"sort"
)

// Steering: the seam between the topology layer and the data plane.
//
// Announcements (route.go) tell every node which streams are live and along
// which paths; on their own they make each node subscribe through the
// neighbour with the shortest announced path. The topology manager, which
// sees the whole overlay, overrides that choice per stream with a Route: the
// node's control layer (node/) receives routes from etcd and hands them to
// SetRoute. A stream without a route still flows by announcement, so a node
// works with no manager at all.
//
// In the other direction the control layer needs to know what this node
// publishes and what its own clients want, to write subscriptions and claims
// to etcd: Interest reports that, and its channel says when it changed.
// Downstream datacenters do not count as interest: the manager learns of
// them from their own nodes.

// Route says where this node takes a stream from, as the topology manager
// decided.
type Route struct {
	Parent  string // neighbour datacenter to receive from; "" = no route: announcements decide
	Backup  string // neighbour to switch to when Parent is dead; "" = none
	Version uint64 // a route older than the one applied is ignored
}

// Interest is what this node publishes and what its local clients want:
// viewers, the RTSP server, chat clients through Want. Downstream
// datacenters do not count. Both lists are sorted.
type Interest struct{ Published, Wanted []string }

func (i Interest) equal(j Interest) bool {
	return slices.Equal(i.Published, j.Published) && slices.Equal(i.Wanted, j.Wanted)
}

// SetRoute sets where this node takes a stream from. A route older than the
// one applied (a lower Version) is ignored. A stream that is flowing moves to
// the new parent make-before-break (see splice.go); a stream subscribed
// later takes it from there. The route stays until ClearRoute, whether the
// stream is live or not.
func (h *Hub) SetRoute(stream string, r Route) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if cur, ok := h.steer[stream]; ok && r.Version < cur.Version {
		return
	}
	h.steer[stream] = r
	if s := h.streams[stream]; s != nil && !s.localLocked() {
		h.followRouteLocked(s)
	}
}

// ClearRoute forgets the stream's route: announcements decide again. A
// flowing stream stays where it is.
func (h *Hub) ClearRoute(stream string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.steer, stream)
}

// Interest returns what this node publishes and what its local clients
// want, and a channel that is closed at the next change.
func (h *Hub) Interest() (Interest, <-chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.interest, h.interestChanged
}

// Want marks a stream wanted here without taking its media (chat clients in
// a room), whether it is live or not. Call release once; later calls do
// nothing.
func (h *Hub) Want(stream string) (release func()) {
	h.mu.Lock()
	h.wants[stream]++
	h.interestChangedLocked()
	h.mu.Unlock()
	released := false
	return func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		if released {
			return
		}
		released = true
		if h.wants[stream]--; h.wants[stream] <= 0 {
			delete(h.wants, stream)
		}
		h.interestChangedLocked()
	}
}

// Upstream returns the neighbour this node takes the stream from now, or
// would take it from if it were subscribed (its route, else the best
// announcement), and the stream's origin datacenter. For a stream published
// here parent is "" and origin this datacenter. ok is false when the node
// knows no way to the stream.
func (h *Hub) Upstream(stream string) (parent, origin string, ok bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if s := h.streams[stream]; s != nil {
		if s.localLocked() {
			return "", h.cfg.Datacenter, true
		}
		return s.src.peer(), s.origin, true
	}
	best, found := h.bestRouteLocked(stream)
	if r, ok := h.steer[stream]; ok && r.Parent != "" {
		if h.links[r.Parent] != nil {
			origin := best.origin
			if ad, ok := h.routes[stream][r.Parent]; ok {
				origin = ad.hops[0]
			}
			return r.Parent, origin, true
		}
	}
	if found {
		return best.via, best.origin, true
	}
	return "", "", false
}

// interestChangedLocked recomputes the interest and, when it changed, wakes
// whoever waits for it.
func (h *Hub) interestChangedLocked() {
	var in Interest
	for name, s := range h.streams {
		if s.localLocked() {
			in.Published = append(in.Published, name)
		} else if s.localInterest > 0 && h.wants[name] == 0 {
			in.Wanted = append(in.Wanted, name)
		}
	}
	for name := range h.wants {
		in.Wanted = append(in.Wanted, name)
	}
	sort.Strings(in.Published)
	sort.Strings(in.Wanted)
	if in.equal(h.interest) {
		return
	}
	h.interest = in
	close(h.interestChanged)
	h.interestChanged = make(chan struct{})
}

// upstreamLinkLocked picks the link to subscribe to a stream through: the
// route's parent when its link is up, else the neighbour of the best
// announcement. It returns nil when there is none.
func (h *Hub) upstreamLinkLocked(name string) (l link, origin string, hops []string) {
	best, found := h.bestRouteLocked(name)
	if r, ok := h.steer[name]; ok && r.Parent != "" {
		if l := h.links[r.Parent]; l != nil {
			if ad, ok := h.routes[name][r.Parent]; ok {
				return l, ad.hops[0], ad.hops
			}
			return l, best.origin, nil
		}
	}
	if !found {
		return nil, "", nil
	}
	return h.links[best.via], best.origin, best.hops
}

// followRouteLocked moves a relayed stream to its route's parent. This first
// version only records the route; the stream moves when it is subscribed
// again.
func (h *Hub) followRouteLocked(*Stream) {}
