package relay

import (
	"context"
	"encoding/binary"
	"math"
	"sync/atomic"
	"time"
)

// Fast failover: a node finds a dead neighbour by silence, long before
// QUIC's idle timeout (5 s, overlay.go) closes the connection.
//
// Every link sends a heartbeat datagram every Config.Heartbeat (50 ms) and
// counts every datagram it receives, media or heartbeat, as a sign of
// life. Silence has two stages:
//
//   - A neighbour not heard from for Config.SuspectAfter (150 ms), and for
//     twice the longest wait between its signs of life lately, is
//     suspect: every stream this node takes from it starts moving to its
//     route's backup, else to the best announcement through another
//     neighbour, make-before-break (splice.go): the new parent's packets
//     take over when they arrive, so a dead relay costs its viewers the
//     suspicion time plus one round trip to the backup. The suspect stays
//     usable. Heard again before it is silent, the moves not spliced yet
//     are dropped and streams whose route names it go back to it
//     make-before-break: a false alarm costs a little traffic, no gap.
//   - A neighbour not heard from for Config.DeadAfter (300 ms) is silent:
//     the hub no longer subscribes through it, and every stream still
//     taken from it switches at once (break-then-make: the stream and its
//     viewers stay, the new parent's GOP replay fills the gap or restarts
//     decoders at a keyframe, and the ingress drops what viewers have). A
//     stream that nothing else has stays on the silent neighbour, which may
//     come back; when the connection finally closes it ends. A neighbour
//     that beats again is usable again, and streams whose route names it as
//     parent move back make-before-break.
//
// A stream whose packets stop while its link still beats is not dead: its
// publisher may have paused. Only the link's silence counts. On a link with
// a round-trip time of its own (a real WAN link) both stages wait that
// round trip longer: see watchLiveness.

const (
	defaultHeartbeat = 50 * time.Millisecond
	defaultDeadAfter = 300 * time.Millisecond
)

// A heartbeat datagram is the wire version and type byte, then two
// big-endian uint32s: the sender's clock in microseconds (its own, from any
// epoch; it wraps) and the interarrival jitter, in microseconds, of the
// heartbeats the sender receives on the link, as jitterMeter measures it:
// each end learns how much the delay of what it sends varies. A one-byte
// heartbeat (a node from before the timestamps) is a sign of life only.
const heartbeatLen = 9

// isHeartbeat reports whether a datagram is a heartbeat.
func isHeartbeat(b []byte) bool {
	return len(b) >= 1 && b[0] == wireVersion<<4|dgramHeartbeat && (len(b) == 1 || len(b) == heartbeatLen)
}

// clockEpoch is where heartbeat clocks start.
var clockEpoch = time.Now()

// heartbeatClock is t on the heartbeat clock, in microseconds.
func heartbeatClock(t time.Time) uint32 { return uint32(t.Sub(clockEpoch).Microseconds()) }

// putHeartbeat writes a heartbeat sent at now, reporting jitter (µs) of
// what this end receives, into b (heartbeatLen bytes).
func putHeartbeat(b []byte, now time.Time, jitter int64) {
	b[0] = wireVersion<<4 | dgramHeartbeat
	binary.BigEndian.PutUint32(b[1:], heartbeatClock(now))
	binary.BigEndian.PutUint32(b[5:], uint32(min(max(jitter, 0), math.MaxUint32)))
}

// jitterMeter measures the interarrival jitter of the heartbeats a link
// receives (RFC 3550 section 6.4.1: the mean deviation of the difference
// in transit time of consecutive heartbeats, smoothed by 1/16; with a
// heartbeat every 50 ms it follows changes within about a second), and
// keeps what the neighbour reports of this end's heartbeats. Clock offsets
// cancel out: only differences of transit times count.
type jitterMeter struct {
	// The datagram reader's alone.
	prevTransit int32 // µs: arrival on this clock minus send on the neighbour's
	have        bool  // prevTransit is valid
	j           float64

	rx atomic.Int64 // µs: j, for the heartbeat sender
	tx atomic.Int64 // µs + 1, as the neighbour last reported; 0: not yet
}

// received folds in a heartbeat b that arrived at now.
func (m *jitterMeter) received(b []byte, now time.Time) {
	if len(b) != heartbeatLen {
		return
	}
	transit := int32(heartbeatClock(now) - binary.BigEndian.Uint32(b[1:]))
	if m.have {
		d := float64(transit - m.prevTransit)
		m.j += (math.Abs(d) - m.j) / 16
		m.rx.Store(int64(m.j))
	}
	m.prevTransit, m.have = transit, true
	m.tx.Store(int64(binary.BigEndian.Uint32(b[5:])) + 1)
}

