package node

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/etcdembed"
	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/relay"
	"github.com/stemflow/stemflow/topology/store"
)

// startEtcd starts one embedded etcd member for the test and opens a store
// on it under the test's own prefix.
func startEtcd(t *testing.T) *store.Store {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(30*time.Second))
	defer cancel()
	srv, err := etcdembed.StartFree(ctx, "127.0.0.1", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	s, err := store.Open(store.Config{Endpoints: []string{srv.ClientURL()}, Prefix: "/" + t.Name() + "/"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// fakeLocal is a node's own view: its links and the streams it knows.
type fakeLocal struct {
	links   func() []relay.LinkStats
	streams func() []relay.StreamInfo
}

func (f fakeLocal) Links() []relay.LinkStats    { return f.links() }
func (f fakeLocal) Streams() []relay.StreamInfo { return f.streams() }

// dLocal is datacenter d's own view in the tests: a link to b (RTT 4.9 ms,
// 10 of 1000 packets from b lost) and stream x arriving a → b → d.
var dLocal = fakeLocal{
	links: func() []relay.LinkStats {
		return []relay.LinkStats{{Peer: "b", RTT: 4900 * time.Microsecond, PacketsReceived: 990, HopLost: 10}}
	},
	streams: func() []relay.StreamInfo {
		return []relay.StreamInfo{{Name: "x", Origin: "a", Local: true, Hops: []string{"a", "b", "d"}}}
	},
}

// getTopology serves one GET /api/v1/topology and decodes it into generic
// maps, the keys a client sees.
func getTopology(t *testing.T, h http.Handler) (map[string]any, time.Duration) {
	t.Helper()
	srv := httptest.NewServer(h)
	defer srv.Close()
	start := time.Now()
	resp, err := http.Get(srv.URL + "/api/v1/topology")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	took := time.Since(start)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("GET /api/v1/topology: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	var v map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		t.Fatal(err)
	}
	return v, took
}

// wantJSON decodes a JSON literal the way getTopology decodes the answer.
func wantJSON(t *testing.T, s string) map[string]any {
	t.Helper()
	var v map[string]any
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("the test's expected JSON: %v", err)
	}
	return v
}

func diffJSON(t *testing.T, got, want map[string]any) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		g, _ := json.MarshalIndent(got, "", "  ")
		w, _ := json.MarshalIndent(want, "", "  ")
		t.Fatalf("GET /api/v1/topology:\n%s\nwant:\n%s", g, w)
	}
}

