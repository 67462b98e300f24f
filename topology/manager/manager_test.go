package manager_test

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/topology/manager"
	"github.com/stemflow/stemflow/topology/store"
	"github.com/stemflow/stemflow/topology/store/storetest"
)

// endpoint is the client URL of the one embedded etcd member every test of
// the package shares; each test keeps its keys under a prefix of its own.
var endpoint string

func TestMain(m *testing.M) { storetest.Main(m, &endpoint) }

// overlay is a test's synthetic datacenters: one node each, registered
// through a store client of its own (so that it can die alone), writing
// the links it sends on.
type overlay struct {
	t      *testing.T
	prefix string
	mu     sync.Mutex
	stores map[string]*store.Store
	regs   map[string]*store.Registration
}

// nodeTTL is the synthetic nodes' lease TTL.
const nodeTTL = 2 * time.Second

func newOverlay(t *testing.T) *overlay {
	// A prefix of its own per run: -count=2 must not find the first run's
	// routes.
	prefix := fmt.Sprintf("/%s-%d/", t.Name(), time.Now().UnixNano())
	return &overlay{t: t, prefix: prefix, stores: map[string]*store.Store{}, regs: map[string]*store.Registration{}}
}

// open connects a client of the test's prefix; the test's cleanup closes it.
func (o *overlay) open() *store.Store {
	o.t.Helper()
	s, err := store.Open(store.Config{Endpoints: []string{endpoint}, Prefix: o.prefix})
	if err != nil {
		o.t.Fatal(err)
	}
	o.t.Cleanup(func() { s.Close() })
	return s
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(20*time.Second))
	t.Cleanup(cancel)
	return ctx
}

// node registers datacenter dc's node.
func (o *overlay) node(dc string) {
	o.t.Helper()
	s := o.open()
	r, err := s.RegisterNode(ctxT(o.t), store.Node{DC: dc, Node: dc + "1"}, nodeTTL)
	if err != nil {
		o.t.Fatal(err)
	}
	o.t.Cleanup(func() { r.Close() })
	o.mu.Lock()
	o.stores[dc], o.regs[dc] = s, r
	o.mu.Unlock()
}

// link writes both directions of a link with the given one-way delay: each
// end writes the direction it sends on, with RTT = 2 × delay.
func (o *overlay) link(a, b string, delay time.Duration) {
	o.t.Helper()
	for _, d := range [][2]string{{a, b}, {b, a}} {
		o.put(store.Link{From: d[0], To: d[1], RTTMs: 2 * float64(delay.Milliseconds()), BandwidthKbps: 100000})
	}
}

func (o *overlay) put(l store.Link) {
	o.t.Helper()
	if err := o.stores[l.From].PutLink(ctxT(o.t), o.regs[l.From], l); err != nil {
		o.t.Fatal(err)
	}
}

// kill closes dc's store client without revoking its lease: its node,
// links, streams and subscriptions go when the lease expires, as when its
// process dies.
func (o *overlay) kill(dc string) {
	o.stores[dc].Close()
}

// diamond is the four datacenters: a–d 150 ms, a–b and b–d 5 ms,
// a–c and c–d 20 ms, one way (RTT twice that), with stream x published at
// a and watched at d.
func diamond(t *testing.T) *overlay {
	o := newOverlay(t)
	for _, dc := range []string{"a", "b", "c", "d"} {
		o.node(dc)
	}
	o.link("a", "d", 150*time.Millisecond)
	o.link("a", "b", 5*time.Millisecond)
	o.link("b", "d", 5*time.Millisecond)
	o.link("a", "c", 20*time.Millisecond)
	o.link("c", "d", 20*time.Millisecond)
	ctx := ctxT(t)
	if err := o.stores["a"].ClaimStream(ctx, o.regs["a"], "x"); err != nil {
		t.Fatal(err)
	}
	if err := o.stores["d"].Subscribe(ctx, o.regs["d"], "x"); err != nil {
		t.Fatal(err)
	}
	return o
}

