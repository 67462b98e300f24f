package relay

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/pion/rtp"
	"github.com/pion/rtp/codecs"
)

// x264 encodes 48 frames of test pattern of the given size (a keyframe every
// 24) with libx264 and the extra arguments, and returns the Annex-B
// elementary stream and the picture types ffprobe decodes from it, counted.
func x264(t *testing.T, size string, args ...string) (es []byte, types map[string]int) {
	t.Helper()
	if _, err := exec.LookPath("ffmpeg"); err != nil {
		t.Fatalf("this test encodes video with ffmpeg: %v (apt-get install -y ffmpeg, or bash scripts/test.sh)", err)
	}
	path := t.TempDir() + "/x.h264"
	cmd := append([]string{"-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=" + size + ":rate=30",
		"-frames:v", "48", "-pix_fmt", "yuv420p", "-c:v", "libx264", "-g", "24"}, args...)
	if out, err := exec.Command("ffmpeg", append(cmd, "-f", "h264", path)...).CombinedOutput(); err != nil {
		t.Fatalf("ffmpeg %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	out, err := exec.Command("ffprobe", "-v", "error", "-show_entries", "frame=pict_type", "-of", "default=nw=1:nk=1", path).Output()
	if err != nil {
		t.Fatalf("ffprobe: %v", err)
	}
	types = map[string]int{}
	for _, f := range strings.Fields(string(out)) {
		if f == "I" || f == "P" || f == "B" {
			types[f]++
		}
	}
	es, err = os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return es, types
}

// nalUnits splits an Annex-B stream into NAL units.
func nalUnits(es []byte) [][]byte {
	var out [][]byte
	for _, n := range bytes.Split(es, []byte{0, 0, 1}) {
		if n = bytes.TrimRight(n, "\x00"); len(n) > 0 {
			out = append(out, n)
		}
	}
	return out
}

// pictureTypes names the slice type of each picture's first slice, counted,
// and counts the slices.
func pictureTypes(t *testing.T, nals [][]byte) (types map[string]int, slices int) {
	t.Helper()
	types = map[string]int{}
	for _, n := range nals {
		if typ := n[0] & 0x1f; typ != 1 && typ != 5 {
			continue
		}
		first, st, ok := h264SliceHeader(n[1:])
		if !ok {
			t.Fatalf("cannot read the slice header of a NAL unit starting % x", n[:min(len(n), 8)])
		}
		slices++
		if first == 0 { // a picture's first slice
			types[string("PBI"[st%5])]++ // 0 P, 1 B, 2 I (3 SP and 4 SI are not in x264 output)
		}
	}
	return types, slices
}

// TestSliceTypesOfX264Output reads the slice type of every picture of real
// x264 output and compares the counts with ffprobe's decoded picture types.
func TestSliceTypesOfX264Output(t *testing.T) {
	for _, tc := range []struct {
		name   string
		size   string
		args   []string
		wantB  bool
		slices int // per picture
	}{
		{"defaults", "320x240", nil, true, 1},
		{"bf0", "320x240", []string{"-bf", "0"}, false, 1},
		// Sliced threads: several slices per picture.
		{"zerolatency", "320x240", []string{"-tune", "zerolatency", "-threads", "2"}, false, 2},
		// first_mb_in_slice up to 900: 19 bits of Exp-Golomb code.
		{"slices", "640x480", []string{"-slices", "4", "-preset", "superfast"}, true, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			es, want := x264(t, tc.size, tc.args...)
			got, slices := pictureTypes(t, nalUnits(es))
			if slices != 48*tc.slices {
				t.Errorf("%d slices in 48 pictures, want %d", slices, 48*tc.slices)
			}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("slice types %v, ffprobe decoded %v", got, want)
			}
			if hasB := got["B"] > 0; hasB != tc.wantB {
				t.Fatalf("B slices: %v, want %v (%v)", hasB, tc.wantB, got)
			}
		})
	}
}

