package relay

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/quic-go/quic-go"
)

func TestHopSequenceWindow(t *testing.T) {
	var u upSub
	var lost atomic.Uint64
	steps := []struct {
		seq        uint32
		frag, want bool
	}{
		{10, false, true},
		{11, false, true},
		{11, false, false}, // duplicate
		{14, false, true},  // 12, 13 lost
		{12, false, true},  // late: no longer lost
		{12, false, false}, // duplicate of a late one
		{15, true, true},   // first fragment
		{15, true, true},   // second fragment: the reassembler decides
		{13, true, true},   // late fragmented packet
		{13, true, true},
		{200, false, true},
		{100, false, false}, // far too old
	}
	for i, s := range steps {
		if got := u.fresh(s.seq, s.frag, &lost); got != s.want {
			t.Fatalf("step %d (seq %d): fresh = %v, want %v", i, s.seq, got, s.want)
		}
	}
	if got := lost.Load(); got != 184 { // 16..199
		t.Fatalf("lost = %d, want 184", got)
	}
}

// captureConn keeps every datagram sent to it.
type captureConn struct {
	limit  int
	dgrams [][]byte
}

func (c *captureConn) SendDatagram(b []byte) error {
	if len(b) > c.limit {
		return &quic.DatagramTooLargeError{MaxDatagramPayloadSize: int64(c.limit)}
	}
	c.dgrams = append(c.dgrams, bytes.Clone(b))
	return nil
}

// linkPair is two nodes' ends of one link without the network: a's sender
// writes datagrams to a captureConn, and b's receiver handles them.
type linkPair struct {
	a, b   *Hub
	tx, rx *quicLink
	conn   *captureConn
}

func newLinkPair(t *testing.T) *linkPair {
	p := &linkPair{
		a:    NewHub(Config{Datacenter: "a", Logger: quietLogger()}),
		b:    NewHub(Config{Datacenter: "b", Logger: quietLogger()}),
		conn: &captureConn{limit: 1400},
	}
	t.Cleanup(func() { p.a.Close(); p.b.Close() })
	p.tx = newLink(p.a, nil, nil, "b")
	p.tx.tx = newLinkSender(p.tx, p.conn)
	p.tx.tx.pace.floor = 0
	p.rx = newLink(p.b, nil, nil, "a")
	return p
}

// relay relays stream name from a to a viewer at b over the pair, as
// subscription id.
func (p *linkPair) relay(t *testing.T, name string, id uint32) *seqRecorder {
	t.Helper()
	d := &downSub{id: id, l: p.tx, closed: make(chan struct{})}
	if _, err := p.a.Subscribe(context.Background(), name, d); err != nil {
		t.Fatal(err)
	}
	s := newStream(p.b, name, "a")
	s.setReady(h264Desc)
	p.rx.ups[id] = &upSub{id: id, s: s, l: p.rx}
	s.src = p.rx.ups[id]
	s.in.setActive(s.src)
	rec := &seqRecorder{}
	s.attach(rec, true)
	return rec
}

// flush sends what a's sender has queued.
func (p *linkPair) flush() {
	for {
		p.tx.tx.takePending()
		if len(p.tx.tx.round) == 0 {
			return
		}
		p.tx.tx.serveRound(context.Background())
	}
}

// deliver sends what a's sender has queued and hands the datagrams to b.
func (p *linkPair) deliver() {
	p.flush()
	for _, d := range p.conn.dgrams {
		p.rx.rx.handle(d)
	}
	p.conn.dgrams = p.conn.dgrams[:0]
}

