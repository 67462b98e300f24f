package rtsp

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/bluenviron/gortsplib/v4/pkg/description"
	"github.com/bluenviron/gortsplib/v4/pkg/format"
	"github.com/bluenviron/gortsplib/v4/pkg/format/rtph264"
	"github.com/pion/rtp"

	"github.com/stemflow/stemflow/relay"
)

var (
	testSPS  = []byte{0x67, 0x64, 0x00, 0x1e, 0xac, 0xd9, 0x40, 0xa0, 0x2f, 0xf9, 0x70, 0x11}
	testPPS  = []byte{0x68, 0xeb, 0xe3, 0xcb, 0x22, 0xc0}
	testSPS2 = []byte{0x67, 0x42, 0xc0, 0x1f, 0xda, 0x01, 0x40, 0x16, 0xe8}
	testPPS2 = []byte{0x68, 0xce, 0x0f, 0xc8}
)

func nalu(typ byte, size int) []byte {
	b := make([]byte, size)
	b[0] = 0x60 | typ
	for i := 1; i < size; i++ {
		b[i] = byte(i * 7)
	}
	return b
}

// ffmpegPackets packetizes access units like ffmpeg does: up to 1460-byte
// payloads.
func ffmpegPackets(t *testing.T, aus [][][]byte, tss []uint32) []*rtp.Packet {
	t.Helper()
	enc := &rtph264.Encoder{PayloadType: 96, PayloadMaxSize: 1460, PacketizationMode: 1}
	if err := enc.Init(); err != nil {
		t.Fatal(err)
	}
	var out []*rtp.Packet
	for i, au := range aus {
		pkts, err := enc.Encode(au)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pkts {
			p.Timestamp = tss[i]
		}
		out = append(out, pkts...)
	}
	return out
}

type output struct {
	pkts []*rtp.Packet
}

func (o *output) emit(b []byte) {
	var p rtp.Packet
	if err := p.Unmarshal(bytes.Clone(b)); err != nil {
		panic(err)
	}
	o.pkts = append(o.pkts, &p)
}

