package whep

import (
	"context"
	"testing"
	"time"

	"github.com/pion/rtcp"
	"github.com/pion/rtp"
	"github.com/pion/webrtc/v4"

	"github.com/stemflow/stemflow/internal/rtc"
	"github.com/stemflow/stemflow/internal/rtc/rtctest"
	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/relay"
)

func TestRewrite(t *testing.T) {
	pkt := rtp.Packet{Header: rtp.Header{Version: 2, Marker: true, PayloadType: 96, SequenceNumber: 65535, Timestamp: 1234,
		SSRC: 1, CSRC: []uint32{7}, Padding: true, PaddingSize: 4}, Payload: []byte{1, 2, 3}}
	if err := pkt.Header.SetExtension(3, []byte{9, 9}); err != nil {
		t.Fatal(err)
	}
	b, err := pkt.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	var p rtp.Packet
	if !rewrite(&p, b, 109, 0xabcdef) {
		t.Fatal("rejected a valid packet")
	}
	out, err := p.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	var got rtp.Packet
	if err := got.Unmarshal(out); err != nil {
		t.Fatal(err)
	}
	if got.PayloadType != 109 || got.SSRC != 0xabcdef || got.SequenceNumber != 65535 || got.Timestamp != 1234 ||
		!got.Marker || got.Extension || len(got.CSRC) != 0 || string(got.Payload) != "\x01\x02\x03" || got.PaddingSize != 4 {
		t.Errorf("rewritten = %+v payload %v", got.Header, got.Payload)
	}
	for _, bad := range [][]byte{nil, b[:11], {0x80 | 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, append([]byte{0xa0}, b[1:12]...),
		append([]byte{0x40}, b[1:]...)} {
		if rewrite(&p, bad, 1, 1) {
			t.Errorf("accepted malformed %x", bad)
		}
	}
}

func FuzzRewrite(f *testing.F) {
	b, _ := (&rtp.Packet{Header: rtp.Header{Version: 2, PayloadType: 96, SequenceNumber: 1}, Payload: []byte{1}}).Marshal()
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		var p rtp.Packet
		if rewrite(&p, b, 100, 1) {
			if _, err := p.Marshal(); err != nil {
				t.Fatalf("accepted packet does not marshal: %v", err)
			}
		}
	})
}

// nopRTCP stands for the PeerConnection a track sends its sender reports to.
type nopRTCP struct{ reports int }

func (w *nopRTCP) WriteRTCP(pkts []rtcp.Packet) error {
	w.reports += len(pkts)
	return nil
}

// newWritePath returns a viewer with one bound video track writing to a
// nopWriter, and the queue feeding it: the per-viewer path of
// BenchmarkWritePath and TestWritePathDoesNotAllocate.
func newWritePath() (*viewer, *viewerQueue, *outTrack, *nopRTCP) {
	q := newViewerQueue(1024)
	out := &nopRTCP{}
	tr := &outTrack{kind: rtc.CodecType(relay.KindVideo), pt: 109, rtcpOut: out}
	tr.bound.Store(&binding{ssrc: 0xabcdef, pt: 109, clockRate: 90000, w: &nopWriter{}})
	v := &viewer{q: q, ctx: context.Background()}
	v.tracks[0] = tr
	return v, q, tr, out
}

