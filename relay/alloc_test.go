package relay

import (
	"context"
	"testing"

	"github.com/stemflow/stemflow/internal/testutil"
)

// TestFanOutDoesNotAllocate: a published packet reaches several viewer
// queues (BufferWriters), a plain Subscriber and a link's media queue
// through the real Publisher.WriteRTP and Stream.writePacket, without a heap
// allocation. Under the race detector sync.Pool drops a quarter of what is
// put back on purpose: a run's 3 Buffers and 3 Packets then cost 1.5
// allocations on average (AllocsPerRun reports 1), while one allocation per
// packet on the path itself would show as 3 more.
func TestFanOutDoesNotAllocate(t *testing.T) {
	h := NewHub(Config{Datacenter: "a", Logger: quietLogger()})
	defer h.Close()
	pub, err := h.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	var queues []*Queue
	for range 4 {
		q := NewQueue(4)
		sub, err := h.Subscribe(context.Background(), "x", q)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Close()
		queues = append(queues, q)
	}
	var plain int
	sub, err := h.Subscribe(context.Background(), "x", SubscriberFunc(func(p *Packet) { plain += len(p.Data) }))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	// The link-like subscriber: a downstream neighbour's subscription,
	// queueing to its link's media sender.
	l := newLink(h, nil, nil, "c")
	conn := newFakeDatagramConn(1400)
	l.tx = newLinkSender(l, conn)
	l.tx.pace.rate = 0
	d := &downSub{id: 1, l: l, closed: make(chan struct{})}
	lsub, err := h.Subscribe(context.Background(), "x", d)
	if err != nil {
		t.Fatal(err)
	}
	defer lsub.Close()

	// Each run writes a GOP of a keyframe and two P-frames; the next
	// keyframe (a new timestamp) releases the cached GOP to the pool, as a
	// live stream does.
	key := rtpPacket(t, 0, 0, true, 1100)
	pframe := rtpPacket(t, 1, 0, false, 1100)
	ts := uint32(0)
	write := func(b []byte) {
		b[4], b[5], b[6], b[7] = byte(ts>>24), byte(ts>>16), byte(ts>>8), byte(ts)
		if err := pub.WriteRTP(0, b); err != nil {
			t.Fatal(err)
		}
		for _, q := range queues {
			(<-q.C()).Release()
		}
		l.tx.takePending()
		l.tx.serveRound(context.Background())
	}
	gop := func() {
		ts += 3000
		write(key)
		write(pframe)
		write(pframe)
	}
	gop()
	allocs := testing.AllocsPerRun(1000, gop)
	limit := 0.0
	if testutil.RaceEnabled {
		limit = 2
	}
	if allocs > limit {
		t.Fatalf("fan-out to 6 subscribers allocates %v times per 3 packets, want at most %v", allocs, limit)
	}
	// Every packet was counted once per subscriber (none had a GOP to
	// replay: they joined before the first packet).
	st := pub.Stream()
	if got, want := st.sentPackets.Load(), 6*st.packets.Load(); got != want {
		t.Errorf("sent packets %d, want 6 × %d received", got, st.packets.Load())
	}
	if got, want := st.sentBytes.Load(), 6*st.bytes.Load(); got != want {
		t.Errorf("sent bytes %d, want 6 × %d received", got, st.bytes.Load())
	}
	if plain == 0 || conn.sent < 3000 {
		t.Fatalf("the plain subscriber got %d bytes, the link sent %d datagrams", plain, conn.sent)
	}
}

// TestSpliceDoesNotAllocate runs the real ingress (Stream.receive) through
// make-before-break splices: a joining source's packet that leads is held,
// the old source catches up and the sources swap, the held packet is
// forwarded, and both sources' duplicates are dropped. None of it may
// allocate per packet: held packets are pooled Buffers. (Under the race
// detector sync.Pool drops some of what is put back: see above.)
func TestSpliceDoesNotAllocate(t *testing.T) {
	h := NewHub(Config{Datacenter: "d", Logger: quietLogger()})
	defer h.Close()
	s := newStream(h, "x", "a") // not in the hub: spliced has nothing to retire
	s.setReady(h264Desc)
	q := NewQueue(8)
	s.attach(q, true)
	x, y := &fakeUp{s: s}, &fakeUp{s: s}
	s.in.setActive(x)
	seq := uint16(0)
	data := rtpPacket(t, 0, 0, false, 1000)
	var p Packet // reused, as the link's receiver does; receive keeps no data
	pkt := func(n uint16) *Packet {
		data[2], data[3] = byte(n>>8), byte(n)
		p = Packet{Data: data}
		return &p
	}
	var forwarded int
	cycle := func() {
		old, nu := x, y
		s.in.join(nu)
		s.receive(nu, pkt(seq+2)) // leads: held
		s.receive(old, pkt(seq+1))
		// old reached the held packet: swapped, and seq+2 forwarded
		s.receive(old, pkt(seq+1)) // retired
		s.receive(nu, pkt(seq+2))  // duplicate
		s.receive(nu, pkt(seq+3))
		seq += 3
		x, y = nu, old
		for q.Len() > 0 {
			b := <-q.C()
			if debugSplice {
				println(RTPSequence(b.Data()))
			}
			b.Release()
			forwarded++
		}
	}
	s.receive(x, pkt(0))
	cycle()
	forwarded = 0
	allocs := testing.AllocsPerRun(1000, cycle)
	limit := 0.0
	if testutil.RaceEnabled {
		limit = 2
	}
	if allocs > limit {
		t.Fatalf("a splice cycle of 5 packets allocates %v times, want at most %v", allocs, limit)
	}
	if want := 3 * 1001; forwarded != want {
		t.Fatalf("the viewer got %d packets, want %d: each of seq+1, seq+2, seq+3 once per cycle", forwarded, want)
	}
}

var debugSplice = false