func newTestH264(t *testing.T, sps, pps []byte) *h264Proc {
	t.Helper()
	h, err := newH264Proc(&format.H264{PayloadTyp: 96, SPS: sps, PPS: pps, PacketizationMode: 1}, 1234)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// decodeAll depacketizes with gortsplib's decoder, as a player would.
func decodeAll(t *testing.T, pkts []*rtp.Packet) (aus [][][]byte, tss []uint32) {
	t.Helper()
	dec := &rtph264.Decoder{PacketizationMode: 1}
	if err := dec.Init(); err != nil {
		t.Fatal(err)
	}
	for _, p := range pkts {
		au, err := dec.Decode(p)
		if errors.Is(err, rtph264.ErrMorePacketsNeeded) {
			continue
		}
		if err != nil {
			t.Fatalf("decoding our packet %d: %v", p.SequenceNumber, err)
		}
		aus, tss = append(aus, au), append(tss, p.Timestamp)
	}
	return aus, tss
}

func TestH264Repacketize(t *testing.T) {
	idr, p1, p2 := nalu(naluIDR, 5000), nalu(1, 3000), nalu(1, 40)
	idr2 := nalu(naluIDR, 1100)
	in := ffmpegPackets(t,
		[][][]byte{{nalu(1, 900)}, {idr}, {p1}, {p2}, {nalu(naluAUD, 2), testSPS2, testPPS2, idr2}},
		[]uint32{0, 3000, 6000, 9000, 12000})

	h := newTestH264(t, testSPS, testPPS)
	var out output
	for _, p := range in {
		if err := h.process(p, out.emit); err != nil {
			t.Fatal(err)
		}
	}

	for i, p := range out.pkts {
		if size := p.MarshalSize(); size > MaxPacketSize {
			t.Errorf("packet %d is %d bytes, want at most %d", i, size, MaxPacketSize)
		}
		if p.SSRC != 1234 || p.PayloadType != 96 {
			t.Errorf("packet %d: SSRC %d PT %d, want 1234 and 96", i, p.SSRC, p.PayloadType)
		}
		if i > 0 && p.SequenceNumber != out.pkts[i-1].SequenceNumber+1 {
			t.Errorf("packet %d: sequence number %d follows %d", i, p.SequenceNumber, out.pkts[i-1].SequenceNumber)
		}
	}
	aus, tss := decodeAll(t, out.pkts)
	want := [][][]byte{
		{testSPS, testPPS, idr}, // the P frame before the first IDR is dropped
		{p1},
		{p2},
		{testSPS2, testPPS2, idr2}, // new in-band parameters, no AUD
	}
	wantTS := []uint32{3000, 6000, 9000, 12000}
	if len(aus) != len(want) {
		t.Fatalf("got %d access units, want %d", len(aus), len(want))
	}
	for i := range want {
		if tss[i] != wantTS[i] {
			t.Errorf("access unit %d: timestamp %d, want %d", i, tss[i], wantTS[i])
		}
		if len(aus[i]) != len(want[i]) {
			t.Errorf("access unit %d: %d NAL units, want %d", i, len(aus[i]), len(want[i]))
			continue
		}
		for j := range want[i] {
			if !bytes.Equal(aus[i][j], want[i][j]) {
				t.Errorf("access unit %d NAL unit %d differs (type %d, want type %d)", i, j, aus[i][j][0]&0x1f, want[i][j][0]&0x1f)
			}
		}
	}
	if fmtp, ok := h.fmtp(""); !ok || !strings.Contains(fmtp, "profile-level-id=42c01f") {
		t.Errorf("fmtp after new in-band SPS = %q, %v", fmtp, ok)
	}
	// The relay sees a keyframe where the IDR starts.
	if !relay.IsKeyframe(relay.MimeH264, out.pkts[0].Payload) {
		t.Error("first packet is not a keyframe to the relay")
	}
}

func TestH264ParametersInBandOnly(t *testing.T) {
	h := newTestH264(t, nil, nil)
	if _, ok := h.fmtp(""); ok {
		t.Fatal("fmtp complete without SPS/PPS")
	}
	var out output
	for _, p := range ffmpegPackets(t, [][][]byte{{testSPS, testPPS, nalu(naluIDR, 2000)}}, []uint32{90}) {
		if err := h.process(p, out.emit); err != nil {
			t.Fatal(err)
		}
	}
	fmtp, ok := h.fmtp("")
	if !ok || fmtp != "packetization-mode=1;profile-level-id=64001e;sprop-parameter-sets=Z2QAHqzZQKAv+XAR,aOvjyyLA" {
		t.Errorf("fmtp = %q, %v", fmtp, ok)
	}
	if aus, _ := decodeAll(t, out.pkts); len(aus) != 1 || len(aus[0]) != 3 {
		t.Errorf("got %v access units", len(aus))
	}
}

func TestH264LostFragment(t *testing.T) {
	h := newTestH264(t, testSPS, testPPS)
	in := ffmpegPackets(t, [][][]byte{{nalu(naluIDR, 5000)}, {nalu(1, 4000)}, {nalu(1, 100)}}, []uint32{0, 3000, 6000})
	var out output
	var errs int
	for i, p := range in {
		if i == 5 { // a middle fragment of the P frame
			continue
		}
		if err := h.process(p, out.emit); err != nil {
			errs++
		}
	}
	if errs != 1 {
		t.Errorf("%d errors, want 1 for the lost fragment", errs)
	}
	aus, tss := decodeAll(t, out.pkts)
	if len(aus) != 2 || tss[0] != 0 || tss[1] != 6000 {
		t.Errorf("got access units at %v, want the IDR and the last P frame", tss)
	}
}

func TestPlan(t *testing.T) {
	aac := &format.MPEG4Audio{PayloadTyp: 97, SizeLength: 13, IndexLength: 3, IndexDeltaLength: 3}
	h264 := &format.H264{PayloadTyp: 96, PacketizationMode: 1, SPS: testSPS, PPS: testPPS}
	opus := &format.Opus{PayloadTyp: 111, ChannelCount: 2}

	_, _, err := plan(&description.Session{Medias: []*description.Media{{Type: description.MediaTypeAudio, Formats: []format.Format{aac}}}})
	if !errors.Is(err, ErrNoSupportedTrack) || !strings.Contains(err.Error(), "MPEG-4 Audio") || !strings.Contains(err.Error(), "H264, VP8 or Opus") {
		t.Errorf("AAC only: %v", err)
	}

	tracks, skipped, err := plan(&description.Session{Medias: []*description.Media{
		{Type: description.MediaTypeVideo, Formats: []format.Format{h264}},
		{Type: description.MediaTypeAudio, Formats: []format.Format{aac}},
		{Type: description.MediaTypeAudio, Formats: []format.Format{opus}},
	}})
	if err != nil || len(tracks) != 2 || !strings.Contains(skipped, "MPEG-4 Audio") {
		t.Fatalf("H264+AAC+Opus: %d tracks, skipped %q, %v", len(tracks), skipped, err)
	}
	if tr := tracks[0].track; tr.MimeType != relay.MimeH264 || tr.PayloadType != 96 ||
		tr.Fmtp != "packetization-mode=1;profile-level-id=64001e;sprop-parameter-sets=Z2QAHqzZQKAv+XAR,aOvjyyLA" {
		t.Errorf("H264 track %+v", tr)
	}
	if tr := tracks[1].track; tr.MimeType != relay.MimeOpus || tr.ClockRate != 48000 || tr.Channels != 2 || tr.PayloadType != 111 {
		t.Errorf("Opus track %+v", tr)
	}
}

func FuzzH264Depacketizer(f *testing.F) {
	f.Add([]byte{0x65, 1, 2, 3}, true, uint16(0), uint32(0))
	f.Add([]byte{0x18, 0, 2, 0x67, 0x64, 0, 2, 0x68, 1}, false, uint16(1), uint32(0))
	f.Add([]byte{0x7c, 0x85, 1, 2, 3}, false, uint16(2), uint32(90))
	f.Add([]byte{0x7c, 0x45, 4, 5}, true, uint16(3), uint32(90))
	h, err := newH264Proc(&format.H264{PayloadTyp: 96, SPS: testSPS, PPS: testPPS, PacketizationMode: 1}, 1)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, payload []byte, marker bool, seq uint16, ts uint32) {
		p := &rtp.Packet{Header: rtp.Header{Version: 2, PayloadType: 96, Marker: marker, SequenceNumber: seq, Timestamp: ts}, Payload: payload}
		_ = h.process(p, func(b []byte) {
			if len(b) > MaxPacketSize {
				t.Fatalf("packet of %d bytes", len(b))
			}
		})
	})
}

