package node

import (
	"context"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
)

// TestDevTopologyFromEtcd asks a real dev cluster (nodes on the embedded
// etcd, a manager candidate beside each) for its topology: every node
// answers from etcd, with the three datacenters registered, the leading
// manager, the links the nodes measured, and — once c wants x, published at
// a — x's route as a tree that ends at c with each hop's measured delay.
// When b stops, its lease goes and the topology shows it down.
func TestDevTopologyFromEtcd(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 90*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(30*time.Second))
	defer cancel()
	c, err := StartDev(ctx, DevConfig{DCs: []string{"a", "b", "c"}, FreePorts: true, Logger: testutil.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	a, b, cc := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	publish(t, a, "x")
	release := cc.Hub().Want("x")
	t.Cleanup(release)

	var last map[string]any
	ready := func() bool {
		last = getJSON(t, cc, "/api/v1/topology")
		if last["source"] != "etcd" || last["leader"] == "" {
			return false
		}
		up := map[string]bool{}
		for _, n := range last["nodes"].([]any) {
			n := n.(map[string]any)
			if n["up"] == true && len(n["nodes"].([]any)) == 1 {
				up[n["dc"].(string)] = true
			}
		}
		if !up["a"] || !up["b"] || !up["c"] {
			return false
		}
		measured := 0
		for _, l := range last["links"].([]any) {
			if rtt, _ := l.(map[string]any)["rtt_ms"].(float64); rtt > 0 {
				measured++
			}
		}
		if measured < 6 { // a full mesh of three: six directions
			return false
		}
		for _, tr := range last["trees"].([]any) {
			tr := tr.(map[string]any)
			edges := tr["edges"].([]any)
			if tr["stream"] != "x" || tr["version"].(float64) < 1 || len(edges) == 0 {
				continue
			}
			for _, e := range edges {
				if e.(map[string]any)["delay_ms"] == nil {
					return false
				}
			}
			return edges[len(edges)-1].(map[string]any)["to"] == "c"
		}
		return false
	}
	deadline := time.Now().Add(testutil.Scale(20 * time.Second))
	for !ready() {
		if time.Now().After(deadline) {
			t.Fatalf("c's /api/v1/topology did not show the etcd view with x's tree to c: last answer %v", last)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("c's topology: leader %v, trees %v", last["leader"], last["trees"])
	// Every node answers the same control plane.
	for _, n := range []*Node{a, b} {
		if got := getJSON(t, n, "/api/v1/topology"); got["source"] != "etcd" || got["leader"] != last["leader"] {
			t.Errorf("%s answers source %v, leader %v; want etcd and %v", got["datacenter"], got["source"], got["leader"], last["leader"])
		}
	}

	// b stops: its registration goes with it, and b shows down.
	b.Close()
	c.Nodes[1] = nil // closed: the cluster's Close skips it
	deadline = time.Now().Add(testutil.Scale(15 * time.Second))
	for {
		got := getJSON(t, cc, "/api/v1/topology")
		down := false
		for _, n := range got["nodes"].([]any) {
			n := n.(map[string]any)
			if n["dc"] == "b" && n["up"] == false {
				down = true
			}
		}
		if down || got["source"] == "etcd" && !hasDC(got, "b") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after b stopped, c's topology still shows b up: %v", got["nodes"])
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func hasDC(topo map[string]any, dc string) bool {
	for _, n := range topo["nodes"].([]any) {
		if n.(map[string]any)["dc"] == dc {
			return true
		}
	}
	return false
}
