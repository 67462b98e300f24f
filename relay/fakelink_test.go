package relay

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// fakeLink is a link (route.go) without a network, for hub tests. It records
// every control message the hub sends through it, in order, and stands for
// the neighbour in one of two ways:
//
//   - scripted (newFakeLink): the test plays the neighbour, calling the
//     hub's handlers (announce) and answering the subscriptions the hub
//     makes (fakeLink.ups: ready, write, end);
//   - piped (pipeHubs): two hubs linked through a pair of fake links, whose
//     control messages are delivered to the other hub in order on a
//     goroutine of their own, as over a QUIC control stream, and whose
//     subscriptions are served by the other hub's Subscribe. Meshes of
//     hubs for routing tests are built from pairs.
type fakeLink struct {
	hub    *Hub      // the hub this end belongs to
	peer   string    // the neighbour's datacenter
	remote *fakeLink // the other end of a pipe; nil when scripted

	// onAnnounce, when set, is called on each announce as the hub sends
	// it, before the message counts as sent: a test widens the window
	// between the hub's decision and the send with it. The hub may hold its
	// lock: it must not wait for the hub without a timeout.
	onAnnounce func(name string, hops []string)

	ctl    chan func() // control messages to deliver to the remote hub, in order
	ctx    context.Context
	cancel context.CancelCauseFunc
	wg     sync.WaitGroup

	// Piped links beat (heartbeat.go): live is what this end heard from
	// the other; silenced makes the pair drop beats and media both ways,
	// as a dead neighbour that says no goodbye.
	live     liveness
	silenced atomic.Bool

	mu     sync.Mutex // guards the following fields
	sent   []string   // control messages the hub sent, e.g. "announce x a,b"
	ups    []*fakeUp  // subscriptions the hub made through the link
	closed error      // set by close
}

var _ link = (*fakeLink)(nil)

// newFakeLink returns a scripted link from h to datacenter peer, added to h.
func newFakeLink(t testing.TB, h *Hub, peer string) *fakeLink {
	l := newFakeEnd(h, peer)
	h.addLink(l)
	t.Cleanup(func() { l.drop(errors.New("test over")) })
	return l
}

func newFakeEnd(h *Hub, peer string) *fakeLink {
	ctx, cancel := context.WithCancelCause(context.Background())
	return &fakeLink{hub: h, peer: peer, ctl: make(chan func(), 1<<14), ctx: ctx, cancel: cancel}
}

// pipeHubs links hubs a and b through a pair of fake links and returns a's
// end and b's end. Drop either end to take the link down.
func pipeHubs(t testing.TB, a, b *Hub) (ab, ba *fakeLink) {
	ab, ba = newFakeEnd(a, b.cfg.Datacenter), newFakeEnd(b, a.cfg.Datacenter)
	ab.remote, ba.remote = ba, ab
	a.addLink(ab)
	b.addLink(ba)
	// Delivery starts once both ends are added, as a quicLink reads its
	// control stream only after adding itself: a hub ignores messages from
	// a link it does not have.
	for _, l := range []*fakeLink{ab, ba} {
		l.wg.Add(2)
		go l.deliver()
		go func() {
			defer l.wg.Done()
			l.hub.watchLiveness(l.ctx, l, &l.live, func() {
				if !l.silenced.Load() {
					l.remote.live.heardFrom()
				}
			}, nil)
		}()
	}
	t.Cleanup(func() {
		ab.drop(errors.New("test over"))
		ba.drop(errors.New("test over"))
	})
	return ab, ba
}

// deliver runs the remote hub's handlers for the control messages sent
// through l, in the order they were sent.
func (l *fakeLink) deliver() {
	defer l.wg.Done()
	for {
		select {
		case f := <-l.ctl:
			f()
		case <-l.ctx.Done():
			return
		}
	}
}

// toRemote queues f for the remote hub; it never blocks the sending hub.
func (l *fakeLink) toRemote(f func()) {
	if l.remote == nil {
		return
	}
	select {
	case l.ctl <- f:
	default:
		panic("fakeLink: control queue full")
	}
}

func (l *fakeLink) record(format string, args ...any) {
	l.mu.Lock()
	l.sent = append(l.sent, fmt.Sprintf(format, args...))
	l.mu.Unlock()
}

// messages returns the control messages sent so far, in order.
func (l *fakeLink) messages() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.sent)
}

// messagesAbout returns the messages about one stream.
func (l *fakeLink) messagesAbout(name string) []string {
	var out []string
	for _, m := range l.messages() {
		if f := strings.Fields(m); len(f) > 1 && f[1] == name {
			out = append(out, m)
		}
	}
	return out
}

func (l *fakeLink) neighbour() string { return l.peer }

func (l *fakeLink) announce(name string, hops []string, flags Flags) {
	if l.onAnnounce != nil {
		l.onAnnounce(name, hops)
	}
	if flags != 0 {
		l.record("announce %s %s flags=%d", name, strings.Join(hops, ","), flags)
	} else {
		l.record("announce %s %s", name, strings.Join(hops, ","))
	}
	hops = slices.Clone(hops)
	l.toRemote(func() { l.remote.hub.handleAnnounce(l.remote, name, hops, flags) })
}

func (l *fakeLink) unannounce(name string) {
	l.record("unannounce %s", name)
	l.toRemote(func() { l.remote.hub.handleUnannounce(l.remote, name) })
}