func BenchmarkH264Repacketize(b *testing.B) {
	in := ffmpegPackets(&testing.T{}, [][][]byte{{nalu(naluIDR, 20000)}, {nalu(1, 3000)}, {nalu(1, 800)}}, []uint32{0, 3000, 6000})
	h, _ := newH264Proc(&format.H264{PayloadTyp: 96, SPS: testSPS, PPS: testPPS, PacketizationMode: 1}, 1)
	emit := func([]byte) {}
	b.ReportAllocs()
	for b.Loop() {
		for _, p := range in {
			_ = h.process(p, emit)
		}
	}
}

// BenchmarkH264RepacketizeRtph264 does what h264Proc does with gortsplib's
// rtph264 decoder and encoder instead, for comparison.
func BenchmarkH264RepacketizeRtph264(b *testing.B) {
	in := ffmpegPackets(&testing.T{}, [][][]byte{{nalu(naluIDR, 20000)}, {nalu(1, 3000)}, {nalu(1, 800)}}, []uint32{0, 3000, 6000})
	dec := &rtph264.Decoder{PacketizationMode: 1}
	enc := &rtph264.Encoder{PayloadType: 96, PayloadMaxSize: MaxPacketSize - rtpHeaderSize, PacketizationMode: 1}
	if err := dec.Init(); err != nil {
		b.Fatal(err)
	}
	if err := enc.Init(); err != nil {
		b.Fatal(err)
	}
	var buf [MaxPacketSize]byte
	b.ReportAllocs()
	for b.Loop() {
		for _, p := range in {
			au, err := dec.Decode(p)
			if err != nil {
				continue
			}
			if au[0][0]&0x1f == naluIDR {
				au = append([][]byte{testSPS, testPPS}, au...)
			}
			pkts, err := enc.Encode(au)
			if err != nil {
				b.Fatal(err)
			}
			for _, q := range pkts {
				q.Timestamp = p.Timestamp
				if _, err := q.MarshalTo(buf[:]); err != nil {
					b.Fatal(err)
				}
			}
		}
	}
}

