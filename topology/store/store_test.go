package store_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/topology/store"
	"github.com/stemflow/stemflow/topology/store/storetest"
)

// endpoint is the client URL of the one embedded etcd member every test of
// the package shares; each test keeps its keys under a prefix of its own.
var endpoint string

func TestMain(m *testing.M) { storetest.Main(m, &endpoint) }

// prefixes holds each test's prefix: its name and when it first asked, so
// that -count=2 does not find the first run's keys.
var prefixes sync.Map // *testing.T → string

func testPrefix(t *testing.T) string {
	p, _ := prefixes.LoadOrStore(t, fmt.Sprintf("/%s-%d/", t.Name(), time.Now().UnixNano()))
	return p.(string)
}

// open connects a client of its own (a node, a manager) under the test's
// prefix; the test's cleanup closes it.
func open(t *testing.T) *store.Store {
	t.Helper()
	s, err := store.Open(store.Config{Endpoints: []string{endpoint}, Prefix: testPrefix(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(10*time.Second))
	t.Cleanup(cancel)
	return ctx
}

func register(t *testing.T, s *store.Store, dc, node string, ttl time.Duration) *store.Registration {
	t.Helper()
	r, err := s.RegisterNode(ctxT(t), store.Node{DC: dc, Node: node, Addresses: map[string]string{"http": "127.0.0.1:8080"}}, ttl)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func hasNode(t *testing.T, s *store.Store, dc, node string) bool {
	t.Helper()
	nodes, err := s.ListNodes(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if n.DC == dc && n.Node == node {
			return true
		}
	}
	return false
}

// TestNodeLeaseExpires: a node whose process dies (its client closes, no
// revoke) leaves nodes/ within its TTL + 1 s; one that closes cleanly
// leaves at once.
func TestNodeLeaseExpires(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	observer := open(t)
	dying := open(t)
	ttl := store.DefaultNodeTTL
	register(t, dying, "a", "a1", ttl)
	clean := register(t, observer, "b", "b1", ttl)
	if !hasNode(t, observer, "a", "a1") || !hasNode(t, observer, "b", "b1") {
		t.Fatal("registered nodes are not listed")
	}
	// Outlive several TTLs first: keepalives must hold the lease.
	time.Sleep(ttl + time.Second)
	if !hasNode(t, observer, "a", "a1") {
		t.Fatalf("node a1 vanished after %v although its keepalives ran", ttl+time.Second)
	}

	dying.Close()
	died := time.Now()
	testutil.WaitForWithin(t, ttl+time.Second, "a1's lease to expire", func() bool { return !hasNode(t, observer, "a", "a1") })
	t.Logf("a dead node left nodes/ %v after its client closed (TTL %v)", time.Since(died).Round(10*time.Millisecond), ttl)

	clean.Close()
	if hasNode(t, observer, "b", "b1") {
		t.Fatal("node b1 is still listed after its registration closed (the lease was not revoked)")
	}
}

// TestClaimStreamRace: two datacenters publishing one name at once: exactly
// one wins, the other's error names the winner; the key goes with the
// winner's lease.
func TestClaimStreamRace(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	sa, sb := open(t), open(t)
	ra, rb := register(t, sa, "a", "a1", 0), register(t, sb, "b", "b1", 0)
	for i := range 20 {
		name := fmt.Sprintf("x%d", i)
		var wg sync.WaitGroup
		start := make(chan struct{})
		errs := make([]error, 2)
		for j, c := range []struct {
			s *store.Store
			r *store.Registration
		}{{sa, ra}, {sb, rb}} {
			wg.Go(func() {
				<-start
				errs[j] = c.s.ClaimStream(ctxT(t), c.r, name)
			})
		}
		close(start)
		wg.Wait()
		if (errs[0] == nil) == (errs[1] == nil) {
			t.Fatalf("stream %s: claims returned %v and %v, want exactly one winner", name, errs[0], errs[1])
		}
		winner, loserErr := "a", errs[1]
		if errs[1] == nil {
			winner, loserErr = "b", errs[0]
		}
		var taken *store.StreamTakenError
		if !errors.Is(loserErr, store.ErrStreamTaken) || !errors.As(loserErr, &taken) {
			t.Fatalf("stream %s: loser's error %v is not ErrStreamTaken", name, loserErr)
		}
		if taken.Holder.OriginDC != winner || taken.Holder.OriginNode != winner+"1" {
			t.Fatalf("stream %s: loser's error names %s/%s, want the winner %s/%s1: %v", name,
				taken.Holder.OriginDC, taken.Holder.OriginNode, winner, winner, loserErr)
		}
		st, ok, err := sa.GetStream(ctxT(t), name)
		if err != nil || !ok || st.OriginDC != winner {
			t.Fatalf("stream %s: stored origin %+v ok=%v err=%v, want %s", name, st, ok, err, winner)
		}
	}
	// The holder claiming again is fine; releasing lets the other claim.
	if err := sa.ClaimStream(ctxT(t), ra, "solo"); err != nil {
		t.Fatal(err)
	}
	if err := sa.ClaimStream(ctxT(t), ra, "solo"); err != nil {
		t.Fatalf("claiming a stream the node holds already: %v", err)
	}
	if err := sb.ReleaseStream(ctxT(t), rb, "solo"); err != nil {
		t.Fatal(err)
	}
	if err := sb.ClaimStream(ctxT(t), rb, "solo"); !errors.Is(err, store.ErrStreamTaken) {
		t.Fatalf("b released a's stream: claim after b's release returned %v", err)
	}
	if err := sa.ReleaseStream(ctxT(t), ra, "solo"); err != nil {
		t.Fatal(err)
	}
	if err := sb.ClaimStream(ctxT(t), rb, "solo"); err != nil {
		t.Fatalf("claim after the holder released: %v", err)
	}
}

// TestSubscriptions: subscriptions list by datacenter and go with the
// subscriber's registration.
func TestSubscriptions(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	s := open(t)
	rb, rc := register(t, s, "b", "b1", 0), register(t, s, "c", "c1", 0)
	for _, r := range []*store.Registration{rc, rb} {
		if err := s.Subscribe(ctxT(t), r, "x"); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := s.Subscribers(ctxT(t), "x"); err != nil || fmt.Sprint(got) != "[b c]" {
		t.Fatalf("subscribers %v (err %v), want [b c]", got, err)
	}
	if err := s.Unsubscribe(ctxT(t), rb, "x"); err != nil {
		t.Fatal(err)
	}
	rc.Close()
	if got, err := s.Subscribers(ctxT(t), "x"); err != nil || len(got) != 0 {
		t.Fatalf("subscribers %v (err %v) after b unsubscribed and c left, want none", got, err)
	}
}

// TestWatchRoutes: a node's one watch sees routes that existed before it
// started and every newer version; stale versions are refused.
func TestWatchRoutes(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	manager, nodeS := open(t), open(t)
	ctx := ctxT(t)
	if err := manager.PutRoute(ctx, store.Route{Stream: "early", Version: 1, Origin: "a", Parent: map[string]string{"b": "a"}}); err != nil {
		t.Fatal(err)
	}
	wctx, stop := context.WithCancel(ctx)
	events := nodeS.WatchRoutes(wctx)
	next := func() store.RouteEvent {
		t.Helper()
		select {
		case ev, ok := <-events:
			if !ok {
				t.Fatal("route watch closed")
			}
			return ev
		case <-time.After(testutil.Scale(5 * time.Second)):
			t.Fatal("no route event within 5 s")
		}
		panic("unreachable")
	}
	if ev := next(); ev.Stream != "early" || ev.Route.Version != 1 || ev.Route.Parent["b"] != "a" {
		t.Fatalf("first event %+v, want the existing route of early", ev)
	}
	want := store.Route{Stream: "x", Version: 7, Origin: "a",
		Parent: map[string]string{"b": "a", "d": "b"}, Backup: map[string]string{"d": "c"}}
	if err := manager.PutRoute(ctx, want); err != nil {
		t.Fatal(err)
	}
	ev := next()
	if ev.Stream != "x" || ev.Deleted || ev.Route.Version != 7 || ev.Route.Parent["d"] != "b" || ev.Route.Backup["d"] != "c" {
		t.Fatalf("event %+v, want route x v7 with d's parent b and backup c", ev)
	}
	if err := manager.PutRoute(ctx, store.Route{Stream: "x", Version: 7, Origin: "a"}); !errors.Is(err, store.ErrStaleRoute) {
		t.Fatalf("PutRoute of a version already stored returned %v, want ErrStaleRoute", err)
	}
	if err := manager.PutRoute(ctx, store.Route{Stream: "x", Version: 8, Origin: "a", Parent: map[string]string{"d": "c", "c": "a"}}); err != nil {
		t.Fatal(err)
	}
	if ev := next(); ev.Route.Version != 8 || ev.Route.Parent["d"] != "c" {
		t.Fatalf("event %+v, want route x v8 with d's parent c", ev)
	}
	stop()
	for range events { // the channel closes when the watch's context ends
	}
}

// TestElectionFailover: two manager candidates, one leads; the leader's
// process dies (client closed, no resign) and the other leads within the
// session TTL; a clean Close resigns at once.
func TestElectionFailover(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	sa, sb, observer := open(t), open(t), open(t)
	ttl := 2 * time.Second
	ca, err := sa.Campaign("a", ttl)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ca.Close)
	testutil.WaitFor(t, "a to lead", func() bool { l, _ := ca.Leading(); return l })
	cb, err := sb.Campaign("b", ttl)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cb.Close)
	time.Sleep(ttl) // b campaigns and must not lead while a lives
	if l, _ := cb.Leading(); l {
		t.Fatal("b leads while a's session lives")
	}
	if leader, err := observer.Leader(ctxT(t)); err != nil || leader != "a" {
		t.Fatalf("Leader() = %q, %v; want a", leader, err)
	}

	sa.Close() // a's process dies: no resign, no revoke
	died := time.Now()
	testutil.WaitForWithin(t, ttl+time.Second, "b to lead after a died", func() bool { l, _ := cb.Leading(); return l })
	t.Logf("b leads %v after a's client closed (session TTL %v)", time.Since(died).Round(10*time.Millisecond), ttl)
	if leader, err := observer.Leader(ctxT(t)); err != nil || leader != "b" {
		t.Fatalf("Leader() = %q, %v; want b", leader, err)
	}

	// A clean close resigns: a third candidate leads at once.
	sc := open(t)
	cc, err := sc.Campaign("c", ttl)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cc.Close)
	time.Sleep(500 * time.Millisecond)
	cb.Close()
	resigned := time.Now()
	testutil.WaitForWithin(t, ttl/2, "c to lead after b resigned", func() bool { l, _ := cc.Leading(); return l })
	t.Logf("c leads %v after b resigned", time.Since(resigned).Round(10*time.Millisecond))
}

// TestFencedRoutes: only the leading manager writes routes. A manager whose
// leadership ended without it noticing (its leader key gone, as when its
// session expired while it was cut off) is refused, steps down, and the
// route stays its successor's.
func TestFencedRoutes(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	sa, sb := open(t), open(t)
	ca, err := sa.Campaign("a", 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ca.Close)
	testutil.WaitFor(t, "a to lead", func() bool { l, _ := ca.Leading(); return l })
	cb, err := sb.Campaign("b", 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cb.Close)
	ctx := ctxT(t)
	if err := ca.PutRoute(ctx, store.Route{Stream: "x", Version: 1, Origin: "a"}); err != nil {
		t.Fatalf("the leader's route write: %v", err)
	}
	if err := cb.PutRoute(ctx, store.Route{Stream: "x", Version: 2, Origin: "b"}); !errors.Is(err, store.ErrNotLeader) {
		t.Fatalf("a standby's route write returned %v, want ErrNotLeader", err)
	}
	// Take a's leader key away behind its back.
	resp, err := sa.Client().Get(ctx, sa.ElectionPrefix()+"/", clientv3.WithFirstCreate()...)
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "a" {
		t.Fatalf("leader key: %v, %v", resp, err)
	}
	if _, err := sa.Client().Delete(ctx, string(resp.Kvs[0].Key)); err != nil {
		t.Fatal(err)
	}
	if l, _ := ca.Leading(); !l {
		t.Fatal("a noticed the deletion; the test needs a deposed leader that has not")
	}
	if err := ca.PutRoute(ctx, store.Route{Stream: "x", Version: 5, Origin: "a"}); !errors.Is(err, store.ErrNotLeader) {
		t.Fatalf("a deposed leader's route write returned %v, want ErrNotLeader", err)
	}
	// The refusal ends a's term: it stops leading and campaigns again.
	testutil.WaitFor(t, "a to step down after its refused write", func() bool { l, _ := ca.Leading(); return !l })
	testutil.WaitFor(t, "b to lead", func() bool { l, _ := cb.Leading(); return l })
	if err := cb.PutRoute(ctx, store.Route{Stream: "x", Version: 2, Origin: "b"}); err != nil {
		t.Fatalf("the new leader's route write: %v", err)
	}
	if rt, ok, err := sb.GetRoute(ctx, "x"); err != nil || !ok || rt.Version != 2 || rt.Origin != "b" {
		t.Fatalf("route %+v ok=%v err=%v, want b's version 2", rt, ok, err)
	}
}

// TestLinks: a node writes the links it sends on, leased; another node's
// link is refused; a watcher sees the existing links, each change and the
// links of a node whose lease expired going away.
func TestLinks(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	sa, sb, observer := open(t), open(t), open(t)
	ra := register(t, sa, "a", "a1", 2*time.Second)
	rb := register(t, sb, "b", "b1", 0)
	ctx := ctxT(t)
	if err := sa.PutLink(ctx, ra, store.Link{To: "b", RTTMs: 10, BandwidthKbps: 50000}); err != nil {
		t.Fatal(err)
	}
	if err := sa.PutLink(ctx, ra, store.Link{From: "b", To: "a", RTTMs: 10}); err == nil {
		t.Fatal("node a wrote the link b→a, which only b measures")
	}
	if err := sa.PutLink(ctx, ra, store.Link{To: "a"}); err == nil {
		t.Fatal("node a wrote a link to itself")
	}
	wctx, stop := context.WithCancel(ctx)
	events := observer.WatchLinks(wctx)
	next := func() store.LinkEvent {
		t.Helper()
		select {
		case ev := <-events:
			return ev
		case <-time.After(testutil.Scale(5 * time.Second)):
			t.Fatal("no link event within 5 s")
		}
		panic("unreachable")
	}
	if ev := next(); ev.Deleted || ev.Link.From != "a" || ev.Link.To != "b" || ev.Link.FromNode != "a1" || ev.Link.RTTMs != 10 || ev.Link.Updated.IsZero() {
		t.Fatalf("first event %+v, want the existing link a→b from node a1 with RTT 10 ms", ev)
	}
	if err := sb.PutLink(ctx, rb, store.Link{To: "a", RTTMs: 12, Loss: 0.01, Down: true}); err != nil {
		t.Fatal(err)
	}
	if ev := next(); ev.Link.From != "b" || ev.Link.To != "a" || !ev.Link.Down || ev.Link.Loss != 0.01 {
		t.Fatalf("event %+v, want b→a down with 1 %% loss", ev)
	}
	links, err := observer.ListLinks(ctx)
	if err != nil || len(links) != 2 || links[0].From != "a" || links[1].From != "b" {
		t.Fatalf("ListLinks = %+v, %v; want a→b and b→a in that order", links, err)
	}
	if err := sb.DeleteLink(ctx, rb, "a"); err != nil {
		t.Fatal(err)
	}
	if ev := next(); !ev.Deleted || ev.Link.From != "b" || ev.Link.To != "a" {
		t.Fatalf("event %+v, want b→a deleted", ev)
	}
	sa.Close() // a dies: its link goes with its lease
	if ev := next(); !ev.Deleted || ev.Link.From != "a" || ev.Link.To != "b" {
		t.Fatalf("event %+v, want a→b deleted when a's lease expired", ev)
	}
	stop()
	for range events {
	}
}

// TestWatchTopology: one watch lists nodes, links, streams and
// subscriptions (not routes), then sends each change; a dead node's keys
// leave in one batch.
func TestWatchTopology(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	sa, sd, observer := open(t), open(t), open(t)
	ctx := ctxT(t)
	ra := register(t, sa, "a", "a1", 0)
	if err := sa.ClaimStream(ctx, ra, "x"); err != nil {
		t.Fatal(err)
	}
	if err := sa.SetStreamBitrate(ctx, ra, "x", 4000); err != nil {
		t.Fatal(err)
	}
	if err := observer.PutRoute(ctx, store.Route{Stream: "x", Version: 1, Origin: "a"}); err != nil {
		t.Fatal(err)
	}
	wctx, stop := context.WithCancel(ctx)
	batches := observer.WatchTopology(wctx)
	next := func() store.TopologyBatch {
		t.Helper()
		select {
		case b := <-batches:
			return b
		case <-time.After(testutil.Scale(5 * time.Second)):
			t.Fatal("no topology batch within 5 s")
		}
		panic("unreachable")
	}
	b := next()
	if !b.Listing || len(b.Events) != 2 || b.Events[0].Kind != store.KindNode || b.Events[1].Kind != store.KindStream ||
		b.Events[1].Stream.OriginDC != "a" || b.Events[1].Stream.BitrateKbps != 4000 {
		t.Fatalf("first batch %+v, want a listing of node a1 and stream x (4000 kbit/s) without the route", b)
	}
	rd := register(t, sd, "d", "d1", 2*time.Second)
	if err := sd.Subscribe(ctx, rd, "x"); err != nil {
		t.Fatal(err)
	}
	if err := sd.PutLink(ctx, rd, store.Link{To: "a", RTTMs: 300}); err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for len(kinds) < 3 {
		b := next()
		if b.Listing {
			t.Fatalf("a listing %+v while the watch ran", b)
		}
		for _, e := range b.Events {
			kinds = append(kinds, fmt.Sprint(e.Kind, e.Deleted))
		}
	}
	if got := fmt.Sprint(kinds); got != "[node false subscription false link false]" {
		t.Fatalf("changes %s, want d's node, subscription and link", got)
	}
	if err := observer.PutRoute(ctx, store.Route{Stream: "x", Version: 2, Origin: "a"}); err != nil {
		t.Fatal(err)
	}
	sd.Close()
	b = next() // not the route: the expiry of d's lease, all keys at once
	var gone []string
	for _, e := range b.Events {
		if !e.Deleted {
			t.Fatalf("event %+v in the batch of d's expiry, want deletions only", e)
		}
		gone = append(gone, fmt.Sprint(e.Kind, ":", e.Node.DC, e.Link.From, e.Subscription.DC))
	}
	slices.Sort(gone) // one expiry, in no particular order
	if got := fmt.Sprint(gone); got != "[link:d node:d subscription:d]" {
		t.Fatalf("batch of d's expiry %v, want its node, link and subscription", got)
	}
	stop()
	for range batches {
	}
}

// TestPutRoutes: the leader writes 250 routes in batches; a stale version
// is refused alone; a standby's batch is refused whole; DeleteRoutes
// deletes in batches.
func TestPutRoutes(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	sa, sb := open(t), open(t)
	ca, err := sa.Campaign("a", 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ca.Close)
	testutil.WaitFor(t, "a to lead", func() bool { l, _ := ca.Leading(); return l })
	cb, err := sb.Campaign("b", 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cb.Close)
	ctx := ctxT(t)
	if err := sa.PutRoute(ctx, store.Route{Stream: "s042", Version: 9, Origin: "a"}); err != nil {
		t.Fatal(err)
	}
	var rts []store.Route
	var names []string
	for i := range 250 {
		name := fmt.Sprintf("s%03d", i)
		rts = append(rts, store.Route{Stream: name, Version: 5, Origin: "a", Parent: map[string]string{"b": "a"}})
		names = append(names, name)
	}
	errs := ca.PutRoutes(ctx, rts)
	for i, err := range errs {
		if i == 42 {
			if !errors.Is(err, store.ErrStaleRoute) {
				t.Errorf("route s042 version 5 over version 9: %v, want ErrStaleRoute", err)
			}
		} else if err != nil {
			t.Errorf("route %s: %v", rts[i].Stream, err)
		}
	}
	got, err := sa.ListRoutes(ctx)
	if err != nil || len(got) != 250 || got[42].Version != 9 || got[249].Version != 5 || got[0].Parent["b"] != "a" {
		t.Fatalf("ListRoutes: %d routes (err %v), want 250 with s042 still at version 9", len(got), err)
	}
	for i := range rts {
		rts[i].Version = 10
	}
	for _, err := range cb.PutRoutes(ctx, rts) {
		if !errors.Is(err, store.ErrNotLeader) {
			t.Fatalf("a standby's batch: %v, want ErrNotLeader", err)
		}
	}
	if err := cb.DeleteRoutes(ctx, names); !errors.Is(err, store.ErrNotLeader) {
		t.Fatalf("a standby's deletion: %v, want ErrNotLeader", err)
	}
	if err := ca.DeleteRoutes(ctx, names); err != nil {
		t.Fatal(err)
	}
	if got, err := sa.ListRoutes(ctx); err != nil || len(got) != 0 {
		t.Fatalf("ListRoutes after DeleteRoutes: %d routes, %v; want none", len(got), err)
	}
}
