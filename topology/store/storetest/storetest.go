// Package storetest runs one embedded etcd member for the tests of a
// package that uses the store (topology/store, topology/manager).
package storetest

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/etcdembed"
	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/topology/store"
)

// Main is a package's TestMain: it starts one embedded etcd member in a
// temporary directory, sets *endpoint to its client URL, warms it up, runs
// the tests and stops the member. Every test shares the member and keeps
// its keys under a prefix of its own.
func Main(m *testing.M, endpoint *string) {
	dir, err := os.MkdirTemp("", "stemflow-etcd-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(60*time.Second))
	srv, err := etcdembed.StartFree(ctx, "127.0.0.1", dir)
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "starting embedded etcd:", err)
		os.Exit(1)
	}
	*endpoint = srv.ClientURL()
	if err := warmUp(*endpoint); err != nil {
		fmt.Fprintln(os.Stderr, "warming up embedded etcd:", err)
		os.Exit(1)
	}
	code := m.Run()
	srv.Close()
	os.RemoveAll(dir)
	os.Exit(code)
}

// warmUp runs what the tests do once (a lease and its keepalives, a client
// that dies, a watch), so that the server's lazily started goroutines do not
// count as the first test's leak.
func warmUp(endpoint string) error {
	s, err := store.Open(store.Config{Endpoints: []string{endpoint}, Prefix: "/warmup/"})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(10*time.Second))
	defer cancel()
	if _, err := s.RegisterNode(ctx, store.Node{DC: "w", Node: "w1"}, time.Second); err != nil {
		return err
	}
	wctx, stop := context.WithCancel(ctx)
	<-s.WatchTopology(wctx)
	stop()
	s.Close()
	time.Sleep(time.Second)
	return nil
}
