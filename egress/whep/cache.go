package whep

import (
	"sync"

	"github.com/stemflow/stemflow/relay"
)

// rtxSlots is how many recent packets of a video track the node keeps to
// answer viewers' NACKs: about 2 s of a 2 Mbit/s stream.
const rtxSlots = 512

// rtxCache is a ring of the last rtxSlots packets of one track, indexed by
// RTP sequence number. One cache serves every viewer of the track on this
// node: packets keep the origin's sequence numbers, so a viewer's NACK names
// the cache's sequence numbers. Buffers come from relay's pool.
type rtxCache struct {
	mu    sync.Mutex // guards the following fields
	slots [rtxSlots]*relay.Buffer
}

// add stores a copy of p, evicting the packet rtxSlots sequence numbers older.
func (c *rtxCache) add(p *relay.Packet) {
	b := relay.NewBuffer(p)
	i := relay.RTPSequence(p.Data) % rtxSlots
	c.mu.Lock()
	old := c.slots[i]
	c.slots[i] = b
	c.mu.Unlock()
	if old != nil {
		old.Release()
	}
}

// get copies the packet with sequence number seq into dst and returns its
// length, or 0 when the cache no longer holds it.
func (c *rtxCache) get(seq uint16, dst []byte) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := c.slots[seq%rtxSlots]
	if b == nil || relay.RTPSequence(b.Data()) != seq {
		return 0
	}
	return copy(dst, b.Data())
}

func (c *rtxCache) release() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, b := range c.slots {
		if b != nil {
			b.Release()
			c.slots[i] = nil
		}
	}
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
			c.tracks[i] = &rtxCache{}
		}
	}
	return c
}

// WritePacket keeps video packets. It runs on the publisher's goroutine and
// does not block beyond a short uncontended lock.
// Tap marks the cache as a relay.Tap: it is no viewer of its own.
func (c *streamCache) Tap() {}

var _ relay.Tap = (*streamCache)(nil)

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
