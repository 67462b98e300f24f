package relay

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"

	"github.com/pion/rtp"
)

func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(&strings.Builder{}, &slog.HandlerOptions{Level: slog.LevelError + 1}))
}

var h264Desc = Description{Tracks: []Track{
	{Kind: KindVideo, MimeType: MimeH264, ClockRate: 90000, Fmtp: "packetization-mode=1", PayloadType: 96},
	{Kind: KindAudio, MimeType: MimeOpus, ClockRate: 48000, Channels: 2, PayloadType: 111},
}}

// rtpPacket makes a marshalled RTP packet of n bytes; key makes it an H264 IDR.
func rtpPacket(t testing.TB, seq uint16, ts uint32, key bool, n int) []byte {
	payload := make([]byte, n-12)
	payload[0] = 0x41 // non-IDR slice
	if key {
		payload[0] = 0x65 // IDR slice
	}
	for i := 1; i < len(payload); i++ {
		payload[i] = byte(seq) + byte(i)
	}
	p := rtp.Packet{Header: rtp.Header{Version: 2, PayloadType: 96, SequenceNumber: seq, Timestamp: ts, SSRC: 0x1234}, Payload: payload}
	b, err := p.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// cluster starts hubs linked in a chain over QUIC on loopback.
func chain(t *testing.T, names ...string) []*Hub {
	t.Helper()
	ca, err := NewClusterCA()
	if err != nil {
		t.Fatal(err)
	}
	hubs := make([]*Hub, len(names))
	addrs := make([]string, len(names))
	for i := len(names) - 1; i >= 0; i-- { // later names first: earlier ones dial them
		h := NewHub(Config{Datacenter: names[i], Logger: quietLogger(), Linger: 100 * time.Millisecond})
		id, err := ca.Issue(names[i])
		if err != nil {
			t.Fatal(err)
		}
		nb := map[string]string{}
		if i+1 < len(names) {
			nb[names[i+1]] = addrs[i+1]
		}
		if i > 0 {
			nb[names[i-1]] = "" // it dials this node: its address is not used
		}
		o, err := StartOverlay(h, OverlayConfig{Listen: "127.0.0.1:0", Neighbours: nb, Identity: id, Logger: quietLogger()})
		if err != nil {
			t.Fatal(err)
		}
		addrs[i] = o.Addr().String()
		hubs[i] = h
		t.Cleanup(func() { o.Close(); h.Close() })
	}
	for i, h := range hubs {
		want := 2
		if i == 0 || i == len(hubs)-1 {
			want = 1
		}
		testutil.WaitFor(t, fmt.Sprintf("%s has %d links", names[i], want), func() bool { return len(h.Links()) == want })
	}
	return hubs
}

func TestLocalPublishSubscribeGOPReplay(t *testing.T) {
	h := NewHub(Config{Datacenter: "a", Logger: quietLogger()})
	defer h.Close()
	pub, err := h.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// A P-frame before any keyframe is not cached; the GOP starts at the IDR.
	for i, key := range []bool{false, true, false, false} {
		if err := pub.WriteRTP(0, rtpPacket(t, uint16(i), uint32(i*3000), key, 200)); err != nil {
			t.Fatal(err)
		}
	}
	q := NewQueue(16)
	sub, err := h.Subscribe(context.Background(), "x", q)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	pub.WriteRTP(0, rtpPacket(t, 4, 12000, false, 200))
	var seqs []uint16
	for len(q.C()) > 0 {
		b := <-q.C()
		seqs = append(seqs, RTPSequence(b.Data()))
		b.Release()
	}
	if fmt.Sprint(seqs) != "[1 2 3 4]" {
		t.Fatalf("subscriber got sequence numbers %v, want the GOP [1 2 3] then live [4]", seqs)
	}
	if _, err := h.Publish("x", h264Desc, PublishOptions{}); err == nil || !strings.Contains(err.Error(), "already being published") {
		t.Fatalf("second publisher: got %v, want ErrStreamExists", err)
	}
	pub.Close()
	select {
	case <-sub.Done():
	case <-time.After(time.Second):
		t.Fatal("subscriber not told that the stream ended")
	}
}

func TestRelayAcrossChain(t *testing.T) {
	testutil.CheckLeaks(t)
	hubs := chain(t, "a", "b", "c")
	a, b, c := hubs[0], hubs[1], hubs[2]

	keyframes := make(chan struct{}, 16)
	pub, err := a.Publish("x", h264Desc, PublishOptions{OnKeyframeRequest: func() { keyframes <- struct{}{} }})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	testutil.WaitFor(t, "c learns of x", func() bool {
		s := c.Streams()
		return len(s) == 1 && s[0].Origin == "a" && fmt.Sprint(s[0].Hops) == "[a b c]"
	})
	if _, err := c.Publish("x", h264Desc, PublishOptions{}); err == nil {
		t.Fatal("publishing x at c while it is live at a succeeded")
	}

	// Nothing crosses the links before anyone subscribes.
	for i := 0; i < 10; i++ {
		pub.WriteRTP(0, rtpPacket(t, uint16(i), uint32(i), i == 0, 1000))
	}
	if n := linkSent(a, "b"); n != 0 {
		t.Fatalf("a sent %d packets to b with nobody watching", n)
	}

	q := NewQueue(4096)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(5*time.Second))
	defer cancel()
	sub, err := c.Subscribe(ctx, "x", q)
	if err != nil {
		t.Fatal(err)
	}
	if d := sub.Description(); len(d.Tracks) != 2 || d.Tracks[0].MimeType != MimeH264 {
		t.Fatalf("description at c: %+v", d)
	}
	tap, err := c.Subscribe(ctx, "x", tapSub{})
	if err != nil {
		t.Fatal(err)
	}
	if s := c.Streams(); len(s) != 1 || !s[0].Local || s[0].Subscribers != 1 || fmt.Sprint(s[0].Hops) != "[a b c]" {
		t.Fatalf("c lists %+v, want x relayed through [a b c] with 1 subscriber (the tap is no viewer)", s)
	}
	tap.Close()
	// GOP replay (10 packets) then 300 live ones of 1472 bytes, as ffmpeg
	// sends: each needs two datagrams.
	const live = 300
	for i := 10; i < 10+live; i++ {
		pub.WriteRTP(0, rtpPacket(t, uint16(i), uint32(i), false, 1472))
		if i%5 == 0 { // ~2500 packets/s: a 30 Mbit/s stream; datagrams have no retransmission yet
			time.Sleep(2 * time.Millisecond)
		}
	}
	next := uint16(0)
	timeout := time.After(testutil.Scale(5 * time.Second))
	for next < 10+live {
		select {
		case buf := <-q.C():
			data := buf.Data()
			if seq := RTPSequence(data); seq != next {
				t.Fatalf("got sequence %d, want %d (gap or reorder)", seq, next)
			}
			want := rtpPacket(t, next, uint32(next), next == 0, map[bool]int{true: 1000, false: 1472}[next < 10])
			if string(data) != string(want) {
				t.Fatalf("packet %d arrived altered (%d bytes, want %d)", next, len(data), len(want))
			}
			if (next == 0) != buf.Keyframe {
				t.Fatalf("packet %d keyframe flag %v", next, buf.Keyframe)
			}
			buf.Release()
			next++
		case <-timeout:
			t.Fatalf("received %d of %d packets", next, 10+live)
		}
	}

	// A keyframe request at c reaches the publisher at a.
	sub.RequestKeyframe()
	select {
	case <-keyframes:
	case <-time.After(testutil.Scale(2 * time.Second)):
		t.Fatal("keyframe request from c never reached the publisher at a")
	}

	// When the last subscriber leaves, the stream stops crossing the links.
	sub.Close()
	testutil.WaitFor(t, "b stops relaying x", func() bool {
		for _, s := range b.Streams() {
			if s.Name == "x" && s.Local {
				return false
			}
		}
		return true
	})
	// b's unsubscribe takes a moment to reach a: wait until a has let go.
	testutil.WaitFor(t, "a stops sending x to b", func() bool {
		for _, s := range a.Streams() {
			if s.Name == "x" && s.Subscribers > 0 {
				return false
			}
		}
		return true
	})
	before := linkSent(a, "b")
	for i := 0; i < 20; i++ {
		pub.WriteRTP(0, rtpPacket(t, uint16(400+i), 0, false, 100))
	}
	time.Sleep(50 * time.Millisecond)
	if after := linkSent(a, "b"); after != before {
		t.Fatalf("a still sent %d packets to b after the last viewer left", after-before)
	}

	// The publisher leaving ends the stream everywhere.
	sub2, err := c.Subscribe(ctx, "x", NewQueue(16))
	if err != nil {
		t.Fatal(err)
	}
	pub.Close()
	select {
	case <-sub2.Done():
		if !strings.Contains(sub2.Err().Error(), "publisher left") {
			t.Fatalf("stream ended with %v", sub2.Err())
		}
	case <-time.After(testutil.Scale(2 * time.Second)):
		t.Fatal("c's subscriber was not told the stream ended")
	}
	testutil.WaitFor(t, "c forgets x", func() bool { return len(c.Streams()) == 0 })
	if _, err := c.Subscribe(ctx, "x", NewQueue(1)); err == nil || !strings.Contains(err.Error(), "not live") {
		t.Fatalf("subscribing to an ended stream: %v", err)
	}
}

