package whep

import (
	"encoding/binary"
	"testing"

	"github.com/stemflow/stemflow/relay"
)

func numbered(i int) *relay.Packet {
	data := make([]byte, 12)
	data[0] = 0x80
	binary.BigEndian.PutUint16(data[2:], uint16(i))
	return &relay.Packet{Data: data}
}

// TestViewerQueueOrderAndDrops fills a queue past its bound: the packets
// that fit come out in order, the rest are dropped and counted, and the
// reader is woken once.
func TestViewerQueueOrderAndDrops(t *testing.T) {
	q := newViewerQueue(100)
	if _, ok := q.Pop(); ok {
		t.Fatal("new queue is not empty")
	}
	for i := range 150 {
		q.WritePacket(numbered(i))
	}
	select {
	case <-q.Ready():
	default:
		t.Fatal("no wake-up token after a push")
	}
	if q.Len() != 100 || q.Dropped() != 50 {
		t.Fatalf("len %d, dropped %d; want 100 and 50", q.Len(), q.Dropped())
	}
	for i := range 100 {
		b, ok := q.Pop()
		if !ok {
			t.Fatalf("queue empty after %d packets, want 100", i)
		}
		if got := relay.RTPSequence(b.Data()); got != uint16(i) {
			t.Fatalf("packet %d has sequence %d: out of order", i, got)
		}
		b.Release()
	}
	if _, ok := q.Pop(); ok {
		t.Fatal("more than 100 packets queued")
	}
}

// TestViewerQueueGrowsAndLetsBurstGo checks that an idle queue holds no
// ring, that a burst grows it, and that once the burst has drained the
// ring goes (its memory is not kept for the viewer's lifetime), while a
// small ring stays for the steady state.
func TestViewerQueueGrowsAndLetsBurstGo(t *testing.T) {
	q := newViewerQueue(1024)
	if q.ring != nil {
		t.Fatalf("idle queue holds a %d-slot ring", len(q.ring))
	}
	for i := range 1000 {
		q.WritePacket(numbered(i))
	}
	if len(q.ring) != 1024 {
		t.Fatalf("1000 queued in a %d-slot ring, want 1024", len(q.ring))
	}
	// Wrap around the ring while it grows: pop some, push more.
	for i := range 1000 {
		b, _ := q.Pop()
		if got := relay.RTPSequence(b.Data()); got != uint16(i) {
			t.Fatalf("packet %d has sequence %d", i, got)
		}
		b.Release()
	}
	if q.ring != nil {
		t.Fatalf("drained queue still holds a %d-slot ring", len(q.ring))
	}
	for i := range 10 {
		q.WritePacket(numbered(i))
		b, _ := q.Pop()
		b.Release()
	}
	if len(q.ring) != queueMinSlots {
		t.Fatalf("steady queue holds a %d-slot ring, want %d", len(q.ring), queueMinSlots)
	}
	q.WritePacket(numbered(0))
	q.Drain()
	if q.Len() != 0 || q.ring != nil {
		t.Fatalf("drained queue: len %d, ring %d", q.Len(), len(q.ring))
	}
}

// TestViewerQueueWrapsInOrder pushes and pops across the ring's end and
// through a growth with the oldest packet in the middle of the ring.
func TestViewerQueueWrapsInOrder(t *testing.T) {
	q := newViewerQueue(1024)
	next, want := 0, 0
	for round := range 50 {
		for range 20 + round {
			q.WritePacket(numbered(next))
			next++
		}
		for range 15 + round {
			b, ok := q.Pop()
			if !ok {
				t.Fatal("queue empty too early")
			}
			if got := relay.RTPSequence(b.Data()); got != uint16(want) {
				t.Fatalf("round %d: got sequence %d, want %d", round, got, want)
			}
			want++
			b.Release()
		}
	}
	if q.Len() != next-want {
		t.Fatalf("len %d, want %d", q.Len(), next-want)
	}
}
