package node

import (
	"context"
	"fmt"
	"sort"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/topology/store"
)

// routeOf reads a stream's route from etcd.
func routeOf(s *store.Store, stream string) (store.Route, bool) {
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(2*time.Second))
	defer cancel()
	rt, ok, err := s.GetRoute(ctx, stream)
	return rt, ok && err == nil
}

// nodesUp lists the datacenters registered in etcd.
func nodesUp(s *store.Store) string {
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(2*time.Second))
	defer cancel()
	nodes, err := s.ListNodes(ctx)
	if err != nil {
		return "error: " + err.Error()
	}
	var dcs []string
	for _, n := range nodes {
		dcs = append(dcs, n.DC)
	}
	sort.Strings(dcs)
	return fmt.Sprint(dcs)
}

// treePath returns the path the route takes from the origin to dc, e.g.
// "[a b d]", or what is missing.
func treePath(rt store.Route, dc string) string {
	path := []string{dc}
	for cur := dc; cur != rt.Origin; {
		p, ok := rt.Parent[cur]
		if !ok || len(path) > 10 {
			return fmt.Sprintf("no path (%v)", rt.Parent)
		}
		path = append([]string{p}, path...)
		cur = p
	}
	return fmt.Sprint(path)
}

// waitTree waits until the manager's route for stream reaches dc along
// want and dc's stream takes that path; on failure it says what etcd and
// the stream had.
func waitTree(t *testing.T, s *store.Store, l *Lab, stream, dc, want string) store.Route {
	t.Helper()
	var rt store.Route
	var hops string
	deadline := time.Now().Add(testutil.Scale(30 * time.Second))
	for {
		var ok bool
		rt, ok = routeOf(s, stream)
		hops = "none (datacenter down)"
		if n := l.Node(dc); n != nil {
			hops = hopsAt(n, stream)
		}
		if ok && treePath(rt, dc) == want && hops == want {
			return rt
		}
		if time.Now().After(deadline) {
			t.Fatalf("the tree of %s to %s is not %s: etcd has route v%d %v (path %s), the stream at %s takes %s",
				stream, dc, want, rt.Version, rt.Parent, treePath(rt, dc), dc, hops)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
