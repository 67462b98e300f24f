package relay

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
)

// The media sender of a link. Every downstream subscription on a link has
// its own bounded queue; one goroutine serves the queues that hold packets
// by deficit round robin (in bytes), so one stream's keyframe burst waits
// behind its own packets and not in front of another stream's audio. The
// hop sequence number is assigned when a packet is queued, so a packet
// dropped here shows downstream as hop loss like one lost on the wire.
//
// The sender paces datagrams with a token bucket whose rate follows the
// link's load: quic-go's datagram receive queue holds 128 and drops
// silently, so a burst of hundreds of datagrams arriving at once is what
// loses packets between relays (see the receiver).

const (
	// subQueueSize bounds the packets waiting on a link for one downstream
	// subscription: a 10,000 packets/s stream's 200 ms, or a GOP replay of
	// 2048 packets. Beyond it packets are dropped and counted.
	subQueueSize = 2048
	// drrQuantum is the bytes each waiting subscription may send per round.
	// It is at least one packet, so every round serves every queue.
	drrQuantum = MaxPacketSize
	// A link's datagrams are paced at paceFactor times the rate packets
	// are offered to it (measured over paceWindow), at least paceFloor per
	// second, in bursts of at most paceBurst: a 333-packet video frame
	// leaves over about half a frame interval, not at once. (WebRTC senders
	// pace at 2.5 times their bitrate for the same reason.) Measured here
	// with 333-packet frames at 2 a second: bursts of 32 at 100,000/s lost
	// 17-19 % in quic-go's receive queue a hop on, 8 at 20,000/s none.
	paceFactor = 2
	paceFloor  = 20_000
	paceBurst  = 16
	// paceMaxBurst bounds a burst after the pacer's timer fired late: half
	// of quic-go's receive queue.
	paceMaxBurst = 64
	// paceMaxDelay bounds the delay pacing adds: the rate is at least what
	// waits on the link divided by it, so a GOP replay, or a link behind its
	// load because timers fire late on a busy machine, drains in a few
	// times paceMaxDelay.
	paceMaxDelay = 25 * time.Millisecond
	paceWindow   = 100 * time.Millisecond
	// budgetRefresh is how often the sender asks quic-go how large a
	// datagram may be: path-MTU discovery raises the limit after the
	// handshake, and a path change may lower it.
	budgetRefresh = time.Second
)

// minDatagramPayload is the datagram payload quic-go v0.65 accepts on every
// connection from the handshake on: packets of its default initial size,
// 1280 bytes, less 37 bytes of QUIC overhead. (quic-go falls back to
// 1200-byte packets, 1163 bytes of payload, only when the local interface
// cannot send 1280; the link's budget then follows, and larger packets are
// fragmented.) Path-MTU discovery raises it to ~1400 within a few round
// trips.
const minDatagramPayload = 1280 - 37

// OverlayPacketSize is the largest RTP packet (header included) that crosses
// every overlay hop in one QUIC datagram from a link's first packet on.
// Ingest protocols that packetize media themselves (RTSP) make packets no
// larger; larger ones (up to [MaxPacketSize]) are split into fragments.
const OverlayPacketSize = minDatagramPayload - mediaHeaderLen

// maxBudget is the largest datagram the sender ever needs.
const maxBudget = mediaHeaderLen + MaxPacketSize

// limitProbe is larger than any QUIC datagram (at most 16,383 bytes in
// quic-go): SendDatagram refuses it at once, naming the current limit, and
// never sends it. Its first byte, wire version 0, would make it malformed
// anyway.
var limitProbe [1 << 14]byte

// datagramSender is what the sender needs of a QUIC connection.
type datagramSender interface {
	SendDatagram(b []byte) error
}

type sendSlot struct {
	b   *Buffer
	seq uint32
}

// subQueue is one downstream subscription's queue on a link. Publishers'
// goroutines push; the link's sender pops.
type subQueue struct {
	mu     sync.Mutex // guards the following fields
	slots  [subQueueSize]sendSlot
	head   int
	n      int
	seq    uint32 // hop sequence number of the last packet pushed or dropped
	active bool   // on the sender's lists: set while packets wait
	closed bool
}

type pushResult uint8

const (
	pushQueued    pushResult = iota
	pushScheduled            // queued into an idle queue: tell the sender
	pushFull                 // dropped: the queue is full
	pushClosed               // dropped: the subscription ended
)

