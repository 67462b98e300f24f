package relay

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stemflow/stemflow/internal/netem"
	"github.com/stemflow/stemflow/internal/testutil"
)

// flow is a publisher writing a video stream (a keyframe every keyEvery
// packets) from its own goroutine, and a viewer checking what arrives.
type flow struct {
	t        *testing.T
	pub      *Publisher
	q        *Queue
	keyEvery uint16
	paused   chan bool
	stop     chan struct{}
	done     chan struct{}

	// Owned by the checker (drain).
	next      uint16
	started   bool
	n, gaps   int
	fault     string
	detail    string // the first fault's sequence numbers
	phase     string // what the test is doing, for detail
	lastAt    time.Time
	maxSilent time.Duration // longest wait between two packets at the viewer
	lost      int           // packets never delivered (gaps)
}

const faultNoKeyframe = "a gap resumed without a keyframe"

func startFlow(t *testing.T, pub *Publisher, q *Queue, keyEvery uint16, perMs int) *flow {
	f := &flow{t: t, pub: pub, q: q, keyEvery: keyEvery, paused: make(chan bool), stop: make(chan struct{}), done: make(chan struct{})}
	t.Cleanup(f.halt)
	go func() {
		defer close(f.done)
		seq := uint16(0)
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-f.stop:
				return
			case p := <-f.paused:
				for p {
					select {
					case p = <-f.paused:
					case <-f.stop:
						return
					}
				}
			case <-tick.C:
				for range perMs {
					key := seq%keyEvery == 0
					pub.WriteRTP(0, rtpPacket(t, seq, uint32(seq)*90, key, 300))
					seq++
				}
			}
		}
	}()
	return f
}

// watchStream subscribes a viewer's queue to a stream at h, as a viewer
// joining would; the subscription closes when the test ends.
func watchStream(t *testing.T, h *Hub, name string) (*Subscription, *Queue) {
	t.Helper()
	q := NewQueue(1 << 14)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(5*time.Second))
	defer cancel()
	sub, err := h.Subscribe(ctx, name, q)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sub.Close)
	return sub, q
}

// drain checks every packet the viewer has: sequence numbers never go back
// or repeat, and a gap resumes at a keyframe (the decoder can resync).
func (f *flow) drain() {
	for {
		select {
		case b := <-f.q.C():
			seq, key := RTPSequence(b.Data()), b.Keyframe
			b.Release()
			now := time.Now()
			if f.started {
				if d := now.Sub(f.lastAt); d > f.maxSilent {
					f.maxSilent = d
				}
				switch {
				case seq == f.next:
				case !seqNewer(seq, f.next) && f.fault == "":
					f.fault = "sequence went back or repeated"
					f.detail = fmt.Sprintf("(%s: %d after %d, %d packets in)", f.phase, seq, f.next-1, f.n)
				default:
					f.gaps++
					f.lost += int(seq - f.next)
					if !key && f.fault == "" {
						f.fault = faultNoKeyframe
						f.detail = fmt.Sprintf("(%s: %d..%d missing, %d packets in)", f.phase, f.next, seq-1, f.n)
					}
				}
			}
			f.started, f.next, f.lastAt = true, seq+1, now
			f.n++
		default:
			return
		}
	}
}

// halt stops the publisher; it may be called more than once.
func (f *flow) halt() {
	select {
	case <-f.stop:
	default:
		close(f.stop)
	}
	<-f.done
}

func (f *flow) end() {
	f.halt()
	time.Sleep(20 * time.Millisecond)
	f.drain()
}

