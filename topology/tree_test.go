package topology

import (
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"slices"
	"sort"
	"syscall"
	"testing"
	"time"
)

// sym returns both directions of a link.
func sym(a, b string, delay time.Duration, capKbps float64) []Link {
	return []Link{{From: a, To: b, Delay: delay, CapacityKbps: capKbps}, {From: b, To: a, Delay: delay, CapacityKbps: capKbps}}
}

func dcs(names ...string) []Datacenter {
	out := make([]Datacenter, len(names))
	for i, n := range names {
		out[i] = Datacenter{Name: n}
	}
	return out
}

func ms(d float64) time.Duration { return time.Duration(d * float64(time.Millisecond)) }

// labLinks is the four-datacenter lab: a–d 150 ms, a–b and b–d 5 ms,
// a–c and c–d 20 ms.
func labLinks() []Link {
	var l []Link
	l = append(l, sym("a", "d", ms(150), 0)...)
	l = append(l, sym("a", "b", ms(5), 0)...)
	l = append(l, sym("b", "d", ms(5), 0)...)
	l = append(l, sym("a", "c", ms(20), 0)...)
	l = append(l, sym("c", "d", ms(20), 0)...)
	return l
}

func TestLabTreeAndBackup(t *testing.T) {
	trees := Compute(Problem{Datacenters: dcs("a", "b", "c", "d"), Links: labLinks(),
		Streams: []StreamDemand{{Name: "x", Origin: "a", BitrateKbps: 2000, Subscribers: []string{"d"}}}}, Params{})
	tr := trees[0]
	if got := fmt.Sprint(tr.Edges()); got != "[[a b] [b d]]" {
		t.Fatalf("tree %s, want a→b→d", got)
	}
	if tr.Backup["d"] != "c" {
		t.Errorf("backup of d = %q, want c (a→c→d avoids b)", tr.Backup["d"])
	}
	if tr.Delay["d"] != ms(10) {
		t.Errorf("delay to d = %v, want 10ms", tr.Delay["d"])
	}

	// b dies: the tree becomes a→c→d.
	down := dcs("a", "b", "c", "d")
	down[1].Down = true
	trees = Compute(Problem{Datacenters: down, Links: labLinks(),
		Streams:  []StreamDemand{{Name: "x", Origin: "a", BitrateKbps: 2000, Subscribers: []string{"d"}}},
		Previous: map[string]*Tree{"x": tr}}, Params{})
	if got := fmt.Sprint(trees[0].Edges()); got != "[[a c] [c d]]" {
		t.Fatalf("after b died: tree %s, want a→c→d", got)
	}
}

// randomGraph makes a connected random graph of n datacenters with
// symmetric links.
func randomGraph(r *rand.Rand, n int, density float64, capKbps float64) ([]Datacenter, []Link) {
	names := make([]string, n)
	for i := range names {
		names[i] = string(rune('a' + i))
	}
	var links []Link
	has := map[[2]int]bool{}
	add := func(i, j int) {
		if i == j || has[[2]int{i, j}] || has[[2]int{j, i}] {
			return
		}
		has[[2]int{i, j}] = true
		links = append(links, sym(names[i], names[j], ms(1+r.Float64()*99), capKbps)...)
	}
	for i := 1; i < n; i++ {
		add(i, r.IntN(i)) // a random spanning tree keeps it connected
	}
	for i := range n {
		for j := i + 1; j < n; j++ {
			if r.Float64() < density {
				add(i, j)
			}
		}
	}
	return dcs(names...), links
}

// optimum is the exact minimum Steiner tree cost by brute force: the
// cheapest minimum spanning tree over every set of datacenters that holds
// the origin and the subscribers (the optimal tree spans some such set, and
// every spanning tree of one is a Steiner tree).
func optimum(dcList []Datacenter, links []Link, origin string, subs []string) float64 {
	names := make([]string, len(dcList))
	for i, d := range dcList {
		names[i] = d.Name
	}
	idx := map[string]int{}
	for i, nm := range names {
		idx[nm] = i
	}
	n := len(names)
	w := make([][]float64, n)
	for i := range w {
		w[i] = make([]float64, n)
		for j := range w[i] {
			w[i][j] = math.Inf(1)
		}
	}
	for _, l := range links {
		w[idx[l.From]][idx[l.To]] = float64(l.Delay) / float64(time.Millisecond)
	}
	required := 1 << idx[origin]
	for _, s := range subs {
		required |= 1 << idx[s]
	}
	best := math.Inf(1)
	for set := 0; set < 1<<n; set++ {
		if set&required != required {
			continue
		}
		if c := mst(w, set); c < best {
			best = c
		}
	}
	return best
}