// TestWritePathDoesNotAllocate sends packets through a viewer's own path,
// as the hub hands them over: the push into the viewer's queue, the pop,
// forward, the rewrite with pion/rtp and the write to pion's
// TrackLocalWriter, with a sender report on every packet.
func TestWritePathDoesNotAllocate(t *testing.T) {
	v, q, tr, out := newWritePath()
	var src rtctest.H264Source
	pkts, _ := src.NextFrame()
	// A packet with a CSRC and a header extension, as a publisher may send.
	var ext rtp.Packet
	if err := ext.Unmarshal(pkts[1]); err != nil {
		t.Fatal(err)
	}
	ext.CSRC = []uint32{1, 2}
	if err := ext.SetExtension(1, []byte{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	withExt, err := ext.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	sent := 0
	for _, data := range [][]byte{pkts[1], withExt} {
		p := relay.Packet{Track: 0, Data: data}
		allocs := testing.AllocsPerRun(1000, func() {
			tr.sr.due = time.Unix(1, 0) // a report is due
			q.WritePacket(&p)
			b, _ := q.Pop()
			sent += v.forward(b)
		})
		if allocs != 0 {
			t.Errorf("%d-byte packet: %.1f allocations per packet, want 0", len(data), allocs)
		}
	}
	if want := 2 * 1001; sent != want || out.reports < want-1 {
		t.Errorf("sent %d packets and %d reports, want %d and %d", sent, out.reports, want, want-1)
	}
}

func TestSenderReport(t *testing.T) {
	b := &binding{ssrc: 7, clockRate: 90000}
	out := &nopRTCP{}
	var s senderReport
	t0 := time.Unix(1_700_000_000, 500_000_000)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	send := func(ts uint32, ms int) {
		s.sent(b, &rtp.Packet{Header: rtp.Header{Timestamp: ts}, Payload: make([]byte, 100)}, at(ms), out)
	}
	// Two frames of two packets, 33 ms apart, the second frame's second
	// packet 10 ms after its first; then one packet after the interval.
	send(1000, 0)
	send(1000, 5)
	send(4000, 33)
	send(4000, 43)
	if out.reports != 0 {
		t.Fatalf("%d reports before the interval", out.reports)
	}
	send(4000, 1043)
	if out.reports != 1 {
		t.Fatalf("%d reports after the interval, want 1", out.reports)
	}
	sr := s.pkt
	// The frame's timestamp was taken at its first packet, 1010 ms before.
	if want := uint32(4000 + 90*1010); sr.RTPTime != want {
		t.Errorf("RTP time %d, want %d", sr.RTPTime, want)
	}
	if sr.SSRC != 7 || sr.PacketCount != 5 || sr.OctetCount != 500 {
		t.Errorf("report %+v, want SSRC 7, 5 packets, 500 octets", sr)
	}
	// Sent at 1,700,000,001.543 s Unix time: in NTP, seconds since 1900
	// and the fraction in 1/2^32 s.
	if want := uint64(1_700_000_001+2_208_988_800)<<32 | uint64(543*(1<<32)/1000); sr.NTPTime>>8 != want>>8 {
		t.Errorf("NTP time %x, want %x", sr.NTPTime, want)
	}
	send(7000, 1500)
	if out.reports != 1 {
		t.Errorf("%d reports within the next interval, want 1", out.reports)
	}
}

// TestViewerGetsSenderReports checks what a browser needs for lip sync:
// an RTCP sender report for each track, whose RTP time is that of the
// media the viewer is receiving.
func TestViewerGetsSenderReports(t *testing.T) {
	e := setup(t)
	startSource(t, e.hub, "sr", sourceOptions{})
	v := e.view(t, "sr", rtctest.ViewOptions{})
	testutil.WaitFor(t, "media", func() bool { return len(v.Video()) > 0 && len(v.Audio()) > 0 })
	for _, r := range v.PC.GetReceivers() {
		tr := r.Track()
		if tr == nil {
			continue
		}
		kind, ssrc, rate := tr.Kind(), uint32(tr.SSRC()), tr.Codec().ClockRate
		deadline := time.Now().Add(testutil.Scale(5 * time.Second))
		var got *rtcp.SenderReport
		for got == nil && time.Now().Before(deadline) {
			_ = r.SetReadDeadline(deadline)
			pkts, _, err := r.ReadRTCP()
			if err != nil {
				break
			}
			for _, p := range pkts {
				if sr, ok := p.(*rtcp.SenderReport); ok && sr.SSRC == ssrc {
					got = sr
				}
			}
		}
		if got == nil {
			t.Errorf("%s: no sender report within 5 s", kind)
			continue
		}
		pkts := v.Video()
		if kind == webrtc.RTPCodecTypeAudio {
			pkts = v.Audio()
		}
		last := pkts[len(pkts)-1].Timestamp
		// The report maps the newest frame sent to the time it was sent:
		// it is within a few frames of what the viewer has just received.
		if d := int32(got.RTPTime - last); d < -int32(rate/5) || d > int32(rate/5) {
			t.Errorf("%s: report's RTP time %d, newest packet's %d: %d ms apart", kind, got.RTPTime, last, int64(d)*1000/int64(rate))
		}
		if got.PacketCount == 0 || got.OctetCount == 0 {
			t.Errorf("%s: report counts %d packets, %d octets", kind, got.PacketCount, got.OctetCount)
		}
	}
}
