package relay

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
)

// callbackSub is a subscriber that calls back into its own subscription from
// WritePacket or WriteBuffer, as a reorder or NACK stage that gives up would.
type callbackSub struct {
	sub   atomic.Pointer[Subscription]
	got   atomic.Int32
	onPkt func(ss *Subscription, n int32)
}

func (c *callbackSub) WritePacket(*Packet) {
	n := c.got.Add(1)
	if ss := c.sub.Load(); ss != nil {
		c.onPkt(ss, n)
	}
}

// deadlockHub returns a hub with stream x published and a function that marks
// the test as hung: the hub is then left as it is rather than closed, since
// closing it would hang on the same lock and the test could not report.
func deadlockHub(t *testing.T, opts PublishOptions) (*Hub, *Publisher, func()) {
	h := NewHub(Config{Datacenter: "a", Logger: quietLogger()})
	pub, err := h.Publish("x", h264Desc, opts)
	if err != nil {
		t.Fatal(err)
	}
	var hung atomic.Bool
	t.Cleanup(func() {
		if !hung.Load() {
			pub.Close()
			h.Close()
		}
	})
	return h, pub, func() { hung.Store(true) }
}

// TestSubscriberCallingBackDoesNotHangPublisher: a subscriber that asks for a
// keyframe and then closes its subscription from inside WritePacket used to
// deadlock the publisher, which held the stream's lock across the fan-out.
// Before the fix WriteRTP did not return ("publisher hung").
func TestSubscriberCallingBackDoesNotHangPublisher(t *testing.T) {
	keyframes := make(chan struct{}, 16)
	h, pub, hung := deadlockHub(t, PublishOptions{OnKeyframeRequest: func() {
		select {
		case keyframes <- struct{}{}:
		default:
		}
	}})

	// One gives up on the 5th packet; a sibling keeps receiving.
	quitter := &callbackSub{onPkt: func(ss *Subscription, n int32) {
		ss.RequestKeyframe()
		if n == 5 {
			ss.Close()
		}
	}}
	sub, err := h.Subscribe(context.Background(), "x", quitter)
	if err != nil {
		t.Fatal(err)
	}
	quitter.sub.Store(sub)
	sibling := NewQueue(64)
	sub2, err := h.Subscribe(context.Background(), "x", sibling)
	if err != nil {
		t.Fatal(err)
	}

	const n = 20
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range n {
			pub.WriteRTP(0, rtpPacket(t, uint16(i), uint32(i), i == 0, 200))
		}
	}()
	select {
	case <-done:
	case <-time.After(testutil.Scale(2 * time.Second)):
		hung()
		t.Fatalf("publisher hung: WriteRTP did not return within %v after a subscriber called back into its subscription (deadlock)", testutil.Scale(2*time.Second))
	}
	if got := quitter.got.Load(); got != 5 {
		t.Fatalf("the subscriber that closed on its 5th packet got %d packets", got)
	}
	if sibling.Len() != n {
		t.Fatalf("sibling got %d of %d packets", sibling.Len(), n)
	}
	sub2.Close()
	sibling.Drain()
	select {
	case <-keyframes:
	default:
		t.Fatal("the keyframe request from inside WritePacket never reached the publisher")
	}
}

// TestCloseDuringGOPReplay: a subscriber may ask for a keyframe and close
// its subscription while the GOP cache is replayed to it, inside Subscribe.
// The replay stops there, and neither Subscribe nor the publisher hangs.
func TestCloseDuringGOPReplay(t *testing.T) {
	h, pub, hung := deadlockHub(t, PublishOptions{})
	for i := range 10 {
		pub.WriteRTP(0, rtpPacket(t, uint16(i), uint32(i), i == 0, 200))
	}
	s := h.streams["x"]
	var replayed atomic.Int32
	w := bufferFunc(func(b *Buffer) {
		b.Release()
		if replayed.Add(1) == 3 {
			// The subscription is installed before its replay starts.
			for _, ss := range s.subsSnapshot() {
				ss.RequestKeyframe()
				ss.Close()
			}
		}
	})
	done := make(chan error, 1)
	go func() {
		_, err := h.Subscribe(context.Background(), "x", w)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(testutil.Scale(2 * time.Second)):
		hung()
		t.Fatal("Subscribe hung: closing the subscription during GOP replay deadlocked")
	}
	if got := replayed.Load(); got != 3 {
		t.Fatalf("replay went on after Close: %d of 10 packets delivered, want 3", got)
	}
	pubDone := make(chan struct{})
	go func() { pub.WriteRTP(0, rtpPacket(t, 10, 10, false, 200)); close(pubDone) }()
	select {
	case <-pubDone:
	case <-time.After(testutil.Scale(2 * time.Second)):
		hung()
		t.Fatal("publisher hung after a subscriber closed during replay")
	}
	if got := replayed.Load(); got != 3 {
		t.Fatalf("a closed subscriber got live packets: %d", got)
	}
	if n := len(s.subsSnapshot()); n != 0 {
		t.Fatalf("%d subscribers left after the only one closed", n)
	}
}

