package relay

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
)

// fakeMesh is hubs linked by piped fake links: hubs by datacenter, and
// links[x][y] is x's end of the link to y.
type fakeMesh struct {
	hubs  map[string]*Hub
	links map[string]map[string]*fakeLink
}

// newFakeMesh links every pair of the named hubs (a full mesh) and waits
// for nothing: announcements travel on their own goroutines.
func newFakeMesh(t *testing.T, cfg Config, names ...string) *fakeMesh {
	t.Helper()
	m := &fakeMesh{hubs: map[string]*Hub{}, links: map[string]map[string]*fakeLink{}}
	for _, n := range names {
		c := cfg
		c.Datacenter = n
		if c.Logger == nil {
			c.Logger = quietLogger()
		}
		if c.Linger == 0 {
			c.Linger = 50 * time.Millisecond
		}
		h := NewHub(c)
		t.Cleanup(h.Close)
		m.hubs[n] = h
		m.links[n] = map[string]*fakeLink{}
	}
	for i, x := range names {
		for _, y := range names[i+1:] {
			m.links[x][y], m.links[y][x] = pipeHubs(t, m.hubs[x], m.hubs[y])
		}
	}
	return m
}

// hops returns the path a hub lists for a stream.
func hopsOf(h *Hub, name string) string {
	for _, s := range h.Streams() {
		if s.Name == name {
			return strings.Join(s.Hops, ">")
		}
	}
	return ""
}

// subscribes counts the subscribe messages a link sent for a stream.
func subscribes(l *fakeLink, name string) int {
	n := 0
	for _, m := range l.messagesAbout(name) {
		if strings.HasPrefix(m, "subscribe ") {
			n++
		}
	}
	return n
}

// TestRouteSteersSubscription: on a full mesh a,b,c,d announcements make d
// take a stream from a directly (the shortest path). A route with parent b
// makes d subscribe through b instead, b takes it from a, and d lists the
// path a>b>d. A route through a neighbour d has no link to is ignored, and
// an older route version does not replace a newer one.
func TestRouteSteersSubscription(t *testing.T) {
	testutil.CheckLeaks(t)
	m := newFakeMesh(t, Config{}, "a", "b", "c", "d")
	a, d := m.hubs["a"], m.hubs["d"]
	pub, err := a.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	testutil.WaitFor(t, "d learns of x from a directly", func() bool { return hopsOf(d, "x") == "a>d" })
	if p, o, ok := d.Upstream("x"); p != "a" || o != "a" || !ok {
		t.Fatalf("Upstream at d before a route: %q %q %v, want a a true", p, o, ok)
	}
	d.SetRoute("x", Route{Parent: "b", Backup: "c", Version: 2})
	d.SetRoute("x", Route{Parent: "c", Version: 1}) // older: ignored
	if p, o, ok := d.Upstream("x"); p != "b" || o != "a" || !ok {
		t.Fatalf("Upstream at d with route via b: %q %q %v, want b a true", p, o, ok)
	}
	q := NewQueue(64)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(5*time.Second))
	defer cancel()
	sub, err := d.Subscribe(ctx, "x", q)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	pub.WriteRTP(0, rtpPacket(t, 1, 0, true, 200))
	select {
	case b := <-q.C():
		b.Release()
	case <-time.After(testutil.Scale(2 * time.Second)):
		t.Fatal("d's viewer got nothing through b")
	}
	if n := subscribes(m.links["d"]["b"], "x"); n != 1 {
		t.Fatalf("d subscribed %d times through b, want 1", n)
	}
	if n := subscribes(m.links["d"]["a"], "x") + subscribes(m.links["d"]["c"], "x"); n != 0 {
		t.Fatalf("d subscribed %d times through a or c, want none", n)
	}
	if got := hopsOf(d, "x"); got != "a>b>d" {
		t.Fatalf("d lists x through %s, want a>b>d", got)
	}

	// A route through a neighbour without a link: announcements decide.
	e := NewHub(Config{Datacenter: "e", Logger: quietLogger()})
	defer e.Close()
	pipeHubs(t, a, e)
	testutil.WaitFor(t, "e learns of x", func() bool { return hopsOf(e, "x") == "a>e" })
	e.SetRoute("x", Route{Parent: "z", Version: 1})
	sub2, err := e.Subscribe(ctx, "x", NewQueue(4))
	if err != nil {
		t.Fatalf("subscribing at e with a route through a neighbour it has no link to: %v", err)
	}
	sub2.Close()
}