// TestKeyframeBurstDoesNotDropOtherStreamsAudio writes a keyframe of 3000
// packets on stream A, faster than the link sends it, with stream B's audio
// packets interleaved: A's queue overflows, B's does not, and A's drops show
// at b as hop loss.
func TestKeyframeBurstDoesNotDropOtherStreamsAudio(t *testing.T) {
	p := newLinkPair(t)
	pubA, err := p.a.Publish("A", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pubB, err := p.a.Publish("B", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	recA, recB := p.relay(t, "A", 1), p.relay(t, "B", 2)

	const burst, audio = 3000, 30
	video, sound := rtpPacket(t, 0, 0, false, 1100), rtpPacket(t, 0, 0, false, 120)
	b := 0
	for i := 0; i < burst; i++ {
		video[2], video[3] = byte(i>>8), byte(i)
		pubA.WriteRTP(0, video)
		if i%(burst/audio) == 0 {
			sound[2], sound[3] = byte(b>>8), byte(b)
			pubB.WriteRTP(1, sound)
			b++
		}
	}
	p.deliver()
	// The next packet shows the end of the burst missing.
	binary.BigEndian.PutUint16(video[2:], burst)
	pubA.WriteRTP(0, video)
	p.deliver()

	if lost, reordered := recB.missing(1, audio); lost != 0 || reordered != 0 {
		t.Fatalf("stream B's viewer lost %d of %d audio packets (%d out of order) behind A's keyframe burst", lost, audio, reordered)
	}
	lostA, _ := recA.missing(0, burst)
	tx, rx := p.tx.stats(), p.rx.stats()
	t.Logf("A: %d of %d packets lost; sender queue dropped %d, receiver hop lost %d", lostA, burst, tx.QueueDropped, rx.HopLost)
	if lostA == 0 {
		t.Fatal("A's burst fit its queue: the test does not overflow it")
	}
	if tx.QueueDropped != uint64(lostA) || rx.HopLost != uint64(lostA) {
		t.Fatalf("A lost %d packets; a counted %d queue drops and b %d hop losses, want all three equal", lostA, tx.QueueDropped, rx.HopLost)
	}
}

// TestDeficitRoundRobin checks that a stream's audio does not wait behind
// another's queued burst: the sender alternates between them.
func TestDeficitRoundRobin(t *testing.T) {
	p := newLinkPair(t)
	pubA, _ := p.a.Publish("A", h264Desc, PublishOptions{})
	pubB, _ := p.a.Publish("B", h264Desc, PublishOptions{})
	p.relay(t, "A", 1)
	p.relay(t, "B", 2)
	for i := 0; i < 100; i++ {
		pubA.WriteRTP(0, rtpPacket(t, uint16(i), 0, false, 1200))
	}
	for i := 0; i < 10; i++ {
		pubB.WriteRTP(1, rtpPacket(t, uint16(i), 0, false, 100))
	}
	p.tx.tx.takePending()
	p.tx.tx.serveRound(context.Background())
	// One round: one quantum (1500 bytes) of each, so one 1200-byte packet
	// of A and every queued audio packet of B.
	var subs []uint32
	for _, d := range p.conn.dgrams {
		var h mediaHeader
		if _, err := parseMediaHeader(d, &h); err != nil {
			t.Fatal(err)
		}
		subs = append(subs, h.SubID)
	}
	if fmt.Sprint(subs) != "[1 2 2 2 2 2 2 2 2 2 2]" {
		t.Fatalf("first round sent subscriptions %v, want one of A (1) then B's ten (2)", subs)
	}
}

// TestReceiverCountsEveryDrop feeds b's receiver what it must not deliver
// and checks each lands in its own counter, and the viewer sees nothing
// twice.
func TestReceiverCountsEveryDrop(t *testing.T) {
	p := newLinkPair(t)
	pub, _ := p.a.Publish("A", h264Desc, PublishOptions{})
	rec := p.relay(t, "A", 1)
	for i := 0; i < 4; i++ {
		pub.WriteRTP(0, rtpPacket(t, uint16(i), 0, false, 1100))
	}
	pub.WriteRTP(0, rtpPacket(t, 4, 0, false, 1500)) // two fragments
	p.flush()
	d := p.conn.dgrams
	if len(d) != 6 {
		t.Fatalf("sent %d datagrams, want 6", len(d))
	}
	h := p.rx.rx.handle
	h(d[0])
	h(d[0]) // duplicate
	h(d[1])
	h(d[4]) // first fragment of packet 4
	h(d[4]) // duplicate fragment
	h(d[5])
	h(d[5]) // fragment of a delivered packet
	h(d[3])
	h([]byte{0x10, 0, 0}) // malformed
	unknown := bytes.Clone(d[2])
	binary.BigEndian.PutUint32(unknown[4:], 99) // no such subscription
	h(unknown)
	st := p.rx.stats()
	if st.Duplicates != 3 || st.Malformed != 1 || st.UnknownSubscription != 1 || st.HopLost != 1 || st.PacketsReceived != 4 || st.DatagramsReceived != 10 {
		t.Fatalf("receiver stats %+v, want 3 duplicates, 1 malformed, 1 unknown subscription, 1 hop lost (packet 2), 4 packets of 10 datagrams", st)
	}
	if fmt.Sprint(rec.seqs[0]) != "[0 1 4 3]" {
		t.Fatalf("viewer got %v, want [0 1 4 3]", rec.seqs[0])
	}
}

// stampConn notes when each datagram was sent.
type stampConn struct {
	mu    sync.Mutex
	times []time.Time
}

func (c *stampConn) SendDatagram(b []byte) error {
	if len(b) > 1400 {
		return &quic.DatagramTooLargeError{MaxDatagramPayloadSize: 1400}
	}
	c.mu.Lock()
	c.times = append(c.times, time.Now())
	c.mu.Unlock()
	return nil
}

// TestPacerSpreadsFrameBursts offers a link 30 frames a second of 333
// packets each, every frame at once, and checks on a fake clock that the
// sender spreads each frame out: quic-go's receive queue a hop on holds 128
// datagrams, and a frame arriving at once overflows it.
func TestPacerSpreadsFrameBursts(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := NewHub(Config{Datacenter: "a", Logger: quietLogger()})
		defer h.Close()
		l := newLink(h, nil, nil, "b")
		conn := &stampConn{}
		l.tx = newLinkSender(l, conn)
		d := &downSub{id: 1, l: l, closed: make(chan struct{})}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			l.tx.run(ctx)
			close(done)
		}()
		const frames, perFrame = 30, 333
		pkt := Packet{Data: rtpPacket(t, 1, 1, false, OverlayPacketSize)}
		for f := 0; f < frames; f++ {
			for i := 0; i < perFrame; i++ {
				d.WritePacket(&pkt)
			}
			time.Sleep(time.Second / 30)
		}
		synctest.Wait()
		cancel()
		<-done

		if st := l.stats(); st.PacketsSent != frames*perFrame || st.QueueDropped != 0 {
			t.Fatalf("sent %d of %d packets, dropped %d", st.PacketsSent, frames*perFrame, st.QueueDropped)
		}
		// The most datagrams that left within any millisecond.
		most := 0
		for i, j := 0, 0; j < len(conn.times); j++ {
			for conn.times[j].Sub(conn.times[i]) >= time.Millisecond {
				i++
			}
			most = max(most, j-i+1)
		}
		t.Logf("at most %d datagrams within a millisecond (a frame is %d)", most, perFrame)
		if most > 64 {
			t.Fatalf("%d datagrams left within a millisecond, want at most 64 (half of quic-go's receive queue)", most)
		}
	})
}