func (l *fakeLink) subscribe(s *Stream) source {
	u := &fakeUp{l: l, s: s}
	l.record("subscribe %s", s.name)
	l.mu.Lock()
	l.ups = append(l.ups, u)
	l.mu.Unlock()
	if l.remote != nil {
		ctx, cancel := context.WithCancel(l.ctx)
		u.cancel = cancel
		l.wg.Add(1)
		go u.serve(ctx)
	}
	return u
}

func (l *fakeLink) close(cause error) {
	l.mu.Lock()
	if l.closed == nil {
		l.closed = cause
	}
	l.mu.Unlock()
}

// silence makes both ends of a pipe drop everything but control messages
// (on) or carry again (off).
func (l *fakeLink) silence(on bool) {
	l.silenced.Store(on)
	l.remote.silenced.Store(on)
}

// drop takes the link down as a lost connection does: the hub forgets the
// routes through it and the streams it carried end. Both ends of a pipe go
// down. drop waits for the link's goroutines.
func (l *fakeLink) drop(cause error) {
	l.dropEnd(cause)
	if l.remote != nil {
		l.remote.dropEnd(cause)
	}
}

func (l *fakeLink) dropEnd(cause error) {
	if l.ctx.Err() != nil {
		return
	}
	l.cancel(cause)
	l.hub.removeLink(l, cause)
	l.mu.Lock()
	ups := slices.Clone(l.ups)
	l.mu.Unlock()
	for _, u := range ups {
		l.hub.upstreamEnded(u.s, u, fmt.Errorf("link to datacenter %s lost: %w", l.peer, cause))
	}
	l.wg.Wait()
}

// upstream returns the subscription the hub made for a stream, or nil.
func (l *fakeLink) upstream(name string) *fakeUp {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := len(l.ups) - 1; i >= 0; i-- {
		if l.ups[i].s.name == name {
			return l.ups[i]
		}
	}
	return nil
}

// fakeUp is a stream a hub receives through a fake link: its source.
type fakeUp struct {
	l         *fakeLink
	s         *Stream
	cancel    context.CancelFunc // piped: ends serve
	stopped   atomic.Int32       // how often the hub stopped it
	keyframes atomic.Int32       // keyframe requests the hub passed on
	readyOnce sync.Once
}

var _ source = (*fakeUp)(nil)

func (u *fakeUp) requestKeyframe() {
	u.keyframes.Add(1)
	u.l.record("keyframe %s", u.s.name)
}

func (u *fakeUp) peer() string { return u.l.peer }

func (u *fakeUp) stop() {
	if u.stopped.Add(1) == 1 {
		u.l.record("unsubscribe %s", u.s.name)
	}
	if u.cancel != nil {
		u.cancel()
	}
}

// ready answers the subscription with the stream's description.
func (u *fakeUp) ready(desc Description) { u.readyHops(desc, nil) }

// readyHops answers the subscription with the description and the path the
// stream takes to the neighbour.
func (u *fakeUp) readyHops(desc Description, hops []string) {
	u.readyOnce.Do(func() { u.l.hub.sourceReady(u.s, u, desc.Clone(), 0, hops) })
}

// write delivers one packet of the stream, as it arrives from upstream.
func (u *fakeUp) write(p Packet) { u.s.receive(u, &p) }

// end ends the subscription from upstream (a subscribe error, the stream
// ended there, the link lost).
func (u *fakeUp) end(err error) { u.l.hub.upstreamEnded(u.s, u, err) }

// serve subscribes at the remote hub and feeds what arrives into the local
// stream, until the hub stops the subscription or the link drops.
func (u *fakeUp) serve(ctx context.Context) {
	defer u.l.wg.Done()
	// A real subscription's first packets arrive a round trip after the
	// request, which the hub sends with its lock held and follows, under
	// the same lock, by telling the stream's ingress of the new source.
	// Wait for the hub to release it: a packet that came before would be
	// dropped as a retired source's (a replay lost, the splice held).
	u.l.hub.mu.Lock()
	closed := u.l.hub.closed
	u.l.hub.mu.Unlock()
	if closed {
		return
	}
	remote := u.l.remote.hub
	feed := downstreamFunc{peer: u.l.remote.peer, f: func(p *Packet) {
		if !u.l.silenced.Load() {
			u.l.live.heardFrom()
			u.s.receive(u, p)
		}
	}}
	sub, err := remote.Subscribe(ctx, u.s.name, feed)
	if err != nil {
		if ctx.Err() == nil {
			u.end(fmt.Errorf("datacenter %s: %w", u.l.peer, err))
		}
		return
	}
	defer sub.Close()
	hops, pathChanged := remote.watchPath(sub.Stream())
	u.readyHops(sub.Description(), hops)
	for {
		select {
		case <-pathChanged:
			hops, pathChanged = remote.watchPath(sub.Stream())
			u.l.hub.sourcePath(u.s, u, hops)
			continue
		case <-sub.Done():
			u.end(fmt.Errorf("upstream datacenter %s: %w", u.l.peer, sub.Err()))
		case <-ctx.Done():
		}
		return
	}
}

// downstreamFunc is a downstream datacenter's subscriber, as a link makes
// one: it does not count as local interest.
type downstreamFunc struct {
	peer string // the downstream datacenter
	f    func(p *Packet)
}

func (d downstreamFunc) WritePacket(p *Packet)  { d.f(p) }
func (d downstreamFunc) downstreamPeer() string { return d.peer }