// TestTopologyFromEtcd writes the control plane's state to a real etcd the
// way nodes and the manager do (registrations, measured links, a route, an
// election) and checks the whole answer: every datacenter with its nodes and
// whether it is up (c has links but no registration: down), the links with
// how many trees load them, the tree's edges from the origin outwards with
// each hop's measured delay, its backups, and the leader.
func TestTopologyFromEtcd(t *testing.T) {
	testutil.Watchdog(t, 60*time.Second)
	s := startEtcd(t)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(20*time.Second))
	defer cancel()

	reg := map[string]*store.Registration{}
	for _, dc := range []string{"a", "b", "d"} {
		r, err := s.RegisterNode(ctx, store.Node{DC: dc, Node: dc + "1"}, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		reg[dc] = r
	}
	updated := time.Date(2026, 12, 1, 23, 0, 0, 0, time.UTC)
	for _, l := range []store.Link{
		{From: "a", To: "b", RTTMs: 5.1, JitterMs: 0.2, BandwidthKbps: 100000},
		{From: "b", To: "d", RTTMs: 4.9, Loss: 0.01, BandwidthKbps: 50000},
		{From: "a", To: "c", RTTMs: 40, BandwidthKbps: 20000},
		{From: "d", To: "c", RTTMs: 40, Down: true}, // configured at d, c is dead
	} {
		l.Updated = updated
		if err := s.PutLink(ctx, reg[l.From], l); err != nil {
			t.Fatal(err)
		}
	}
	// x is published at a at 4 Mbit/s and watched at d; y is published at b
	// and watched nowhere else, so it has no route.
	if err := s.ClaimStream(ctx, reg["a"], "x"); err != nil {
		t.Fatal(err)
	}
	if err := s.SetStreamBitrate(ctx, reg["a"], "x", 4000); err != nil {
		t.Fatal(err)
	}
	if err := s.ClaimStream(ctx, reg["b"], "y"); err != nil {
		t.Fatal(err)
	}
	if err := s.PutRoute(ctx, store.Route{Stream: "x", Version: 3, Origin: "a",
		Parent: map[string]string{"d": "b", "b": "a"}, Backup: map[string]string{"d": "c"}}); err != nil {
		t.Fatal(err)
	}
	cand, err := s.Campaign("a", 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cand.Close)
	testutil.WaitForWithin(t, 10*time.Second, "a's manager to lead", func() bool {
		ok, _ := cand.Leading()
		return ok
	})

	// d also knows y's path by announcement (b → d): without a route, that
	// is y's tree as d answers. z is announced but not in etcd (its origin
	// runs without etcd): d shows its path too.
	local := fakeLocal{links: dLocal.links, streams: func() []relay.StreamInfo {
		return append(dLocal.streams(),
			relay.StreamInfo{Name: "y", Origin: "b", Hops: []string{"b", "d"}},
			relay.StreamInfo{Name: "z", Origin: "b", Hops: []string{"b", "d"}})
	}}
	api := &topologyAPI{dc: "d", source: func() topologySource { return s }, local: local}
	got, _ := getTopology(t, api)
	diffJSON(t, got, wantJSON(t, `{
		"datacenter": "d",
		"source": "etcd",
		"leader": "a",
		"nodes": [
			{"dc": "a", "up": true, "nodes": ["a1"]},
			{"dc": "b", "up": true, "nodes": ["b1"]},
			{"dc": "c", "up": false, "nodes": []},
			{"dc": "d", "up": true, "nodes": ["d1"]}
		],
		"links": [
			{"from": "a", "to": "b", "rtt_ms": 5.1, "jitter_ms": 0.2, "loss": 0, "bandwidth_kbps": 100000, "down": false, "streams": 1, "load_kbps": 4000, "updated": "2026-12-01T23:00:00Z"},
			{"from": "a", "to": "c", "rtt_ms": 40, "jitter_ms": 0, "loss": 0, "bandwidth_kbps": 20000, "down": false, "streams": 0, "load_kbps": 0, "updated": "2026-12-01T23:00:00Z"},
			{"from": "b", "to": "d", "rtt_ms": 4.9, "jitter_ms": 0, "loss": 0.01, "bandwidth_kbps": 50000, "down": false, "streams": 3, "load_kbps": 4000, "updated": "2026-12-01T23:00:00Z"},
			{"from": "d", "to": "c", "rtt_ms": 40, "jitter_ms": 0, "loss": 0, "bandwidth_kbps": 0, "down": true, "streams": 0, "load_kbps": 0, "updated": "2026-12-01T23:00:00Z"}
		],
		"trees": [
			{"stream": "x", "origin": "a", "version": 3, "bitrate_kbps": 4000,
			 "edges": [
				{"from": "a", "to": "b", "rtt_ms": 5.1, "delay_ms": 2.55},
				{"from": "b", "to": "d", "rtt_ms": 4.9, "delay_ms": 2.45}
			 ],
			 "backup": {"d": "c"}},
			{"stream": "y", "origin": "b", "version": 0, "bitrate_kbps": 0,
			 "edges": [{"from": "b", "to": "d", "rtt_ms": 4.9, "delay_ms": 2.45}], "backup": {}},
			{"stream": "z", "origin": "b", "version": 0, "bitrate_kbps": 0,
			 "edges": [{"from": "b", "to": "d", "rtt_ms": 4.9, "delay_ms": 2.45}], "backup": {}}
		]
	}`))

	// The leader resigns: no manager leads, the routes stay.
	cand.Close()
	testutil.WaitForWithin(t, 10*time.Second, "no manager to lead", func() bool {
		l, err := s.Leader(ctx)
		return err == nil && l == ""
	})
	got, _ = getTopology(t, api)
	if got["leader"] != "" || len(got["trees"].([]any)) != 3 {
		t.Fatalf("with no manager: leader %q, trees %v; want leader \"\" and x's tree kept", got["leader"], got["trees"])
	}
}