// deferredRecorder is a DeferredSubscriber that records the live packets it
// gets after Start.
type deferredRecorder struct {
	mu   sync.Mutex
	seqs []uint16
}

func (*deferredRecorder) DeferStart() {}
func (q *deferredRecorder) WritePacket(p *Packet) {
	q.mu.Lock()
	q.seqs = append(q.seqs, RTPSequence(p.Data))
	q.mu.Unlock()
}

// bufferFunc adapts a function to a BufferWriter subscriber.
type bufferFunc func(b *Buffer)

func (f bufferFunc) WritePacket(p *Packet) { f(NewBuffer(p)) }
func (f bufferFunc) WriteBuffer(b *Buffer) { f(b) }

// TestConcurrentJoinGetsGOPThenLiveInOrder: subscribers that join while the
// publisher writes get the GOP from its keyframe and then every live packet,
// with no gap, no duplicate and no reorder: Packet and BufferWriter
// subscribers, and DeferredSubscribers that take the GOP from Start.
func TestConcurrentJoinGetsGOPThenLiveInOrder(t *testing.T) {
	testutil.Watchdog(t, 30*time.Second)
	h := NewHub(Config{Datacenter: "a", Logger: quietLogger()})
	defer h.Close()
	pub, err := h.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()

	const total, gop = 6000, 50
	pkts := make([][]byte, total)
	for i := range pkts {
		pkts[i] = rtpPacket(t, uint16(i), uint32(i/gop), i%gop == 0, 100)
	}
	type result struct {
		seqs []uint16          // what the subscriber got; a deferred one's GOP from Start
		dq   *deferredRecorder // a deferred one's live packets
		mu   sync.Mutex
	}
	var (
		wg      sync.WaitGroup
		results []*result
		subs    []*Subscription
		smu     sync.Mutex
		writing = make(chan struct{})
	)
	go func() {
		defer close(writing)
		for i := range total {
			pub.WriteRTP(0, pkts[i])
		}
	}()
	for j := range 40 {
		r := &result{}
		results = append(results, r)
		var sub Subscriber = SubscriberFunc(func(p *Packet) {
			r.mu.Lock()
			r.seqs = append(r.seqs, RTPSequence(p.Data))
			r.mu.Unlock()
		})
		var dq *deferredRecorder
		switch j % 3 {
		case 1:
			sub = bufferFunc(func(b *Buffer) {
				r.mu.Lock()
				r.seqs = append(r.seqs, RTPSequence(b.Data()))
				r.mu.Unlock()
				b.Release()
			})
		case 2: // replays the GOP itself, after Start
			dq = &deferredRecorder{}
			sub = dq
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(j) * 200 * time.Microsecond)
			ss, err := h.Subscribe(context.Background(), "x", sub)
			if err != nil {
				t.Error(err)
				return
			}
			if dq != nil {
				time.Sleep(time.Millisecond) // connecting
				gop := ss.Start(nil)
				r.mu.Lock()
				for _, b := range gop {
					r.seqs = append(r.seqs, RTPSequence(b.Data()))
					b.Release()
				}
				r.dq = dq
				r.mu.Unlock()
			}
			smu.Lock()
			subs = append(subs, ss)
			smu.Unlock()
		}()
	}
	wg.Wait()
	<-writing
	for _, ss := range subs {
		ss.Close()
	}
	for j, r := range results {
		r.mu.Lock()
		seqs := r.seqs
		if r.dq != nil {
			seqs = append(seqs, r.dq.seqs...)
		}
		r.mu.Unlock()
		if len(seqs) == 0 {
			t.Fatalf("subscriber %d got nothing", j)
		}
		if seqs[0]%gop != 0 {
			t.Fatalf("subscriber %d started at %d, not at a keyframe", j, seqs[0])
		}
		for i := 1; i < len(seqs); i++ {
			if seqs[i] != seqs[i-1]+1 {
				t.Fatalf("subscriber %d: %d after %d (gap, duplicate or reorder) at its packet %d", j, seqs[i], seqs[i-1], i)
			}
		}
		if last := seqs[len(seqs)-1]; last != total-1 {
			t.Fatalf("subscriber %d ended at %d, want %d", j, last, total-1)
		}
	}
	t.Logf("%d subscribers joined during %d packets", len(results), total)
}