// TestSilentNeighbourFailsOver: on a full mesh a,b,c,d with fake links that
// beat, d takes a stream through b (route, backup c). A publisher pausing
// for longer than DeadAfter changes nothing: the link still beats. When b
// goes silent (a dead node says no goodbye) d switches to c within about
// DeadAfter, the viewer's packets go on with no duplicate, a new stream is
// not subscribed through silent b, and when b beats again the stream moves
// back to its route's parent. Before, d waited for the link to close (QUIC's
// 5 s idle timeout), then ended the stream.
func TestSilentNeighbourFailsOver(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	deadAfter := testutil.Scale(300 * time.Millisecond)
	m := newFakeMesh(t, Config{Heartbeat: 50 * time.Millisecond, DeadAfter: deadAfter}, "a", "b", "c", "d")
	a, d := m.hubs["a"], m.hubs["d"]
	pub, err := a.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	for _, n := range []string{"b", "c", "d"} {
		testutil.WaitFor(t, n+" learns of x", func() bool { return hopsOf(m.hubs[n], "x") == "a>"+n })
	}
	d.SetRoute("x", Route{Parent: "b", Backup: "c", Version: 1})
	q := NewQueue(1 << 14)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(5*time.Second))
	defer cancel()
	sub, err := d.Subscribe(ctx, "x", q)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	f := startFlow(t, pub, q, 2000, 1)

	// A paused publisher is no dead neighbour.
	time.Sleep(100 * time.Millisecond)
	f.paused <- true
	time.Sleep(3 * deadAfter)
	f.paused <- false
	time.Sleep(100 * time.Millisecond)
	f.drain()
	if got := hopsOf(d, "x"); got != "a>b>d" || subscribes(m.links["d"]["c"], "x") != 0 {
		t.Fatalf("after a pause of the publisher d takes x through %s (subscribed %d times through c), want a>b>d",
			got, subscribes(m.links["d"]["c"], "x"))
	}
	f.maxSilent = 0

	// b dies.
	f.drain()
	f.phase = "failover"
	for _, peer := range []string{"a", "c", "d"} {
		m.links["b"][peer].silence(true)
	}
	cut := time.Now()
	testutil.WaitFor(t, "d to take x through c", func() bool { f.drain(); return hopsOf(d, "x") == "a>c>d" })
	switched := time.Since(cut)
	time.Sleep(100 * time.Millisecond)
	f.drain()
	if p, _, _ := d.Upstream("x"); p != "c" {
		t.Fatalf("Upstream at d names %s after b went silent, want c", p)
	}
	t.Logf("switched to c %v after b went silent (DeadAfter %v); longest wait between two packets at the viewer %v; %d packets lost in %d gaps",
		switched.Round(time.Millisecond), deadAfter, f.maxSilent.Round(time.Millisecond), f.lost, f.gaps)

	// A new stream with a route through silent b goes elsewhere. (x moved
	// when b turned suspect, before it was silent.)
	testutil.WaitFor(t, "d to find b silent", func() bool { return isSilent(d, "b") })
	pub2, err := a.Publish("y", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub2.Close()
	testutil.WaitFor(t, "d learns of y", func() bool { return hopsOf(d, "y") != "" })
	d.SetRoute("y", Route{Parent: "b", Version: 1})
	sub2, err := d.Subscribe(ctx, "y", NewQueue(4))
	if err != nil {
		t.Fatalf("subscribing to y while its route's parent is silent: %v", err)
	}
	sub2.Close()
	if n := subscribes(m.links["d"]["b"], "y"); n != 0 {
		t.Fatalf("d subscribed to y through silent b %d times", n)
	}

	// b comes back: x moves back to its route's parent, make-before-break.
	f.drain()
	f.phase = "move back"
	for _, peer := range []string{"a", "c", "d"} {
		m.links["b"][peer].silence(false)
	}
	// (b may take x from c for a moment: it may hear c before a again.)
	deadline := time.Now().Add(testutil.Scale(5 * time.Second))
	for !strings.HasSuffix(hopsOf(d, "x"), ">b>d") {
		f.drain()
		if time.Now().After(deadline) {
			bp, _, _ := m.hubs["b"].Upstream("x")
			t.Fatalf("d still takes x through %s; b takes it from %q (%s); d sent b %q", hopsOf(d, "x"), bp, hopsOf(m.hubs["b"], "x"),
				m.links["d"]["b"].messagesAbout("x"))
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	f.end()
	if f.fault != "" {
		t.Fatal(f.fault, f.detail)
	}
	select {
	case <-sub.Done():
		t.Fatalf("the viewer's stream ended: %v", sub.Err())
	default:
	}
	if f.n < 200 { // about 1000 at 1 packet/ms; far fewer under -race on a busy machine
		t.Fatalf("the viewer got %d packets", f.n)
	}
}

// TestQuietNeighbourStreamsMoveFirst: d takes a stream through b on fake
// links that beat, by its route (backup c) or, with no route and no link
// a–d, by announcement (a→b→d wins the tie with a→c→d). The link b–d falls
// quiet: after SuspectAfter, long before DeadAfter calls b silent, d's
// stream is already on c, spliced make-before-break, and the viewer sees
// no duplicate and no gap without a keyframe. b is heard again before it
// is silent: the stream goes back to b, make-before-break. Before, the
// stream stayed on quiet b until DeadAfter, and the backup's round trip
// came on top of that.
func TestQuietNeighbourStreamsMoveFirst(t *testing.T) {
	for _, routed := range []bool{true, false} {
		t.Run(map[bool]string{true: "route", false: "announcement"}[routed], func(t *testing.T) {
			testQuietNeighbourStreamsMoveFirst(t, routed)
		})
	}
}

func testQuietNeighbourStreamsMoveFirst(t *testing.T, routed bool) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	// DeadAfter is long here so that the move can only be the suspicion's.
	cfg := Config{Heartbeat: 20 * time.Millisecond, SuspectAfter: 100 * time.Millisecond, DeadAfter: testutil.Scale(5 * time.Second)}
	m := newFakeMesh(t, cfg, "a", "b", "c", "d")
	a, d := m.hubs["a"], m.hubs["d"]
	if !routed {
		m.links["a"]["d"].drop(errors.New("not linked in this test"))
	}
	pub, err := a.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	for _, n := range []string{"b", "c"} {
		testutil.WaitFor(t, n+" learns of x", func() bool { return hopsOf(m.hubs[n], "x") == "a>"+n })
	}
	if routed {
		testutil.WaitFor(t, "d learns of x", func() bool { return hopsOf(d, "x") == "a>d" })
		d.SetRoute("x", Route{Parent: "b", Backup: "c", Version: 1})
	} else {
		testutil.WaitFor(t, "d learns of x through b", func() bool { return hopsOf(d, "x") == "a>b>d" })
	}
	sub, q := watchStream(t, d, "x")
	f := startFlow(t, pub, q, 2000, 1)
	testutil.WaitFor(t, "packets through b", func() bool { f.drain(); return f.n > 100 && hopsOf(d, "x") == "a>b>d" })

	f.phase = "b–d quiet"
	m.links["b"]["d"].silence(true)
	quiet := time.Now()
	testutil.WaitFor(t, "d to take x through c", func() bool { f.drain(); return hopsOf(d, "x") == "a>c>d" })
	moved := time.Since(quiet)
	if isSilent(d, "b") {
		t.Fatalf("d called b silent before x moved (after %v): the move was no suspicion's", moved)
	}
	n := f.n
	testutil.WaitFor(t, "packets through c", func() bool { f.drain(); return f.n > n+50 })
	t.Logf("x on c %v after b–d fell quiet (SuspectAfter %v); longest wait at the viewer %v; %d packets lost in %d gaps",
		moved.Round(time.Millisecond), cfg.SuspectAfter, f.maxSilent.Round(time.Millisecond), f.lost, f.gaps)

	f.phase = "b heard again"
	m.links["b"]["d"].silence(false)
	testutil.WaitFor(t, "x back through b", func() bool { f.drain(); return hopsOf(d, "x") == "a>b>d" })
	n = f.n
	testutil.WaitFor(t, "packets through b again", func() bool { f.drain(); return f.n > n+50 })
	f.end()
	if f.fault != "" {
		t.Fatal(f.fault, f.detail)
	}
	if isSilent(d, "b") {
		t.Fatal("b was called silent")
	}
	select {
	case <-sub.Done():
		t.Fatalf("the viewer's stream ended: %v", sub.Err())
	default:
	}
}

// TestAnnouncementsLeaveSilentNeighbour: e hears of x only from d, and d
// from b and c (a→b→d wins the tie). e takes nothing yet (a chat room
// there only wants x). b goes silent: d announces the path through c to e
// within DeadAfter (here b, which hears nobody either, also stops
// announcing the path through a, which it finds silent), so e's way to x
// follows the failover. Before, d went
// on announcing a→b→d until its connection to b timed out (5 s on QUIC),
// and nodes that only wanted the stream waited that long.
func TestAnnouncementsLeaveSilentNeighbour(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	m := newFakeMesh(t, Config{Heartbeat: 20 * time.Millisecond, DeadAfter: 100 * time.Millisecond}, "a", "b", "c", "d", "e")
	for _, p := range [][2]string{{"a", "d"}, {"a", "e"}, {"b", "e"}, {"c", "e"}} {
		m.links[p[0]][p[1]].drop(errors.New("not linked in this test"))
	}
	pub, err := m.hubs["a"].Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	e := m.hubs["e"]
	testutil.WaitFor(t, "e learns of x through b and d", func() bool { return hopsOf(e, "x") == "a>b>d>e" })
	for _, peer := range []string{"a", "c", "d"} {
		m.links["b"][peer].silence(true)
	}
	testutil.WaitFor(t, "e to learn of x through c", func() bool { return hopsOf(e, "x") == "a>c>d>e" })
	if p, origin, ok := e.Upstream("x"); !ok || p != "d" || origin != "a" {
		t.Fatalf("Upstream at e: %q %q %v, want d a true", p, origin, ok)
	}
	for _, peer := range []string{"a", "c", "d"} {
		m.links["b"][peer].silence(false)
	}
	testutil.WaitFor(t, "e to learn of x through b again", func() bool { return hopsOf(e, "x") == "a>b>d>e" })
}

// TestNewLinkToSilentNeighbourIsUsable: a neighbour that went silent and
// whose link closed comes back on a new link: it is usable at once (its new
// link's heartbeat watches it), not silent forever.
func TestNewLinkToSilentNeighbourIsUsable(t *testing.T) {
	testutil.CheckLeaks(t)
	cfg := Config{Logger: quietLogger(), Heartbeat: 20 * time.Millisecond, DeadAfter: 60 * time.Millisecond}
	cfg.Datacenter = "a"
	a := NewHub(cfg)
	cfg.Datacenter = "d"
	d := NewHub(cfg)
	defer a.Close()
	defer d.Close()
	_, da := pipeHubs(t, a, d)
	pub, err := a.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	testutil.WaitFor(t, "d learns of x", func() bool { return hopsOf(d, "x") == "a>d" })
	da.silence(true)
	testutil.WaitFor(t, "d to find a silent", func() bool { _, _, ok := d.Upstream("x"); return !ok })
	da.drop(errors.New("idle timeout"))
	pipeHubs(t, a, d)
	testutil.WaitFor(t, "d to learn of x again", func() bool { return hopsOf(d, "x") == "a>d" })
	if p, _, ok := d.Upstream("x"); !ok || p != "a" {
		t.Fatalf("Upstream at d on a new link to a: %q %v, want a", p, ok)
	}
}

func isSilent(h *Hub, peer string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.silent[peer]
}

// TestLivenessTiming (in a synctest bubble, on fake time): a neighbour
// heard every 100 ms is never silent; after it stops it is silent between
// DeadAfter and DeadAfter + Heartbeat/2 later, and heard again at the next
// check after a sign of life. The watch beats once per Heartbeat.
func TestLivenessTiming(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := NewHub(Config{Datacenter: "d", Logger: quietLogger()})
		defer h.Close()
		l := newFakeEnd(h, "b")
		h.addLink(l)
		var lv liveness
		var beats atomic.Int32
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			h.watchLiveness(ctx, l, &lv, func() { beats.Add(1) }, nil)
		}()
		for range 20 {
			lv.heardFrom()
			time.Sleep(100 * time.Millisecond)
			if isSilent(h, "b") {
				t.Fatal("a neighbour heard every 100 ms was called silent")
			}
		}
		if n := beats.Load(); n < 39 || n > 41 {
			t.Fatalf("%d heartbeats in 2 s, want 40", n)
		}
		lv.heardFrom()
		heard := time.Now()
		for !isSilent(h, "b") {
			time.Sleep(5 * time.Millisecond)
		}
		if d := time.Since(heard); d < defaultDeadAfter || d > defaultDeadAfter+defaultHeartbeat/2+5*time.Millisecond {
			t.Fatalf("silent %v after the last sign of life, want %v to %v", d, defaultDeadAfter, defaultDeadAfter+defaultHeartbeat/2)
		}
		lv.heardFrom()
		time.Sleep(defaultHeartbeat/2 + time.Millisecond)
		if isSilent(h, "b") {
			t.Fatal("still silent after a sign of life")
		}
		cancel()
		<-done
	})
}

