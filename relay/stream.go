package relay

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// keyframeInterval is the shortest time between two keyframe requests sent to
// a stream's source: viewers joining together cost the publisher one keyframe.
const keyframeInterval = 500 * time.Millisecond

// source is where a stream's packets come from: a local publisher or an
// upstream datacenter.
type source interface {
	requestKeyframe()
	// stop is called once when the last subscriber of a relayed stream has
	// gone (after the linger time) or the stream is removed.
	stop()
	// peer is the neighbour the packets come from; "" for a publisher.
	peer() string
}

// downstreamSubscriber is the subscriber a link makes for a downstream
// datacenter: it is no interest of this node's own clients (see Interest),
// and the stream is never taken from that datacenter.
type downstreamSubscriber interface {
	Subscriber
	downstreamPeer() string
}

// Stream is one live stream known to a hub: published here, or relayed from
// upstream while something here watches it.
//
// Packets fan out to the subscribers without a lock: the subscriber list is
// a copy-on-write slice that attach and detach replace under mu. mu also
// serialises the GOP cache, which is what keeps a joining subscriber's
// packets in order (see attach).
type Stream struct {
	hub    *Hub
	name   string
	origin string    // datacenter the stream was published at
	since  time.Time // when the stream was created here

	ready     chan struct{} // closed once desc or err is set
	readyOnce sync.Once
	desc      Description
	done      chan struct{} // closed when the stream ends
	doneOnce  sync.Once
	err       error // why it ended, or why it never started; read after ready/done

	// Hub-owned: what the hub decides about the stream, guarded by hub.mu
	// (see Hub). The source is replaceable: the stream outlives it.
	src      source
	next     source          // make-before-break: the new parent's subscription, until spliced
	nextHops []string        // the path through next, once known
	failed   map[string]bool // neighbours whose subscription failed since the stream last got an answer
	// quietFrom is the neighbour a move started because it fell quiet
	// left (heartbeat.go), until it is heard again.
	quietFrom string
	hops      []string // datacenters from the origin to this node
	// pathChanged is closed when hops changes; nil until watched.
	pathChanged chan struct{}
	interest    int // acquire calls not released: Subscribes waiting or attached
	// localInterest counts the interests taken for this node's own clients,
	// not for downstream datacenters (see Interest).
	localInterest int
	linger        *time.Timer // stops a relayed stream nobody is interested in
	lingerGen     uint64      // bumped whenever linger is stopped or replaced
	// announcedFlags are the flags the hub announces for a stream
	// published here: Flags as the hub last took them (announceFlags).
	announcedFlags Flags

	packets atomic.Uint64
	bytes   atomic.Uint64
	// sentPackets and sentBytes count what the stream handed to its
	// subscribers that are not taps: each packet once per subscriber, the
	// GOP replayed to a joining one included.
	sentPackets atomic.Uint64
	sentBytes   atomic.Uint64
	lastKeyReq  atomic.Int64 // when a keyframe request last went to the source, Unix ns

	flags        atomic.Uint32 // Flags; see flags.go
	flagsMu      sync.Mutex    // guards flagsChanged
	flagsChanged chan struct{} // closed when flags change; nil until watched

	in ingress // a relayed stream's sources meet here (splice.go)

	// subs is read lock-free by the fan-out; written under mu.
	subs atomic.Pointer[subList]

	mu      sync.Mutex // guards the following fields, and writes of subs
	gop     GOPCache
	pending []*Subscription // DeferredSubscribers not started: not in subs yet
	ended   bool            // the GOP cache is released and takes no more packets
}

func newStream(h *Hub, name, origin string) *Stream {
	return &Stream{
		hub:    h,
		name:   name,
		origin: origin,
		since:  time.Now(),
		ready:  make(chan struct{}),
		done:   make(chan struct{}),
		gop:    GOPCache{Max: h.cfg.GOPMaxPackets},
	}
}

// Name returns the stream's name.
func (s *Stream) Name() string { return s.name }

// Origin returns the datacenter the stream was published at.
func (s *Stream) Origin() string { return s.origin }

// setReady publishes the stream's description to waiting subscribers.
// Only the first call counts: a source that replaced another keeps the
// description the stream started with.
func (s *Stream) setReady(desc Description) {
	s.readyOnce.Do(func() {
		s.desc = desc
		close(s.ready)
	})
}