// push numbers b with the next hop sequence number and queues it, or
// releases it when the queue is full or closed.
func (q *subQueue) push(b *Buffer) pushResult {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		b.Release()
		return pushClosed
	}
	q.seq++
	if q.n == len(q.slots) {
		q.mu.Unlock()
		b.Release()
		return pushFull
	}
	q.slots[(q.head+q.n)%len(q.slots)] = sendSlot{b: b, seq: q.seq}
	q.n++
	r := pushQueued
	if !q.active {
		q.active, r = true, pushScheduled
	}
	q.mu.Unlock()
	return r
}

// pop takes the first packet if it is no larger than deficit bytes. more
// reports whether packets are left; when it is false the queue is idle and
// the next push schedules it again.
func (q *subQueue) pop(deficit int) (s sendSlot, ok, more bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.n == 0 {
		q.active = false
		return s, false, false
	}
	first := &q.slots[q.head]
	if first.b.n > deficit {
		return s, false, true
	}
	s, *first = *first, sendSlot{}
	q.head = (q.head + 1) % len(q.slots)
	q.n--
	if q.n == 0 {
		q.active = false
	}
	return s, true, q.n > 0
}

// close releases the queued packets, and drops every later one. It returns
// how many it released.
func (q *subQueue) close() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.closed = true
	released := q.n
	for ; q.n > 0; q.n-- {
		q.slots[q.head].b.Release()
		q.slots[q.head] = sendSlot{}
		q.head = (q.head + 1) % len(q.slots)
	}
	return released
}

// linkSender writes a link's media datagrams from one goroutine.
type linkSender struct {
	l    *quicLink // counters
	conn datagramSender
	wake chan struct{} // a queue became active

	mu      sync.Mutex // guards pending
	pending []*downSub // queues that became active since the last round

	backlog atomic.Int64 // packets in the link's queues

	// Bandwidth probes (probe.go): reports from the neighbour on our
	// trains, and ours on its trains to send, from the datagram reader.
	probeIn, probeOut chan probeReport

	// Owned by the sending goroutine.
	round, next []*downSub
	budget      int
	refreshAt   time.Time
	pace        pacer
	probe       prober
	scratch     [maxBudget]byte
}

func newLinkSender(l *quicLink, conn datagramSender) *linkSender {
	s := &linkSender{
		l:    l,
		conn: conn,
		wake: make(chan struct{}, 1),
		pace: newPacer(&l.offered),

		probeIn:  make(chan probeReport, 4),
		probeOut: make(chan probeReport, 4),
	}
	if l.conn != nil {
		s.probe.init(l.conn.ConnectionStats)
	} else {
		s.probe.init(nil) // a link in a test, without a connection: no probes
	}
	s.setBudget(minDatagramPayload)
	return s
}

// schedule puts a queue that just became active on the next round.
func (s *linkSender) schedule(d *downSub) {
	s.mu.Lock()
	s.pending = append(s.pending, d)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// run sends until ctx ends. Probe trains go only when no media waits.
func (s *linkSender) run(ctx context.Context) {
	defer s.probe.stop()
	for {
		s.probeMessages()
		if len(s.round) == 0 {
			s.takePending()
		}
		if len(s.round) == 0 {
			select {
			case <-s.wake:
			case r := <-s.probeIn:
				s.probeReported(r)
			case r := <-s.probeOut:
				s.sendProbeReport(r)
			case <-s.probe.due():
				s.sendProbe(ctx)
				s.probe.rearm()
			case <-ctx.Done():
				return
			}
			continue
		}
		if err := s.serveRound(ctx); err != nil {
			return
		}
	}
}

func (s *linkSender) takePending() {
	s.mu.Lock()
	s.round = append(s.round, s.pending...)
	clear(s.pending)
	s.pending = s.pending[:0]
	s.mu.Unlock()
}

// serveRound gives every active queue its quantum, once. It fails only when
// ctx ends.
func (s *linkSender) serveRound(ctx context.Context) error {
	for i, d := range s.round {
		s.round[i] = nil
		d.deficit += drrQuantum
		for {
			slot, ok, more := d.q.pop(d.deficit)
			if ok {
				s.backlog.Add(-1)
				d.deficit -= slot.b.n
				if err := s.sendPacket(ctx, d.id, slot); err != nil {
					return err
				}
			}
			if !more {
				d.deficit = 0
				break
			}
			if !ok {
				s.next = append(s.next, d)
				break
			}
		}
	}
	s.round, s.next = s.next, s.round[:0]
	s.takePending()
	return nil
}

// sendPacket sends one queued packet, in as many datagrams as the budget
// needs, and releases it. It fails only when ctx ends.
func (s *linkSender) sendPacket(ctx context.Context, subID uint32, slot sendSlot) error {
	defer slot.b.Release()
	h := mediaHeader{Track: slot.b.Track, SubID: subID, HopSeq: slot.seq}
	if slot.b.Keyframe {
		h.Flags |= flagKeyframe
	}
	s.maybeRefreshBudget()
	pkt := slot.b.Data()
	count, chunk, err := fragments(len(pkt), s.budget)
	retried := false
	for i := 0; err == nil && i < count; i++ {
		if err = s.pace.wait(ctx, s.backlog.Load()); err != nil {
			return err
		}
		err = s.conn.SendDatagram(appendDatagram(s.scratch[:0], h, pkt, i, count, chunk))
		if tooLarge, ok := errors.AsType[*quic.DatagramTooLargeError](err); ok && i == 0 && !retried {
			// The limit fell since the last refresh: start the packet
			// again within the new one.
			retried = true
			s.setBudget(tooLarge.MaxDatagramPayloadSize)
			count, chunk, err = fragments(len(pkt), s.budget)
			i = -1
			continue
		}
		if err == nil {
			s.l.dgramsSent.Add(1)
		}
	}
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		s.l.sendErrors.Add(1)
		return nil
	}
	s.l.sent.Add(1)
	return nil
}

