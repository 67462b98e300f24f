package relay

import (
	"context"
	"sync/atomic"
	"time"
)

// Fast failover: a node finds a dead neighbour by silence, long before
// QUIC's idle timeout (5 s, overlay.go) closes the connection.
//
// Every link sends a one-byte heartbeat datagram every Config.Heartbeat
// (100 ms) and counts every datagram it receives, media or heartbeat, as a
// sign of life. A neighbour not heard from for Config.DeadAfter (300 ms) is
// silent: the hub no longer subscribes through it, and every stream this
// node takes from it switches at once to its route's backup, else to the
// best announcement through another neighbour (break-then-make: the stream
// and its viewers stay, the new parent's GOP replay fills the gap or
// restarts decoders at a keyframe, and the ingress drops what viewers have;
// see splice.go). A stream that nothing else has stays on the silent
// neighbour, which may come back; when the connection finally closes it
// ends. A neighbour that beats again is usable again, and streams whose
// route names it as parent move back make-before-break.
//
// A stream whose packets stop while its link still beats is not dead: its
// publisher may have paused. Only the link's silence counts. On a link with
// a round-trip time of its own (a real WAN link) silence must last
// DeadAfter plus that round trip: see watchLiveness.

const (
	defaultHeartbeat = 100 * time.Millisecond
	defaultDeadAfter = 300 * time.Millisecond
)

// heartbeatDatagram is the whole of a heartbeat: wire version and type.
var heartbeatDatagram = []byte{wireVersion<<4 | dgramHeartbeat}

// isHeartbeat reports whether a datagram is a heartbeat.
func isHeartbeat(b []byte) bool { return len(b) == 1 && b[0] == heartbeatDatagram[0] }

// liveness is what a link knows of its neighbour's signs of life.
type liveness struct {
	heard atomic.Bool // something arrived since the last check
}

// heardFrom records a sign of life. It is called per datagram: it writes
// only when the flag was clear.
func (lv *liveness) heardFrom() {
	if !lv.heard.Load() {
		lv.heard.Store(true)
	}
}

// watchLiveness beats through beat (which must not block) every Heartbeat
// and tells the hub when the link's neighbour goes silent or is heard
// again, until ctx ends. Silent is DeadAfter plus the link's smoothed
// round-trip time (rtt; nil for none) without a sign of life: on a long
// link a congestion window's worth of datagrams arrives once per round
// trip while QUIC opens the window, and the heartbeats queue behind media.
// It checks twice per heartbeat, so silence is found within that time
// plus Heartbeat/2. Time this node itself did not run (its ticks came
// late) does not count as the neighbour's silence.
func (h *Hub) watchLiveness(ctx context.Context, l link, lv *liveness, beat func(), rtt func() time.Duration) {
	period := h.cfg.Heartbeat / 2
	tick := time.NewTicker(period)
	defer tick.Stop()
	last, lastBeat, prevTick := time.Now(), time.Time{}, time.Now()
	silent := false
	for {
		select {
		case now := <-tick.C:
			if late := now.Sub(prevTick) - period; late > period {
				// This process did not run for a while (a stall, a
				// machine too busy): the neighbour's datagrams wait
				// unread meanwhile, and that is no silence of its.
				last = last.Add(late)
			}
			prevTick = now
			if now.Sub(lastBeat) >= h.cfg.Heartbeat-h.cfg.Heartbeat/4 {
				lastBeat = now
				beat()
			}
			switch {
			case lv.heard.Swap(false):
				last = now
				if silent {
					silent = false
					h.setSilent(l, false)
				}
			case !silent && now.Sub(last) >= h.cfg.DeadAfter && (rtt == nil || now.Sub(last) >= h.cfg.DeadAfter+rtt()):
				silent = true
				h.setSilent(l, true)
			}
		case <-ctx.Done():
			return
		}
	}
}

// setSilent marks a neighbour silent (no new subscriptions through it, its
// streams fail over) or alive again (streams routed through it go back).
func (h *Hub) setSilent(l link, silent bool) {
	peer := l.neighbour()
	h.mu.Lock()
	if h.links[peer] != l || h.silent[peer] == silent {
		h.mu.Unlock()
		return
	}
	var stops []source
	moved, stuck := 0, 0
	if silent {
		h.silent[peer] = true
		for _, s := range h.streams {
			if s.localLocked() {
				continue
			}
			h.syncSourcesLocked(s)
			if s.next != nil && s.next.peer() == peer {
				h.dropJoiningLocked(s)
			}
			if s.src.peer() != peer {
				continue
			}
			old := s.src
			if h.replaceSourceLocked(s) {
				stops = append(stops, old)
				moved++
			} else {
				stuck++
			}
		}
	} else {
		delete(h.silent, peer)
		for name, s := range h.streams {
			if r, ok := h.steer[name]; ok && r.Parent == peer && !s.localLocked() {
				h.followRouteLocked(s) // make-before-break back to the route's parent
			}
		}
	}
	h.mu.Unlock()
	for _, src := range stops {
		src.stop()
	}
	if silent {
		h.log.Warn("neighbour silent: its streams switch parent", "peer", peer, "after", h.cfg.DeadAfter,
			"switched", moved, "without_alternative", stuck)
	} else {
		h.log.Info("neighbour heard again", "peer", peer)
	}
}
