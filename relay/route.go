package relay

import (
	"slices"
)

// link is a connection to a neighbouring datacenter, as the hub sees it.
type link interface {
	// announce tells the neighbour that a stream is live; hops is the path
	// of datacenters from the origin to this node.
	announce(name string, hops []string)
	unannounce(name string)
	// subscribe asks the neighbour for a stream. The link feeds s (its
	// description, packets and end) and returns the source to stop it by.
	subscribe(s *Stream) source
}

// Streams are found by announcement, as in moq-relay's clusters: the origin
// announces a stream to its neighbours, each of them to theirs with its own
// name appended to the hops, and a node ignores announcements whose hops
// already name it (a loop). A node subscribes through the neighbour with the
// shortest announced path, ties broken by the neighbour's name so that every
// node decides the same way. The topology manager will later override these
// choices with computed relay trees.

// route is how a stream announced by a neighbour can be reached.
type route struct {
	origin string
	via    string   // the neighbour it was announced by
	hops   []string // datacenters from the origin to via, both included
}

// bestRouteLocked returns the best announced route to a stream.
func (h *Hub) bestRouteLocked(name string) (route, bool) {
	var best route
	found := false
	for via, hops := range h.routes[name] {
		if !found || len(hops) < len(best.hops) || len(hops) == len(best.hops) && via < best.via {
			best, found = route{origin: hops[0], via: via, hops: hops}, true
		}
	}
	return best, found
}

// handleAnnounce records that neighbour l can reach a stream.
func (h *Hub) handleAnnounce(l link, name string, hops []string) {
	peer := linkPeer(l)
	if ValidateStreamName(name) != nil || len(hops) == 0 || hops[len(hops)-1] != peer ||
		slices.Contains(hops, h.cfg.Datacenter) {
		return // malformed, or a loop back to us
	}
	h.mu.Lock()
	before, had := h.bestRouteLocked(name)
	if h.routes[name] == nil {
		h.routes[name] = make(map[string][]string)
	}
	h.routes[name][peer] = slices.Clone(hops)
	h.propagateLocked(name, before, had)
}

// handleUnannounce forgets that neighbour l can reach a stream.
func (h *Hub) handleUnannounce(l link, name string) {
	h.mu.Lock()
	before, had := h.bestRouteLocked(name)
	delete(h.routes[name], linkPeer(l))
	if len(h.routes[name]) == 0 {
		delete(h.routes, name)
	}
	h.propagateLocked(name, before, had)
}

// propagateLocked tells the neighbours when the best route to a stream
// changed, and unlocks h.mu.
func (h *Hub) propagateLocked(name string, before route, had bool) {
	after, has := h.bestRouteLocked(name)
	_, local := h.streams[name]
	if local && h.streams[name].origin == h.cfg.Datacenter || had == has && slices.Equal(before.hops, after.hops) {
		h.mu.Unlock()
		return
	}
	links := h.linksLocked()
	h.mu.Unlock()
	for _, l := range links {
		if has && h.shouldAnnounce(l, after) {
			l.announce(name, append(slices.Clone(after.hops), h.cfg.Datacenter))
		} else if had {
			l.unannounce(name)
		}
	}
}

// shouldAnnounce reports whether a route may be passed on to neighbour l:
// not back where it came from, nor to a datacenter it already crossed.
func (h *Hub) shouldAnnounce(l link, r route) bool {
	return !slices.Contains(r.hops, linkPeer(l))
}

func linkPeer(l link) string {
	if ql, ok := l.(*quicLink); ok {
		return ql.peer
	}
	return ""
}

// addLink starts using a connected neighbour and tells it every stream this
// node can reach.
func (h *Hub) addLink(l *quicLink) {
	h.mu.Lock()
	old := h.links[l.peer]
	h.links[l.peer] = l
	type ann struct {
		name string
		hops []string
	}
	var anns []ann
	for name, s := range h.streams {
		if s.origin == h.cfg.Datacenter {
			anns = append(anns, ann{name, []string{h.cfg.Datacenter}})
		}
	}
	for name := range h.routes {
		if s, ok := h.streams[name]; ok && s.origin == h.cfg.Datacenter {
			continue
		}
		if r, ok := h.bestRouteLocked(name); ok && h.shouldAnnounce(l, r) {
			anns = append(anns, ann{name, append(slices.Clone(r.hops), h.cfg.Datacenter)})
		}
	}
	h.mu.Unlock()
	if old != nil && old != l {
		if ol, ok := old.(*quicLink); ok {
			ol.close(errReplaced)
		}
	}
	for _, a := range anns {
		l.announce(a.name, a.hops)
	}
	h.log.Info("link up", "peer", l.peer)
}

var errReplaced = errorString("replaced by a newer connection")

// removeLink forgets a neighbour and every route through it.
func (h *Hub) removeLink(l *quicLink, cause error) {
	h.mu.Lock()
	if h.links[l.peer] == l {
		delete(h.links, l.peer)
	} else {
		h.mu.Unlock()
		return // replaced: the newer link owns the routes
	}
	var names []string
	for name, vias := range h.routes {
		if _, ok := vias[l.peer]; ok {
			names = append(names, name)
		}
	}
	h.mu.Unlock()
	for _, name := range names {
		h.handleUnannounce(l, name)
	}
	h.log.Info("link down", "peer", l.peer, "reason", cause)
}

// Links returns the statistics of every connected neighbour.
func (h *Hub) Links() []LinkStats {
	h.mu.Lock()
	links := h.linksLocked()
	h.mu.Unlock()
	out := make([]LinkStats, 0, len(links))
	for _, l := range links {
		if ql, ok := l.(*quicLink); ok {
			out = append(out, ql.stats())
		}
	}
	slices.SortFunc(out, func(a, b LinkStats) int {
		if a.Peer < b.Peer {
			return -1
		}
		return 1
	})
	return out
}