func (s *Stream) isReady() bool {
	select {
	case <-s.ready:
		return true
	default:
		return false
	}
}

// end ends the stream, ready or not, and wakes everyone waiting on it.
func (s *Stream) end(err error) {
	s.doneOnce.Do(func() {
		s.err = err
		s.readyOnce.Do(func() { close(s.ready) })
		close(s.done)
		s.mu.Lock()
		s.ended = true
		s.gop.Reset()
		s.mu.Unlock()
	})
}

// writePacket keeps a packet in the GOP cache and fans it out to every
// subscriber, without holding a lock while subscribers run: a subscriber may
// call back into the stream (RequestKeyframe, Close). Packets of one track
// written from one goroutine reach each subscriber in order.
//
// The packet is copied once into a shared Buffer that the GOP cache and every
// BufferWriter subscriber (the viewers' and links' queues) reference; other
// subscribers get the Packet.
func (s *Stream) writePacket(p *Packet) {
	s.packets.Add(1)
	s.bytes.Add(uint64(len(p.Data)))
	shared := NewBuffer(p)
	// The subscriber list is read under the lock that serialises GOP
	// appends: a subscriber attached before this point is in subs, one
	// attached after finds this packet in the GOP snapshot it replays.
	s.mu.Lock()
	if !s.ended {
		shared.Retain()
		s.gop.AddBuffer(shared)
	}
	subs := s.subs.Load()
	s.mu.Unlock()
	if subs != nil {
		if n := uint64(subs.counted); n > 0 {
			s.sentPackets.Add(n)
			s.sentBytes.Add(n * uint64(len(p.Data)))
		}
		for _, ss := range subs.subs {
			ss.deliver(shared, p)
		}
	}
	shared.Release()
}

func (s *Stream) requestKeyframe() {
	now := time.Now().UnixNano()
	last := s.lastKeyReq.Load()
	if now-last < int64(keyframeInterval) || !s.lastKeyReq.CompareAndSwap(last, now) {
		return // coalesced with a recent request
	}
	s.hub.mu.Lock()
	s.hub.syncSourcesLocked(s)
	src := s.src
	s.hub.mu.Unlock()
	if src != nil {
		src.requestKeyframe()
	}
}

// localLocked reports whether s is published at this node. h.mu is held.
func (s *Stream) localLocked() bool {
	_, local := s.src.(*Publisher)
	return local
}

// attach adds a subscriber, replaying the GOP cache to it before any live
// packet. A DeferredSubscriber gets nothing until Subscription.Start, which
// installs it in subs then: it waits in pending meanwhile. The subscription
// takes over an interest the caller acquired from the hub, and releases it
// when closed.
//
// Ordering: under mu, attach takes a snapshot of the GOP cache and installs
// the subscription in subs, so every packet is either in the snapshot (it
// was appended before) or fanned out to the new subscriber (its writer read
// subs after), never both and never neither. The replay runs after mu is
// released, so that the subscriber may call back into the stream; until it
// is done the subscription's replay gate is held, and a writer that reaches
// the new subscriber waits at the gate (deliver), so live packets follow the
// replay. A writer waits only while a subscriber that joined concurrently
// gets its replay, which never blocks (see Subscriber).
func (s *Stream) attach(sub Subscriber, local bool) *Subscription {
	ss := &Subscription{s: s, sub: sub, local: local}
	ss.bw, _ = sub.(BufferWriter)
	_, ss.tap = sub.(Tap)
	if _, ss.deferred = sub.(DeferredSubscriber); ss.deferred {
		s.mu.Lock()
		s.pending = append(s.pending, ss)
		s.mu.Unlock()
		return ss
	}
	ss.gate.Lock()
	ss.replaying.Store(true)
	s.mu.Lock()
	replay := slices.Clone(s.gop.Packets())
	for _, b := range replay {
		b.Retain()
	}
	s.setSubsLocked(append(s.subsSnapshot(), ss))
	s.mu.Unlock()
	ss.countSent(replay)
	for _, b := range replay {
		switch {
		case ss.closed.Load():
			b.Release()
		case ss.bw != nil:
			ss.bw.WriteBuffer(b)
		default:
			p := b.Packet()
			sub.WritePacket(&p)
			b.Release()
		}
	}
	ss.replaying.Store(false)
	ss.gate.Unlock()
	return ss
}