func linkSent(h *Hub, peer string) uint64 {
	for _, l := range h.Links() {
		if l.Peer == peer {
			return l.PacketsSent
		}
	}
	return 0
}

// stalled is a subscriber that never drains its queue.
func TestStalledDownstreamDoesNotStopSibling(t *testing.T) {
	hubs := chain(t, "a", "b", "c")
	a, c := hubs[0], hubs[2]
	pub, err := a.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	testutil.WaitFor(t, "c learns of x", func() bool { return len(c.Streams()) == 1 })
	ctx := context.Background()
	stalled := NewQueue(8) // never read
	s1, err := c.Subscribe(ctx, "x", stalled)
	if err != nil {
		t.Fatal(err)
	}
	defer s1.Close()
	healthy := NewQueue(2048)
	s2, err := a.Subscribe(ctx, "x", healthy)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	const n = 1000
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < n; i++ {
			pub.WriteRTP(0, rtpPacket(t, uint16(i), uint32(i), i == 0, 500))
		}
	}()
	select {
	case <-done:
	case <-time.After(testutil.Scale(5 * time.Second)):
		t.Fatal("publisher blocked by a stalled subscriber")
	}
	if healthy.Len() != n {
		t.Fatalf("healthy sibling got %d of %d packets", healthy.Len(), n)
	}
	testutil.WaitFor(t, "the stalled queue drops", func() bool { return stalled.Dropped() > 0 })
	healthy.Drain()
	stalled.Drain()
}

