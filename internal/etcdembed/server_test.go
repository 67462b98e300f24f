package etcdembed

import (
	"context"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/stemflow/stemflow/internal/testutil"
)

// TestStartFreeRestart: a member alone serves writes, Close stops every
// goroutine it started, and a member restarted on the same directory (on
// other free ports) still has the data.
func TestStartFreeRestart(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(20*time.Second))
	defer cancel()
	for run := range 2 {
		start := time.Now()
		s, err := StartFree(ctx, "127.0.0.1", dir)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("run %d: ready after %v", run, time.Since(start).Round(time.Millisecond))
		cli, err := clientv3.New(clientv3.Config{Endpoints: []string{s.ClientURL()}, Logger: zap.NewNop()})
		if err != nil {
			s.Close()
			t.Fatal(err)
		}
		if run == 0 {
			_, err = cli.Put(ctx, "k", "v")
		} else {
			var r *clientv3.GetResponse
			r, err = cli.Get(ctx, "k")
			if err == nil && (len(r.Kvs) != 1 || string(r.Kvs[0].Value) != "v") {
				t.Errorf("after a restart on the same directory k holds %v, want v", r.Kvs)
			}
		}
		cli.Close()
		s.Close()
		if err != nil {
			t.Fatalf("run %d: %v", run, err)
		}
	}
}