// mst returns the cost of a minimum spanning tree of the datacenters in
// set (Prim), or +Inf when they are not connected among themselves.
func mst(w [][]float64, set int) float64 {
	n := len(w)
	in := make([]bool, n)
	first := -1
	count := 0
	for i := range n {
		if set&(1<<i) != 0 {
			count++
			if first < 0 {
				first = i
			}
		}
	}
	in[first] = true
	total := 0.0
	for range count - 1 {
		bu, bd := -1, math.Inf(1)
		for u := range n {
			if !in[u] {
				continue
			}
			for v := range n {
				if set&(1<<v) != 0 && !in[v] && w[u][v] < bd {
					bu, bd = v, w[u][v]
				}
			}
		}
		if bu < 0 {
			return math.Inf(1)
		}
		in[bu] = true
		total += bd
	}
	return total
}

func TestTreesAgainstOptimum(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	var ratios []float64
	for trial := range 300 {
		n := 3 + r.IntN(6) // 3 to 8 datacenters
		dcList, links := randomGraph(r, n, 0.5, 0)
		origin := dcList[r.IntN(n)].Name
		var subs []string
		for _, d := range dcList {
			if d.Name != origin && r.Float64() < 0.5 {
				subs = append(subs, d.Name)
			}
		}
		if len(subs) == 0 {
			continue
		}
		tr := Compute(Problem{Datacenters: dcList, Links: links, Streams: []StreamDemand{
			{Name: "s", Origin: origin, BitrateKbps: 1000, Subscribers: subs}}},
			Params{DelayBound: time.Hour, MaxChildren: 100})[0]
		if len(tr.Unreached) > 0 {
			t.Fatalf("trial %d: unreached %v on a connected graph", trial, tr.Unreached)
		}
		checkTree(t, tr, subs)
		opt := optimum(dcList, links, origin, subs)
		ratio := tr.Cost / opt
		if ratio > 2+1e-9 {
			t.Errorf("trial %d: tree cost %.1f is %.2f× the optimum %.1f", trial, tr.Cost, ratio, opt)
		}
		if ratio < 1-1e-9 {
			t.Fatalf("trial %d: tree cost %.1f below the optimum %.1f: the brute force is wrong", trial, tr.Cost, opt)
		}
		ratios = append(ratios, ratio)
	}
	sort.Float64s(ratios)
	median, worst := ratios[len(ratios)/2], ratios[len(ratios)-1]
	exact := 0
	for _, x := range ratios {
		if x < 1+1e-9 {
			exact++
		}
	}
	t.Logf("%d graphs: median %.3f× the optimum, worst %.3f×, optimal in %d", len(ratios), median, worst, exact)
	if median > 1.05 {
		t.Errorf("median tree cost %.3f× the optimum, want within 5%%", median)
	}
}

// checkTree checks that a tree is a tree: every datacenter reaches the
// origin through parents without a loop, and every subscriber is in it.
func checkTree(t *testing.T, tr *Tree, subs []string) {
	t.Helper()
	for _, s := range subs {
		if s == tr.Origin || slices.Contains(tr.Unreached, s) {
			continue
		}
		if _, ok := tr.Parent[s]; !ok {
			t.Fatalf("subscriber %s not in the tree %v", s, tr.Edges())
		}
	}
	for v := range tr.Parent {
		seen := map[string]bool{}
		for u := v; u != tr.Origin; u = tr.Parent[u] {
			if seen[u] {
				t.Fatalf("loop through %s in %v", u, tr.Edges())
			}
			seen[u] = true
			if _, ok := tr.Parent[u]; !ok {
				t.Fatalf("%s does not reach the origin %s in %v", v, tr.Origin, tr.Edges())
			}
		}
	}
}