// fuzzAccessUnits cuts data into access units of NAL units (types 1 to 23,
// never AUD, SPS or PPS, which h264Proc handles itself), using sizes as the
// NAL unit lengths.
func fuzzAccessUnits(data, sizes []byte) [][][]byte {
	var aus [][][]byte
	var au [][]byte
	for i := 0; len(data) > 0 && i < len(sizes); i++ {
		n := min(len(data), 1+int(sizes[i])*37)
		nal := bytes.Clone(data[:n])
		data = data[n:]
		typ := 1 + nal[0]%23
		if typ == naluAUD || typ == naluSPS || typ == naluPPS {
			typ = 1
		}
		nal[0] = nal[0]&0x60 | typ
		au = append(au, nal)
		if sizes[i]&1 == 0 || len(au) >= 8 {
			aus, au = append(aus, au), nil
		}
	}
	if len(au) > 0 {
		aus = append(aus, au)
	}
	return aus
}

// FuzzH264AgainstRtph264 checks the hand-written depacketizer and packetizer
// against gortsplib's rtph264: what rtph264's encoder packetizes (any payload
// size) our depacketizer reassembles exactly, and what our packetizer makes
// rtph264's decoder reassembles exactly, in packets of at most MaxPacketSize
// bytes with continuous sequence numbers.
func FuzzH264AgainstRtph264(f *testing.F) {
	f.Add(bytes.Repeat([]byte{0x65, 1, 2, 3}, 200), []byte{20, 3, 1, 0, 5}, uint16(1460))
	f.Add([]byte{0x41, 9, 9, 9, 0x41, 8, 8}, []byte{0, 0}, uint16(100))
	f.Fuzz(func(t *testing.T, data, sizes []byte, payloadMax uint16) {
		aus := fuzzAccessUnits(data, sizes)
		if len(aus) == 0 {
			return
		}
		enc := &rtph264.Encoder{PayloadType: 96, PayloadMaxSize: 50 + int(payloadMax)%1450, PacketizationMode: 1}
		if err := enc.Init(); err != nil {
			t.Fatal(err)
		}
		var in []*rtp.Packet
		for i, au := range aus {
			pkts, err := enc.Encode(au)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range pkts {
				p.Timestamp = uint32(3000 * i)
			}
			in = append(in, pkts...)
		}

		// rtph264 → our depacketizer.
		var d h264Depacketizer
		var got [][][]byte
		for _, p := range in {
			if err := d.push(p, func(_ uint32, au [][]byte) {
				var c [][]byte
				for _, n := range au {
					c = append(c, bytes.Clone(n))
				}
				got = append(got, c)
			}); err != nil {
				t.Fatalf("depacketizing rtph264's packets: %v", err)
			}
		}
		if !equalAUs(got, aus) {
			t.Fatalf("depacketized %d access units from rtph264's packets, want the %d encoded", len(got), len(aus))
		}

		// Our packetizer → rtph264.
		p := h264Packetizer{pt: 96, ssrc: 1, seq: 65530, maxSize: MaxPacketSize}
		var out []*rtp.Packet
		for i, au := range aus {
			p.packetize(uint32(3000*i), au, func(b []byte) {
				if len(b) > MaxPacketSize {
					t.Fatalf("packet of %d bytes", len(b))
				}
				var q rtp.Packet
				if err := q.Unmarshal(bytes.Clone(b)); err != nil {
					t.Fatal(err)
				}
				if len(out) > 0 && q.SequenceNumber != out[len(out)-1].SequenceNumber+1 {
					t.Fatalf("sequence number %d after %d", q.SequenceNumber, out[len(out)-1].SequenceNumber)
				}
				out = append(out, &q)
			})
		}
		dec := &rtph264.Decoder{PacketizationMode: 1}
		if err := dec.Init(); err != nil {
			t.Fatal(err)
		}
		got = nil
		for _, q := range out {
			au, err := dec.Decode(q)
			if errors.Is(err, rtph264.ErrMorePacketsNeeded) {
				continue
			}
			if err != nil {
				t.Fatalf("rtph264 decoding our packet %d: %v", q.SequenceNumber, err)
			}
			got = append(got, au)
		}
		if !equalAUs(got, aus) {
			t.Fatalf("rtph264 decoded %d access units from our packets, want the %d packetized", len(got), len(aus))
		}
	})
}

