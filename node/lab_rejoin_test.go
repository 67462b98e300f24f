package node

import (
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
)

// topologyUp returns what GET /api/v1/topology at url says of each
// datacenter: up or not (absent: not listed).
func topologyUp(t *testing.T, url string) map[string]bool {
	t.Helper()
	resp, err := http.Get(url + "/api/v1/topology")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body struct {
		Source string
		Nodes  []struct {
			DC string
			Up bool
		}
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatal(err)
	}
	up := map[string]bool{}
	for _, n := range body.Nodes {
		up[n.DC] = n.Up
	}
	return up
}

// TestLabNodeRejoin: c relays x from a to b (a–b is slow); c is killed and
// its lease expires: c leaves etcd, the topology API shows it down, and the
// manager's tree no longer crosses it. c is started again: it registers, the
// API shows it up, and the tree crosses it again: b's viewer gets x along
// a→c→b.
func TestLabNodeRejoin(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 120*time.Second)
	l := startLab(t, "datacenters: [a, b, c]\nlinks:\n  - {between: [a, b], delay: 200ms}\n")
	s := labStore(t, l)
	publish(t, l.Node("a"), "x")
	v := watch(t, l.Node("b"), "x")
	v.flowing(t, "packets at b", 100)
	waitTree(t, s, l, "x", "b", "[a c b]")

	killed := time.Now()
	if code, body := post(t, l.HTTPURL(0)+"/api/v1/lab/dcs/c/kill", ""); code != 200 {
		t.Fatalf("POST kill c: %d %s", code, body)
	}
	testutil.WaitForWithin(t, 15*time.Second, "c to leave etcd (its lease expires)", func() bool { return nodesUp(s) == "[a b]" })
	left := time.Since(killed)
	testutil.WaitForWithin(t, 15*time.Second, "a tree to b without c", func() bool {
		rt, ok := routeOf(s, "x")
		_, viaC := rt.Parent["c"]
		return ok && rt.Parent["b"] == "a" && !viaC
	})
	moved := time.Since(killed)
	testutil.WaitFor(t, "the topology API at a to show c down", func() bool { up, ok := topologyUp(t, l.HTTPURL(0))["c"]; return !ok || !up })
	t.Logf("c killed: it left etcd %v later (lease TTL 3 s), the tree went a→b %v after the kill, the topology API showed c down %v after it",
		left.Round(10*time.Millisecond), moved.Round(10*time.Millisecond), time.Since(killed).Round(10*time.Millisecond))

	if code, body := post(t, l.HTTPURL(0)+"/api/v1/lab/dcs/c/start", ""); code != 200 {
		t.Fatalf("POST start c: %d %s", code, body)
	}
	started := time.Now()
	testutil.WaitForWithin(t, 15*time.Second, "c to register again", func() bool { return nodesUp(s) == "[a b c]" })
	testutil.WaitFor(t, "the topology API at a to show c up", func() bool { return topologyUp(t, l.HTTPURL(0))["c"] })
	v2 := watch(t, l.Node("b"), "x")
	waitTree(t, s, l, "x", "b", "[a c b]")
	v2.flowing(t, "packets at b along a→c→b after c's restart", 100)
	t.Logf("c started again: registered, and b takes x through it %v later", time.Since(started).Round(10*time.Millisecond))
}