func TestCapacityNeverExceeded(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for trial := range 50 {
		n := 4 + r.IntN(5)
		dcList, links := randomGraph(r, n, 0.4, 10000)
		for i := range links {
			links[i].CommittedKbps = r.Float64() * 3000
		}
		var streams []StreamDemand
		for i := range 40 {
			s := StreamDemand{Name: fmt.Sprintf("s%02d", i), Origin: dcList[r.IntN(n)].Name, BitrateKbps: 500 + r.Float64()*2500}
			for _, d := range dcList {
				if r.Float64() < 0.4 {
					s.Subscribers = append(s.Subscribers, d.Name)
				}
			}
			streams = append(streams, s)
		}
		params := Params{Headroom: 0.1, MaxChildren: 3}
		trees := Compute(Problem{Datacenters: dcList, Links: links, Streams: streams}, params)
		load := map[[2]string]float64{}
		reached := 0
		for i, tr := range trees {
			checkTree(t, tr, streams[i].Subscribers)
			children := map[string]int{}
			for c, p := range tr.Parent {
				load[[2]string{p, c}] += streams[i].BitrateKbps
				children[p]++
			}
			for p, k := range children {
				if k > params.MaxChildren {
					t.Fatalf("trial %d: %s feeds %d datacenters in %s's tree, cap %d", trial, p, k, tr.Stream, params.MaxChildren)
				}
			}
			reached += len(tr.Delay)
		}
		for _, l := range links {
			limit := l.CapacityKbps*0.9 - l.CommittedKbps
			if got := load[[2]string{l.From, l.To}]; got > limit+1e-6 {
				t.Fatalf("trial %d: link %s→%s carries %.0f kbps, limit %.0f", trial, l.From, l.To, got, limit)
			}
		}
		if reached == 0 {
			t.Fatalf("trial %d: nothing reached", trial)
		}
	}
}

func TestDelayBound(t *testing.T) {
	// a–b–c is cheap but slow (2 × 60 ms); a–c direct is 100 ms. With
	// subscribers b and c the Steiner tree is a→b→c (cost 120, c at
	// 120 ms); a bound of 110 ms forces c onto the direct link.
	var links []Link
	links = append(links, sym("a", "b", ms(60), 0)...)
	links = append(links, sym("b", "c", ms(60), 0)...)
	links = append(links, sym("a", "c", ms(100), 0)...)
	demand := []StreamDemand{{Name: "x", Origin: "a", BitrateKbps: 1000, Subscribers: []string{"b", "c"}}}
	loose := Compute(Problem{Datacenters: dcs("a", "b", "c"), Links: links, Streams: demand}, Params{DelayBound: time.Second})[0]
	if got := fmt.Sprint(loose.Edges()); got != "[[a b] [b c]]" {
		t.Fatalf("loose bound: %s, want a→b→c", got)
	}
	tight := Compute(Problem{Datacenters: dcs("a", "b", "c"), Links: links, Streams: demand}, Params{DelayBound: ms(110)})[0]
	if got := fmt.Sprint(tight.Edges()); got != "[[a b] [a c]]" {
		t.Fatalf("110 ms bound: %s, want a→b and a→c", got)
	}
	if len(tight.OverBound) != 0 {
		t.Errorf("over bound: %v", tight.OverBound)
	}
	impossible := Compute(Problem{Datacenters: dcs("a", "b", "c"), Links: links, Streams: demand}, Params{DelayBound: ms(50)})[0]
	if fmt.Sprint(impossible.OverBound) != "[b c]" || len(impossible.Unreached) != 0 {
		t.Errorf("50 ms bound: over %v unreached %v, want b and c reached late", impossible.OverBound, impossible.Unreached)
	}
}

func TestDeterministic(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	dcList, links := randomGraph(r, 8, 0.6, 50000)
	// Equal delays everywhere make ties the rule, not the exception.
	for i := range links {
		links[i].Delay = ms(10)
	}
	var streams []StreamDemand
	for i := range 20 {
		streams = append(streams, StreamDemand{Name: fmt.Sprint("s", i), Origin: dcList[i%8].Name, BitrateKbps: 1000,
			Subscribers: []string{dcList[(i+3)%8].Name, dcList[(i+5)%8].Name, dcList[(i+6)%8].Name}})
	}
	first := Compute(Problem{Datacenters: dcList, Links: links, Streams: streams}, Params{})
	for range 5 {
		r.Shuffle(len(links), func(i, j int) { links[i], links[j] = links[j], links[i] })
		r.Shuffle(len(dcList), func(i, j int) { dcList[i], dcList[j] = dcList[j], dcList[i] })
		again := Compute(Problem{Datacenters: dcList, Links: links, Streams: streams}, Params{})
		if !reflect.DeepEqual(first, again) {
			t.Fatal("the same input in another order gave other trees")
		}
	}
}

