package node

import (
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
)

// TestLabEtcdGone: the lab's etcd stops while a stream flows along the
// manager's route: the stream goes on, the node keeps the route (its
// parent stays the one the manager chose), and a new viewer in another
// datacenter gets the stream by announcement.
func TestLabEtcdGone(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 90*time.Second)
	l := startLab(t, "datacenters: [a, b, c]\nlinks:\n  - {between: [a, c], delay: 100ms}\n")
	s := labStore(t, l)
	publish(t, l.Node("a"), "x")
	v := watch(t, l.Node("c"), "x")
	v.flowing(t, "packets at c", 100)
	// The manager routes c's stream through b (0 ms + 0 ms beats 100 ms),
	// and c follows the route: the test's read of etcd can see the route
	// before c's watch delivers it, and a route c never got is no route
	// it kept when etcd went.
	waitTree(t, s, l, "x", "c", "[a b c]")
	l.closeEtcd()
	stopped := time.Now()
	v.flowing(t, "packets at c with etcd gone", 200)
	time.Sleep(testutil.Scale(time.Second))
	if parent, _, ok := l.Node("c").Hub().Upstream("x"); !ok || parent != "b" {
		t.Errorf("with etcd gone c takes x from %q (ok %v), want b, the manager's last route", parent, ok)
	}
	v2 := watch(t, l.Node("b"), "x")
	v2.flowing(t, "packets at b for a new viewer with etcd gone", 100)
	t.Logf("etcd gone for %v: the stream flowed on, a new viewer at b got it", time.Since(stopped).Round(100*time.Millisecond))
}