func (s *Stream) detach(ss *Subscription) {
	s.mu.Lock()
	subs := s.subsSnapshot()
	if i := slices.Index(subs, ss); i >= 0 {
		s.setSubsLocked(slices.Delete(slices.Clone(subs), i, i+1))
	}
	if i := slices.Index(s.pending, ss); i >= 0 {
		s.pending = slices.Delete(s.pending, i, i+1)
	}
	s.mu.Unlock()
	s.hub.release(s, ss.local)
}

// subList is one version of the attached subscriptions, replaced whole
// (copy on write) so that the fan-out reads it without a lock.
type subList struct {
	subs    []*Subscription
	counted int // how many of subs are not taps: what sentPackets counts
}

// subsSnapshot returns the attached subscriptions. The slice is shared:
// do not modify it.
func (s *Stream) subsSnapshot() []*Subscription {
	if p := s.subs.Load(); p != nil {
		return p.subs
	}
	return nil
}

// setSubsLocked replaces the subscriber list; the fan-out may still be
// reading the old one.
func (s *Stream) setSubsLocked(subs []*Subscription) {
	l := &subList{subs: subs}
	for _, ss := range subs {
		if !ss.tap {
			l.counted++
		}
	}
	s.subs.Store(l)
}

// countSent counts a GOP replay handed to the subscriber in the stream's
// sent counters.
func (ss *Subscription) countSent(replay []*Buffer) {
	if ss.tap || len(replay) == 0 {
		return
	}
	var n uint64
	for _, b := range replay {
		n += uint64(len(b.Data()))
	}
	ss.s.sentPackets.Add(uint64(len(replay)))
	ss.s.sentBytes.Add(n)
}

// subscriberCount counts the subscribers that are not taps, started or not.
func (s *Stream) subscriberCount() int {
	s.mu.Lock()
	all := append(slices.Clone(s.pending), s.subsSnapshot()...)
	s.mu.Unlock()
	n := 0
	for _, ss := range all {
		if !ss.tap {
			n++
		}
	}
	return n
}

// DeferredSubscriber is a Subscriber that is sent nothing from its
// subscription until it calls [Subscription.Start], which hands it the GOP
// cache to replay at its own pace (see [Pacer]). A WebRTC viewer subscribes
// when it is offered and starts once connected, so nothing piles up in its
// queue meanwhile.
type DeferredSubscriber interface {
	Subscriber
	// DeferStart marks the subscriber as deferred; it is never called.
	DeferStart()
}

// Subscription is one subscriber's attachment to a stream. It is safe for
// concurrent use.
type Subscription struct {
	s      *Stream
	sub    Subscriber
	bw     BufferWriter // sub, when it takes shared buffers
	tap    bool         // sub is a Tap: left out of counts
	local  bool         // for this node's clients, not a downstream datacenter
	closed atomic.Bool

	deferred bool // guarded by s.mu: a DeferredSubscriber not yet started

	// gate is held while the GOP cache is replayed to the subscriber, and
	// replaying is set meanwhile, so that live packets wait for the replay.
	gate      sync.Mutex
	replaying atomic.Bool
}

// deliver hands the subscriber one live packet: a reference to b, or p.
func (ss *Subscription) deliver(b *Buffer, p *Packet) {
	if ss.replaying.Load() {
		// Wait for the replay to finish.
		ss.gate.Lock()
		ss.gate.Unlock() //lint:ignore SA2001 the wait is the point
	}
	if ss.closed.Load() {
		return
	}
	if ss.bw != nil {
		b.Retain()
		ss.bw.WriteBuffer(b)
		return
	}
	ss.sub.WritePacket(p)
}

