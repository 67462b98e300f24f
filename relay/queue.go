package relay

import "sync/atomic"

// Subscriber receives the packets of a stream.
type Subscriber interface {
	// WritePacket hands the subscriber one packet. It is called from the
	// publisher's goroutines, so it must not block and must not keep p.Data
	// after returning: copy it (see [Queue]) and send it from a goroutine of
	// the subscriber's own. It may call back into its Subscription
	// (RequestKeyframe, Close): the hub holds no lock while subscribers run.
	WritePacket(p *Packet)
}

// BufferWriter is implemented by subscribers that can take a shared
// reference to a packet instead of a copy: the hub then copies each packet
// once for all of them, and replays its GOP cache without copying.
type BufferWriter interface {
	// WriteBuffer takes one reference to b, which it must Release. Like
	// WritePacket it must not block.
	WriteBuffer(b *Buffer)
}

// Tap is a Subscriber that watches a stream for the node's own purposes,
// such as a shared retransmission cache, rather than for a viewer. Taps are
// left out of subscriber counts.
type Tap interface {
	Subscriber
	Tap()
}

// SubscriberFunc adapts a function to a Subscriber.
type SubscriberFunc func(p *Packet)

// WritePacket calls f(p).
func (f SubscriberFunc) WritePacket(p *Packet) { f(p) }

// Queue is a bounded packet queue between a publisher and one slow consumer.
// Push never blocks: when the queue is full the packet is dropped and counted,
// so a slow or dead consumer never holds back the publisher or its siblings.
// Queue implements Subscriber.
type Queue struct {
	c       chan *Buffer
	dropped atomic.Uint64
}

var _ Subscriber = (*Queue)(nil)

// NewQueue returns a queue that holds up to size packets.
func NewQueue(size int) *Queue {
	return &Queue{c: make(chan *Buffer, size)}
}

// WritePacket copies p into the queue, or drops it when the queue is full.
func (q *Queue) WritePacket(p *Packet) { q.WriteBuffer(NewBuffer(p)) }

var _ BufferWriter = (*Queue)(nil)

// WriteBuffer queues a reference to b, or releases it when the queue is full.
func (q *Queue) WriteBuffer(b *Buffer) {
	select {
	case q.c <- b:
	default:
		b.Release()
		q.dropped.Add(1)
	}
}

// C returns the channel to read queued packets from. The reader owns each
// buffer it receives and must Release it.
func (q *Queue) C() <-chan *Buffer { return q.c }

// Dropped returns how many packets were dropped because the queue was full.
func (q *Queue) Dropped() uint64 { return q.dropped.Load() }

// Len returns the number of queued packets.
func (q *Queue) Len() int { return len(q.c) }

// Drain releases every queued packet. Call it after the last WritePacket.
func (q *Queue) Drain() {
	for {
		select {
		case b := <-q.c:
			b.Release()
		default:
			return
		}
	}
}
