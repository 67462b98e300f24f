package relay

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
)

func relayedLocally(h *Hub, name string) bool {
	for _, s := range h.Streams() {
		if s.Name == name && s.Local {
			return true
		}
	}
	return false
}

// TestRelayedStreamNobodyAttachedToIsStopped: a Subscribe that gives up
// before the upstream answers (a browser aborting its WHEP POST, a middle
// hop's timeout) left the relayed stream subscribed upstream with 0
// subscribers forever, since linger only started on a detach. Now it is
// stopped after the linger time and unsubscribed upstream, whether the
// description comes late or never.
func TestRelayedStreamNobodyAttachedToIsStopped(t *testing.T) {
	for _, late := range []bool{true, false} {
		t.Run(fmt.Sprintf("description late %v", late), func(t *testing.T) {
			h := NewHub(Config{Datacenter: "b", Logger: quietLogger(), Linger: 50 * time.Millisecond})
			defer h.Close()
			l := newFakeLink(t, h, "a")
			h.handleAnnounce(l, "x", []string{"a"}, 0)

			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
			_, err := h.Subscribe(ctx, "x", NewQueue(16))
			cancel()
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("Subscribe with an upstream that never answers: %v", err)
			}
			u := l.upstream("x")
			if u == nil {
				t.Fatal("b did not subscribe upstream")
			}
			if late {
				u.ready(h264Desc)
				u.write(Packet{Track: 0, Keyframe: true, Data: rtpPacket(t, 0, 0, true, 200)})
			}
			testutil.WaitForWithin(t, 2*time.Second, "b to stop relaying x and unsubscribe upstream", func() bool {
				return !relayedLocally(h, "x") && u.stopped.Load() > 0
			})
			if got := l.messagesAbout("x"); strings.Join(got, "; ") != "subscribe x; unsubscribe x" {
				t.Fatalf("b sent a %v, want one subscribe then one unsubscribe", got)
			}
		})
	}
}

