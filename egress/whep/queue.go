package whep

import (
	"sync"
	"sync/atomic"

	"github.com/stemflow/stemflow/relay"
)

const (
	// queueMinSlots is the ring a viewer's queue starts with once a
	// packet arrives: a frame or two of a 2 Mbit/s stream.
	queueMinSlots = 32
	// queueShrinkSlots is the ring size above which an emptied queue lets
	// its ring go: a burst (the live packets that wait behind the GOP
	// replay, a slow viewer's lag) does not keep its peak for the
	// viewer's lifetime. Rings up to this size are kept, so that the
	// steady state does not allocate.
	queueShrinkSlots = 64
)

// viewerQueue is a viewer's bounded packet queue: a relay.BufferWriter the
// hub pushes into from the publisher's goroutine, drained by the viewer's
// goroutine. Like relay.Queue, a push never blocks: a packet that finds
// the queue full is dropped and counted. Unlike relay.Queue's channel, whose
// slots are allocated up front (8 KB for 1024), its ring grows with what is
// queued and is let go once a burst has drained.
//
// It is a relay.DeferredSubscriber: the hub sends it nothing until the
// viewer has connected and called Start.
type viewerQueue struct {
	max   int
	ready chan struct{} // holds a token while the queue may be non-empty

	mu   sync.Mutex // guards the following fields
	ring []*relay.Buffer
	head int // index of the oldest packet in ring
	n    int // number of queued packets

	dropped atomic.Uint64
}

var (
	_ relay.Subscriber         = (*viewerQueue)(nil)
	_ relay.BufferWriter       = (*viewerQueue)(nil)
	_ relay.DeferredSubscriber = (*viewerQueue)(nil)
)

// newViewerQueue returns an empty queue that holds up to max packets.
func newViewerQueue(max int) *viewerQueue {
	return &viewerQueue{max: max, ready: make(chan struct{}, 1)}
}

// DeferStart marks the queue as a relay.DeferredSubscriber.
func (*viewerQueue) DeferStart() {}

// WritePacket copies p into the queue, or drops it when the queue is full.
func (q *viewerQueue) WritePacket(p *relay.Packet) { q.WriteBuffer(relay.NewBuffer(p)) }

// WriteBuffer queues a reference to b, or releases it when the queue is
// full. It does not block, and allocates only when the ring grows.
func (q *viewerQueue) WriteBuffer(b *relay.Buffer) {
	q.mu.Lock()
	if q.n >= q.max {
		q.mu.Unlock()
		b.Release()
		q.dropped.Add(1)
		return
	}
	if q.n == len(q.ring) {
		q.growLocked()
	}
	q.ring[(q.head+q.n)%len(q.ring)] = b
	q.n++
	wake := q.n == 1
	q.mu.Unlock()
	if wake {
		select {
		case q.ready <- struct{}{}:
		default: // a token is there already
		}
	}
}

// growLocked doubles the ring (from queueMinSlots, up to max), keeping the
// packets in order.
func (q *viewerQueue) growLocked() {
	size := min(max(2*len(q.ring), queueMinSlots), q.max)
	ring := make([]*relay.Buffer, size)
	for i := range q.n {
		ring[i] = q.ring[(q.head+i)%len(q.ring)]
	}
	q.ring, q.head = ring, 0
}

// Ready returns a channel that receives a token when packets may be
// queued: after receiving from it, Pop until it reports false.
func (q *viewerQueue) Ready() <-chan struct{} { return q.ready }

// Pop removes and returns the oldest queued packet, which the caller must
// Release, or reports false when the queue is empty.
func (q *viewerQueue) Pop() (*relay.Buffer, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.n == 0 {
		return nil, false
	}
	b := q.ring[q.head]
	q.ring[q.head] = nil
	q.head = (q.head + 1) % len(q.ring)
	q.n--
	if q.n == 0 {
		q.head = 0
		if len(q.ring) > queueShrinkSlots {
			q.ring = nil
		}
	}
	return b, true
}

// Len returns the number of queued packets.
func (q *viewerQueue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.n
}

// Dropped returns how many packets were dropped because the queue was full.
func (q *viewerQueue) Dropped() uint64 { return q.dropped.Load() }

// Drain releases every queued packet and the ring. Call it after the last
// WriteBuffer.
func (q *viewerQueue) Drain() {
	for {
		b, ok := q.Pop()
		if !ok {
			break
		}
		b.Release()
	}
	q.mu.Lock()
	q.ring = nil
	q.mu.Unlock()
}