// TestInterestCountsLocalClientsOnly: the origin reports what it publishes;
// a viewer's node reports the stream wanted; the relay in between, which
// carries it only for a downstream datacenter, reports nothing. Want marks
// a stream that is not live, and each change closes the channel.
func TestInterestCountsLocalClientsOnly(t *testing.T) {
	testutil.CheckLeaks(t)
	m := newFakeMesh(t, Config{}, "a", "b", "d")
	a, b, d := m.hubs["a"], m.hubs["b"], m.hubs["d"]
	_, ch := a.Interest()
	pub, err := a.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	select {
	case <-ch:
	default:
		t.Fatal("a's interest channel did not close when x was published")
	}
	if in, _ := a.Interest(); fmt.Sprint(in) != "{[x] []}" {
		t.Fatalf("a's interest %v, want published [x]", in)
	}
	testutil.WaitFor(t, "d learns of x", func() bool { return hopsOf(d, "x") != "" })
	d.SetRoute("x", Route{Parent: "b", Version: 1})
	_, dch := d.Interest()
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(5*time.Second))
	defer cancel()
	sub, err := d.Subscribe(ctx, "x", NewQueue(4))
	if err != nil {
		t.Fatal(err)
	}
	<-dch
	if in, _ := d.Interest(); fmt.Sprint(in) != "{[] [x]}" {
		t.Fatalf("d's interest %v, want wanted [x]", in)
	}
	if !relayedLocally(b, "x") {
		t.Fatal("b does not relay x for d")
	}
	if in, _ := b.Interest(); len(in.Published)+len(in.Wanted) != 0 {
		t.Fatalf("b's interest %v: a downstream datacenter counted as b's own client", in)
	}
	release := b.Want("room")
	release2 := b.Want("room")
	if in, _ := b.Interest(); fmt.Sprint(in) != "{[] [room]}" {
		t.Fatalf("b's interest with chat clients in room: %v", in)
	}
	release()
	release() // a second call does nothing
	if in, _ := b.Interest(); fmt.Sprint(in) != "{[] [room]}" {
		t.Fatalf("b's interest with one Want left: %v", in)
	}
	_, bch := b.Interest()
	release2()
	select {
	case <-bch:
	default:
		t.Fatal("b's interest channel did not close when the last Want was released")
	}
	sub.Close()
	testutil.WaitFor(t, "d wants nothing once its viewer left", func() bool {
		in, _ := d.Interest()
		return len(in.Wanted) == 0
	})
}

// TestClaimGuardsPublish: Publish calls Claim first; its error is the
// publisher's, and the stream never exists. A claim is released once, when
// the publication ends.
func TestClaimGuardsPublish(t *testing.T) {
	errTaken := errors.New("claimed by datacenter z")
	var claimed, released []string
	h := NewHub(Config{Datacenter: "a", Logger: quietLogger(), Claim: func(name string) (func(), error) {
		if name == "taken" {
			return nil, errTaken
		}
		claimed = append(claimed, name)
		return func() { released = append(released, name) }, nil
	}})
	defer h.Close()
	if _, err := h.Publish("taken", h264Desc, PublishOptions{}); !errors.Is(err, errTaken) {
		t.Fatalf("publishing a name claimed elsewhere: %v, want the claim's error", err)
	}
	if len(h.Streams()) != 0 {
		t.Fatal("a refused publication left a stream")
	}
	pub, err := h.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.Publish("x", h264Desc, PublishOptions{}); !errors.Is(err, ErrStreamExists) {
		t.Fatalf("second publisher of x: %v", err)
	}
	pub.Close()
	pub.Close()
	if !slices.Equal(claimed, []string{"x"}) || !slices.Equal(released, []string{"x"}) {
		t.Fatalf("claimed %v released %v, want x claimed and released once", claimed, released)
	}
}

