package node

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/topology/store"
)

// TestDevEtcd: the dev cluster embeds an etcd member that serves the
// control plane's keys; its temporary data goes at Close, while data in
// EtcdDataDir (--data-dir) outlives a restart of the cluster.
func TestDevEtcd(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(20*time.Second))
	defer cancel()
	dataDir := t.TempDir()
	var tmp string
	for run := range 3 {
		cfg := DevConfig{DCs: []string{"a"}, FreePorts: true, Logger: testutil.Logger()}
		if run > 0 {
			cfg.EtcdDataDir = dataDir
		}
		c, err := StartDev(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		if run == 0 {
			tmp = c.etcdTmp
		}
		s, err := store.Open(store.Config{Endpoints: []string{c.EtcdURL()}})
		if err != nil {
			c.Close()
			t.Fatal(err)
		}
		switch run {
		case 0, 1:
			err = s.PutRoute(ctx, store.Route{Stream: "x", Version: int64(run + 1), Origin: "a"})
		case 2:
			var rt store.Route
			var ok bool
			rt, ok, err = s.GetRoute(ctx, "x")
			if err == nil && (!ok || rt.Version != 2) {
				t.Errorf("after a restart on the same --data-dir the route is %+v (ok=%v), want version 2", rt, ok)
			}
		}
		s.Close()
		c.Close()
		if err != nil {
			t.Fatalf("run %d at %s: %v", run, c.EtcdURL(), err)
		}
	}
	if tmp == "" {
		t.Fatal("the cluster without --data-dir kept etcd's data in no temporary directory")
	}
	if _, err := os.Stat(tmp); !os.IsNotExist(err) {
		t.Errorf("etcd's temporary data directory %s is still there after Close (stat: %v)", tmp, err)
	}
}
