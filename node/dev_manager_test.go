package node

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/topology/store"
)

// TestDevManager: `stemflow dev` links every pair of datacenters and runs a
// manager candidate beside each node: one leads, and a viewer at c gets the
// stream from a along the tree the manager wrote (the direct link: the
// mesh is unimpaired).
func TestDevManager(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(20*time.Second))
	defer cancel()
	c, err := StartDev(ctx, DevConfig{DCs: []string{"a", "b", "c"}, FreePorts: true, Logger: testutil.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	for i, n := range c.Nodes {
		if got := linksUp(n); len(got) != 2 {
			t.Errorf("datacenter %s links to %v, want the two others (a full mesh)", c.Datacenters()[i], got)
		}
	}
	s, err := store.Open(store.Config{Endpoints: []string{c.EtcdURL()}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// The election key shows in etcd a moment before its candidate
	// learns it leads: wait for both.
	var leader string
	leading := 0
	testutil.WaitFor(t, "one manager to lead", func() bool {
		leader, _ = s.Leader(ctx)
		leading = 0
		for _, n := range c.Nodes {
			st, ok := n.Manager()
			if !ok {
				t.Fatalf("datacenter %s runs no manager", n.cfg.Datacenter)
			}
			if st.Leading {
				leading++
			}
		}
		return leader != "" && leading > 0
	})
	if !slices.Contains(c.Datacenters(), leader) || leading != 1 {
		t.Errorf("leader %q, %d managers leading; want one of %v", leader, leading, c.Datacenters())
	}
	publish(t, c.Nodes[0], "x")
	v := watch(t, c.Nodes[2], "x")
	v.flowing(t, "packets at c", 100)
	testutil.WaitFor(t, "the manager's route of x to c", func() bool {
		rt, ok, err := s.GetRoute(ctx, "x")
		return err == nil && ok && rt.Origin == "a" && rt.Parent["c"] == "a"
	})
}
