package rtsp

import (
	"context"
	"io"
	"log/slog"
	"testing"

	"github.com/bluenviron/gortsplib/v4/pkg/description"
	"github.com/bluenviron/gortsplib/v4/pkg/format"
	"github.com/pion/rtp"

	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/relay"
)

// libx264's parameter sets for 640x360 High 4:2:0 8-bit.
var (
	realSPS = []byte{0x67, 0x64, 0x00, 0x1e, 0xac, 0xd9, 0x40, 0xa0, 0x2f, 0xf9, 0x70, 0x11, 0x00, 0x00, 0x03, 0x00, 0x01, 0x00, 0x00, 0x03, 0x00, 0x3c, 0x0f, 0x16, 0x2d, 0x96}
	realPPS = []byte{0x68, 0xef, 0x8f, 0xcb}
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// newTestStream publishes an H264 + Opus stream as an RTSP publisher's
// ANNOUNCE would, into a new hub with one subscriber counting packets.
func newTestStream(tb testing.TB) (st *ingestStream, received *int) {
	tb.Helper()
	hub := relay.NewHub(relay.Config{Datacenter: "a", Logger: quiet})
	tb.Cleanup(hub.Close)
	desc := &description.Session{Medias: []*description.Media{
		{Type: description.MediaTypeVideo, Formats: []format.Format{&format.H264{PayloadTyp: 96, PacketizationMode: 1, SPS: realSPS, PPS: realPPS}}},
		{Type: description.MediaTypeAudio, Formats: []format.Format{&format.Opus{PayloadTyp: 97, ChannelCount: 2}}},
	}}
	tracks, _, err := plan(desc)
	if err != nil {
		tb.Fatal(err)
	}
	st, err = newIngestStream(hub, "x", tracks, quiet, func(err error) { tb.Errorf("publication failed: %v", err) })
	if err != nil {
		tb.Fatal(err)
	}
	if err := st.start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(st.close)
	received = new(int)
	sub, err := hub.Subscribe(context.Background(), "x", relay.SubscriberFunc(func(*relay.Packet) { *received++ }))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(sub.Close)
	return st, received
}

// testGOP is a short GOP as ffmpeg sends it: an IDR frame in FU-A fragments,
// P frames, and Opus packets between them.
func testGOP(tb testing.TB) (video, audio []*rtp.Packet) {
	t, ok := tb.(*testing.T)
	if !ok {
		t = &testing.T{}
	}
	video = ffmpegPackets(t, [][][]byte{{nalu(naluIDR, 20000)}, {nalu(1, 3000)}, {nalu(1, 800)}, {nalu(1, 200)}},
		[]uint32{0, 3000, 6000, 9000})
	for i := range 4 {
		audio = append(audio, &rtp.Packet{Header: rtp.Header{Version: 2, PayloadType: 97, SequenceNumber: uint16(i),
			Timestamp: uint32(960 * i), SSRC: 7, Marker: true}, Payload: make([]byte, 160)})
	}
	return video, audio
}

// sendGOP hands the GOP to handle and moves its timestamps on by its
// duration, so that the next send is the next GOP (the relay's GOP cache
// starts over at a keyframe with a new timestamp).
func sendGOP(st *ingestStream, vt, at *ingestTrack, video, audio []*rtp.Packet) {
	for _, p := range video {
		st.handle(vt, p)
		p.Timestamp += 12000
	}
	for _, p := range audio {
		st.handle(at, p)
		p.Timestamp += 3840
	}
}

// TestIngestAllocations runs RTSP packets through the real per-packet path
// (handle: depacketize, parameter sets, packetize, relay write, GOP cache and
// fan-out) and asserts that it allocates nothing once warm. Under -race
// sync.Pool drops a quarter of what is put back (on purpose), so there the
// relay's pooled buffers are sometimes new: the test then only asserts
// fewer than one allocation per packet on average.
func TestIngestAllocations(t *testing.T) {
	st, received := newTestStream(t)
	video, audio := testGOP(t)
	pkts := len(video) + len(audio)
	sendGOP(st, st.tracks[0], st.tracks[1], video, audio) // warm-up: arenas and pools grow to size
	before := *received
	const gops = 50
	var mallocs float64
	for range gops {
		mallocs += testing.AllocsPerRun(1, func() { sendGOP(st, st.tracks[0], st.tracks[1], video, audio) })
	}
	perGOP := (*received - before) / (2 * gops)
	if perGOP < pkts {
		t.Fatalf("the subscriber got %d packets per GOP, want at least %d: the path under test is not the real one", perGOP, pkts)
	}
	perPacket := mallocs / (gops * float64(pkts)) // AllocsPerRun(1) counts the second of its two runs
	t.Logf("%.3f allocations per packet (race detector: %v)", perPacket, testutil.RaceEnabled)
	if perPacket != 0 && !(testutil.RaceEnabled && perPacket < 1) {
		t.Errorf("%.3f allocations per RTSP packet, want 0", perPacket)
	}
	if n := st.errorsIn.Load(); n != 0 {
		t.Errorf("%d packet errors", n)
	}
}

func BenchmarkIngestHandle(b *testing.B) {
	st, _ := newTestStream(b)
	video, audio := testGOP(b)
	vt, at := st.tracks[0], st.tracks[1]
	b.ReportAllocs()
	for b.Loop() {
		sendGOP(st, vt, at, video, audio)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*(len(video)+len(audio))), "ns/packet")
}