func TestHysteresis(t *testing.T) {
	// Two ways from a to d: via b (10 ms) and via c (10.5 ms).
	links := func(viaB, viaC float64) []Link {
		var l []Link
		l = append(l, sym("a", "b", ms(viaB/2), 0)...)
		l = append(l, sym("b", "d", ms(viaB/2), 0)...)
		l = append(l, sym("a", "c", ms(viaC/2), 0)...)
		l = append(l, sym("c", "d", ms(viaC/2), 0)...)
		return l
	}
	demand := []StreamDemand{{Name: "x", Origin: "a", BitrateKbps: 1000, Subscribers: []string{"d"}}}
	tr := Compute(Problem{Datacenters: dcs("a", "b", "c", "d"), Links: links(10, 10.5), Streams: demand}, Params{})[0]
	if fmt.Sprint(tr.Edges()) != "[[a b] [b d]]" {
		t.Fatalf("first tree %v, want via b", tr.Edges())
	}
	// Measurement noise: c becomes 5 % faster than b. The tree stays.
	noisy := Compute(Problem{Datacenters: dcs("a", "b", "c", "d"), Links: links(10, 9.5), Streams: demand,
		Previous: map[string]*Tree{"x": tr}}, Params{Margin: 0.1})[0]
	if fmt.Sprint(noisy.Edges()) != "[[a b] [b d]]" {
		t.Errorf("5%% noise moved the tree to %v", noisy.Edges())
	}
	// c becomes 40 % faster: the tree moves.
	better := Compute(Problem{Datacenters: dcs("a", "b", "c", "d"), Links: links(10, 6), Streams: demand,
		Previous: map[string]*Tree{"x": tr}}, Params{Margin: 0.1})[0]
	if fmt.Sprint(better.Edges()) != "[[a c] [c d]]" {
		t.Errorf("a 40%% better path did not move the tree: %v", better.Edges())
	}
	// A tree in use via c, b now 5 % faster, and a new subscriber e
	// (linked to d): e joins the tree in use, which does not move.
	viaC := Compute(Problem{Datacenters: dcs("a", "b", "c", "d"), Links: links(10.5, 10), Streams: demand}, Params{})[0]
	if fmt.Sprint(viaC.Edges()) != "[[a c] [c d]]" {
		t.Fatalf("tree %v, want via c", viaC.Edges())
	}
	demand[0].Subscribers = []string{"d", "e"}
	grown := Compute(Problem{Datacenters: dcs("a", "b", "c", "d", "e"), Links: append(links(10, 10.5), sym("d", "e", ms(3), 0)...),
		Streams: demand, Previous: map[string]*Tree{"x": viaC}}, Params{})[0]
	if fmt.Sprint(grown.Edges()) != "[[a c] [c d] [d e]]" {
		t.Errorf("grown tree %v, want the tree in use (via c) with e added", grown.Edges())
	}
}

func TestBackupsValid(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	withBackup, total := 0, 0
	for trial := range 200 {
		n := 4 + r.IntN(5)
		dcList, links := randomGraph(r, n, 0.5, 0)
		origin := dcList[r.IntN(n)].Name
		var subs []string
		for _, d := range dcList {
			if d.Name != origin && r.Float64() < 0.6 {
				subs = append(subs, d.Name)
			}
		}
		tr := Compute(Problem{Datacenters: dcList, Links: links, Streams: []StreamDemand{
			{Name: "s", Origin: origin, BitrateKbps: 1000, Subscribers: subs}}}, Params{})[0]
		linked := map[[2]string]bool{}
		for _, l := range links {
			linked[[2]string{l.From, l.To}] = true
		}
		for v, b := range tr.Backup {
			p := tr.Parent[v]
			if b == p || b == v {
				t.Fatalf("trial %d: backup of %s is %s (parent %s)", trial, v, b, p)
			}
			if !linked[[2]string{b, v}] {
				t.Fatalf("trial %d: backup %s of %s has no link to it", trial, b, v)
			}
			// The backup must not get the stream through v, nor through
			// v's parent (unless that is the origin).
			if _, inTree := tr.Parent[b]; inTree {
				for u := b; u != tr.Origin; u = tr.Parent[u] {
					if u == v || u == p && p != tr.Origin {
						t.Fatalf("trial %d: backup %s of %s is fed through %s", trial, b, v, u)
					}
				}
			}
		}
		total += len(tr.Parent)
		withBackup += len(tr.Backup)
	}
	t.Logf("%d of %d tree datacenters have a backup parent", withBackup, total)
	if withBackup*2 < total {
		t.Errorf("only %d of %d datacenters have a backup on graphs of density 0.5", withBackup, total)
	}
}