// sent is the jitter of what this end sends, as its neighbour measured it,
// or -1 before it reported.
func (m *jitterMeter) sent() time.Duration {
	v := m.tx.Load()
	if v == 0 {
		return -1
	}
	return time.Duration(v-1) * time.Microsecond
}

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
// and tells the hub when the link's neighbour turns suspect, goes silent or
// is heard again, until ctx ends. Each stage is its time plus the link's
// smoothed round-trip time (rtt; nil for none) without a sign of life: on
// a long link a congestion window's worth of datagrams arrives once per
// round trip while QUIC opens the window, and the heartbeats queue behind
// media. It checks twice per heartbeat, so a stage is found within that
// time plus Heartbeat/2. Time this node itself did not run (its ticks came
// late) does not count as the neighbour's silence.
func (h *Hub) watchLiveness(ctx context.Context, l link, lv *liveness, beat func(), rtt func() time.Duration) {
	period := h.cfg.Heartbeat / 2
	tick := time.NewTicker(period)
	defer tick.Stop()
	last, lastBeat, prevTick := time.Now(), time.Time{}, time.Now()
	state := alive
	// recentGap is the longest wait between signs of life lately (halved
	// every second or so). A neighbour is suspect only after twice that:
	// on a long link whose congestion window is still opening, datagrams
	// come in bursts once per round trip with silence between, and that is
	// its normal.
	var recentGap time.Duration
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
			recentGap -= recentGap / 64
			if lv.heard.Swap(false) {
				recentGap = max(recentGap, now.Sub(last))
				last = now
				switch state {
				case suspect:
					h.setSuspect(l, false)
				case silent:
					h.setSilent(l, false)
				}
				state = alive
				continue
			}
			quiet := now.Sub(last)
			if rtt != nil {
				quiet -= rtt()
			}
			switch {
			case state != silent && quiet >= h.cfg.DeadAfter:
				state = silent
				h.setSilent(l, true)
			case state == alive && quiet >= max(h.cfg.SuspectAfter, 2*recentGap):
				state = suspect
				h.setSuspect(l, true)
			}
		case <-ctx.Done():
			return
		}
	}
}

// What a link's liveness watch knows of its neighbour.
const (
	alive   = iota
	suspect // quiet for SuspectAfter: its streams move to their backups
	silent  // quiet for DeadAfter: not used, its streams switched
)

// setSuspect starts moving every stream taken from a neighbour that has
// been quiet for SuspectAfter to another parent, make-before-break (on),
// or, when it is heard again (off), drops the moves that have not spliced
// yet and sends the streams that moved back to it, make-before-break:
// those whose route names it, and those without a route whose best
// announcement still comes through it.
func (h *Hub) setSuspect(l link, on bool) {
	peer := l.neighbour()
	h.mu.Lock()
	if h.links[peer] != l {
		h.mu.Unlock()
		return
	}
	moving := 0
	for name, s := range h.streams {
		if s.localLocked() {
			continue
		}
		h.syncSourcesLocked(s)
		r := h.steer[name]
		from := s.src != nil && s.src.peer() == peer
		switch {
		case on && from && s.next == nil:
			exclude := map[string]bool{peer: true}
			for p := range s.failed {
				exclude[p] = true
			}
			nl, _, hops := h.pickLinkLocked(name, exclude)
			if nl == nil {
				continue
			}
			s.next = nl.subscribe(s)
			s.nextHops = nil
			if hops != nil {
				s.nextHops = h.pathThrough(hops)
			}
			s.in.join(s.next)
			s.quietFrom = peer
			moving++
		case !on && r.Parent == peer:
			h.followRouteLocked(s)
		case !on && from && s.next != nil && s.next.peer() != r.Parent:
			h.dropJoiningLocked(s)
		case !on && s.quietFrom == peer && r.Parent == "":
			// It moved away by announcement: back while the quiet
			// neighbour's announcement is still the best.
			if best, ok := h.bestRouteLocked(name); ok && best.via == peer {
				h.moveLocked(s, peer)
			}
		}
		if !on && s.quietFrom == peer {
			s.quietFrom = ""
		}
	}
	h.mu.Unlock()
	switch {
	case on && moving > 0:
		h.log.Info("neighbour quiet: its streams move to their backups", "peer", peer, "after", h.cfg.SuspectAfter, "moving", moving)
	case on:
		h.log.Debug("neighbour quiet", "peer", peer, "after", h.cfg.SuspectAfter)
	default:
		h.log.Debug("quiet neighbour heard again", "peer", peer)
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
	// What this node announces leaves out routes through a silent
	// neighbour (bestRouteLocked): announce what changes.
	before := map[string]advert{}
	for name, vias := range h.routes {
		if _, ok := vias[peer]; ok {
			before[name] = h.advertLocked(name)
		}
	}
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
	for name, ad := range before {
		h.advertiseLocked(name, ad)
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