type tapSub struct{}

func (tapSub) WritePacket(*Packet) {}
func (tapSub) Tap()                {}

func TestPacketsAreSharedNotCopiedPerViewer(t *testing.T) {
	h := NewHub(Config{Datacenter: "a", Logger: quietLogger()})
	defer h.Close()
	pub, err := h.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	q1, q2 := NewQueue(4), NewQueue(4)
	for _, q := range []*Queue{q1, q2} {
		sub, err := h.Subscribe(context.Background(), "x", q)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Close()
	}
	pub.WriteRTP(0, rtpPacket(t, 1, 1, true, 300))
	b1, b2 := <-q1.C(), <-q2.C()
	if b1 != b2 {
		t.Fatal("each viewer got its own copy of the packet")
	}
	if got := b1.refs.Load(); got != 3 { // the GOP cache and two queues
		t.Fatalf("shared buffer has %d references, want 3", got)
	}
	b1.Release()
	b2.Release()
	// A third viewer's GOP replay references the same buffer again.
	q3 := NewQueue(4)
	sub, err := h.Subscribe(context.Background(), "x", q3)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if b3 := <-q3.C(); b3 != b1 || string(b3.Data()) != string(rtpPacket(t, 1, 1, true, 300)) {
		t.Fatal("GOP replay did not hand out the cached packet")
	} else {
		b3.Release()
	}
	if got := b1.refs.Load(); got != 1 {
		t.Fatalf("after the viewers released it the buffer has %d references, want 1 (the GOP cache)", got)
	}
}