// Start starts a DeferredSubscriber's packets: it appends the stream's GOP
// cache to gop, one reference to each packet that the caller must Release,
// and from then on the subscriber gets every packet after them, with none
// lost or doubled between the two: the snapshot and the subscription's move
// from pending to subs happen under the lock that serialises GOP appends
// (see attach). Start is for DeferredSubscribers; a second call, a call for
// another subscriber or after Close returns gop unchanged.
func (ss *Subscription) Start(gop []*Buffer) []*Buffer {
	s := ss.s
	s.mu.Lock()
	defer s.mu.Unlock()
	i := slices.Index(s.pending, ss)
	if !ss.deferred || i < 0 {
		return gop
	}
	ss.deferred = false
	s.pending = slices.Delete(s.pending, i, i+1)
	n := len(gop)
	for _, b := range s.gop.Packets() {
		b.Retain()
		gop = append(gop, b)
	}
	ss.countSent(gop[n:])
	s.setSubsLocked(append(s.subsSnapshot(), ss))
	return gop
}

// Description returns the stream's tracks.
func (ss *Subscription) Description() Description { return ss.s.desc }

// Stream returns the stream subscribed to.
func (ss *Subscription) Stream() *Stream { return ss.s }

// RequestKeyframe asks the stream's publisher for a keyframe (a PLI for WebRTC
// publishers), through every datacenter on the way. Requests are coalesced.
func (ss *Subscription) RequestKeyframe() { ss.s.requestKeyframe() }

// Done is closed when the stream ends (its publisher left, or the upstream
// datacenter was lost).
func (ss *Subscription) Done() <-chan struct{} { return ss.s.done }

// Err returns why the stream ended, once Done is closed.
func (ss *Subscription) Err() error {
	select {
	case <-ss.s.done:
		return ss.s.err
	default:
		return nil
	}
}

// Close detaches the subscriber. It may be called from inside the
// subscriber's own WritePacket or WriteBuffer. No further packet is delivered
// from the goroutine that calls Close, and none starts after Close returns
// except one a publisher goroutine was already handing out (the fan-out holds
// no lock): a subscriber must tolerate that, e.g. by queueing it to nobody.
// Close is idempotent.
func (ss *Subscription) Close() {
	if ss.closed.Swap(true) {
		return
	}
	ss.s.detach(ss)
}

// wait blocks until the stream is ready or ctx ends.
func (s *Stream) wait(ctx context.Context) error {
	select {
	case <-s.ready:
		select {
		case <-s.done:
			return s.err
		default:
			return nil
		}
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// GOPCache keeps every packet since the last video keyframe, so that a new
// subscriber starts with a decodable picture at once. Every stream has one;
// egress protocols that share one subscription among several readers keep
// their own. It is not safe for concurrent use.
type GOPCache struct {
	// Max bounds the packets kept; a longer GOP is dropped until the next
	// keyframe rather than held in unbounded memory.
	Max int

	pkts     []*Buffer
	active   bool // a keyframe has been seen and the cache is within Max
	keyTS    uint32
	keyTrack uint8
}

// Add keeps a copy of p.
func (g *GOPCache) Add(p *Packet) {
	if g.admit(p.Track, p.Keyframe, p.Data) {
		g.pkts = append(g.pkts, NewBuffer(p))
	}
}

// AddBuffer keeps b, or releases it when it does not belong to the GOP.
func (g *GOPCache) AddBuffer(b *Buffer) {
	if g.admit(b.Track, b.Keyframe, b.Data()) {
		g.pkts = append(g.pkts, b)
		return
	}
	b.Release()
}

// admit starts a new GOP at each keyframe and reports whether a packet
// belongs to the current one.
func (g *GOPCache) admit(track uint8, keyframe bool, data []byte) bool {
	if keyframe {
		_, ts, _ := rtpPayload(data)
		if !g.active || track != g.keyTrack || ts != g.keyTS {
			g.Reset()
			g.active, g.keyTS, g.keyTrack = true, ts, track
		}
	}
	if !g.active {
		return false
	}
	if len(g.pkts) >= g.Max {
		g.Reset()
		return false
	}
	return true
}

// Packets returns the cached packets in order. They stay owned by the cache
// and are valid until the next Add, AddBuffer or Reset.
func (g *GOPCache) Packets() []*Buffer { return g.pkts }

// Reset releases every cached packet.
func (g *GOPCache) Reset() {
	for i, b := range g.pkts {
		b.Release()
		g.pkts[i] = nil
	}
	g.pkts = g.pkts[:0]
	g.active = false
}
