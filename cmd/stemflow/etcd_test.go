package main

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/topology/store"
)

// TestEtcdCluster runs three `stemflow etcd` processes (the binary built
// with `go build`) as one cluster on free loopback ports. A client writes a
// route and watches routes; SIGKILL takes the cluster's raft leader down;
// the other two members still accept writes and serve reads, and the watch
// sees the write made after the kill. SIGTERM then stops both, which must
// exit 0.
func TestEtcdCluster(t *testing.T) {
	testutil.Watchdog(t, 240*time.Second)
	dir := t.TempDir()
	bin := stemflowBinary(t)
	names := []string{"m1", "m2", "m3"}
	clientURL, peerURL := map[string]string{}, map[string]string{}
	var initial []string
	for _, m := range names {
		clientURL[m] = fmt.Sprintf("http://127.0.0.1:%d", testutil.FreePort(t))
		peerURL[m] = fmt.Sprintf("http://127.0.0.1:%d", testutil.FreePort(t))
		initial = append(initial, m+"="+peerURL[m])
	}
	members := map[string]*process{}
	for _, m := range names {
		members[m] = startEtcdProcess(t, bin, m, "--name", m, "--data-dir", filepath.Join(dir, m),
			"--client-url", clientURL[m], "--peer-url", peerURL[m], "--initial-cluster", strings.Join(initial, ","))
	}
	for _, m := range names {
		select {
		case <-members[m].ready:
		case <-members[m].exited:
			t.Fatalf("member %s exited before it was ready:\n%s", m, members[m].log())
		case <-time.After(testutil.Scale(30 * time.Second)):
			t.Fatalf("member %s not ready within 30 s:\n%s", m, members[m].log())
		}
	}

	s, err := store.Open(store.Config{Endpoints: []string{clientURL["m1"], clientURL["m2"], clientURL["m3"]}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(60*time.Second))
	defer cancel()
	if err := s.PutRoute(ctx, store.Route{Stream: "x", Version: 1, Origin: "a", Parent: map[string]string{"b": "a"}}); err != nil {
		t.Fatal(err)
	}
	events := s.WatchRoutes(ctx)
	if ev := <-events; ev.Route.Version != 1 {
		t.Fatalf("watch began with %+v, want route x v1", ev)
	}

	// Kill the raft leader: the harder case (the others must elect a new one).
	var leader string
	for _, m := range names {
		st, err := s.Client().Status(ctx, clientURL[m])
		if err != nil {
			t.Fatalf("status of %s: %v", m, err)
		}
		if st.Leader == st.Header.MemberId {
			leader = m
		}
	}
	if leader == "" {
		t.Fatal("no member says it leads")
	}
	if err := members[leader].cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-members[leader].exited
	killed := time.Now()

	// Through the survivors only, and through the client that knew all three.
	var survivors []string
	for _, m := range names {
		if m != leader {
			survivors = append(survivors, clientURL[m])
		}
	}
	s2, err := store.Open(store.Config{Endpoints: survivors})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	want := store.Route{Stream: "x", Version: 2, Origin: "a", Parent: map[string]string{"b": "a", "c": "b"}}
	if err := s2.PutRoute(ctx, want); err != nil {
		t.Fatalf("writing a route with %s killed: %v", leader, err)
	}
	t.Logf("a write succeeded %v after the raft leader %s was killed", time.Since(killed).Round(10*time.Millisecond), leader)
	for _, c := range []*store.Store{s, s2} {
		rt, ok, err := c.GetRoute(ctx, "x")
		if err != nil || !ok || rt.Version != 2 || rt.Parent["c"] != "b" {
			t.Fatalf("reading the route with %s killed: %+v ok=%v err=%v, want v2", leader, rt, ok, err)
		}
	}
	if err := s.PutRoute(ctx, store.Route{Stream: "y", Version: 1, Origin: "b"}); err != nil {
		t.Fatalf("writing through the client that knew the dead member too: %v", err)
	}
	seen := map[string]int64{}
	for seen["x"] != 2 || seen["y"] != 1 {
		select {
		case ev := <-events:
			seen[ev.Stream] = ev.Route.Version
		case <-time.After(testutil.Scale(20 * time.Second)):
			t.Fatalf("the route watch saw %v, want x v2 and y v1 after the kill", seen)
		}
	}

	for _, m := range names {
		if m != leader {
			members[m].cmd.Process.Signal(syscall.SIGTERM)
		}
	}
	for _, m := range names {
		if m == leader {
			continue
		}
		select {
		case <-members[m].exited:
		case <-time.After(testutil.Scale(15 * time.Second)):
			t.Fatalf("member %s still running 15 s after SIGTERM:\n%s", m, members[m].log())
		}
		if code := members[m].cmd.ProcessState.ExitCode(); code != 0 {
			t.Errorf("member %s exited with %d after SIGTERM:\n%s", m, code, members[m].log())
		}
	}
}

// startEtcdProcess starts one `stemflow etcd` member; it is ready when it
// logs that the member is.
func startEtcdProcess(t *testing.T, bin, name string, args ...string) *process {
	t.Helper()
	return startProcess(t, "member "+name, "member "+name+" ready", bin, append([]string{"etcd"}, args...)...)
}

// TestEtcdFlags: bad flags are refused before anything starts, naming the
// flag.
func TestEtcdFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--name", "m1"}, "--data-dir is required"},
		{[]string{"--data-dir", t.TempDir(), "--client-url", "127.0.0.1:2379"}, "--client-url"},
		{[]string{"--data-dir", t.TempDir(), "--name", "m1", "--initial-cluster", "m2=http://127.0.0.1:2380"}, "--initial-cluster"},
	} {
		var stdout, stderr bytes.Buffer
		if code := runCLI(append([]string{"etcd"}, c.args...), &stdout, &stderr); code != 1 || !strings.Contains(stderr.String(), c.want) {
			t.Errorf("stemflow etcd %s: exit %d, stderr %q; want 1 and a message naming %s", strings.Join(c.args, " "), code, stderr.String(), c.want)
		}
	}
}
