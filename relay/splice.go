package relay

import (
	"sync"
	"time"
)

// The ingress of a relayed stream: the stage between the stream's upstream
// subscriptions (its sources) and its fan-out, where a stream changes source
// without its viewers noticing.
//
// A relayed stream has one active source, and while it moves to another
// parent make-before-break (SetRoute) a joining one too. Relays keep the
// origin's RTP sequence numbers, so the ingress can tell, per track, which
// packets its viewers already have:
//
//   - Packets of the active source are forwarded. The highest sequence
//     number forwarded per track is kept (16-bit, with wraparound).
//   - The joining source's first packets are its upstream's GOP replay, then
//     live packets that may lag or lead the active source's. As soon as one
//     of them is not ahead of what was forwarded (its sequence number is at
//     most the last forwarded + 1), the joining source's stream from there
//     on holds everything the viewers still need: it becomes the active
//     source, the old one is retired (its packets are dropped from then on;
//     the hub unsubscribes it), and packets the viewers already have are
//     dropped until the new source delivers a newer one. If the joining
//     source leads by more than its GOP (its first packet is ahead of
//     last + 1), its packets are held, and the old source keeps filling in
//     until it reaches them: then the held packets are forwarded and the
//     sources swap. A splice holds at most spliceHoldMax packets or
//     spliceHoldTime, then swaps anyway (a gap rather than a stall).
//   - When the active source dies (break-then-make: a lost link, a
//     neighbour gone silent), the hub installs a replacement at once. Its
//     GOP replay fills in what was lost if the gap is shorter than a GOP,
//     and starts at a keyframe otherwise, so downstream decoders resync;
//     duplicates are dropped the same way.
//
// Outside a source change a packet that is not newer than the last one
// forwarded (reordered on the way) is forwarded if it was not yet, within
// a window of 64: viewers never get a packet twice, and a reordered one is
// not lost. From a source change until the new source's first newer
// packet, only newer packets pass.
//
// Locks: writeMu serialises the stream's writers and is held across the
// fan-out, so the two sources' packets reach viewers in the order decided.
// Nothing takes writeMu while holding another lock, and fan-out callbacks
// never take it. mu is a leaf lock guarding the decision state: the hub
// takes it under its own lock to change sources, the data path only under
// writeMu. No allocation per packet: held packets are pooled Buffers.
type ingress struct {
	writeMu sync.Mutex

	mu              sync.Mutex // guards the following fields
	active          source     // whose packets are forwarded
	joining         source     // make-before-break candidate; nil when none
	tracks          [MaxTracks]trackSeq
	held            []*Buffer // joining packets ahead of active, in order; made at the first hold
	heldHead, nHeld int       // held[heldHead:nHeld] wait
	heldAt          time.Time // when the first packet was held
	dups            uint64    // packets dropped because viewers had them
}

// Splice bounds: how many packets, or how long, a joining source that leads
// the active one is held back before the swap happens anyway.
const (
	spliceHoldMax  = 512
	spliceHoldTime = 250 * time.Millisecond
)

// trackSeq is what the ingress knows of one track's sequence numbers.
type trackSeq struct {
	last      uint16 // highest sequence number forwarded
	seen      bool   // last is valid
	filtering bool   // drop packets not newer than last: after a source change
	window    uint64 // bit i: last-i was forwarded
}

// seqNewer reports whether a is after b in 16-bit sequence space.
func seqNewer(a, b uint16) bool { return int16(a-b) > 0 }

// admitLocked decides whether a packet of the active source is forwarded,
// and records it: a newer packet always; an older one (reordered on the
// way) only outside a source change, once, and within 64 of the newest.
func (in *ingress) admitLocked(track uint8, seq uint16) bool {
	t := &in.tracks[track]
	if !t.seen {
		t.seen, t.last, t.window = true, seq, 1
		return true
	}
	d := int16(seq - t.last)
	switch {
	case d > 0:
		if d >= 64 {
			t.window = 0
		} else {
			t.window <<= uint(d)
		}
		t.window |= 1
		t.last, t.filtering = seq, false
		return true
	case !t.filtering && d > -64 && t.window&(1<<uint(-d)) == 0:
		t.window |= 1 << uint(-d)
		return true
	}
	in.dups++
	return false
}

// aheadLocked reports whether seq is ahead of last forwarded + 1: a packet
// the active source has not delivered the one before of.
func (in *ingress) aheadLocked(track uint8, seq uint16) bool {
	t := &in.tracks[track]
	return t.seen && seqNewer(seq, t.last+1)
}

// caughtUpLocked reports whether the active source has reached the held
// packets on every track that has some.
func (in *ingress) caughtUpLocked() bool {
	var checked [MaxTracks]bool
	for _, b := range in.held[in.heldHead:in.nHeld] {
		if checked[b.Track] {
			continue
		}
		checked[b.Track] = true
		if in.aheadLocked(b.Track, RTPSequence(b.Data())) {
			return false
		}
	}
	return true
}