// TestJitterMeter: RFC 3550's interarrival jitter over heartbeats. A
// constant transit time (whatever the two clocks' offset, across the
// 32-bit clock's wrap) is no jitter; transit times alternating 4 ms apart
// converge to 4 ms; what the neighbour reports is what sent returns.
func TestJitterMeter(t *testing.T) {
	var m jitterMeter
	if got := m.sent(); got != -1 {
		t.Fatalf("sent before any report: %v, want -1", got)
	}
	hb := func(sendUs uint32, reported uint32) []byte {
		b := make([]byte, heartbeatLen)
		b[0] = wireVersion<<4 | dgramHeartbeat
		binary.BigEndian.PutUint32(b[1:], sendUs)
		binary.BigEndian.PutUint32(b[5:], reported)
		return b
	}
	arrive := clockEpoch.Add(time.Hour)
	send := uint32(math.MaxUint32 - 500_000) // wraps within the loop
	for i := range 100 {
		m.received(hb(send, 1500), arrive)
		send += 50_000
		arrive = arrive.Add(50 * time.Millisecond)
		if j := m.rx.Load(); j != 0 {
			t.Fatalf("heartbeat %d: jitter %d µs with a constant transit time", i, j)
		}
	}
	if got := m.sent(); got != 1500*time.Microsecond {
		t.Fatalf("sent: %v, want the neighbour's 1.5ms", got)
	}
	for i := range 200 {
		extra := time.Duration(i%2) * 4 * time.Millisecond
		m.received(hb(send, 0), arrive.Add(extra))
		send += 50_000
		arrive = arrive.Add(50 * time.Millisecond)
	}
	if j := m.rx.Load(); j < 3900 || j > 4000 {
		t.Fatalf("jitter %d µs with transit times alternating 4 ms apart, want about 4000", j)
	}
	m.received([]byte{wireVersion<<4 | dgramHeartbeat}, arrive) // a one-byte heartbeat: no figures
	if got := m.sent(); got != 0 {
		t.Fatalf("sent after a one-byte heartbeat: %v, want the last report (0)", got)
	}
}