func (s *linkSender) maybeRefreshBudget() {
	if now := time.Now(); now.After(s.refreshAt) {
		s.refreshAt = now.Add(budgetRefresh)
		s.refreshBudget()
	}
}

// refreshBudget asks quic-go for the datagram payload it accepts now.
func (s *linkSender) refreshBudget() {
	err := s.conn.SendDatagram(limitProbe[:])
	if tooLarge, ok := errors.AsType[*quic.DatagramTooLargeError](err); ok {
		s.setBudget(tooLarge.MaxDatagramPayloadSize)
	}
}

// setBudget takes quic-go's datagram limit as the budget, within what the
// sender can use.
func (s *linkSender) setBudget(limit int64) {
	s.budget = int(max(min(limit, maxBudget), mediaHeaderLen+fragHeaderLen+1))
	s.l.budget.Store(int64(s.budget))
}

// pacer is a token bucket of datagrams whose rate follows the link's load.
// It is used by one goroutine.
type pacer struct {
	floor   float64        // datagrams per second at least; 0 does not pace
	factor  float64        // times the offered packet rate
	burst   float64        // tokens at most
	offered *atomic.Uint64 // packets offered to the link, counted by producers

	rate, tokens float64
	last         time.Time
	windowStart  time.Time
	windowBase   uint64
	avg          float64 // offered packets per second, smoothed
	timer        *time.Timer
}

func newPacer(offered *atomic.Uint64) pacer {
	return pacer{floor: paceFloor, factor: paceFactor, burst: paceBurst, offered: offered, rate: paceFloor, tokens: paceBurst}
}

// wait takes one token, sleeping until there is one; backlog is how many
// packets wait on the link. It fails only when ctx ends.
func (p *pacer) wait(ctx context.Context, backlog int64) error {
	if p.floor == 0 {
		return nil
	}
	rate := max(p.rate, float64(backlog)/paceMaxDelay.Seconds())
	p.refillAt(rate, p.burst)
	if p.tokens < 1 {
		d := time.Duration((1 - p.tokens) / rate * float64(time.Second))
		if p.timer == nil {
			p.timer = time.NewTimer(d)
		} else {
			p.timer.Reset(d)
		}
		select {
		case <-p.timer.C:
		case <-ctx.Done():
			return ctx.Err()
		}
		// Timers here fire a millisecond or more late under load: keep
		// what the oversleep earned, up to paceMaxBurst or 2 ms worth, or
		// the pacer would cap the link below its load.
		p.refillAt(rate, max(paceMaxBurst, rate*0.002))
	}
	p.tokens--
	return nil
}

// refillAt adds the tokens earned at rate since the last call, up to limit, and, once per
// paceWindow, sets the rate from the offered load: the larger of the last
// window's and a smoothed one, so that the rate rises at once with the load
// and falls slowly.
func (p *pacer) refillAt(rate, limit float64) {
	now := time.Now()
	if p.last.IsZero() {
		p.last, p.windowStart, p.windowBase = now, now, p.offered.Load()
		return
	}
	if p.tokens < limit {
		p.tokens = min(limit, p.tokens+now.Sub(p.last).Seconds()*rate)
	}
	p.last = now
	if dt := now.Sub(p.windowStart); dt >= paceWindow {
		n := p.offered.Load()
		inst := float64(n-p.windowBase) / dt.Seconds()
		p.avg = 0.75*p.avg + 0.25*inst
		p.rate = max(p.floor, p.factor*max(p.avg, inst))
		p.windowStart, p.windowBase = now, n
	}
}
