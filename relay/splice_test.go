package relay

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
)

// spliceRig is a hub d with scripted links to b and c that both announce a
// stream x from a, and a viewer at d: the test plays both upstreams.
type spliceRig struct {
	t      *testing.T
	d      *Hub
	lb, lc *fakeLink
	q      *Queue
	sub    *Subscription
}

func newSpliceRig(t *testing.T) *spliceRig {
	r := &spliceRig{t: t, d: NewHub(Config{Datacenter: "d", Logger: quietLogger()}), q: NewQueue(8192)}
	t.Cleanup(r.d.Close)
	r.lb, r.lc = newFakeLink(t, r.d, "b"), newFakeLink(t, r.d, "c")
	r.d.handleAnnounce(r.lb, "x", []string{"a", "b"}, 0)
	r.d.handleAnnounce(r.lc, "x", []string{"a", "c"}, 0)
	r.d.SetRoute("x", Route{Parent: "b", Version: 1})
	done := make(chan error, 1)
	go func() {
		var err error
		r.sub, err = r.d.Subscribe(context.Background(), "x", r.q)
		done <- err
	}()
	testutil.WaitFor(t, "d to subscribe through b", func() bool { return r.lb.upstream("x") != nil })
	r.lb.upstream("x").readyHops(h264Desc, []string{"a", "b"})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.sub.Close)
	return r
}

// pkt is packet seq of a track: video (0) keyframes every 50, audio (1).
func (r *spliceRig) pkt(track uint8, seq uint16) Packet {
	return Packet{Track: track, Keyframe: track == 0 && seq%50 == 0, Data: rtpPacket(r.t, seq, uint32(seq)*3000, track == 0 && seq%50 == 0, 100)}
}

// run writes packets of track 0 from..to (inclusive, 16-bit) through u,
// and the same numbers on track 1 when audio is set.
func (r *spliceRig) run(u *fakeUp, from, to uint16, audio bool) {
	for s := from; ; s++ {
		u.write(r.pkt(0, s))
		if audio {
			u.write(r.pkt(1, s))
		}
		if s == to {
			return
		}
	}
}

// interleave writes from..to through a and af..at through b, one packet of
// each in turn.
func (r *spliceRig) interleave(a *fakeUp, from, to uint16, b *fakeUp, bf, bt uint16, audio bool) {
	an, bn := int(to-from)+1, int(bt-bf)+1
	for i := 0; i < max(an, bn); i++ {
		if i < an {
			r.run(a, from+uint16(i), from+uint16(i), audio)
		}
		if i < bn {
			r.run(b, bf+uint16(i), bf+uint16(i), audio)
		}
	}
}

// check reads what the viewer got and fails unless every track's sequence
// numbers run from first to last exactly once, in order.
func (r *spliceRig) check(first, last uint16, audio bool) {
	r.t.Helper()
	next := map[uint8]uint16{0: first, 1: first}
	done := map[uint8]bool{1: !audio}
	for !done[0] || !done[1] {
		var b *Buffer
		select {
		case b = <-r.q.C():
		default:
			r.t.Fatalf("the viewer's packets end before %d on track 0 (next %d) or track 1 (next %d)", last, next[0], next[1])
		}
		seq := RTPSequence(b.Data())
		tr := b.Track
		b.Release()
		if done[tr] || seq != next[tr] {
			r.t.Fatalf("track %d: the viewer got sequence %d, want %d (a gap, duplicate or reorder)", tr, seq, next[tr])
		}
		if seq == last {
			done[tr] = true
		}
		next[tr]++
	}
}

// checkAll is check, and nothing more arrived.
func (r *spliceRig) checkAll(first, last uint16, audio bool) {
	r.t.Helper()
	r.check(first, last, audio)
	if n := r.q.Len(); n != 0 {
		r.t.Fatalf("the viewer got %d packets more than %d..%d", n, first, last)
	}
}