// TestPacerDrainsReplayWithinDelayBound queues a GOP replay of 2000 packets
// at once: pacing spreads it, at a rate that rises with what waits (at the
// floor rate alone it would take 100 ms).
func TestPacerDrainsReplayWithinDelayBound(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := NewHub(Config{Datacenter: "a", Logger: quietLogger()})
		defer h.Close()
		l := newLink(h, nil, nil, "b")
		conn := &stampConn{}
		l.tx = newLinkSender(l, conn)
		d := &downSub{id: 1, l: l, closed: make(chan struct{})}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			l.tx.run(ctx)
			close(done)
		}()
		start := time.Now()
		pkt := Packet{Data: rtpPacket(t, 1, 1, false, 1000)}
		for i := 0; i < 2000; i++ {
			d.WritePacket(&pkt)
		}
		synctest.Wait()
		time.Sleep(time.Second)
		cancel()
		<-done
		if len(conn.times) != 2000 {
			t.Fatalf("sent %d of 2000", len(conn.times))
		}
		if took := conn.times[len(conn.times)-1].Sub(start); took > 3*paceMaxDelay {
			t.Fatalf("a replay of 2000 packets took %v to leave, want at most %v", took, 3*paceMaxDelay)
		} else {
			t.Logf("a replay of 2000 packets left over %v", took)
		}
	})
}