// startManager starts a manager candidate for dc with a store client of its
// own; it is closed when the test ends.
func (o *overlay) startManager(dc string, ttl time.Duration) (*manager.Manager, *store.Store) {
	o.t.Helper()
	s := o.open()
	m, err := manager.Start(manager.Config{Store: s, ID: dc, Logger: testutil.Logger().With("test", o.t.Name()), LeaseTTL: ttl})
	if err != nil {
		o.t.Fatal(err)
	}
	o.t.Cleanup(m.Close)
	return m, s
}

// routeWatcher records every version of one stream's route, with the time
// it arrived.
type routeWatcher struct {
	mu   sync.Mutex
	seen []seenRoute
}

type seenRoute struct {
	at      time.Time
	route   store.Route
	deleted bool
}

func watchRoute(t *testing.T, s *store.Store, stream string) *routeWatcher {
	w := &routeWatcher{}
	ctx, cancel := context.WithCancel(context.Background())
	events := s.WatchRoutes(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev := range events {
			if ev.Stream == stream {
				w.mu.Lock()
				w.seen = append(w.seen, seenRoute{at: time.Now(), route: ev.Route, deleted: ev.Deleted})
				w.mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return w
}

// last returns the latest route seen; ok is false before any, or after a
// deletion.
func (w *routeWatcher) last() (seenRoute, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.seen) == 0 {
		return seenRoute{}, false
	}
	s := w.seen[len(w.seen)-1]
	return s, !s.deleted
}

func (w *routeWatcher) versions() []int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []int64
	for _, s := range w.seen {
		out = append(out, s.route.Version)
	}
	return out
}

// path renders a route as the path from the origin to dc and dc's backup:
// "a→b→d backup c".
func path(rt store.Route, dc string) string {
	hops := []string{dc}
	for v := dc; v != rt.Origin; {
		p, ok := rt.Parent[v]
		if !ok || len(hops) > 10 {
			return "no path to " + dc
		}
		hops = append(hops, p)
		v = p
	}
	slices.Reverse(hops)
	return strings.Join(hops, "→") + " backup " + rt.Backup[dc]
}

// waitPath waits until the route's path to dc is want and returns the
// route.
func (w *routeWatcher) waitPath(t *testing.T, within time.Duration, dc, want string) seenRoute {
	t.Helper()
	var got seenRoute
	testutil.WaitForWithin(t, within, fmt.Sprintf("the route to %s to become %s", dc, want), func() bool {
		var ok bool
		got, ok = w.last()
		return ok && path(got.route, dc) == want
	})
	return got
}

// nodeGone returns when dc's node key leaves etcd and when that was seen.
func nodeGone(t *testing.T, s *store.Store, dc string) <-chan time.Time {
	ch := make(chan time.Time, 1)
	ctx, cancel := context.WithCancel(context.Background())
	batches := s.WatchTopology(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for b := range batches {
			for _, e := range b.Events {
				if e.Kind == store.KindNode && e.Deleted && e.Node.DC == dc {
					ch <- time.Now()
					cancel()
					for range batches {
					}
					return
				}
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return ch
}

// TestRouteFollowsTopology: on the four datacenters (one-way
// delays a–d 150 ms, a–b and b–d 5 ms, a–c and c–d 20 ms) a stream from a
// watched at d flows a→b→d with c as d's backup. b's node dies (its lease
// expires): within the TTL + 1 s the route becomes a→c→d. The figure is how
// long after the lease expired the new route was in etcd. b restarts: x
// flows over it again.
func TestRouteFollowsTopology(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	o := diamond(t)
	observer := o.open()
	w := watchRoute(t, observer, "x")
	m, _ := o.startManager("a", 0)
	first := w.waitPath(t, 10*time.Second, "d", "a→b→d backup c")
	if first.route.Version != 1 || first.route.Origin != "a" {
		t.Fatalf("first route %+v, want version 1 from origin a", first.route)
	}

	gone := nodeGone(t, observer, "b")
	o.kill("b")
	killed := time.Now()
	moved := w.waitPath(t, nodeTTL+time.Second, "d", "a→c→d backup a")
	expired := <-gone
	t.Logf("b's lease expired %v after its client closed; the route moved to a→c→d %v later (%v after the kill), version %d",
		expired.Sub(killed).Round(time.Millisecond), moved.at.Sub(expired).Round(time.Millisecond),
		moved.at.Sub(killed).Round(time.Millisecond), moved.route.Version)
	if moved.route.Version != 2 || moved.route.Parent["c"] != "a" || len(moved.route.Parent) != 2 {
		t.Fatalf("route after b died: %+v, want version 2 with c←a and d←c only", moved.route)
	}
	if d := moved.at.Sub(expired); d > testutil.Scale(time.Second) {
		t.Errorf("the route moved %v after b's lease expired, want within 1 s", d)
	}
	// The watcher can see the route before the manager's Put returns and
	// counts it.
	testutil.WaitFor(t, "the manager to count 2 routes written", func() bool {
		return m.Status().RoutesWritten >= 2
	})
	if st := m.Status(); !st.Leading || st.RoutesWritten != 2 {
		t.Errorf("manager status %+v, want leading with 2 routes written", st)
	}

	// b restarts: it registers and writes its links again, and carries x
	// again (10 ms against 40: better by more than the margin).
	o.node("b")
	o.link("a", "b", 5*time.Millisecond)
	o.link("b", "d", 5*time.Millisecond)
	back := w.waitPath(t, 5*time.Second, "d", "a→b→d backup c")
	if back.route.Version != 3 {
		t.Fatalf("route after b came back: version %d, want 3", back.route.Version)
	}
}

// TestLinkDown: a link reported down leaves the trees within 1 s; reported
// up again, the stream does not move back unless the old tree is better by
// the margin (a–b–d is 10 ms against 40: it moves back).
func TestLinkDown(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	o := diamond(t)
	observer := o.open()
	w := watchRoute(t, observer, "x")
	o.startManager("a", 0)
	w.waitPath(t, 10*time.Second, "d", "a→b→d backup c")

	down := time.Now()
	o.put(store.Link{From: "b", To: "d", RTTMs: 10, BandwidthKbps: 100000, Down: true})
	moved := w.waitPath(t, time.Second, "d", "a→c→d backup a")
	t.Logf("the route left b→d %v after b reported the link down", moved.at.Sub(down).Round(time.Millisecond))

	// Noise below the margin on the new tree's links moves nothing.
	o.put(store.Link{From: "c", To: "d", RTTMs: 41, BandwidthKbps: 100000})
	time.Sleep(testutil.Scale(300 * time.Millisecond))
	if got := w.versions(); len(got) != 2 {
		t.Fatalf("route versions %v after a 0.5 ms change on c→d, want [1 2]: the tree must not move for noise", got)
	}
	o.put(store.Link{From: "b", To: "d", RTTMs: 10, BandwidthKbps: 100000})
	back := w.waitPath(t, time.Second, "d", "a→b→d backup c")
	if back.route.Version != 3 {
		t.Fatalf("route back on b→d has version %d, want 3", back.route.Version)
	}
}

// TestLeaderCrash: two managers; the leader's process dies (its client
// closes, no resign); the standby leads within the session TTL, keeps the
// route as it is (same version, same tree: no flap on takeover) and plans
// the next change. With no manager left, the routes stay in etcd.
func TestLeaderCrash(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 90*time.Second)
	o := diamond(t)
	observer := o.open()
	w := watchRoute(t, observer, "x")
	ttl := 2 * time.Second
	ma, sa := o.startManager("a", ttl)
	testutil.WaitFor(t, "a to lead", ma.Leading)
	mc, _ := o.startManager("c", ttl)
	first := w.waitPath(t, 10*time.Second, "d", "a→b→d backup c")
	time.Sleep(testutil.Scale(200 * time.Millisecond))
	if mc.Leading() || mc.Status().RoutesWritten != 0 {
		t.Fatalf("the standby c leads or writes while a lives: %+v", mc.Status())
	}

	sa.Close() // a's manager dies: no resign
	died := time.Now()
	testutil.WaitForWithin(t, ttl+time.Second, "c to lead after a's manager died", mc.Leading)
	t.Logf("c leads %v after a's manager died (session TTL %v)", time.Since(died).Round(time.Millisecond), ttl)
	testutil.WaitFor(t, "c to plan", func() bool { return mc.Status().Recomputes > 0 })
	if last, ok := w.last(); !ok || last.route.Version != first.route.Version || !maps.Equal(last.route.Parent, first.route.Parent) {
		t.Fatalf("route after the takeover %+v, want the route in use (version %d, a→b→d) untouched", last.route, first.route.Version)
	}
	if st := mc.Status(); st.RoutesWritten != 0 {
		t.Fatalf("the new leader rewrote %d routes on takeover, want none", st.RoutesWritten)
	}

	// The new leader plans: c subscribes too.
	if err := o.stores["c"].Subscribe(ctxT(t), o.regs["c"], "x"); err != nil {
		t.Fatal(err)
	}
	next := w.waitPath(t, 5*time.Second, "c", "a→c backup d")
	if next.route.Version != first.route.Version+1 || next.route.Parent["d"] != "b" {
		t.Fatalf("route after c subscribed: %+v, want version %d with d still fed by b", next.route, first.route.Version+1)
	}
	testutil.WaitFor(t, "c's second recompute", func() bool { return mc.Status().Recomputes >= 2 })
	if st := mc.Status(); st.FullRecomputes != 1 {
		t.Errorf("c's status %+v: want one full recompute (the takeover) and the subscription placed alone", st)
	}

	// No manager at all: the routes stay.
	mc.Close()
	ma.Close()
	if leader, err := observer.Leader(ctxT(t)); err != nil || leader != "" {
		t.Fatalf("leader %q (err %v) with every manager stopped, want none", leader, err)
	}
	if err := o.stores["b"].Subscribe(ctxT(t), o.regs["b"], "x"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(ttl + time.Second)
	rt, ok, err := observer.GetRoute(ctxT(t), "x")
	if err != nil || !ok || rt.Version != next.route.Version || !maps.Equal(rt.Parent, next.route.Parent) {
		t.Fatalf("route with no manager: %+v ok=%v err=%v, want version %d kept as it was", rt, ok, err, next.route.Version)
	}
}

// TestDeposedLeader: a leader whose leader key went away behind its back
// (as when its session expired while it was cut off) is refused, steps
// down without error (it campaigns again, as a standby), and its successor
// plans.
func TestDeposedLeader(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	o := diamond(t)
	observer := o.open()
	w := watchRoute(t, observer, "x")
	ma, _ := o.startManager("a", 0)
	testutil.WaitFor(t, "a to lead", ma.Leading)
	mb, _ := o.startManager("b", 0)
	w.waitPath(t, 10*time.Second, "d", "a→b→d backup c")

	ctx := ctxT(t)
	resp, err := observer.Client().Get(ctx, observer.ElectionPrefix()+"/", clientv3.WithFirstCreate()...)
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "a" {
		t.Fatalf("leader key: %v, %v", resp, err)
	}
	if _, err := observer.Client().Delete(ctx, string(resp.Kvs[0].Key)); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, "b to lead", mb.Leading)
	if !ma.Leading() {
		t.Fatal("a noticed; the test needs a deposed leader that has not")
	}
	// A change both see: a's write is refused, b's lands.
	if err := o.stores["c"].Subscribe(ctx, o.regs["c"], "x"); err != nil {
		t.Fatal(err)
	}
	w.waitPath(t, 5*time.Second, "c", "a→c backup d")
	testutil.WaitFor(t, "a's refused write", func() bool { return ma.Status().Refused > 0 })
	testutil.WaitFor(t, "a to step down", func() bool { return !ma.Leading() })
	if st := ma.Status(); st.Planning || st.RoutesWritten != 1 {
		t.Fatalf("deposed a: %+v, want not planning, its one route of before", st)
	}
	if leader, err := observer.Leader(ctx); err != nil || leader != "b" {
		t.Fatalf("leader %q (err %v) after a stepped down, want b", leader, err)
	}
	if got := w.versions(); fmt.Sprint(got) != "[1 2]" {
		t.Fatalf("route versions %v, want [1 2]", got)
	}
}

// TestStreamEnds: a stream whose publisher leaves loses its route.
func TestStreamEnds(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	o := diamond(t)
	observer := o.open()
	w := watchRoute(t, observer, "x")
	o.startManager("a", 0)
	w.waitPath(t, 10*time.Second, "d", "a→b→d backup c")
	if err := o.stores["a"].ReleaseStream(ctxT(t), o.regs["a"], "x"); err != nil {
		t.Fatal(err)
	}
	testutil.WaitForWithin(t, time.Second, "x's route to go", func() bool { _, ok := w.last(); return !ok })
}

// TestManyStreamsMove: 2,000 streams from a watched at d flow over b; b's
// node dies and every route moves to a→c→d. The figure is how long after
// b's lease expired the last route was in etcd (the writes dominate).
func TestManyStreamsMove(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 120*time.Second)
	o := diamond(t)
	const n = 2000
	ctx := ctxT(t)
	// Claim and subscribe in bulk, as the nodes' own calls would, leased
	// by a's and d's registrations.
	cli := o.stores["a"].Client()
	for i := 0; i < n; i += 50 {
		var ops []clientv3.Op
		for j := i; j < i+50; j++ {
			name := fmt.Sprintf("s%04d", j)
			ops = append(ops,
				clientv3.OpPut(o.stores["a"].StreamKey(name), fmt.Sprintf(`{"name":%q,"origin_dc":"a","origin_node":"a1"}`, name), clientv3.WithLease(o.regs["a"].Lease())),
				clientv3.OpPut(o.stores["a"].SubscriptionKey(name, "d"), fmt.Sprintf(`{"stream":%q,"dc":"d","node":"d1"}`, name), clientv3.WithLease(o.regs["d"].Lease())))
		}
		if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			t.Fatal(err)
		}
	}
	// 10 Gbit/s links: 2,000 streams of 2.5 Mbit/s fit on one path.
	for _, l := range [][3]string{{"a", "d", "300"}, {"a", "b", "10"}, {"b", "d", "10"}, {"a", "c", "40"}, {"c", "d", "40"}} {
		var rtt float64
		fmt.Sscan(l[2], &rtt)
		o.put(store.Link{From: l[0], To: l[1], RTTMs: rtt, BandwidthKbps: 1e7})
		o.put(store.Link{From: l[1], To: l[0], RTTMs: rtt, BandwidthKbps: 1e7})
	}
	observer := o.open()
	m, _ := o.startManager("a", 0)
	onB := func() int {
		routes, err := observer.ListRoutes(ctxT(t))
		if err != nil {
			t.Fatal(err)
		}
		c := 0
		for _, rt := range routes {
			if rt.Parent["d"] == "b" {
				c++
			}
		}
		return c
	}
	start := time.Now()
	testutil.WaitForWithin(t, 60*time.Second, "every stream's route over b", func() bool { return onB() == n+1 })
	t.Logf("%d routes written %v after the manager started", n+1, time.Since(start).Round(time.Millisecond))

	gone := nodeGone(t, observer, "b")
	o.kill("b")
	expired := <-gone
	testutil.WaitForWithin(t, 30*time.Second, "every route off b", func() bool { return onB() == 0 })
	t.Logf("all %d routes moved off b %v after b's lease expired (manager: %+v)", n+1, time.Since(expired).Round(time.Millisecond), m.Status())
}