// TestSpliceMakeBeforeBreak: a stream flowing from b moves to c. c's first
// packets are its GOP replay and may lead b (its live point is ahead),
// lag it, or lead by more than its GOP (its GOP starts after what b
// delivered); and sequence numbers may wrap. In every case the viewer gets
// every packet once, in order, on each track; b is unsubscribed once c
// took over, and d lists the path through c.
func TestSpliceMakeBeforeBreak(t *testing.T) {
	cases := []struct {
		name  string
		base  uint16
		audio bool
		// move runs after b delivered base..base+99; it must leave the
		// viewer with base..base+last.
		move func(r *spliceRig, b, c *fakeUp, base uint16)
		last uint16
	}{
		{"c leads within its GOP", 0, false, func(r *spliceRig, b, c *fakeUp, base uint16) {
			r.run(c, base+50, base+110, false) // GOP replay from the keyframe at 50, live at 110
			r.interleave(b, base+100, base+130, c, base+111, base+140, false)
		}, 140},
		{"c lags", 0, false, func(r *spliceRig, b, c *fakeUp, base uint16) {
			r.run(c, base+50, base+90, false) // c's live point is 10 behind b's
			r.interleave(b, base+100, base+120, c, base+91, base+140, false)
		}, 140},
		{"c leads beyond its GOP", 0, false, func(r *spliceRig, b, c *fakeUp, base uint16) {
			r.run(c, base+150, base+160, false) // c's GOP starts at 150, b is at 99
			r.interleave(b, base+100, base+155, c, base+161, base+170, false)
		}, 170},
		{"sequence numbers wrap, two tracks", 65500, true, func(r *spliceRig, b, c *fakeUp, base uint16) {
			r.run(c, base+50, base+105, true)
			r.interleave(b, base+100, base+130, c, base+106, base+140, true)
		}, 140},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := newSpliceRig(t)
			b := r.lb.upstream("x")
			base := tc.base - tc.base%50 // keyframes at multiples of 50
			if tc.base != 0 {
				base = tc.base
			}
			r.run(b, base, base+99, tc.audio)
			r.d.SetRoute("x", Route{Parent: "c", Version: 2})
			c := r.lc.upstream("x")
			if c == nil {
				t.Fatal("d did not subscribe through c")
			}
			c.readyHops(h264Desc, []string{"a", "c"})
			tc.move(r, b, c, base)
			r.checkAll(base, base+tc.last, tc.audio)
			if b.stopped.Load() == 0 {
				t.Fatal("b is still subscribed after the splice")
			}
			if got := hopsOf(r.d, "x"); got != "a>c>d" {
				t.Fatalf("d lists x through %s, want a>c>d", got)
			}
		})
	}
}

// TestSpliceFailoverDedupes: the active source dies (break-then-make); the
// replacement's GOP replay fills in what was lost when the gap is shorter
// than a GOP, and duplicates are dropped.
func TestSpliceFailoverDedupes(t *testing.T) {
	r := newSpliceRig(t)
	r.d.SetRoute("x", Route{Parent: "b", Backup: "c", Version: 2})
	b := r.lb.upstream("x")
	r.run(b, 0, 79, false)
	b.end(fmt.Errorf("link to datacenter b lost"))
	c := r.lc.upstream("x")
	if c == nil {
		t.Fatal("d did not fail over to its backup c")
	}
	c.readyHops(h264Desc, []string{"a", "c"})
	r.run(c, 50, 120, false) // GOP replay from 50: 80..89 were lost with b
	r.checkAll(0, 120, false)
	select {
	case <-r.sub.Done():
		t.Fatalf("the stream ended: %v", r.sub.Err())
	default:
	}
}

// TestSpliceHoldIsBounded: a joining source that leads while the old one
// stops delivering is not held back forever: after spliceHoldTime it takes
// over, with a gap.
func TestSpliceHoldIsBounded(t *testing.T) {
	r := newSpliceRig(t)
	b := r.lb.upstream("x")
	r.run(b, 0, 99, false)
	r.d.SetRoute("x", Route{Parent: "c", Version: 2})
	c := r.lc.upstream("x")
	c.readyHops(h264Desc, []string{"a", "c"})
	r.run(c, 150, 160, false) // b never gets there
	time.Sleep(spliceHoldTime + 10*time.Millisecond)
	r.run(c, 161, 161, false)
	r.check(0, 99, false)
	r.checkAll(150, 161, false)
}

// seqChecker checks a viewer's packets as they arrive: per track, every
// sequence number after the first exactly once and in order.
type seqChecker struct {
	next  [MaxTracks]uint16
	seen  [MaxTracks]bool
	n     int
	fault string
}

func (c *seqChecker) add(track uint8, seq uint16) {
	c.n++
	if c.seen[track] && seq != c.next[track] && c.fault == "" {
		c.fault = fmt.Sprintf("track %d: sequence %d after %d (packet %d): a gap, duplicate or reorder", track, seq, c.next[track]-1, c.n)
	}
	c.seen[track], c.next[track] = true, seq+1
}

