package node

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/topology/store"
)

// TestLabManagerFailover: the datacenter whose manager leads is killed; a
// standby leads within the election's lease TTL, and a new viewer in
// another datacenter gets the stream along a tree the new leader computed.
func TestLabManagerFailover(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 120*time.Second)
	l := startLab(t, "datacenters: [a, b, c]\n")
	s := labStore(t, l)
	var leader string
	testutil.WaitFor(t, "a manager to lead", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		leader, _ = s.Leader(ctx)
		return leader != ""
	})
	// The stream comes from a datacenter other than the leader's, and the
	// new viewer watches at the third.
	var others []string
	for _, dc := range l.Datacenters() {
		if dc != leader {
			others = append(others, dc)
		}
	}
	origin, viewerAt := others[0], others[1]
	publish(t, l.Node(origin), "x")
	testutil.WaitFor(t, "x announced at "+viewerAt, func() bool { return hopsAt(l.Node(viewerAt), "x") != "none" })

	killed := time.Now()
	if code, body := post(t, l.HTTPURL(0)+"/api/v1/lab/dcs/"+leader+"/kill", ""); code != 200 {
		t.Fatalf("POST kill %s: %d %s", leader, code, body)
	}
	var next string
	testutil.WaitForWithin(t, 20*time.Second, "a standby to lead", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		next, _ = s.Leader(ctx)
		return next != "" && next != leader
	})
	took := time.Since(killed)
	t.Logf("manager %s killed: %s leads %v later (election TTL %v)", leader, next, took.Round(10*time.Millisecond), store.DefaultElectionTTL)
	if took > testutil.Scale(store.DefaultElectionTTL+time.Second) {
		t.Errorf("the standby led %v after the leader died, want within the lease TTL %v", took, store.DefaultElectionTTL)
	}
	v := watch(t, l.Node(viewerAt), "x")
	v.flowing(t, "packets at "+viewerAt, 100)
	testutil.WaitFor(t, "subscriptions/x/"+viewerAt, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		dcs, err := s.Subscribers(ctx, "x")
		return err == nil && fmt.Sprint(dcs) == "["+viewerAt+"]"
	})
	testutil.WaitForWithin(t, 20*time.Second, "the new leader's route to "+viewerAt, func() bool {
		rt, ok := routeOf(s, "x")
		return ok && rt.Parent[viewerAt] == origin
	})
}
