package whep

import (
	"sync"
	"time"

	"github.com/stemflow/stemflow/relay"
)

const (
	// rtxWindow is how long the node keeps a video track's packets to
	// answer viewers' NACKs: at least this much, at most about twice. A
	// viewer NACKs a loss within a round trip and gives up on it once the
	// frame is late for playout, well within a second.
	rtxWindow = time.Second
	// rtxMinBytes and rtxMaxBytes bound a cache's byte ring: it starts
	// small and grows by half while one lap of it holds less than
	// rtxWindow of the track (~324 KB for a 2 Mbit/s stream; doubling
	// overshot to 512 KB).
	rtxMinBytes = 64 << 10
	rtxMaxBytes = 2 << 20
	// rtxSlots is the size of the sequence number index: more packets
	// than rtxMaxBytes holds of typical ~1100-byte packets, so that the
	// ring's bytes, not the index, bound what is kept.
	rtxSlots = 2048
)

// rtxCache keeps exact-size copies of the recent packets of one track in
// one byte ring, indexed by RTP sequence number. One cache serves every
// viewer of the track on this node: packets keep the origin's sequence
// numbers, so a viewer's NACK names the cache's sequence numbers.
//
// Packets are written one after the other in the ring; one that does not
// fit before the end starts a new lap at offset 0. A packet written in the
// current lap is held; one written in the previous lap is held until the
// current lap's writes reach its offset.
type rtxCache struct {
	mu  sync.Mutex // guards the following fields
	buf []byte
	w   int       // where the next packet goes in buf
	lap uint32    // incremented each time writing restarts at offset 0
	t0  time.Time // when the current lap started
	idx [rtxSlots]rtxEntry
}

// rtxEntry locates one packet in the ring.
type rtxEntry struct {
	off int32
	n   uint16 // 0: empty
	seq uint16
	lap uint32
}

func newRTXCache() *rtxCache {
	return &rtxCache{buf: make([]byte, rtxMinBytes), t0: time.Now()}
}

// add stores a copy of p, evicting the oldest packets it overwrites.
func (c *rtxCache) add(p *relay.Packet) {
	n := len(p.Data)
	if n < 4 || n > relay.MaxPacketSize {
		return
	}
	seq := relay.RTPSequence(p.Data)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.buf == nil {
		return // released
	}
	if c.w+n > len(c.buf) {
		c.endLapLocked()
	}
	copy(c.buf[c.w:], p.Data)
	c.idx[seq%rtxSlots] = rtxEntry{off: int32(c.w), n: uint16(n), seq: seq, lap: c.lap}
	c.w += n
}

// endLapLocked makes room at the end of the ring: it grows the ring by
// half when the lap took less than rtxWindow, and starts a new lap
// otherwise.
func (c *rtxCache) endLapLocked() {
	now := time.Now()
	if now.Sub(c.t0) < rtxWindow && len(c.buf) < rtxMaxBytes {
		// Growing keeps every offset: the previous lap's packets beyond w
		// stay where they were until this lap's writes reach them.
		grown := make([]byte, min(len(c.buf)*3/2, rtxMaxBytes))
		copy(grown, c.buf)
		c.buf = grown
		return
	}
	c.lap++
	c.w = 0
	c.t0 = now
}

// get copies the packet with sequence number seq into dst and returns its
// length, or 0 when the cache no longer holds it.
func (c *rtxCache) get(seq uint16, dst []byte) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.idx[seq%rtxSlots]
	if e.n == 0 || e.seq != seq {
		return 0
	}
	switch e.lap {
	case c.lap:
	case c.lap - 1:
		if int(e.off) < c.w {
			return 0 // overwritten by the current lap
		}
	default:
		return 0
	}
	return copy(dst, c.buf[int(e.off):int(e.off)+int(e.n)])
}

func (c *rtxCache) release() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf = nil
	c.w = 0
	c.lap++
	c.idx = [rtxSlots]rtxEntry{}
}

// streamCache holds the retransmission caches of one stream's video tracks.
// It is a relay.Subscriber of its own, attached once per stream however
// many viewers watch, and lives while at least one viewer does.
type streamCache struct {
	stream *relay.Stream
	sub    *relay.Subscription
	refs   int // guarded by Server.mu
	tracks [relay.MaxTracks]*rtxCache
}

var _ relay.Subscriber = (*streamCache)(nil)

func newStreamCache(desc relay.Description) *streamCache {
	c := &streamCache{}
	for i, t := range desc.Tracks {
		if t.Kind == relay.KindVideo && i < relay.MaxTracks {
			c.tracks[i] = newRTXCache()
		}
	}
	return c
}

// Tap marks the cache as a relay.Tap: it is no viewer of its own.
func (c *streamCache) Tap() {}

var _ relay.Tap = (*streamCache)(nil)

// WritePacket keeps video packets. It runs on the publisher's goroutine and
// does not block beyond a short uncontended lock.
func (c *streamCache) WritePacket(p *relay.Packet) {
	if int(p.Track) < len(c.tracks) {
		if rc := c.tracks[p.Track]; rc != nil {
			rc.add(p)
		}
	}
}

func (c *streamCache) close() {
	if c.sub != nil {
		c.sub.Close()
	}
	for _, rc := range c.tracks {
		if rc != nil {
			rc.release()
		}
	}
}