// benchProblem is 100 datacenters in a full mesh with delays of 1–150 ms
// and 10,000 streams of 1–8 subscribers each.
func benchProblem() Problem {
	r := rand.New(rand.NewPCG(9, 10))
	const n = 100
	var p Problem
	for i := range n {
		p.Datacenters = append(p.Datacenters, Datacenter{Name: fmt.Sprintf("dc%03d", i)})
	}
	for i := range n {
		for j := i + 1; j < n; j++ {
			p.Links = append(p.Links, sym(p.Datacenters[i].Name, p.Datacenters[j].Name, ms(1+r.Float64()*149), 10e6)...)
		}
	}
	for i := range 10000 {
		s := StreamDemand{Name: fmt.Sprintf("s%05d", i), Origin: p.Datacenters[r.IntN(n)].Name, BitrateKbps: 1000 + r.Float64()*5000}
		for range 1 + r.IntN(8) {
			s.Subscribers = append(s.Subscribers, p.Datacenters[r.IntN(n)].Name)
		}
		p.Streams = append(p.Streams, s)
	}
	return p
}

// BenchmarkFullRecompute places every stream afresh (the manager's global
// loop). Besides wall time it reports the process's CPU time per run, which a
// busy shared machine distorts less (goal: 200 ms).
func BenchmarkFullRecompute(b *testing.B) {
	p := benchProblem()
	start := cpuTime()
	b.ResetTimer()
	for b.Loop() {
		Compute(p, Params{})
	}
	b.ReportMetric(float64((cpuTime()-start)/time.Millisecond)/float64(b.N), "cpu-ms/op")
	b.ReportMetric(float64(len(p.Streams)), "streams")
}

// cpuTime is the CPU time this process has used, user and system.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func BenchmarkSubscriptionChange(b *testing.B) {
	p := benchProblem()
	pl := NewPlanner(p.Datacenters, p.Links, Params{})
	trees := make([]*Tree, len(p.Streams))
	for i := range p.Streams {
		trees[i] = pl.Place(&p.Streams[i], nil)
	}
	s := &p.Streams[42]
	b.ResetTimer()
	joiner := "dc099"
	for b.Loop() {
		// One datacenter joins the stream's audience, or leaves it again.
		if j := slices.Index(s.Subscribers, joiner); j >= 0 {
			s.Subscribers = slices.Delete(s.Subscribers, j, j+1)
		} else {
			s.Subscribers = append(s.Subscribers, joiner)
		}
		pl.Release(trees[42], s.BitrateKbps)
		trees[42] = pl.Place(s, trees[42])
	}
}

// BenchmarkSteadyRecompute is the manager's recompute after a measurement
// round when nothing moved much: every stream placed again with its tree in
// use as the previous tree, kept unless a new one is better by the margin.
func BenchmarkSteadyRecompute(b *testing.B) {
	p := benchProblem()
	trees := Compute(p, Params{})
	p.Previous = make(map[string]*Tree, len(trees))
	for _, t := range trees {
		// The manager passes what the route holds: origin and parents.
		p.Previous[t.Stream] = &Tree{Stream: t.Stream, Origin: t.Origin, Parent: t.Parent}
	}
	start := cpuTime()
	b.ResetTimer()
	for b.Loop() {
		Compute(p, Params{})
	}
	b.ReportMetric(float64((cpuTime()-start)/time.Millisecond)/float64(b.N), "cpu-ms/op")
}