// TestTopologyLocal: a node without etcd answers with what it knows by
// itself, and says so.
func TestTopologyLocal(t *testing.T) {
	got, _ := getTopology(t, &topologyAPI{dc: "d", local: dLocal})
	diffJSON(t, got, wantLocalD)
}

// TestTopologyLocalMeasured: a node that measures its links shows its own
// smoothed figures for the outgoing direction.
func TestTopologyLocalMeasured(t *testing.T) {
	upd := time.Date(2026, 12, 1, 23, 30, 0, 0, time.UTC)
	got, _ := getTopology(t, &topologyAPI{dc: "d", local: dLocal, measured: func() []store.Link {
		return []store.Link{{From: "d", To: "b", RTTMs: 5, JitterMs: 0.3, Loss: 0.002, BandwidthKbps: 80000, Updated: upd}}
	}})
	want := wantJSON(t, mustJSON(t, wantLocalD))
	want["links"].([]any)[1] = map[string]any{"from": "d", "to": "b", "rtt_ms": 5.0, "jitter_ms": 0.3, "loss": 0.002,
		"bandwidth_kbps": 80000.0, "down": false, "streams": 0.0, "load_kbps": 0.0, "updated": "2026-12-01T23:30:00Z"}
	diffJSON(t, got, want)
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// wantLocalD is d's own view (dLocal): the link to b both ways, loss as it
// arrives from b, and x's path to d with the delay of the one hop d
// measures.
var wantLocalD = map[string]any{}

func init() {
	if err := json.Unmarshal([]byte(`{
		"datacenter": "d",
		"source": "local",
		"leader": "",
		"nodes": [
			{"dc": "a", "up": true, "nodes": []},
			{"dc": "b", "up": true, "nodes": []},
			{"dc": "d", "up": true, "nodes": []}
		],
		"links": [
			{"from": "b", "to": "d", "rtt_ms": 4.9, "jitter_ms": 0, "loss": 0.01, "bandwidth_kbps": 0, "down": false, "streams": 1, "load_kbps": 0},
			{"from": "d", "to": "b", "rtt_ms": 4.9, "jitter_ms": 0, "loss": 0, "bandwidth_kbps": 0, "down": false, "streams": 0, "load_kbps": 0}
		],
		"trees": [
			{"stream": "x", "origin": "a", "version": 0, "bitrate_kbps": 0,
			 "edges": [
				{"from": "a", "to": "b", "rtt_ms": null, "delay_ms": null},
				{"from": "b", "to": "d", "rtt_ms": 4.9, "delay_ms": 2.45}
			 ],
			 "backup": {}}
		]
	}`), &wantLocalD); err != nil {
		panic(err)
	}
}

// TestTopologyEtcdUnreachable: a node whose etcd does not answer still
// answers 200 within about the read timeout, with its local view and a
// message saying what is wrong and what to check.
func TestTopologyEtcdUnreachable(t *testing.T) {
	testutil.CheckLeaks(t)
	// Nothing listens on this port (below the ephemeral range: no other
	// test's listen on port 0 takes it meanwhile).
	s, err := store.Open(store.Config{Endpoints: []string{fmt.Sprintf("http://127.0.0.1:%d", portNobodyPicks(t))}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	got, took := getTopology(t, &topologyAPI{dc: "d", source: func() topologySource { return s }, local: dLocal})
	msg, _ := got["etcd_error"].(string)
	t.Logf("answered in %v: etcd_error %q", took.Round(time.Millisecond), msg)
	if !strings.Contains(msg, "etcd did not answer within 1s") || !strings.Contains(msg, "check that etcd runs") {
		t.Errorf("etcd_error %q: want it to say etcd did not answer and what to check", msg)
	}
	delete(got, "etcd_error")
	diffJSON(t, got, wantLocalD)
}

// TestTopologyEtcdBadValue: a value in etcd that does not decode makes the
// node fall back to its local view, naming the key.
func TestTopologyEtcdBadValue(t *testing.T) {
	testutil.Watchdog(t, 60*time.Second)
	s := startEtcd(t)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(10*time.Second))
	defer cancel()
	if _, err := s.Client().Put(ctx, s.RouteKey("x"), "{not json"); err != nil {
		t.Fatal(err)
	}
	got, _ := getTopology(t, &topologyAPI{dc: "d", source: func() topologySource { return s }, local: dLocal})
	msg, _ := got["etcd_error"].(string)
	if !strings.Contains(msg, s.RouteKey("x")) || !strings.Contains(msg, "holds no valid value") {
		t.Errorf("etcd_error %q: want it to name the key %s that holds no valid value", msg, s.RouteKey("x"))
	}
	delete(got, "etcd_error")
	diffJSON(t, got, wantLocalD)
}

// TestTopologyTreeEdgeOrder: edges run from the origin outwards, children
// by name, whatever order the route's map has; edges cut off from the
// origin (a route half rewritten) come last.
func TestTopologyTreeEdgeOrder(t *testing.T) {
	got := treeEdges("a", map[string]string{"e": "d", "d": "b", "c": "a", "b": "a", "y": "x"})
	want := [][2]string{{"a", "b"}, {"a", "c"}, {"b", "d"}, {"d", "e"}, {"x", "y"}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("edges %v, want %v", got, want)
	}
}

// TestNodeTopologyAPI asks a real node without etcd: b knows its link to a
// and the path of a stream published at a.
func TestNodeTopologyAPI(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	a, b := startPair(t)
	publish(t, a, "x")
	testutil.WaitFor(t, "b to know x", func() bool { return len(b.Hub().Streams()) == 1 })
	got := getJSON(t, b, "/api/v1/topology")
	if got["datacenter"] != "b" || got["source"] != "local" || got["leader"] != "" {
		t.Fatalf("datacenter %v, source %v, leader %v: want b, local, \"\"", got["datacenter"], got["source"], got["leader"])
	}
	links := got["links"].([]any)
	if len(links) != 2 {
		t.Fatalf("links %v: want a→b and b→a", links)
	}
	for _, l := range links {
		l := l.(map[string]any)
		if rtt, _ := l["rtt_ms"].(float64); rtt <= 0 {
			t.Errorf("link %v→%v has no measured RTT: %v", l["from"], l["to"], l)
		}
	}
	trees := got["trees"].([]any)
	if len(trees) != 1 {
		t.Fatalf("trees %v: want x's", trees)
	}
	tree := trees[0].(map[string]any)
	edges := tree["edges"].([]any)
	if tree["stream"] != "x" || tree["origin"] != "a" || len(edges) != 1 {
		t.Fatalf("tree %v: want x from a with the edge a→b", tree)
	}
	e := edges[0].(map[string]any)
	if e["from"] != "a" || e["to"] != "b" {
		t.Fatalf("edge %v: want a→b", e)
	}
	rtt, _ := e["rtt_ms"].(float64)
	delay, _ := e["delay_ms"].(float64)
	if rtt <= 0 || delay != rtt/2 {
		t.Errorf("edge a→b: rtt_ms %v, delay_ms %v: want a measured RTT and half of it", e["rtt_ms"], e["delay_ms"])
	}
}
