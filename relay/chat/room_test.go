package chat

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/relay"
)

// switchTree is a room's place in a tree that the test moves.
type switchTree struct {
	hub *relay.Hub

	mu             sync.Mutex // guards the following fields
	parent, origin string
}

func (t *switchTree) set(parent, origin string) {
	t.mu.Lock()
	t.parent, t.origin = parent, origin
	t.mu.Unlock()
}

func (t *switchTree) Upstream(string) (string, string, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.parent, t.origin, t.origin != ""
}
func (t *switchTree) Want(string) func() { return func() {} }
func (t *switchTree) OpenChannel(ctx context.Context, peer string, kind relay.ChannelKind) (relay.Channel, error) {
	return t.hub.OpenChannel(ctx, peer, kind)
}

// startMesh starts the datacenters names, every two linked, each with a
// chat service on a switchTree.
func startMesh(tb testing.TB, names ...string) (map[string]*Service, map[string]*switchTree) {
	tb.Helper()
	ca, err := relay.NewClusterCA()
	if err != nil {
		tb.Fatal(err)
	}
	svcs, trees, hubs := map[string]*Service{}, map[string]*switchTree{}, map[string]*relay.Hub{}
	addrs := map[string]string{}
	for i := len(names) - 1; i >= 0; i-- { // later ones first: a node dials the names after its own
		dc := names[i]
		h := relay.NewHub(relay.Config{Datacenter: dc, Logger: testutil.Logger()})
		nb := map[string]string{}
		for _, o := range names {
			if o != dc {
				nb[o] = addrs[o]
				if nb[o] == "" {
					nb[o] = "127.0.0.1:1"
				}
			}
		}
		id, err := ca.Issue(dc)
		if err != nil {
			tb.Fatal(err)
		}
		o, err := relay.StartOverlay(h, relay.OverlayConfig{Listen: "127.0.0.1:0", Neighbours: nb, Identity: id})
		if err != nil {
			tb.Fatal(err)
		}
		addrs[dc] = o.Addr().String()
		tree := &switchTree{hub: h}
		svc := NewService(Config{Datacenter: dc, Tree: tree, Logger: testutil.Logger()})
		h.HandleChannels(relay.ChannelChat, svc.ServeChannel)
		svcs[dc], trees[dc], hubs[dc] = svc, tree, h
		tb.Cleanup(func() {
			svc.Close()
			o.Close()
			h.Close()
		})
	}
	for _, dc := range names {
		testutil.WaitFor(tb, "the links of "+dc, func() bool { return len(hubs[dc].Links()) == len(names)-1 })
	}
	return svcs, trees
}

// submit sends a message to r and waits for its ack.
func submit(t *testing.T, r *Room, id string) Ack {
	t.Helper()
	acks := make(chan Ack, 1)
	if err := r.Submit(context.Background(), id, "ann", "text of "+id, acks); err != nil {
		t.Fatal(err)
	}
	select {
	case a := <-acks:
		return a
	case <-time.After(testutil.Scale(10 * time.Second)):
		t.Fatalf("no ack for %s", id)
		return Ack{}
	}
}

// ids lists a room's history as seq:id.
func ids(r *Room) []string {
	var out []string
	v := r.Read(AnyEpoch, 0, 0)
	for i := range v.Len() {
		m := v.Msg(i)
		out = append(out, fmt.Sprintf("%d:%s", m.Seq, m.ID))
	}
	return out
}

// TestRoomMoveKeepsLeadersLastMessage: the room x is sequenced at b, c
// follows b. The stream's origin moves to a: c reaches a first and carries
// its copy there (m1–m3); b sequences m4 before it learns of the move, so
// only b has m4. When b follows a, it carries its history too (it
// sequenced it): a holds m1–m4, each once. Before, a node carried its
// history only into an empty room, and m4 was lost.
func TestRoomMoveKeepsLeadersLastMessage(t *testing.T) {
	testutil.CheckLeaks(t)
	svcs, trees := startMesh(t, "a", "b", "c")
	trees["a"].set("b", "b")
	trees["b"].set("", "b")
	trees["c"].set("b", "b")
	rb, relB := svcs["b"].Acquire("x", true)
	defer relB()
	rc, relC := svcs["c"].Acquire("x", true)
	defer relC()
	<-rb.Synced()
	<-rc.Synced()
	for i := 1; i <= 3; i++ {
		submit(t, rc, fmt.Sprintf("m%d", i))
	}
	testutil.WaitFor(t, "c holding m1–m3", func() bool { return len(ids(rc)) == 3 })

	trees["a"].set("", "a")
	trees["c"].set("a", "a")
	testutil.WaitFor(t, "c's copy at a", func() bool {
		ra, rel := svcs["a"].Acquire("x", false)
		defer rel()
		return len(ids(ra)) == 3
	})
	if a := submit(t, rb, "m4"); a.Seq != 4 {
		t.Fatalf("b acked m4 with seq %d, want 4 (b still sequences)", a.Seq)
	}
	trees["b"].set("a", "a")
	testutil.WaitFor(t, "b following a", func() bool {
		role, parent := rb.Role()
		return role == "follower" && parent == "a" && rb.Read(AnyEpoch, 0, 0).Epoch == rc.Read(AnyEpoch, 0, 0).Epoch
	})
	var got []string
	testutil.WaitForWithin(t, 5*time.Second, "m4 at a", func() bool {
		got = ids(rc)
		return len(got) >= 4
	})
	var idsOnly []string
	for _, s := range got {
		var seq int
		var id string
		fmt.Sscanf(s, "%d:%s", &seq, &id)
		idsOnly = append(idsOnly, id)
	}
	sort.Strings(idsOnly)
	if fmt.Sprint(idsOnly) != "[m1 m2 m3 m4]" {
		t.Fatalf("the history at a (seen at c): %v, want m1–m4 once each", got)
	}
}

// TestRoomIDsCollide: Room.ids holds hashes of ids; a message whose id's
// hash is another's is still a message of its own, and its retry is still
// recognised.
func TestRoomIDsCollide(t *testing.T) {
	defer func(h func(string) uint64) { idHash = h }(idHash)
	idHash = func(string) uint64 { return 7 }
	svcs, trees := startMesh(t, "a")
	trees["a"].set("", "a")
	r, rel := svcs["a"].Acquire("x", true)
	defer rel()
	<-r.Synced()
	for _, c := range []struct {
		id   string
		want uint64
	}{{"m1", 1}, {"m2", 2}, {"m2", 2}, {"m3", 3}, {"m3", 3}} {
		if a := submit(t, r, c.id); a.Seq != c.want {
			t.Fatalf("%s acked with seq %d, want %d (history %v)", c.id, a.Seq, c.want, ids(r))
		}
	}
	if got := fmt.Sprint(ids(r)); got != "[1:m1 2:m2 3:m3]" {
		t.Fatalf("history %s, want m1–m3 once each", got)
	}
}