// filterLocked turns the duplicate filter on for every track: the source
// changed.
func (in *ingress) filterLocked() {
	for i := range in.tracks {
		in.tracks[i].filtering = in.tracks[i].seen
	}
}

// swapLocked makes the joining source active.
func (in *ingress) swapLocked() {
	in.active, in.joining = in.joining, nil
	in.filterLocked()
}

func (in *ingress) releaseHeldLocked() {
	for i := in.heldHead; i < in.nHeld; i++ {
		in.held[i].Release()
		in.held[i] = nil
	}
	in.heldHead, in.nHeld = 0, 0
}

// Hub side: called with the hub's lock held.

// setActive installs a source whose packets are forwarded at once (a new
// stream's first source, or a replacement after the active one died),
// ending any splice.
func (in *ingress) setActive(src source) {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.joining == src {
		// The joining source takes over: its held packets come first.
		in.joining = nil
	} else {
		in.joining = nil
		in.releaseHeldLocked()
	}
	in.active = src
	in.filterLocked()
}

// join starts a make-before-break move to src.
func (in *ingress) join(src source) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.joining = src
	in.releaseHeldLocked()
}

// drop forgets a source that ended; it reports whether it was the active
// one.
func (in *ingress) drop(src source) (wasActive bool) {
	in.mu.Lock()
	defer in.mu.Unlock()
	switch src {
	case in.joining:
		in.joining = nil
		in.releaseHeldLocked()
	case in.active:
		in.active = nil
		return true
	}
	return false
}

func (in *ingress) sources() (active, joining source) {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.active, in.joining
}

// receive is where a relayed stream's sources hand over their packets.
func (s *Stream) receive(src source, p *Packet) {
	in := &s.in
	in.writeMu.Lock()
	swapped, gap := in.receiveLocked(s, src, p)
	in.writeMu.Unlock()
	if swapped {
		s.hub.spliced(s)
	}
	if gap {
		s.requestKeyframe()
	}
}

// receiveLocked runs under writeMu. gap reports a new source whose first
// packet left a hole and is no keyframe: decoders downstream need one.
func (in *ingress) receiveLocked(s *Stream, src source, p *Packet) (swapped, gap bool) {
	seq := RTPSequence(p.Data)
	in.mu.Lock()
	defer in.mu.Unlock()
	switch src {
	case in.active:
		if in.heldHead < in.nHeld && in.joining == nil {
			// The hub made the joining source active (the old one
			// died): what it held comes before this packet.
			in.flushLocked(s)
		}
		t := in.tracks[p.Track]
		if in.admitLocked(p.Track, seq) {
			gap = t.filtering && seqNewer(seq, t.last+1) && !p.Keyframe
			in.mu.Unlock()
			s.writePacket(p)
			in.mu.Lock()
		}
		if in.joining != nil && in.heldHead < in.nHeld && in.caughtUpLocked() {
			// The old source reached the packets the joining one
			// held: they come next, from the joining source.
			in.swapLocked()
			in.flushLocked(s)
			swapped = true
		}
		return swapped, gap
	case in.joining:
		if in.heldHead == in.nHeld && !in.aheadLocked(p.Track, seq) {
			// Not ahead of the viewers: the joining source's stream
			// from here on holds all they still need.
			in.swapLocked()
			in.writeAdmittedLocked(s, p, seq)
			return true, false
		}
		if in.nHeld == 0 {
			in.heldAt = time.Now()
		}
		if in.nHeld == spliceHoldMax || time.Since(in.heldAt) > spliceHoldTime {
			// The old source did not catch up in time: swap with a gap.
			in.swapLocked()
			in.flushLocked(s)
			in.writeAdmittedLocked(s, p, seq)
			return true, false
		}
		if in.held == nil {
			in.held = make([]*Buffer, spliceHoldMax) // once per stream that ever splices this way
		}
		in.held[in.nHeld] = NewBuffer(p)
		in.nHeld++
		return false, false
	}
	in.dups++ // a retired source's last packets
	return false, false
}

// writeAdmittedLocked forwards a packet of the active source unless the
// viewers have it. mu is released while it fans out.
func (in *ingress) writeAdmittedLocked(s *Stream, p *Packet, seq uint16) {
	if in.admitLocked(p.Track, seq) {
		in.mu.Unlock()
		s.writePacket(p)
		in.mu.Lock()
	}
}

// flushLocked forwards the held packets, dropping those the viewers have.
// It releases mu while each packet fans out (writeMu keeps the order); the
// hub may release what is left meanwhile.
func (in *ingress) flushLocked(s *Stream) {
	for in.heldHead < in.nHeld {
		b := in.held[in.heldHead]
		in.held[in.heldHead] = nil
		in.heldHead++
		if in.admitLocked(b.Track, RTPSequence(b.Data())) {
			in.mu.Unlock()
			p := packetPool.Get().(*Packet)
			*p = b.Packet()
			s.writePacket(p)
			*p = Packet{}
			packetPool.Put(p)
			in.mu.Lock()
		}
		b.Release()
	}
	in.heldHead, in.nHeld = 0, 0
}