// TestMoveParentMidFlowOnMesh: on a full mesh a,b,c,d a viewer at d
// watches a two-track stream from a while d's route moves it b → c → a →
// b → c mid-flow. Every move shows in d's path, and the viewer's packets
// have no gap and no duplicate on either track.
func TestMoveParentMidFlowOnMesh(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	m := newFakeMesh(t, Config{}, "a", "b", "c", "d")
	a, d := m.hubs["a"], m.hubs["d"]
	pub, err := a.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	for _, n := range []string{"b", "c", "d"} {
		testutil.WaitFor(t, n+" learns of x", func() bool { return hopsOf(m.hubs[n], "x") == "a>"+n })
	}
	d.SetRoute("x", Route{Parent: "b", Version: 1})
	_, q := watchStream(t, d, "x")

	var check seqChecker
	stop := make(chan struct{})
	written := make(chan int)
	go func() {
		seq, aseq := uint16(65000), uint16(65500) // both wrap during the test
		n := 0
		for {
			select {
			case <-stop:
				written <- n
				return
			default:
			}
			key := seq%30 == 0
			pub.WriteRTP(0, rtpPacket(t, seq, uint32(seq)*3000, key, 300))
			if seq%3 == 0 {
				pub.WriteRTP(1, rtpPacket(t, aseq, uint32(seq)*960, false, 100))
				aseq++
			}
			seq++
			n++
			if n%20 == 0 {
				time.Sleep(time.Millisecond)
			}
		}
	}()
	drain := func() {
		for {
			select {
			case b := <-q.C():
				check.add(b.Track, RTPSequence(b.Data()))
				b.Release()
			default:
				return
			}
		}
	}
	for i, p := range []string{"c", "a", "b", "c"} {
		d.SetRoute("x", Route{Parent: p, Version: uint64(i + 2)})
		want := "a>" + p + ">d"
		if p == "a" {
			want = "a>d"
		}
		testutil.WaitFor(t, "d's path to become "+want, func() bool { drain(); return hopsOf(d, "x") == want })
		for range 20 {
			drain()
			time.Sleep(2 * time.Millisecond)
		}
	}
	close(stop)
	<-written
	time.Sleep(20 * time.Millisecond)
	drain()
	if check.fault != "" {
		t.Fatal(check.fault)
	}
	if check.n < 1000 || q.Dropped() > 0 {
		t.Fatalf("the viewer got %d packets (%d dropped in its queue)", check.n, q.Dropped())
	}
	t.Logf("the viewer got %d packets over 4 parent moves, none missing or doubled", check.n)
	for _, n := range []string{"b"} {
		testutil.WaitFor(t, n+" to stop relaying x once d left it", func() bool { return !relayedLocally(m.hubs[n], "x") })
	}
}

// TestFailoverGapAsksForKeyframe: when the replacement's first packet
// leaves a gap and is no keyframe (its upstream had no GOP to replay), the
// node asks it for a keyframe at once, so decoders downstream resync
// without waiting for their own timeout.
func TestFailoverGapAsksForKeyframe(t *testing.T) {
	r := newSpliceRig(t)
	r.d.SetRoute("x", Route{Parent: "b", Backup: "c", Version: 2})
	b := r.lb.upstream("x")
	r.run(b, 0, 20, false)
	b.end(errors.New("link to datacenter b lost"))
	c := r.lc.upstream("x")
	c.readyHops(h264Desc, []string{"a", "c"})
	r.run(c, 31, 40, false) // no replay: 21..30 are gone, 31 is a P-frame
	if c.keyframes.Load() == 0 {
		t.Fatal("d did not ask its new parent for a keyframe after a gap")
	}
	r.check(0, 20, false)
	r.checkAll(31, 40, false)
}

// TestUpstreamPathThroughHereIsRefused: an upstream that answers with a
// path through this node (routes that loop) is refused, and the stream is
// taken from elsewhere.
func TestUpstreamPathThroughHereIsRefused(t *testing.T) {
	h := NewHub(Config{Datacenter: "d", Logger: quietLogger()})
	defer h.Close()
	lb, lc := newFakeLink(t, h, "b"), newFakeLink(t, h, "c")
	h.handleAnnounce(lb, "x", []string{"a", "b"}, 0)
	h.handleAnnounce(lc, "x", []string{"a", "c"}, 0)
	h.SetRoute("x", Route{Parent: "b", Version: 1})
	done := make(chan error, 1)
	go func() {
		sub, err := h.Subscribe(context.Background(), "x", NewQueue(4))
		if err == nil {
			defer sub.Close()
		}
		done <- err
	}()
	testutil.WaitFor(t, "d to subscribe through b", func() bool { return lb.upstream("x") != nil })
	lb.upstream("x").readyHops(h264Desc, []string{"a", "d", "b"}) // b takes it from d
	testutil.WaitFor(t, "d to subscribe through c instead", func() bool { return lc.upstream("x") != nil })
	if lb.upstream("x").stopped.Load() == 0 {
		t.Fatal("d kept the looping subscription through b")
	}
	lc.upstream("x").readyHops(h264Desc, []string{"a", "c"})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := hopsOf(h, "x"); got != "a>c>d" {
		t.Fatalf("d lists x through %s, want a>c>d", got)
	}
}
