package node

import (
	"context"
	"fmt"
	"sort"
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