func equalAUs(a, b [][][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if len(a[i]) != len(b[i]) {
			return false
		}
		for j := range a[i] {
			if !bytes.Equal(a[i][j], b[i][j]) {
				return false
			}
		}
	}
	return true
}

// TestH264UnplayableWarning publishes libx264 streams of several pixel
// formats and checks that those browsers cannot decode are named in a
// warning, from their SPS.
func TestH264UnplayableWarning(t *testing.T) {
	for _, c := range []struct {
		pixFmt string
		sps    []byte
		want   string // "" for no warning
	}{
		{"yuv420p", realSPS, ""},
		{"yuv444p", []byte{0x67, 0xf4, 0x00, 0x0a, 0x91, 0x9b, 0x28, 0x84, 0xd8, 0x08, 0x80, 0x00, 0x00, 0x03, 0x00, 0x80, 0x00, 0x00, 0x19, 0x07, 0x89, 0x12, 0xcb},
			"H264 High 4:4:4 Predictive profile, 4:4:4 chroma: browsers cannot decode it; encode 4:2:0 8-bit (ffmpeg -pix_fmt yuv420p)"},
		{"yuv422p", []byte{0x67, 0x7a, 0x00, 0x0a, 0xbc, 0xd9, 0x44, 0x26, 0xc0, 0x44, 0x00, 0x00, 0x03, 0x00, 0x04, 0x00, 0x00, 0x03, 0x00, 0xc8, 0x3c, 0x48, 0x96, 0x58},
			"H264 High 4:2:2 profile, 4:2:2 chroma: browsers"},
		{"yuv420p10le", []byte{0x67, 0x6e, 0x00, 0x0a, 0xa6, 0xcd, 0x94, 0x42, 0x6c, 0x04, 0x40, 0x00, 0x00, 0x03, 0x00, 0x40, 0x00, 0x00, 0x0c, 0x83, 0xc4, 0x89, 0x65, 0x80},
			"H264 High 10 profile, 10-bit: browsers"},
	} {
		t.Run(c.pixFmt, func(t *testing.T) {
			var logs bytes.Buffer
			log := slog.New(slog.NewTextHandler(&logs, nil))
			hub := relay.NewHub(relay.Config{Datacenter: "a", Logger: quiet})
			defer hub.Close()
			tracks, _, err := plan(&description.Session{Medias: []*description.Media{{Type: description.MediaTypeVideo,
				Formats: []format.Format{&format.H264{PayloadTyp: 96, PacketizationMode: 1, SPS: c.sps, PPS: realPPS}}}}})
			if err != nil {
				t.Fatal(err)
			}
			st, err := newIngestStream(hub, "x", tracks, log, func(error) {})
			if err != nil {
				t.Fatal(err)
			}
			defer st.close()
			if err := st.start(); err != nil {
				t.Fatal(err)
			}
			if st.pub.Load() == nil {
				t.Fatal("not published")
			}
			got := logs.String()
			if c.want == "" && strings.Contains(got, "WARN") {
				t.Errorf("warning for a 4:2:0 8-bit stream: %s", got)
			}
			if c.want != "" && !strings.Contains(got, c.want) {
				t.Errorf("log %q lacks %q", got, c.want)
			}
		})
	}
}