// packetize turns an Annex-B stream into RTP packets as a browser or ffmpeg
// would: single NAL unit packets, FU-A fragments of at most mtu bytes, and
// STAP-A for the parameter sets.
func packetize(es []byte, mtu uint16) [][]byte {
	p := rtp.NewPacketizer(mtu, 96, 0x1234, &codecs.H264Payloader{}, rtp.NewFixedSequencer(1), 90000)
	var out [][]byte
	for _, n := range nalUnits(es) {
		for _, pkt := range p.Packetize(append([]byte{0, 0, 0, 1}, n...), 3000) {
			b, _ := pkt.Marshal()
			out = append(out, b)
		}
	}
	return out
}

// TestPublisherFlagsBFrames publishes real x264 output, packetized small
// (every slice in FU-A fragments) and large (single NAL unit packets), and
// checks that the stream is flagged exactly when it has B-frames.
func TestPublisherFlagsBFrames(t *testing.T) {
	withB, _ := x264(t, "320x240")
	withoutB, _ := x264(t, "320x240", "-bf", "0")
	for _, tc := range []struct {
		name string
		es   []byte
		mtu  uint16
		want bool
	}{
		{"defaults/FU-A", withB, 200, true},
		{"defaults/single", withB, 1400, true},
		{"bf0/FU-A", withoutB, 200, false},
		{"bf0/single", withoutB, 1400, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := NewHub(Config{Datacenter: "a", Logger: quietLogger()})
			defer h.Close()
			pub, err := h.Publish("x", h264Desc, PublishOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer pub.Close()
			pkts := packetize(tc.es, tc.mtu)
			for _, b := range pkts {
				if err := pub.WriteRTP(0, b); err != nil {
					t.Fatal(err)
				}
			}
			got := pub.Stream().Flags()&FlagBFrames != 0
			info := h.Streams()
			if got != tc.want || len(info) != 1 || info[0].BFrames != tc.want {
				t.Fatalf("after %d packets: flag %v, listed %+v; want b_frames %v", len(pkts), got, info, tc.want)
			}
		})
	}
}

// TestBSliceInSTAPA finds a B slice aggregated with other NAL units, and
// nothing in packets that only look alike.
func TestBSliceInSTAPA(t *testing.T) {
	bSlice := []byte{0x01, 0xa8, 0x42}  // non-IDR slice: first_mb 0 (1), slice_type 1 (010)
	bSlice6 := []byte{0x21, 0x9c, 0x00} // first_mb 0, slice_type 6 (00111)
	pSlice := []byte{0x41, 0x9a, 0x42}  // first_mb 0, slice_type 5 (00110)
	aud := []byte{0x09, 0xf0}
	stap := func(nals ...[]byte) []byte {
		b := []byte{0x18}
		for _, n := range nals {
			b = append(b, byte(len(n)>>8), byte(len(n)))
			b = append(b, n...)
		}
		return b
	}
	for _, tc := range []struct {
		name    string
		payload []byte
		want    bool
	}{
		{"single B", bSlice, true},
		{"single B (type 6)", bSlice6, true},
		{"single P", pSlice, false},
		{"STAP-A AUD+B", stap(aud, bSlice), true},
		{"STAP-A AUD+P", stap(aud, pSlice), false},
		{"STAP-A truncated", stap(aud, bSlice)[:6], false},
		{"FU-A start of B", []byte{0x1c, 0x81, 0xa8, 0x42}, true},
		{"FU-A middle of B", []byte{0x1c, 0x01, 0xa8, 0x42}, false},
		{"FU-A start of IDR", []byte{0x1c, 0x85, 0xa8, 0x42}, false},
		{"IDR with B bits", []byte{0x65, 0xa8, 0x42}, false},
		{"empty", nil, false},
		// 00 00 03 is emulation prevention: unescaped 00 00 08 00 00 1c is
		// first_mb_in_slice 2^20-1 (the most it may be), then slice_type 6.
		{"escaped", []byte{0x01, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x03, 0x1c}, true},
		{"first_mb too large", []byte{0x01, 0x00, 0x00, 0x07, 0x00, 0x00, 0x1c}, false},
	} {
		if got := h264BSlice(tc.payload); got != tc.want {
			t.Errorf("%s: h264BSlice(% x) = %v, want %v", tc.name, tc.payload, got, tc.want)
		}
	}
}

