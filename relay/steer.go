package relay

import (
	"errors"
	"fmt"
	"slices"
	"sort"
	"time"
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
	if cur, ok := h.steer[stream]; ok && r.Version < cur.Version {
		h.mu.Unlock()
		return
	}
	h.steer[stream] = r
	from, moving := "", false
	if s := h.streams[stream]; s != nil && !s.localLocked() {
		from, moving = h.followRouteLocked(s)
	}
	h.mu.Unlock()
	if moving {
		h.log.Info("stream moving to a new parent", "stream", stream, "from", from, "to", r.Parent, "route_version", r.Version)
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
		h.syncSourcesLocked(s)
		return s.src.peer(), s.origin, true
	}
	if l, origin, _ := h.pickLinkLocked(stream, nil); l != nil {
		return l.neighbour(), origin, true
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

// usableLocked reports whether new subscriptions may go through a
// neighbour: its link is up and it has not gone silent (see heartbeat.go).
func (h *Hub) usableLocked(peer string) bool {
	return h.links[peer] != nil && !h.silent[peer]
}

// pickLinkLocked picks the link to take a stream through, leaving out the
// neighbours in exclude: the route's parent, else its backup, else the
// neighbour of the best announcement; only neighbours that are usable. It
// returns nil when there is none; origin and hops come from that
// neighbour's announcement, when it made one.
func (h *Hub) pickLinkLocked(name string, exclude map[string]bool) (l link, origin string, hops []string) {
	var best route
	found := false
	for via, ad := range h.routes[name] {
		if exclude[via] || !h.usableLocked(via) {
			continue
		}
		if hops := ad.hops; !found || len(hops) < len(best.hops) || len(hops) == len(best.hops) && via < best.via {
			best, found = route{origin: hops[0], via: via, hops: hops, flags: ad.flags}, true
		}
	}
	if r, ok := h.steer[name]; ok {
		for _, p := range []string{r.Parent, r.Backup} {
			if p == "" || exclude[p] || !h.usableLocked(p) {
				continue
			}
			if ad, ok := h.routes[name][p]; ok {
				return h.links[p], ad.hops[0], ad.hops
			}
			if origin = best.origin; origin == "" {
				// Any neighbour's announcement names the origin.
				for _, ad := range h.routes[name] {
					origin = ad.hops[0]
					break
				}
			}
			return h.links[p], origin, nil
		}
	}
	if !found {
		return nil, "", nil
	}
	return h.links[best.via], best.origin, best.hops
}

// pathThrough is the path of a stream taken from upstream hops, ending at
// this node; nil when the hops are not known.
func (h *Hub) pathThrough(hops []string) []string {
	if hops == nil {
		return nil
	}
	return append(slices.Clone(hops), h.cfg.Datacenter)
}

// Source changes. The ingress (splice.go) is the truth about which source
// a relayed stream forwards; the hub mirrors it in s.src and s.next, and
// catches up with a splice the data path completed (syncSourcesLocked)
// before every decision about the stream's sources.

// followRouteLocked moves a relayed stream to its route's parent
// make-before-break: it subscribes through the parent and lets the ingress
// splice when the new packets arrive (then spliced retires the old source).
// It reports whether a move started, and from which parent.
func (h *Hub) followRouteLocked(s *Stream) (from string, moving bool) {
	h.syncSourcesLocked(s)
	return h.moveLocked(s, h.steer[s.name].Parent)
}

// moveLocked moves a relayed stream to parent make-before-break (see
// followRouteLocked); parent "" or unusable does nothing.
func (h *Hub) moveLocked(s *Stream, parent string) (from string, moving bool) {
	if parent == "" || !h.usableLocked(parent) {
		return "", false
	}
	if s.src != nil && s.src.peer() == parent {
		h.dropJoiningLocked(s) // back to where it was before the move finished
		return "", false
	}
	if s.next != nil && s.next.peer() == parent {
		return "", false
	}
	h.dropJoiningLocked(s)
	l := h.links[parent]
	s.next = l.subscribe(s)
	s.nextHops = nil
	if ad, ok := h.routes[s.name][parent]; ok {
		s.nextHops = h.pathThrough(ad.hops)
	}
	s.in.join(s.next)
	return s.src.peer(), true
}

// routeRetry is how long a stream whose new parent failed it (e.g. a
// neighbour that just came back and does not hear its own upstream yet)
// waits before it tries its route again.
const routeRetry = time.Second

// retryRouteLocked tries the stream's route again after routeRetry, unless
// the route changed or the stream went meanwhile.
func (h *Hub) retryRouteLocked(s *Stream) {
	r, ok := h.steer[s.name]
	if !ok {
		return
	}
	time.AfterFunc(routeRetry, func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		if cur, ok := h.steer[s.name]; ok && cur == r && h.streams[s.name] == s && !h.closed {
			h.followRouteLocked(s)
		}
	})
}

// dropJoiningLocked abandons a make-before-break move in progress.
func (h *Hub) dropJoiningLocked(s *Stream) {
	if s.next == nil {
		return
	}
	next := s.next
	s.next, s.nextHops = nil, nil
	s.in.drop(next)
	next.stop()
}

// syncSourcesLocked catches the hub up with a splice the ingress completed:
// the joining source became active, and the old one is unsubscribed. It
// reports whether it did.
func (h *Hub) syncSourcesLocked(s *Stream) bool {
	if s.localLocked() {
		return false
	}
	active, _ := s.in.sources()
	if active == s.src || active == nil || active != s.next {
		return false
	}
	old := s.src
	s.src, s.next = active, nil
	if s.nextHops != nil {
		h.setHopsLocked(s, s.nextHops)
	}
	s.nextHops = nil
	if old != nil {
		old.stop()
	}
	return true
}

// spliced is called by the data path after it made the joining source of a
// stream active.
func (h *Hub) spliced(s *Stream) {
	h.mu.Lock()
	synced := h.streams[s.name] == s && h.syncSourcesLocked(s)
	var parent string
	var hops []string
	if synced {
		parent, hops = s.src.peer(), slices.Clone(s.hops)
	}
	h.mu.Unlock()
	if synced {
		h.log.Info("stream spliced onto its new parent", "stream", s.name, "parent", parent, "hops", hops)
	}
}

// upstreamEnded is called when one of a relayed stream's sources ends: its
// link was lost, the upstream ended the stream or refused the subscription,
// or its neighbour went silent. The stream outlives it when anything else
// has it: a joining source takes over, else the route's parent or backup,
// else the best announcement not through a neighbour that failed it. It
// ends only when its origin ended it (ErrPublisherGone) or nowhere else has
// it (with err).
func (h *Hub) upstreamEnded(s *Stream, src source, err error) {
	h.mu.Lock()
	if h.streams[s.name] != s {
		h.mu.Unlock()
		return
	}
	h.syncSourcesLocked(s)
	switch {
	case src == s.next:
		h.dropJoiningLocked(s)
		h.retryRouteLocked(s)
		h.mu.Unlock()
		h.log.Info("new parent failed; the stream stays where it is and tries again", "stream", s.name, "parent", src.peer(),
			"in", routeRetry, "err", err)
		return
	case src != s.src:
		h.mu.Unlock()
		return // retired already
	case !errors.Is(err, ErrPublisherGone):
		if s.failed == nil {
			s.failed = make(map[string]bool)
		}
		s.failed[src.peer()] = true
		if h.replaceSourceLocked(s) {
			parent := s.src.peer()
			h.mu.Unlock()
			src.stop()
			h.log.Info("stream switched parent", "stream", s.name, "from", src.peer(), "to", parent, "reason", err)
			return
		}
	}
	stops := h.forgetLocked(s)
	h.mu.Unlock()
	for _, src := range stops {
		src.stop()
	}
	s.end(err)
}

// replaceSourceLocked gives a relayed stream whose active source died a new
// one at once (break-then-make): the joining source if a move was under
// way, else a fresh subscription. It reports false when there is none.
func (h *Hub) replaceSourceLocked(s *Stream) bool {
	if s.next != nil && !s.failed[s.next.peer()] {
		s.src, s.next = s.next, nil
		if s.nextHops != nil {
			h.setHopsLocked(s, s.nextHops)
		}
		s.nextHops = nil
		s.in.setActive(s.src)
		return true
	}
	h.dropJoiningLocked(s)
	l, _, hops := h.pickLinkLocked(s.name, s.failed)
	if l == nil {
		return false
	}
	s.src = l.subscribe(s)
	if hops != nil {
		h.setHopsLocked(s, h.pathThrough(hops))
	}
	s.in.setActive(s.src)
	return true
}

// errLoop refuses an upstream whose path crosses this node.
var errLoop = errors.New("upstream path crosses this datacenter (a routing loop)")

// sourceReady is called when a source answered the subscription: the
// stream's description and flags, and the upstream's path from the origin
// (nil when it did not say). The first answer makes the stream ready; later
// ones (another source) keep its description.
func (h *Hub) sourceReady(s *Stream, src source, desc Description, flags Flags, hops []string) {
	h.mu.Lock()
	if h.streams[s.name] != s {
		h.mu.Unlock()
		return
	}
	h.syncSourcesLocked(s)
	if slices.Contains(hops, h.cfg.Datacenter) {
		h.mu.Unlock()
		h.upstreamEnded(s, src, fmt.Errorf("datacenter %s: %w: %v", src.peer(), errLoop, hops))
		return
	}
	switch src {
	case s.src:
		if hops != nil {
			h.setHopsLocked(s, h.pathThrough(hops))
		}
		s.failed = nil
	case s.next:
		if hops != nil {
			s.nextHops = h.pathThrough(hops)
		}
	default:
		h.mu.Unlock()
		return
	}
	if s.origin == "" && len(hops) > 0 && !s.isReady() {
		s.origin = hops[0]
	}
	h.mu.Unlock()
	s.setFlags(flags)
	s.setReady(desc)
}

// watchPath returns a stream's path from its origin to this node, and a
// channel closed when it changes: a link tells its downstream neighbour
// (msgStreamPath), so that every hop lists the live path.
func (h *Hub) watchPath(s *Stream) ([]string, <-chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.syncSourcesLocked(s)
	if s.pathChanged == nil {
		s.pathChanged = make(chan struct{})
	}
	return slices.Clone(s.hops), s.pathChanged
}

// setHopsLocked changes a stream's path and wakes its watchers.
func (h *Hub) setHopsLocked(s *Stream, hops []string) {
	if slices.Equal(s.hops, hops) {
		return
	}
	s.hops = hops
	if s.pathChanged != nil {
		close(s.pathChanged)
		s.pathChanged = nil
	}
}

// sourcePath is called when a source says the path it takes the stream on
// changed upstream.
func (h *Hub) sourcePath(s *Stream, src source, hops []string) {
	h.mu.Lock()
	if h.streams[s.name] != s {
		h.mu.Unlock()
		return
	}
	h.syncSourcesLocked(s)
	if slices.Contains(hops, h.cfg.Datacenter) {
		h.mu.Unlock()
		h.upstreamEnded(s, src, fmt.Errorf("datacenter %s: %w: %v", src.peer(), errLoop, hops))
		return
	}
	switch src {
	case s.src:
		h.setHopsLocked(s, h.pathThrough(hops))
	case s.next:
		s.nextHops = h.pathThrough(hops)
	}
	h.mu.Unlock()
}
