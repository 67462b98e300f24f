package relay

import "time"

// epoch is the origin of Buffer arrival times, read from the monotonic clock.
var epoch = time.Now()

// sinceEpoch is the clock of Buffer arrival times.
func sinceEpoch() time.Duration { return time.Since(epoch) }

// ReplaySpeedup is how many times faster than real time a Pacer sends a GOP
// replay. At 4 the replay's bitrate is at most 4× the stream's, and a new
// subscriber has caught up with live packets after a third of the GOP's
// span (two thirds of a second for a 2 s GOP).
const ReplaySpeedup = 4

// Pacer spaces out a new subscriber's GOP replay and the live packets that
// queue up behind it, so that a viewer whose socket has the default receive
// buffer is not sent hundreds of packets at once. Both egresses use it
// between a subscription's replay and the subscriber's network writes.
//
// Each packet is due at its arrival time at this node, compressed Speedup
// times and counted from the replay's first packet. So the keyframe goes
// first, as fast as the publisher sent it (no burstier than the keyframes
// the viewer gets live), then the rest of the GOP at Speedup × the stream's
// own bitrate, audio interleaved as it arrived. A packet due no later than
// it arrived means the replay has caught up: from then on every packet is
// due at once, so live packets follow the replay in order, none held back or
// dropped. A sender that falls behind the schedule does not burst to catch
// up: the schedule moves (see maxLate).
//
// A Pacer is used by one goroutine. A zero Pacer sends everything at once
// until Start.
type Pacer struct {
	// Speedup is the replay's speed-up over real time (default
	// ReplaySpeedup).
	Speedup int

	now     func() time.Duration // the arrival clock; tests replace it
	started bool
	live    bool          // caught up: everything is due at once
	start   time.Duration // when the replay's first packet was due
	t0      time.Duration // its arrival time
}

// Start starts pacing a replay whose first packet is first: it is due now.
func (p *Pacer) Start(first *Buffer) {
	if p.Speedup <= 0 {
		p.Speedup = ReplaySpeedup
	}
	if p.now == nil {
		p.now = sinceEpoch
	}
	p.started, p.live = true, false
	p.start, p.t0 = p.now(), first.arrival
}

// Live reports whether the replay has caught up with live packets (or never
// started): every packet is due at once.
func (p *Pacer) Live() bool { return !p.started || p.live }

// Wait returns how long to wait before sending b, the next packet after the
// previous one Wait returned 0 for: 0 when it is due.
func (p *Pacer) Wait(b *Buffer) time.Duration {
	if !p.started || p.live {
		return 0
	}
	due := p.start + (b.arrival-p.t0)/time.Duration(p.Speedup)
	if due <= b.arrival {
		p.live = true
		return 0
	}
	now := p.now()
	if late := now - due; late > maxLate {
		// The sender fell behind (it was not scheduled, or its writes
		// were slow): move the schedule rather than burst what is overdue.
		p.start += late - maxLate
		due = now - maxLate
	}
	return max(due-now, 0)
}

// maxLate is how far behind its schedule a Pacer lets its sender fall before
// it moves the schedule: what is overdue goes at once, so this bounds the
// burst after a stall (10 ms at 4× is 40 ms of the stream).
const maxLate = 10 * time.Millisecond