// TestWriteRTPInspectsWithoutAllocating checks that looking for B slices adds
// no allocation to the publisher's per-packet path, before and after one is
// found.
func TestWriteRTPInspectsWithoutAllocating(t *testing.T) {
	h := NewHub(Config{Datacenter: "a", Logger: quietLogger()})
	defer h.Close()
	pub, err := h.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	pkt := func(payload []byte) []byte {
		b, _ := (&rtp.Packet{Header: rtp.Header{Version: 2, PayloadType: 96, SequenceNumber: 1, Timestamp: 3000}, Payload: payload}).Marshal()
		return b
	}
	p, b := pkt([]byte{0x41, 0x9a, 0x42, 0x17}), pkt([]byte{0x01, 0xa8, 0x42, 0x17})
	if n := testing.AllocsPerRun(1000, func() { pub.WriteRTP(0, p) }); n != 0 {
		t.Errorf("WriteRTP of a P slice: %v allocations, want 0", n)
	}
	if pub.Stream().Flags() != 0 {
		t.Fatalf("P slices flagged the stream %v", pub.Stream().Flags())
	}
	pub.WriteRTP(0, b)
	if pub.Stream().Flags() != FlagBFrames {
		t.Fatalf("a B slice left the stream's flags at %v", pub.Stream().Flags())
	}
	if n := testing.AllocsPerRun(1000, func() { pub.WriteRTP(0, b) }); n != 0 {
		t.Errorf("WriteRTP of a B slice: %v allocations, want 0", n)
	}
}

// refSliceHeader is a plain reading of the start of a slice header, bit by
// bit over the whole unescaped NAL unit, for the fuzz test to compare with.
func refSliceHeader(rbsp []byte) (firstMB, typ uint32, ok bool) {
	var unesc []byte
	zeros := 0
	for _, c := range rbsp {
		if zeros >= 2 && c == 3 {
			zeros = 0
			continue
		}
		if c == 0 {
			zeros++
		} else {
			zeros = 0
		}
		unesc = append(unesc, c)
	}
	pos := 0
	bit := func() (uint64, bool) {
		if pos >= 8*len(unesc) {
			return 0, false
		}
		v := uint64(unesc[pos/8]>>(7-pos%8)) & 1
		pos++
		return v, true
	}
	ue := func() (uint64, bool) {
		n := 0
		for {
			b, ok := bit()
			if !ok {
				return 0, false
			}
			if b == 1 {
				break
			}
			n++
			if n > 32 {
				return 0, false
			}
		}
		v := uint64(1)
		for range n {
			b, ok := bit()
			if !ok {
				return 0, false
			}
			v = v<<1 | b
		}
		return v - 1, true
	}
	f, ok1 := ue()
	if !ok1 || f >= 1<<20 {
		return 0, 0, false
	}
	s, ok2 := ue()
	if !ok2 || s > 9 {
		return 0, 0, false
	}
	return uint32(f), uint32(s), true
}

func FuzzH264SliceHeader(f *testing.F) {
	for _, seed := range [][]byte{
		{0xa8, 0x42}, {0x9a, 0x42}, {0x88, 0x84}, {0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x03, 0x1c},
		{0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00}, {0x00, 0x01, 0xff, 0xff, 0xff, 0xff}, {},
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, rbsp []byte) {
		first, typ, ok := h264SliceHeader(rbsp)
		rfirst, rtyp, rok := refSliceHeader(rbsp)
		if first != rfirst || typ != rtyp || ok != rok {
			t.Fatalf("h264SliceHeader(% x) = %d, %d, %v; the plain reading gives %d, %d, %v", rbsp, first, typ, ok, rfirst, rtyp, rok)
		}
		// Whole RTP payloads built around it must not panic either.
		for _, hdr := range [][]byte{{0x01}, {0x1c, 0x81}, {0x18, 0x00, byte(len(rbsp) + 1), 0x01}} {
			h264BSlice(append(hdr, rbsp...))
		}
		h264BSlice(rbsp)
	})
}
