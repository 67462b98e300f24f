package node

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/etcdembed"
	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/relay"
	"github.com/stemflow/stemflow/topology/store"
)

// startEtcdNode starts one node of datacenter dc whose etcd is at url (that
// may not run), logging into buf.
func startEtcdNode(t *testing.T, dc, url string, buf *syncBuffer) *Node {
	t.Helper()
	ca, err := relay.NewClusterCA()
	if err != nil {
		t.Fatal(err)
	}
	id, err := ca.Issue(dc)
	if err != nil {
		t.Fatal(err)
	}
	dev := DevConfig{FreePorts: true}
	dev.setDefaults()
	rtp, err := freeUDPPair(dev.Bind)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := dev.nodeConfig(dc, &id, 0, 0, rtp, nil)
	if err != nil {
		t.Fatal(err)
	}
	nc.Etcd.Endpoints = []string{url}
	log := slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelInfo}))
	n, err := Start(nc, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Close)
	return n
}

// portNobodyPicks returns a free TCP port of 127.0.0.1 below the kernel's
// ephemeral range (32768–60999 here), for a server that starts seconds
// after the port is chosen: testutil.FreePort's ports come from that range,
// where any listen on port 0 or outgoing connection of the tests running
// beside (or the node's own client, dialling the port meanwhile) may take
// it before the server binds it.
func portNobodyPicks(t *testing.T) int {
	t.Helper()
	for range 100 {
		p := 20000 + rand.IntN(10000)
		if ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p)); err == nil {
			ln.Close()
			return p
		}
	}
	t.Fatal("no free TCP port in 20000–29999")
	return 0
}

// TestNodeEtcdDownAtStart: a node whose etcd does not run starts anyway,
// says so naming the endpoint, and serves media; once etcd runs it
// registers on its own, and says so.
func TestNodeEtcdDownAtStart(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	port := portNobodyPicks(t)
	url := fmt.Sprintf("http://127.0.0.1:%d", port)
	var buf syncBuffer
	started := time.Now()
	n := startEtcdNode(t, "a", url, &buf)
	t.Logf("node ready %v after start with etcd down", time.Since(started).Round(time.Millisecond))
	testutil.WaitFor(t, "a warning that etcd is unreachable", func() bool {
		return strings.Contains(buf.String(), `msg="etcd unreachable: the node serves media without the control plane`) &&
			strings.Contains(buf.String(), "etcd="+url)
	})
	// Media flows meanwhile.
	publish(t, n, "x")
	v := watch(t, n, "x")
	v.flowing(t, "packets of x at a with etcd down", 50)

	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(20*time.Second))
	defer cancel()
	srv, err := etcdembed.Start(ctx, etcdembed.Config{Name: "t", Dir: t.TempDir(), UnsafeNoFsync: true, Tick: 10 * time.Millisecond,
		ClientURL: url, PeerURL: fmt.Sprintf("http://127.0.0.1:%d", testutil.FreePort(t))})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	s := n.Store()
	if s == nil {
		t.Fatal("a node with etcd.endpoints has no Store()")
	}
	testutil.WaitFor(t, "a registered once etcd runs", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		nodes, err := s.ListNodes(ctx)
		return err == nil && len(nodes) == 1 && nodes[0].DC == "a" && nodes[0].Addresses["http"] == n.HTTPAddr().String()
	})
	// The line follows the registration: wait for it rather than race it.
	testutil.WaitFor(t, "a log line saying etcd is reachable again", func() bool {
		return strings.Contains(buf.String(), `msg="etcd reachable again: node registered"`)
	})
	v.flowing(t, "packets of x at a with etcd up", 50)
	// A clean close revokes the lease: the node leaves at once.
	n.Close()
	nodes, err := s.ListNodes(ctx)
	if err == nil {
		t.Errorf("the store of a closed node still answers: %v", nodes)
	}
	check, err := store.Open(store.Config{Endpoints: []string{url}})
	if err != nil {
		t.Fatal(err)
	}
	defer check.Close()
	if nodes, err := check.ListNodes(ctx); err != nil || len(nodes) != 0 {
		t.Errorf("after a clean close etcd lists nodes %v (%v), want none at once", nodes, err)
	}
}
