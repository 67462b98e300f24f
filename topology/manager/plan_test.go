package manager

import (
	"fmt"
	"math/rand/v2"
	"syscall"
	"testing"
	"time"

	"github.com/stemflow/stemflow/topology"
	"github.com/stemflow/stemflow/topology/store"
)

// benchListing is what a manager reads for 100 datacenters in a full mesh
// (delays 1–150 ms one way) and 10,000 streams of 1–8 subscribers each:
// the records topology's benchProblem holds, drawn from the same seed, as
// store records (node, link, stream and subscription values).
func benchListing() store.TopologyBatch {
	r := rand.New(rand.NewPCG(9, 10))
	const n = 100
	b := store.TopologyBatch{Listing: true}
	dc := func(i int) string { return fmt.Sprintf("dc%03d", i) }
	for i := range n {
		b.Events = append(b.Events, store.TopologyEvent{Kind: store.KindNode, Node: store.Node{DC: dc(i), Node: dc(i) + "-1"}})
	}
	for i := range n {
		for j := i + 1; j < n; j++ {
			rtt := 2 * (1 + r.Float64()*149)
			for _, d := range [][2]int{{i, j}, {j, i}} {
				b.Events = append(b.Events, store.TopologyEvent{Kind: store.KindLink,
					Link: store.Link{From: dc(d[0]), To: dc(d[1]), RTTMs: rtt, BandwidthKbps: 10e6}})
			}
		}
	}
	for i := range 10000 {
		name := fmt.Sprintf("s%05d", i)
		origin := dc(r.IntN(n))
		b.Events = append(b.Events, store.TopologyEvent{Kind: store.KindStream,
			Stream: store.Stream{Name: name, OriginDC: origin, OriginNode: origin + "-1", BitrateKbps: 1000 + r.Float64()*5000}})
		for range 1 + r.IntN(8) {
			sub := dc(r.IntN(n))
			b.Events = append(b.Events, store.TopologyEvent{Kind: store.KindSubscription,
				Subscription: store.Subscription{Stream: name, DC: sub, Node: sub + "-1"}})
		}
	}
	return b
}

func benchState(b *testing.B) *state {
	st := newState()
	for _, ev := range benchListing().Events {
		st.apply(ev)
	}
	if len(st.dcs) != 100 || len(st.streams) != 10000 {
		b.Fatalf("state of %d datacenters and %d streams, want 100 and 10,000", len(st.dcs), len(st.streams))
	}
	return st
}

// cpuTime is the CPU time this process has used, user and system.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func reportCPU(b *testing.B, start time.Duration) {
	b.ReportMetric(float64((cpuTime()-start)/time.Microsecond)/1000/float64(b.N), "cpu-ms/op")
}

// BenchmarkManagerFullRecompute is a new leader's first recompute with no
// routes in etcd: the state to a topology.Problem, every tree, and every
// route to write. Compare with topology's BenchmarkFullRecompute (the
// trees alone) in the same run.
func BenchmarkManagerFullRecompute(b *testing.B) {
	st := benchState(b)
	var puts []store.Route
	start := cpuTime()
	for b.Loop() {
		puts, _ = plan(st, map[string]store.Route{}, topology.Params{}, DefaultBitrateKbps, time.Now())
	}
	reportCPU(b, start)
	b.ReportMetric(float64(len(puts)), "routes")
}

// BenchmarkManagerSteadyRecompute is the recompute after a change that
// moves nothing (a link's noise below the margin): every tree checked
// against the route in use, none written.
func BenchmarkManagerSteadyRecompute(b *testing.B) {
	st := benchState(b)
	puts, _ := plan(st, map[string]store.Route{}, topology.Params{}, DefaultBitrateKbps, time.Now())
	routes := make(map[string]store.Route, len(puts))
	for _, rt := range puts {
		routes[rt.Stream] = rt
	}
	start := cpuTime()
	for b.Loop() {
		puts, _ = plan(st, routes, topology.Params{}, DefaultBitrateKbps, time.Now())
	}
	reportCPU(b, start)
	b.ReportMetric(float64(len(puts)), "routes")
}