// TestRelayedStreamOutlivesItsUpstream: on a full mesh a,b,c,d a viewer at
// d watches a stream from a that d takes through b (its route). When b goes
// away (the link d–b is lost; b's hub shuts down; the link a–b is lost) the
// viewer's subscription stays and packets keep coming, now through another
// datacenter. Before, each of these ended the stream at d ("link to
// datacenter b lost").
func TestRelayedStreamOutlivesItsUpstream(t *testing.T) {
	cases := []struct {
		name string
		kill func(m *fakeMesh)
		path string // d's path to x after
	}{
		{"link d-b lost", func(m *fakeMesh) { m.links["d"]["b"].drop(errors.New("cut")) }, "a>c>d"},
		{"b shuts down", func(m *fakeMesh) { m.hubs["b"].Close() }, "a>c>d"},
		// b takes it from c now (d would loop) and tells d the path.
		{"link a-b lost", func(m *fakeMesh) { m.links["a"]["b"].drop(errors.New("cut")) }, "a>c>b>d"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			testutil.CheckLeaks(t)
			m := newFakeMesh(t, Config{}, "a", "b", "c", "d")
			a, d := m.hubs["a"], m.hubs["d"]
			pub, err := a.Publish("x", h264Desc, PublishOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer pub.Close()
			for _, n := range []string{"b", "c", "d"} {
				testutil.WaitFor(t, n+" learns of x", func() bool { return hopsOf(m.hubs[n], "x") == "a>"+n })
			}
			d.SetRoute("x", Route{Parent: "b", Backup: "c", Version: 1})
			q := NewQueue(1024)
			ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(5*time.Second))
			defer cancel()
			sub, err := d.Subscribe(ctx, "x", q)
			if err != nil {
				t.Fatal(err)
			}
			defer sub.Close()
			seq := uint16(0)
			write := func() {
				pub.WriteRTP(0, rtpPacket(t, seq, uint32(seq)*3000, seq%10 == 0, 200))
				seq++
			}
			for range 5 {
				write()
			}
			if got := hopsOf(d, "x"); got != "a>b>d" {
				t.Fatalf("d takes x through %s, want a>b>d", got)
			}
			c.kill(m)
			testutil.WaitFor(t, "x to flow again at d through "+c.path, func() bool {
				write()
				time.Sleep(time.Millisecond)
				return hopsOf(d, "x") == c.path && q.Len() > 5
			})
			select {
			case <-sub.Done():
				t.Fatalf("the viewer's stream ended: %v", sub.Err())
			default:
			}
			before := q.Len()
			write()
			testutil.WaitFor(t, "a packet written after the switch", func() bool { return q.Len() > before })
			t.Logf("d takes x through %s after %s", hopsOf(d, "x"), c.name)
		})
	}
}

// TestOriginEndEndsEverywhere: the publisher leaving ends the stream at
// every hop with ErrPublisherGone, and no node looks for another parent
// (which would find none and end it later with "not found").
func TestOriginEndEndsEverywhere(t *testing.T) {
	testutil.CheckLeaks(t)
	m := newFakeMesh(t, Config{}, "a", "b", "c", "d")
	a, d := m.hubs["a"], m.hubs["d"]
	pub, err := a.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, "d learns of x", func() bool { return hopsOf(d, "x") == "a>d" })
	d.SetRoute("x", Route{Parent: "b", Backup: "c", Version: 1})
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(5*time.Second))
	defer cancel()
	sub, err := d.Subscribe(ctx, "x", NewQueue(16))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	pub.Close()
	select {
	case <-sub.Done():
	case <-time.After(testutil.Scale(2 * time.Second)):
		t.Fatal("the viewer at d was not told the stream ended")
	}
	if !errors.Is(sub.Err(), ErrPublisherGone) {
		t.Fatalf("the stream ended at d with %v, want ErrPublisherGone", sub.Err())
	}
	if n := subscribes(m.links["d"]["c"], "x") + subscribes(m.links["d"]["a"], "x"); n != 0 {
		t.Fatalf("d subscribed %d times elsewhere after the origin ended the stream", n)
	}
}

// TestRouteFollowedWhenParentLinkComesLater: a route whose parent has no
// link yet leaves the stream where it flows; once the link comes up and the
// parent announces the stream, the stream moves to it.
func TestRouteFollowedWhenParentLinkComesLater(t *testing.T) {
	testutil.CheckLeaks(t)
	a := NewHub(Config{Datacenter: "a", Logger: quietLogger()})
	b := NewHub(Config{Datacenter: "b", Logger: quietLogger()})
	d := NewHub(Config{Datacenter: "d", Logger: quietLogger()})
	for _, h := range []*Hub{a, b, d} {
		defer h.Close()
	}
	pipeHubs(t, a, b)
	pipeHubs(t, a, d)
	pub, err := a.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for seq := uint16(1); ; seq++ {
			pub.WriteRTP(0, rtpPacket(t, seq, uint32(seq)*3000, seq%30 == 1, 200))
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	})
	defer func() { close(stop); wg.Wait() }()

	testutil.WaitFor(t, "d learns of x from a", func() bool { return hopsOf(d, "x") == "a>d" })
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(5*time.Second))
	defer cancel()
	sub, err := d.Subscribe(ctx, "x", NewQueue(4096))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	d.SetRoute("x", Route{Parent: "b", Version: 1})
	if got := hopsOf(d, "x"); got != "a>d" {
		t.Fatalf("d takes x through %s with no link to its route's parent, want a>d", got)
	}
	pipeHubs(t, d, b)
	testutil.WaitFor(t, "d moves x to its route's parent b once linked", func() bool { return hopsOf(d, "x") == "a>b>d" })
}
