package relay

import (
	"context"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"

	"github.com/pion/rtp"
)

// h264Packet makes an RTP packet of the first video track with the given
// payload.
func h264Packet(t *testing.T, seq uint16, ts uint32, payload []byte) []byte {
	t.Helper()
	b, err := (&rtp.Packet{Header: rtp.Header{Version: 2, PayloadType: 96, SequenceNumber: seq, Timestamp: ts, SSRC: 1}, Payload: payload}).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

var (
	idrSlice = []byte{0x65, 0x88, 0x84, 0x21} // first_mb 0, slice_type 7 (I)
	pSlice   = []byte{0x41, 0x9a, 0x42, 0x17} // slice_type 5 (P)
	bSlice   = []byte{0x01, 0x9e, 0x42, 0x17} // slice_type 6 (B)
)

// listed returns how hub h lists stream x.
func listed(h *Hub) StreamInfo {
	for _, s := range h.Streams() {
		if s.Name == "x" {
			return s
		}
	}
	return StreamInfo{}
}

// TestBFramesFlagCrossesTheOverlay publishes at a and watches at c (a – b –
// c): a B slice that appears after c subscribed reaches b and c in a
// stream-flags message; a subscription made later gets the flag with the
// stream's description, before its first packet.
func TestBFramesFlagCrossesTheOverlay(t *testing.T) {
	testutil.CheckLeaks(t)
	hubs := chain(t, "a", "b", "c")
	a, b, c := hubs[0], hubs[1], hubs[2]
	pub, err := a.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	testutil.WaitFor(t, "c learns of x", func() bool { return listed(c).Name == "x" })

	pub.WriteRTP(0, h264Packet(t, 1, 0, idrSlice))
	pub.WriteRTP(0, h264Packet(t, 2, 3000, pSlice))
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(5*time.Second))
	defer cancel()
	q := NewQueue(64)
	sub, err := c.Subscribe(ctx, "x", q)
	if err != nil {
		t.Fatal(err)
	}
	if f := sub.Stream().Flags(); f != 0 || listed(a).BFrames || listed(c).BFrames {
		t.Fatalf("a stream of I and P slices is flagged %v (a lists %+v, c %+v)", f, listed(a), listed(c))
	}

	// x264 with its defaults: the first B slice comes a few frames in.
	pub.WriteRTP(0, h264Packet(t, 3, 9000, bSlice))
	if !listed(a).BFrames {
		t.Fatalf("a B slice published at a: a lists %+v, want b_frames", listed(a))
	}
	testutil.WaitFor(t, "b and c list x with b_frames", func() bool { return listed(b).BFrames && listed(c).BFrames })
	if f := sub.Stream().Flags(); f != FlagBFrames {
		t.Fatalf("c's subscription sees flags %v, want %v", f, FlagBFrames)
	}

	// Everyone leaves; b and c stop relaying x after the linger time.
	sub.Close()
	testutil.WaitFor(t, "b and c stop relaying x", func() bool { return !listed(b).Local && !listed(c).Local })

	// A new viewer at c: the flag arrives with the description, hop by hop,
	// before any packet.
	sub, err = c.Subscribe(ctx, "x", NewQueue(64))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if f := sub.Stream().Flags(); f != FlagBFrames || !listed(c).BFrames || !listed(b).BFrames {
		t.Fatalf("a new subscription at c sees flags %v (b lists %+v, c %+v), want b_frames at once", f, listed(b), listed(c))
	}
}

// TestBFramesFlagInAnnouncements: datacenters that know a stream only by
// announcement list its flags too. Stream x with B-frames and stream y
// without are published at a (a – b – c) and watched nowhere: b and c list
// x with b_frames and y without, and a flag found after the stream was
// announced is announced again.
func TestBFramesFlagInAnnouncements(t *testing.T) {
	testutil.CheckLeaks(t)
	hubs := chain(t, "a", "b", "c")
	a, b, c := hubs[0], hubs[1], hubs[2]
	find := func(h *Hub, name string) StreamInfo {
		for _, s := range h.Streams() {
			if s.Name == name {
				return s
			}
		}
		return StreamInfo{}
	}
	x, err := a.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	y, err := a.Publish("y", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer y.Close()
	testutil.WaitFor(t, "c learns of x and y", func() bool { return find(c, "x").Name == "x" && find(c, "y").Name == "y" })
	for i, p := range [][]byte{idrSlice, pSlice, bSlice, pSlice} {
		x.WriteRTP(0, h264Packet(t, uint16(i), uint32(i)*3000, p))
	}
	for i, p := range [][]byte{idrSlice, pSlice, pSlice} {
		y.WriteRTP(0, h264Packet(t, uint16(i), uint32(i)*3000, p))
	}
	if !find(a, "x").BFrames {
		t.Fatalf("a lists x as %+v, want b_frames", find(a, "x"))
	}
	testutil.WaitFor(t, "b and c list x with b_frames", func() bool { return find(b, "x").BFrames && find(c, "x").BFrames })
	for _, h := range []*Hub{b, c} {
		if s := find(h, "x"); s.Local {
			t.Errorf("%s relays x (%+v): nobody watches it", h.Datacenter(), s)
		}
		if s := find(h, "y"); s.Name != "y" || s.BFrames || s.Local {
			t.Errorf("%s lists y as %+v, want known by announcement, without b_frames", h.Datacenter(), s)
		}
	}

	// A datacenter linked later learns x's flags with its first
	// announcement.
	d := NewHub(Config{Datacenter: "d", Logger: quietLogger()})
	defer d.Close()
	pipeHubs(t, c, d)
	testutil.WaitFor(t, "d lists x with b_frames", func() bool { return find(d, "x").BFrames })
	if s := find(d, "y"); s.Name != "y" || s.BFrames {
		t.Errorf("d lists y as %+v, want it without b_frames", s)
	}
}