// BenchmarkManagerProblem is the conversion alone: the state to a
// topology.Problem with the routes in use as previous trees.
func BenchmarkManagerProblem(b *testing.B) {
	st := benchState(b)
	puts, _ := plan(st, map[string]store.Route{}, topology.Params{}, DefaultBitrateKbps, time.Now())
	routes := make(map[string]store.Route, len(puts))
	for _, rt := range puts {
		routes[rt.Stream] = rt
	}
	start := cpuTime()
	for b.Loop() {
		st.problem(routes, DefaultBitrateKbps)
	}
	reportCPU(b, start)
}

// BenchmarkManagerListing is a new leader reading the whole state: every
// record of the listing applied to an empty state.
func BenchmarkManagerListing(b *testing.B) {
	l := benchListing()
	start := cpuTime()
	for b.Loop() {
		st := newState()
		for _, ev := range l.Events {
			st.apply(ev)
		}
	}
	reportCPU(b, start)
	b.ReportMetric(float64(len(l.Events)), "records")
}

// TestPlanSteady: planning twice on the same state writes every route once
// and then nothing; a stream that ended is deleted.
func TestPlanSteady(t *testing.T) {
	st := newState()
	for _, ev := range []store.TopologyEvent{
		{Kind: store.KindNode, Node: store.Node{DC: "a", Node: "a1"}},
		{Kind: store.KindNode, Node: store.Node{DC: "b", Node: "b1"}},
		{Kind: store.KindLink, Link: store.Link{From: "a", To: "b", RTTMs: 10}},
		{Kind: store.KindStream, Stream: store.Stream{Name: "x", OriginDC: "a"}},
		{Kind: store.KindStream, Stream: store.Stream{Name: "y", OriginDC: "b"}},
		{Kind: store.KindSubscription, Subscription: store.Subscription{Stream: "x", DC: "b"}},
	} {
		if !st.apply(ev) {
			t.Fatalf("applying %+v reported no change", ev)
		}
	}
	if st.apply(store.TopologyEvent{Kind: store.KindLink, Link: store.Link{From: "a", To: "b", RTTMs: 10, JitterMs: 3}}) {
		t.Error("a link rewritten with the same planned figures (only jitter changed) reported a change")
	}
	routes := map[string]store.Route{}
	puts, dels := plan(st, routes, topology.Params{}, DefaultBitrateKbps, time.Now())
	if len(puts) != 2 || len(dels) != 0 || puts[0].Version != 1 || puts[0].Parent["b"] != "a" {
		t.Fatalf("first plan: puts %+v, deletes %v; want x (b←a) and y at version 1", puts, dels)
	}
	for _, rt := range puts {
		routes[rt.Stream] = rt
	}
	if puts, dels := plan(st, routes, topology.Params{}, DefaultBitrateKbps, time.Now()); len(puts)+len(dels) != 0 {
		t.Fatalf("second plan on the same state: puts %+v, deletes %v; want nothing", puts, dels)
	}
	st.apply(store.TopologyEvent{Kind: store.KindStream, Deleted: true, Stream: store.Stream{Name: "y"}})
	if puts, dels := plan(st, routes, topology.Params{}, DefaultBitrateKbps, time.Now()); len(puts) != 0 || fmt.Sprint(dels) != "[y]" {
		t.Fatalf("after y ended: puts %+v, deletes %v; want y deleted", puts, dels)
	}
}

