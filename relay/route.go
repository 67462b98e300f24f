package relay

import (
	"slices"
	"strings"
)

// link is a connection to a neighbouring datacenter, as the hub sees it. The
// hub calls announce, unannounce and subscribe with its lock held, so that
// messages leave in the order the hub's state changed: they must queue the
// message and return, never block or call back into the hub.
type link interface {
	// neighbour is the datacenter at the other end.
	neighbour() string
	// announce tells the neighbour that a stream is live; hops is the path
	// of datacenters from the origin to this node, flags the stream's Flags
	// as this node knows them. A stream is announced again when either
	// changes.
	announce(name string, hops []string, flags Flags)
	unannounce(name string)
	// subscribe asks the neighbour for a stream. The link feeds s (its
	// description, packets and end) and returns the source to stop it by.
	subscribe(s *Stream) source
	// close drops the link (the hub replaced it with a newer one).
	close(cause error)
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
	flags  Flags    // the stream's flags, as via announced them
}

// advert is what a neighbour announced for a stream, or what this node
// announces: the path from the origin and the stream's flags. hops is nil
// when there is nothing to announce.
type advert struct {
	hops  []string
	flags Flags
}

func (a advert) equal(b advert) bool { return slices.Equal(a.hops, b.hops) && a.flags == b.flags }

// bestRouteLocked returns the best announced route to a stream, leaving
// out routes through a silent neighbour (heartbeat.go): what this node
// announces follows its neighbours' failover, so that nodes further on
// learn of another path within DeadAfter, not when the silent link's
// connection times out.
func (h *Hub) bestRouteLocked(name string) (route, bool) {
	var best route
	found := false
	for via, ad := range h.routes[name] {
		if h.silent[via] {
			continue
		}
		if hops := ad.hops; !found || len(hops) < len(best.hops) || len(hops) == len(best.hops) && via < best.via {
			best, found = route{origin: hops[0], via: via, hops: hops, flags: ad.flags}, true
		}
	}
	return best, found
}

// handleAnnounce records that neighbour l can reach a stream, and the
// stream's flags as l knows them.
func (h *Hub) handleAnnounce(l link, name string, hops []string, flags Flags) {
	peer := l.neighbour()
	if ValidateStreamName(name) != nil || len(hops) == 0 || hops[len(hops)-1] != peer ||
		slices.Contains(hops, h.cfg.Datacenter) {
		return // malformed, or a loop back to us
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.links[peer] != l {
		return // from a link that was replaced or is gone
	}
	before := h.advertLocked(name)
	if h.routes[name] == nil {
		h.routes[name] = make(map[string]advert)
	}
	h.routes[name][peer] = advert{hops: slices.Clone(hops), flags: flags}
	h.advertiseLocked(name, before)
	// A route whose parent could not carry the stream yet (no link, or
	// the parent did not know it) is followed once the parent announces it.
	if r, ok := h.steer[name]; ok && r.Parent == peer {
		if s := h.streams[name]; s != nil && !s.localLocked() {
			h.followRouteLocked(s)
		}
	}
}

// handleUnannounce forgets that neighbour l can reach a stream.
func (h *Hub) handleUnannounce(l link, name string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.links[l.neighbour()] != l {
		return
	}
	before := h.advertLocked(name)
	h.deleteRouteLocked(name, l.neighbour())
	h.advertiseLocked(name, before)
}

func (h *Hub) deleteRouteLocked(name, via string) {
	delete(h.routes[name], via)
	if len(h.routes[name]) == 0 {
		delete(h.routes, name)
	}
}

// advertLocked returns what this node announces for a stream (the path
// from its origin to this node and the stream's flags), or an advert
// without hops: its own streams, with the flags the hub last took from the
// stream (announcedFlags), else the best route.
func (h *Hub) advertLocked(name string) advert {
	if s, ok := h.streams[name]; ok && s.localLocked() {
		return advert{hops: []string{h.cfg.Datacenter}, flags: s.announcedFlags}
	}
	if r, ok := h.bestRouteLocked(name); ok {
		return advert{hops: append(slices.Clone(r.hops), h.cfg.Datacenter), flags: r.flags}
	}
	return advert{}
}

// announceFlags announces a stream published here again when its flags
// changed (a B slice found at ingest), so that datacenters that know it
// only by announcement list them too. Relayed streams carry the flags of
// the route they came by, which their upstream announces.
func (h *Hub) announceFlags(s *Stream) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.streams[s.name] != s || !s.localLocked() {
		return
	}
	before := h.advertLocked(s.name)
	s.announcedFlags = s.Flags()
	h.advertiseLocked(s.name, before)
}