// TestLinkJitterOverQUIC: a→b delays vary uniformly within ±10 ms (the
// lab's emulator), b→a not at all. a's link to b reports the jitter b
// measured of a's heartbeats, RFC 3550's figure for that: the mean of
// |X1−X2| for two uniform delays, 2/3 × 10 ms; b's link to a reports
// little. Before, the jitter published was quic-go's RTT mean deviation,
// 23–104 ms on lab links with no jitter set.
func TestLinkJitterOverQUIC(t *testing.T) {
	testutil.CheckLeaks(t)
	hubs, conns := quicMesh(t, Config{}, "a", "b")
	addrB := netip.MustParseAddrPort(conns["b"].LocalAddr().String())
	if err := conns["a"].Set(addrB, netem.Impairment{Delay: 20 * time.Millisecond, Jitter: 10 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	jitterTo := func(h *Hub, peer string) time.Duration {
		for _, ls := range h.Links() {
			if ls.Peer == peer {
				return ls.Jitter
			}
		}
		return -1
	}
	// timerJitter follows, until stop closes, RFC 3550's jitter of how late
	// this process's timers fire, sampled once a heartbeat interval and
	// smoothed as the link's figure is: the emulator delays packets with a
	// timer, and a late timer (or a late receiver) is jitter on the wire
	// too. Beside three CPU hogs and another test binary a→b read 16–66 ms;
	// on a quiet machine the timers' jitter is a fraction of a millisecond.
	timerJitter := func(stop <-chan struct{}) *atomic.Int64 {
		var j atomic.Int64 // nanoseconds
		go func() {
			var jf, prev float64
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				start := time.Now()
				time.Sleep(defaultHeartbeat)
				late := float64(time.Since(start) - defaultHeartbeat)
				if i > 0 {
					jf += (math.Abs(late-prev) - jf) / 16
					j.Store(int64(jf))
				}
				prev = late
			}
		}()
		return &j
	}
	// The estimate follows the last ~16 heartbeats: let it settle, then
	// average it over 40 more. The a→b bound has room for twice the
	// timers' jitter over the window, and a window off the mark is
	// measured again, up to three times. Quic-go's RTT mean deviation
	// (23–104 ms on lab links) fails b→a's bound in every window.
	stop := make(chan struct{})
	defer close(stop)
	tj := timerJitter(stop)
	time.Sleep(1500 * time.Millisecond)
	var ab, ba, maxAB time.Duration
	const n = 20
	for try := 1; try <= 3; try++ {
		var late time.Duration
		ab, ba = 0, 0
		for range n {
			time.Sleep(100 * time.Millisecond)
			ab += jitterTo(hubs["a"], "b") / n
			ba += jitterTo(hubs["b"], "a") / n
			late += time.Duration(tj.Load()) / n
		}
		maxAB = 10*time.Millisecond + 2*late
		t.Logf("try %d: jitter a→b %v (±10 ms set: RFC 3550 expects about 6.7 ms; at most %v with the timers' own jitter %v), b→a %v (none set)",
			try, ab, maxAB, late, ba)
		if ab >= 4*time.Millisecond && ab <= maxAB && ba >= 0 && ba <= testutil.Scale(3*time.Millisecond) {
			break
		}
	}
	if ab < 4*time.Millisecond || ab > maxAB {
		t.Errorf("jitter a→b %v, want about 6.7 ms (at most %v)", ab, maxAB)
	}
	if ba < 0 || ba > testutil.Scale(3*time.Millisecond) {
		t.Errorf("jitter b→a %v with none set", ba)
	}
}
