package relay

import (
	"bufio"
	"bytes"
	"io"
	"math/rand/v2"
	"reflect"
	"testing"
)

var sampleControl = []controlMsg{
	{Type: msgHello, Version: wireVersion, Datacenter: "a"},
	{Type: msgAnnounce, Stream: "x", Hops: []string{"a", "b"}},
	{Type: msgAnnounce, Stream: "y", Hops: []string{"a"}, Flags: uint32(FlagBFrames)},
	{Type: msgUnannounce, Stream: "x"},
	{Type: msgSubscribe, SubID: 7, Stream: "x"},
	{Type: msgSubscribeOK, SubID: 7, Desc: h264Desc},
	{Type: msgSubscribeOK, SubID: 8, Desc: h264Desc, Flags: uint32(FlagBFrames)},
	{Type: msgStreamFlags, SubID: 7, Flags: uint32(FlagBFrames)},
	{Type: msgSubscribeError, SubID: 7, Code: codeNotFound, Reason: "stream not found"},
	{Type: msgUnsubscribe, SubID: 7},
	{Type: msgStreamEnd, SubID: 7, Reason: "publisher left"},
	{Type: msgStreamEnd, SubID: 7, Reason: "publisher left", Code: codePublisherGone},
	{Type: msgSubscribeOK, SubID: 9, Desc: h264Desc, Hops: []string{"a", "b"}},
	{Type: msgStreamPath, SubID: 9, Hops: []string{"a", "c", "b"}},
	{Type: msgKeyframeRequest, SubID: 1 << 31},
}

func TestControlRoundTrip(t *testing.T) {
	var stream []byte
	for i := range sampleControl {
		stream = appendControl(stream, &sampleControl[i])
	}
	br := bufio.NewReader(bytes.NewReader(stream))
	for i := range sampleControl {
		m, err := readControl(br, func(b []byte) error { _, err := io.ReadFull(br, b); return err })
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if !reflect.DeepEqual(*m, sampleControl[i]) {
			t.Fatalf("message %d: got %+v, want %+v", i, *m, sampleControl[i])
		}
	}
}

// TestAnnounceFlagsAreOptional: an announce of a stream without flags is
// encoded as before flags were added to it, byte for byte, and one without
// the flags field parses as flags 0, so nodes of this wire version that
// predate the field and newer ones agree on every stream without flags.
func TestAnnounceFlagsAreOptional(t *testing.T) {
	old := []byte{msgAnnounce, 1, 'x', 2, 1, 'a', 1, 'b'} // stream x, hops a,b
	if got := appendControl(nil, &controlMsg{Type: msgAnnounce, Stream: "x", Hops: []string{"a", "b"}}); !bytes.Equal(got[1:], old) {
		t.Errorf("announce without flags encodes as %v, want %v", got[1:], old)
	}
	m, err := parseControl(old)
	if err != nil || m.Flags != 0 || m.Stream != "x" || len(m.Hops) != 2 {
		t.Errorf("parseControl(%v) = %+v, %v; want x over a,b without flags", old, m, err)
	}
	withFlags := append(old, byte(FlagBFrames))
	if m, err := parseControl(withFlags); err != nil || Flags(m.Flags) != FlagBFrames {
		t.Errorf("parseControl(%v) = %+v, %v; want flags %v", withFlags, m, err, FlagBFrames)
	}
}

func TestControlRejectsGarbage(t *testing.T) {
	for _, body := range [][]byte{
		{},                        // no type
		{99},                      // unknown type
		{msgSubscribe, 0x80},      // truncated varint
		{msgSubscribe, 1, 5, 'x'}, // truncated string
		{msgUnsubscribe, 1, 0},    // trailing byte
		{msgStreamFlags, 1},       // no flags
		{msgStreamFlags, 1, 0x80, 0x80, 0x80, 0x80, 0x10},              // flags over 32 bits
		{msgSubscribeOK, 1, 9},                                         // too many tracks
		{msgAnnounce, 1, 'x', 65},                                      // too many hops
		{msgAnnounce, 1, 'x', 1, 1, 'a', 0x80, 0x80, 0x80, 0x80, 0x10}, // flags over 32 bits
		{msgAnnounce, 1, 'x', 1, 1, 'a', 1, 0},                         // trailing byte after the flags
		{msgSubscribe, 0x80, 0x80, 0x80, 0x80, 0x10, 1, 'x'},           // id over 32 bits
	} {
		if m, err := parseControl(body); err == nil {
			t.Errorf("parseControl(%v) = %+v, want an error", body, m)
		}
	}
}

func FuzzControl(f *testing.F) {
	for i := range sampleControl {
		b := appendControl(nil, &sampleControl[i])
		f.Add(b[1:]) // the one-byte length prefix of these small messages
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		m, err := parseControl(body)
		if err != nil {
			return
		}
		// What parses must encode back to something that parses the same.
		enc := appendControl(nil, m)
		br := bufio.NewReader(bytes.NewReader(enc))
		m2, err := readControl(br, func(b []byte) error { _, err := io.ReadFull(br, b); return err })
		if err != nil {
			t.Fatalf("re-encoded message does not parse: %v", err)
		}
		if !reflect.DeepEqual(m, m2) {
			t.Fatalf("round trip changed %+v into %+v", m, m2)
		}
	})
}

