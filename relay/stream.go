package relay

import (
	"context"
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
}

// Stream is one live stream known to a hub: published here, or relayed from
// upstream while something here watches it.
type Stream struct {
	hub    *Hub
	name   string
	origin string    // datacenter the stream was published at
	since  time.Time // when the stream was created here

	hops     []string      // datacenters from the origin to this node
	ready    chan struct{} // closed once desc or err is set
	desc     Description
	done     chan struct{} // closed when the stream ends
	doneOnce sync.Once
	err      error // why it ended, or why it never started; read after ready/done

	src source

	packets atomic.Uint64
	bytes   atomic.Uint64

	flags        atomic.Uint32 // Flags; see flags.go
	flagsMu      sync.Mutex    // guards flagsChanged
	flagsChanged chan struct{} // closed when flags change; nil until watched

	mu          sync.Mutex // guards the following fields
	subs        []*Subscription
	gop         GOPCache
	lastKeyReq  time.Time
	lingerTimer *time.Timer
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
func (s *Stream) setReady(desc Description) {
	s.desc = desc
	close(s.ready)
}

// end ends the stream, ready or not, and wakes everyone waiting on it.
func (s *Stream) end(err error) {
	s.doneOnce.Do(func() {
		s.err = err
		select {
		case <-s.ready:
		default:
			close(s.ready)
		}
		close(s.done)
		s.mu.Lock()
		s.gop.Reset()
		if s.lingerTimer != nil {
			s.lingerTimer.Stop()
		}
		s.mu.Unlock()
	})
}

// writePacket fans a packet out to every subscriber and keeps it in the GOP
// cache. Subscribers' WritePacket never blocks (see Subscriber), which is why
// it may be called with s.mu held: that keeps GOP replay and live packets in
// order for a subscriber that joins concurrently.
//
// The packet is copied once into a shared Buffer that the GOP cache and every
// BufferWriter subscriber (the viewers' queues) reference; other subscribers
// get the Packet.
func (s *Stream) writePacket(p *Packet) {
	s.packets.Add(1)
	s.bytes.Add(uint64(len(p.Data)))
	shared := NewBuffer(p)
	s.mu.Lock()
	shared.Retain()
	s.gop.AddBuffer(shared)
	for _, sub := range s.subs {
		if sub.deferred {
			continue
		}
		if sub.bw != nil {
			shared.Retain()
			sub.bw.WriteBuffer(shared)
		} else {
			sub.sub.WritePacket(p)
		}
	}
	s.mu.Unlock()
	shared.Release()
}

func (s *Stream) requestKeyframe() {
	now := time.Now()
	s.mu.Lock()
	if now.Sub(s.lastKeyReq) < keyframeInterval {
		s.mu.Unlock()
		return
	}
	s.lastKeyReq = now
	s.mu.Unlock()
	if s.src != nil {
		s.src.requestKeyframe()
	}
}

// attach adds a subscriber, replaying the GOP cache to it first (a
// DeferredSubscriber gets nothing until it calls Subscription.Start).
func (s *Stream) attach(sub Subscriber) *Subscription {
	ss := &Subscription{s: s, sub: sub}
	ss.bw, _ = sub.(BufferWriter)
	_, ss.deferred = sub.(DeferredSubscriber)
	s.mu.Lock()
	if s.lingerTimer != nil {
		s.lingerTimer.Stop()
		s.lingerTimer = nil
	}
	for _, b := range s.gop.Packets() {
		if ss.deferred {
			break
		}
		if ss.bw != nil {
			b.Retain()
			ss.bw.WriteBuffer(b)
			continue
		}
		p := b.Packet()
		sub.WritePacket(&p)
	}
	s.subs = append(s.subs, ss)
	s.mu.Unlock()
	return ss
}

func (s *Stream) detach(ss *Subscription) {
	s.mu.Lock()
	for i, x := range s.subs {
		if x == ss {
			s.subs = append(s.subs[:i:i], s.subs[i+1:]...)
			break
		}
	}
	empty := len(s.subs) == 0
	s.mu.Unlock()
	if empty {
		s.hub.streamIdle(s)
	}
}

// subscriberCount counts the subscribers that are not taps.
func (s *Stream) subscriberCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, ss := range s.subs {
		if _, tap := ss.sub.(Tap); !tap {
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
	s        *Stream
	sub      Subscriber
	bw       BufferWriter // sub, when it takes shared buffers
	deferred bool         // guarded by s.mu: a DeferredSubscriber not yet started
	closed   atomic.Bool
}

// Start starts a DeferredSubscriber's packets: it appends the stream's GOP
// cache to gop, one reference to each packet that the caller must Release,
// and from then on the subscriber gets every packet after them, with none
// lost or doubled between the two. Start is for DeferredSubscribers; a
// second call, or a call for another subscriber, returns gop unchanged.
func (ss *Subscription) Start(gop []*Buffer) []*Buffer {
	s := ss.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if !ss.deferred {
		return gop
	}
	ss.deferred = false
	for _, b := range s.gop.Packets() {
		b.Retain()
		gop = append(gop, b)
	}
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

// Close detaches the subscriber. No WritePacket call starts after Close
// returns. Close is idempotent.
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