// TestWaitingSubscriberKeepsRelayedStream: while one Subscribe still waits
// for the upstream, another giving up does not stop the stream; when the
// description comes the waiting one gets it, and the stream lingers only
// after it leaves.
func TestWaitingSubscriberKeepsRelayedStream(t *testing.T) {
	const linger = 50 * time.Millisecond
	h := NewHub(Config{Datacenter: "b", Logger: quietLogger(), Linger: linger})
	defer h.Close()
	l := newFakeLink(t, h, "a")
	h.handleAnnounce(l, "x", []string{"a"}, 0)

	type result struct {
		sub *Subscription
		err error
	}
	patient := make(chan result, 1)
	q := NewQueue(16)
	go func() {
		sub, err := h.Subscribe(context.Background(), "x", q)
		patient <- result{sub, err}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	if _, err := h.Subscribe(ctx, "x", NewQueue(16)); err == nil {
		t.Fatal("the impatient Subscribe succeeded with no description")
	}
	cancel()
	time.Sleep(4 * linger)
	u := l.upstream("x")
	if u == nil || u.stopped.Load() != 0 {
		t.Fatal("the stream was stopped while a subscriber still waited for it")
	}
	u.ready(h264Desc)
	r := <-patient
	if r.err != nil {
		t.Fatal(r.err)
	}
	u.write(Packet{Track: 0, Keyframe: true, Data: rtpPacket(t, 0, 0, true, 200)})
	if q.Len() != 1 {
		t.Fatalf("the waiting subscriber got %d packets, want 1", q.Len())
	}
	q.Drain()
	r.sub.Close()
	testutil.WaitForWithin(t, 2*time.Second, "b to stop relaying x once its subscriber left", func() bool {
		return !relayedLocally(h, "x") && u.stopped.Load() > 0
	})
}

// TestAnnouncementsKeepStateOrder: a neighbour's link comes up while the
// stream it is being told about goes away. The hub used to decide under its
// lock and send after unlocking, so the unannounce could overtake the
// announce on the new link and leave the neighbour a ghost route, which
// blocks publishing that name there. The last word on the new link must be
// the unannounce (or nothing at all).
func TestAnnouncementsKeepStateOrder(t *testing.T) {
	cases := []struct {
		name string
		// setup makes x reachable at hub "m" and returns what ends it.
		setup func(t *testing.T, m *Hub) (end func())
	}{
		{"publisher leaves", func(t *testing.T, m *Hub) func() {
			pub, err := m.Publish("x", h264Desc, PublishOptions{})
			if err != nil {
				t.Fatal(err)
			}
			return pub.Close
		}},
		{"upstream unannounces", func(t *testing.T, m *Hub) func() {
			up := newFakeLink(t, m, "a")
			m.handleAnnounce(up, "x", []string{"a"}, 0)
			return func() { m.handleUnannounce(up, "x") }
		}},
		{"upstream link lost", func(t *testing.T, m *Hub) func() {
			up := newFakeLink(t, m, "a")
			m.handleAnnounce(up, "x", []string{"a"}, 0)
			return func() { up.drop(errors.New("lost")) }
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m := NewHub(Config{Datacenter: "m", Logger: quietLogger()})
			defer m.Close()
			end := c.setup(t, m)
			l := newFakeEnd(m, "z")
			var once sync.Once
			ended := make(chan struct{})
			l.onAnnounce = func(name string, hops []string) {
				once.Do(func() {
					// The stream ends while its announcement to the new
					// link is on its way.
					go func() { end(); close(ended) }()
					select {
					case <-ended:
					case <-time.After(100 * time.Millisecond):
					}
				})
			}
			m.addLink(l)
			t.Cleanup(func() { l.drop(errors.New("test over")) })
			<-ended
			got := l.messagesAbout("x")
			if len(got) > 0 && got[len(got)-1] != "unannounce x" {
				t.Fatalf("the new link was told %v: a ghost route for x", got)
			}
		})
	}
}

// TestPipedHubsRelayAndForget: hubs linked by fake links (the fixture for
// routing tests) carry a stream from a to c through b, and forget it
// everywhere when the publisher leaves: then c may publish the name.
func TestPipedHubsRelayAndForget(t *testing.T) {
	testutil.CheckLeaks(t)
	a := NewHub(Config{Datacenter: "a", Logger: quietLogger(), Linger: 50 * time.Millisecond})
	b := NewHub(Config{Datacenter: "b", Logger: quietLogger(), Linger: 50 * time.Millisecond})
	c := NewHub(Config{Datacenter: "c", Logger: quietLogger(), Linger: 50 * time.Millisecond})
	for _, h := range []*Hub{a, b, c} {
		defer h.Close()
	}
	pipeHubs(t, a, b)
	pipeHubs(t, b, c)
	pub, err := a.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, "c learns of x through b", func() bool {
		s := c.Streams()
		return len(s) == 1 && fmt.Sprint(s[0].Hops) == "[a b c]"
	})
	q := NewQueue(64)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(2*time.Second))
	defer cancel()
	sub, err := c.Subscribe(ctx, "x", q)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		pub.WriteRTP(0, rtpPacket(t, uint16(i), uint32(i), i == 0, 200))
	}
	for i := range 10 {
		b := <-q.C()
		if seq := RTPSequence(b.Data()); seq != uint16(i) {
			t.Fatalf("c got sequence %d, want %d", seq, i)
		}
		b.Release()
	}
	pub.Close()
	select {
	case <-sub.Done():
	case <-time.After(testutil.Scale(2 * time.Second)):
		t.Fatal("c's subscriber was not told the stream ended")
	}
	sub.Close()
	testutil.WaitFor(t, "every hub forgets x", func() bool {
		return len(a.Streams())+len(b.Streams())+len(c.Streams()) == 0
	})
	if p, err := c.Publish("x", h264Desc, PublishOptions{}); err != nil {
		t.Fatalf("publishing x at c after it ended at a: %v", err)
	} else {
		p.Close()
	}
}

// TestGivingUpCleansUpEveryHop: a viewer at c gives up while the stream is
// still on its way (the origin's neighbour never answers); c, then the
// middle hop b, stop relaying and unsubscribe, down to the hop that
// subscribed at the origin's side.
func TestGivingUpCleansUpEveryHop(t *testing.T) {
	testutil.CheckLeaks(t)
	const linger = 50 * time.Millisecond
	b := NewHub(Config{Datacenter: "b", Logger: quietLogger(), Linger: linger})
	c := NewHub(Config{Datacenter: "c", Logger: quietLogger(), Linger: linger})
	defer b.Close()
	defer c.Close()
	up := newFakeLink(t, b, "a") // a never answers b's subscription
	pipeHubs(t, b, c)
	b.handleAnnounce(up, "x", []string{"a"}, 0)
	testutil.WaitFor(t, "c learns of x", func() bool { return len(c.Streams()) == 1 })

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	_, err := c.Subscribe(ctx, "x", NewQueue(16))
	cancel()
	if err == nil {
		t.Fatal("Subscribe at c succeeded though a never answered")
	}
	testutil.WaitForWithin(t, 2*time.Second, "b and c to stop relaying x and b to unsubscribe from a", func() bool {
		u := up.upstream("x")
		return u != nil && u.stopped.Load() > 0 && !relayedLocally(b, "x") && !relayedLocally(c, "x")
	})
}