func FuzzMediaHeader(f *testing.F) {
	h := mediaHeader{Flags: flagKeyframe, Track: 1, SubID: 9, HopSeq: 77}
	f.Add(append(h.append(nil), 0x80, 96))
	h.Flags |= flagFragment
	h.FragIndex, h.FragCount = 1, 2
	f.Add(append(h.append(nil), 1, 2, 3))
	f.Add([]byte{0x10})
	f.Fuzz(func(t *testing.T, b []byte) {
		var h mediaHeader
		payload, err := parseMediaHeader(b, &h)
		if err != nil {
			return
		}
		enc := append(h.append(nil), payload...)
		if !bytes.Equal(enc, b) {
			t.Fatalf("header round trip: %x became %x", b, enc)
		}
		// Feed it to a reassembler too: it must never panic.
		if h.Flags&flagFragment != 0 {
			var r reassembler
			r.add(&h, payload)
		}
	})
}

// fragments splits pkt as the sender would.
func splitPacket(t *testing.T, pkt []byte, budget int, seq uint32) [][]byte {
	var out [][]byte
	h := mediaHeader{SubID: 3, HopSeq: seq}
	err := fragment(h, pkt, budget, make([]byte, 0, 2048), func(b []byte) error {
		if len(b) > budget {
			t.Fatalf("datagram of %d bytes over the %d budget", len(b), budget)
		}
		out = append(out, bytes.Clone(b))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func reassemble(t *testing.T, r *reassembler, dgrams [][]byte) [][]byte {
	var out [][]byte
	for _, d := range dgrams {
		var h mediaHeader
		payload, err := parseMediaHeader(d, &h)
		if err != nil {
			t.Fatal(err)
		}
		if h.Flags&flagFragment == 0 {
			out = append(out, bytes.Clone(payload))
			continue
		}
		if pkt, ok := r.add(&h, payload); ok {
			out = append(out, bytes.Clone(pkt))
		}
	}
	return out
}

func TestFragmentsLostReorderedDuplicated(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	pkts := make([][]byte, 40)
	for i := range pkts {
		pkts[i] = rtpPacket(t, uint16(i), 0, false, 1472)
	}
	var dgrams [][]byte
	for i, p := range pkts {
		f := splitPacket(t, p, minDatagramPayload, uint32(i))
		if len(f) != 2 {
			t.Fatalf("1472-byte packet took %d datagrams, want 2", len(f))
		}
		dgrams = append(dgrams, f...)
	}
	// Lose the second fragment of packet 5, duplicate everything of packet
	// 7, and shuffle within windows of 6 datagrams.
	var wire [][]byte
	for i, d := range dgrams {
		if i == 11 {
			continue
		}
		wire = append(wire, d)
		if i/2 == 7 {
			wire = append(wire, d)
		}
	}
	for i := 0; i+6 <= len(wire); i += 6 {
		rng.Shuffle(6, func(a, b int) { wire[i+a], wire[i+b] = wire[i+b], wire[i+a] })
	}
	var r reassembler
	got := reassemble(t, &r, wire)
	seen := map[uint16]int{}
	for _, p := range got {
		seq := RTPSequence(p)
		if !bytes.Equal(p, pkts[seq]) {
			t.Fatalf("packet %d reassembled wrong", seq)
		}
		seen[seq]++
	}
	for i := range pkts {
		want := 1
		if i == 5 {
			want = 0
		}
		if seen[uint16(i)] != want {
			t.Errorf("packet %d delivered %d times, want %d", i, seen[uint16(i)], want)
		}
	}
}

func TestFragmentSmallBudget(t *testing.T) {
	p := rtpPacket(t, 1, 0, false, 1500)
	f := splitPacket(t, p, 400, 1)
	if len(f) != 4 {
		t.Fatalf("got %d fragments, want 4", len(f))
	}
	var r reassembler
	if got := reassemble(t, &r, [][]byte{f[3], f[1], f[0], f[2]}); len(got) != 1 || !bytes.Equal(got[0], p) {
		t.Fatal("reordered fragments did not reassemble")
	}
}

func BenchmarkFragmentReassemble(b *testing.B) {
	p := rtpPacket(b, 1, 0, false, 1472)
	scratch := make([]byte, 0, 2048)
	var r reassembler
	b.ReportAllocs()
	b.SetBytes(int64(len(p)))
	for i := 0; b.Loop(); i++ {
		h := mediaHeader{SubID: 1, HopSeq: uint32(i)}
		fragment(h, p, minDatagramPayload, scratch, func(d []byte) error {
			var hh mediaHeader
			payload, _ := parseMediaHeader(d, &hh)
			r.add(&hh, payload)
			return nil
		})
	}
}