// advertiseLocked tells every neighbour what changed in what this node
// announces for a stream, from before (what advertLocked said before the
// change) to now. Holding h.mu across the change and the queueing of the
// messages keeps each link's messages in the order of the state changes:
// an unannounce never overtakes the announce it undoes.
func (h *Hub) advertiseLocked(name string, before advert) {
	after := h.advertLocked(name)
	if before.equal(after) {
		return
	}
	for peer, l := range h.links {
		if mayAnnounce(after.hops, peer) {
			l.announce(name, after.hops, after.flags)
		} else if mayAnnounce(before.hops, peer) {
			l.unannounce(name)
		}
	}
}

// mayAnnounce reports whether hops may be announced to a neighbour: not back
// to a datacenter the stream already crossed.
func mayAnnounce(hops []string, peer string) bool {
	return hops != nil && !slices.Contains(hops, peer)
}

// dropRoutesLocked forgets every route through a neighbour.
func (h *Hub) dropRoutesLocked(peer string) {
	for name, vias := range h.routes {
		if _, ok := vias[peer]; ok {
			before := h.advertLocked(name)
			h.deleteRouteLocked(name, peer)
			h.advertiseLocked(name, before)
		}
	}
}

func (l *quicLink) neighbour() string { return l.peer }

// addLink starts using a connected neighbour and tells it every stream this
// node can reach. A newer link to the same neighbour replaces the older one,
// whose routes are forgotten: the neighbour announces again what is live.
func (h *Hub) addLink(l link) {
	peer := l.neighbour()
	h.mu.Lock()
	old := h.links[peer]
	if old != nil && old != l {
		h.dropRoutesLocked(peer)
	}
	h.links[peer] = l
	delete(h.silent, peer) // a new link starts alive: its own heartbeat watches it
	names := make([]string, 0, len(h.streams)+len(h.routes))
	for name := range h.streams {
		names = append(names, name)
	}
	for name := range h.routes {
		if _, ok := h.streams[name]; !ok {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	for _, name := range names {
		if ad := h.advertLocked(name); mayAnnounce(ad.hops, peer) {
			l.announce(name, ad.hops, ad.flags)
		}
	}
	h.mu.Unlock()
	if old != nil && old != l {
		old.close(errReplaced)
	}
	h.log.Info("link up", "peer", peer)
}

var errReplaced = errorString("replaced by a newer connection")

// removeLink forgets a neighbour and every route through it.
func (h *Hub) removeLink(l link, cause error) {
	peer := l.neighbour()
	h.mu.Lock()
	if h.links[peer] != l {
		h.mu.Unlock()
		return // replaced: the newer link owns the neighbour
	}
	delete(h.links, peer)
	delete(h.silent, peer)
	h.dropRoutesLocked(peer)
	h.mu.Unlock()
	h.log.Info("link down", "peer", peer, "reason", cause)
}

// Links returns the statistics of every connected neighbour.
func (h *Hub) Links() []LinkStats {
	h.mu.Lock()
	links := make([]link, 0, len(h.links))
	silent := make(map[string]bool, len(h.silent))
	for peer, l := range h.links {
		links = append(links, l)
		silent[peer] = h.silent[peer]
	}
	h.mu.Unlock()
	out := make([]LinkStats, 0, len(links))
	for _, l := range links {
		if ql, ok := l.(*quicLink); ok {
			st := ql.stats()
			st.Silent = silent[st.Peer]
			out = append(out, st)
		}
	}
	slices.SortFunc(out, func(a, b LinkStats) int { return strings.Compare(a.Peer, b.Peer) })
	return out
}