// TestPlanIncremental: on links without capacity limits, re-placing the
// streams whose subscribers changed gives the routes a full recompute
// gives, and touches no other stream; a stream that ended is deleted.
func TestPlanIncremental(t *testing.T) {
	st := newState()
	for _, ev := range benchListing().Events {
		if ev.Kind == store.KindLink {
			ev.Link.BandwidthKbps = 0 // unlimited: trees do not depend on each other
		}
		st.apply(ev)
	}
	now := time.Now()
	pln := newPlanner(topology.Params{}, DefaultBitrateKbps)
	routes := map[string]store.Route{}
	puts, _ := pln.full(st, routes, now)
	for _, rt := range puts {
		routes[rt.Stream] = rt
	}
	changed := map[string]bool{}
	for i := range 50 {
		name := fmt.Sprintf("s%05d", i*97)
		dc := fmt.Sprintf("dc%03d", (i*31)%100)
		ev := store.TopologyEvent{Kind: store.KindSubscription, Subscription: store.Subscription{Stream: name, DC: dc}}
		ev.Deleted = st.subs[name][dc]
		st.apply(ev)
		changed[name] = true
	}
	st.apply(store.TopologyEvent{Kind: store.KindStream, Deleted: true, Stream: store.Stream{Name: "s00001"}})
	changed["s00001"] = true
	inc, incDel := pln.streams(st, routes, changed, now)
	full, fullDel := plan(st, routes, topology.Params{}, DefaultBitrateKbps, now)
	if len(inc) == 0 || fmt.Sprint(inc) != fmt.Sprint(full) || fmt.Sprint(incDel) != fmt.Sprint(fullDel) {
		t.Fatalf("incremental: %d routes, deletes %v; full: %d routes, deletes %v; want the same (and some)", len(inc), incDel, len(full), fullDel)
	}
	for _, rt := range inc {
		if !changed[rt.Stream] {
			t.Fatalf("incremental recompute wrote %s, whose subscribers did not change", rt.Stream)
		}
	}
	t.Logf("%d of %d changed streams got a new route", len(inc), len(changed))
}

// BenchmarkManagerSubscriptionChange is the recompute after one
// datacenter joins or leaves one stream's audience, at 100 datacenters ×
// 10,000 streams: that stream alone is re-placed. Compare with topology's
// BenchmarkSubscriptionChange and with BenchmarkManagerSteadyRecompute,
// what every such change would cost with full recomputes.
func BenchmarkManagerSubscriptionChange(b *testing.B) {
	st := benchState(b)
	now := time.Now()
	pln := newPlanner(topology.Params{}, DefaultBitrateKbps)
	routes := map[string]store.Route{}
	puts, _ := pln.full(st, routes, now)
	for _, rt := range puts {
		routes[rt.Stream] = rt
	}
	names := map[string]bool{"s00042": true}
	start := cpuTime()
	for b.Loop() {
		ev := store.TopologyEvent{Kind: store.KindSubscription, Subscription: store.Subscription{Stream: "s00042", DC: "dc099"}}
		ev.Deleted = st.subs["s00042"]["dc099"]
		st.apply(ev)
		puts, _ := pln.streams(st, routes, names, now)
		for _, rt := range puts {
			routes[rt.Stream] = rt
		}
	}
	reportCPU(b, start)
}

// TestPlanUnreached: a subscriber without any link is counted as
// unreached, and no longer once it leaves.
func TestPlanUnreached(t *testing.T) {
	st := newState()
	for _, ev := range []store.TopologyEvent{
		{Kind: store.KindNode, Node: store.Node{DC: "a", Node: "a1"}},
		{Kind: store.KindNode, Node: store.Node{DC: "b", Node: "b1"}},
		{Kind: store.KindNode, Node: store.Node{DC: "island", Node: "i1"}},
		{Kind: store.KindLink, Link: store.Link{From: "a", To: "b", RTTMs: 10}},
		{Kind: store.KindStream, Stream: store.Stream{Name: "x", OriginDC: "a"}},
		{Kind: store.KindSubscription, Subscription: store.Subscription{Stream: "x", DC: "b"}},
		{Kind: store.KindSubscription, Subscription: store.Subscription{Stream: "x", DC: "island"}},
	} {
		st.apply(ev)
	}
	pln := newPlanner(topology.Params{}, DefaultBitrateKbps)
	routes := map[string]store.Route{}
	puts, _ := pln.full(st, routes, time.Now())
	if pln.unreached != 1 || len(puts) != 1 || puts[0].Parent["b"] != "a" {
		t.Fatalf("unreached %d, routes %+v; want island unreached and b←a", pln.unreached, puts)
	}
	routes["x"] = puts[0]
	st.apply(store.TopologyEvent{Kind: store.KindSubscription, Deleted: true, Subscription: store.Subscription{Stream: "x", DC: "island"}})
	pln.streams(st, routes, map[string]bool{"x": true}, time.Now())
	if pln.unreached != 0 {
		t.Fatalf("unreached %d after island left, want 0", pln.unreached)
	}
}
