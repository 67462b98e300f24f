package rtsp

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"

	"github.com/bluenviron/gortsplib/v4"
	"github.com/bluenviron/gortsplib/v4/pkg/base"
	"github.com/bluenviron/gortsplib/v4/pkg/description"
	"github.com/bluenviron/gortsplib/v4/pkg/format"
	"github.com/pion/rtp"

	"github.com/stemflow/stemflow/relay"
)

var (
	// From gortsplib's tests: a parsable SPS, which its client insists on.
	testSPS = []byte{0x67, 0x4d, 0x00, 0x2a, 0x9d, 0xa8, 0x1e, 0x00, 0x89, 0xf9, 0x66, 0xe0, 0x20, 0x20, 0x20, 0x40}
	testPPS = []byte{0x68, 0xee, 0x3c, 0x80}
)

// testHandler is the part of node/rtspserver's handler the egress needs.
type testHandler struct{ e *Egress }

func (h testHandler) OnDescribe(c *gortsplib.ServerHandlerOnDescribeCtx) (*base.Response, *gortsplib.ServerStream, error) {
	return h.e.OnDescribe(c)
}

func (h testHandler) OnSetup(c *gortsplib.ServerHandlerOnSetupCtx) (*base.Response, *gortsplib.ServerStream, error) {
	return h.e.OnSetup(c)
}
func (h testHandler) OnPlay(c *gortsplib.ServerHandlerOnPlayCtx) (*base.Response, error) {
	return h.e.OnPlay(c)
}
func (h testHandler) OnSessionClose(c *gortsplib.ServerHandlerOnSessionCloseCtx) {
	h.e.OnSessionClose(c)
}
func (h testHandler) OnResponse(sc *gortsplib.ServerConn, r *base.Response) { h.e.OnResponse(sc, r) }

func testLogger() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func rtpBytes(t *testing.T, pt uint8, seq uint16, ts uint32, marker bool, payload []byte) []byte {
	t.Helper()
	b, err := (&rtp.Packet{Header: rtp.Header{Version: 2, PayloadType: pt, SequenceNumber: seq, Timestamp: ts,
		SSRC: 42, Marker: marker}, Payload: payload}).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

type received struct {
	media *description.Media
	pkt   *rtp.Packet
}

func TestEgress(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 30*time.Second)

	hub := relay.NewHub(relay.Config{Datacenter: "a", Logger: testLogger()})
	defer hub.Close()
	pub, err := hub.Publish("s", relay.Description{Tracks: []relay.Track{
		{Kind: relay.KindVideo, MimeType: relay.MimeH264, ClockRate: 90000, PayloadType: 100,
			Fmtp: "packetization-mode=1;profile-level-id=4d002a;sprop-parameter-sets=Z00AKp2oHgCJ+WbgICAgQA==,aO48gA=="},
		{Kind: relay.KindAudio, MimeType: relay.MimeOpus, ClockRate: 48000, Channels: 2, PayloadType: 111},
	}}, relay.PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	stapA := append([]byte{naluSTAPA(), 0, byte(len(testSPS))}, testSPS...)
	stapA = append(append(stapA, 0, byte(len(testPPS))), testPPS...)
	// A GOP before anyone reads: SPS/PPS, IDR, P frame, Opus.
	for i, p := range [][]byte{
		rtpBytes(t, 100, 1, 0, false, stapA),
		rtpBytes(t, 100, 2, 0, true, []byte{0x65, 1, 2, 3}),
		rtpBytes(t, 100, 3, 3000, true, []byte{0x41, 4, 5}),
	} {
		if err := pub.WriteRTP(0, p); err != nil {
			t.Fatal(i, err)
		}
	}
	if err := pub.WriteRTP(1, rtpBytes(t, 111, 7, 960, true, []byte{0xfc, 1})); err != nil {
		t.Fatal(err)
	}

	var addr string
	srv := &gortsplib.Server{RTSPAddress: "127.0.0.1:0", Listen: func(n, a string) (net.Listener, error) {
		l, err := net.Listen(n, a)
		if err == nil {
			addr = l.Addr().String()
		}
		return l, err
	}}
	e := New(Config{Hub: hub, Server: srv, Logger: testLogger()})
	srv.Handler = testHandler{e}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	defer e.Close()

	c := &gortsplib.Client{Scheme: "rtsp", Host: addr, Transport: ptr(gortsplib.TransportTCP),
		OnDecodeError: func(err error) { t.Log("client decode error:", err) }}
	if err := c.Start2(); err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	// Unknown stream: 404 with a reason.
	u, _ := base.ParseURL("rtsp://" + addr + "/nothing")
	if _, _, err := c.Describe(u); err == nil || !strings.Contains(err.Error(), "404") || !strings.Contains(err.Error(), `"nothing" is not live`) {
		t.Errorf("DESCRIBE of an unknown stream: %v", err)
	}

	c1, desc, got1 := play(t, addr, "s")
	defer c1.Close()
	h, ok := desc.Medias[0].Formats[0].(*format.H264)
	if !ok || !bytes.Equal(h.SPS, testSPS) || !bytes.Equal(h.PPS, testPPS) || h.PayloadTyp != 96 {
		t.Errorf("video format %#v", desc.Medias[0].Formats[0])
	}
	if o, ok := desc.Medias[1].Formats[0].(*format.Opus); !ok || o.PayloadTyp != 97 || o.ChannelCount != 2 {
		t.Errorf("audio format %#v", desc.Medias[1].Formats[0])
	}
	type want struct {
		media int
		seq   uint16
		pt    uint8
	}
	expect := func(got chan received, desc *description.Session, ws []want) {
		t.Helper()
		for i, w := range ws {
			var r received
			select {
			case r = <-got:
			case <-time.After(5 * time.Second):
				t.Fatalf("packet %d: nothing within 5 s", i)
			}
			if r.media != desc.Medias[w.media] || r.pkt.SequenceNumber != w.seq || r.pkt.PayloadType != w.pt {
				t.Errorf("packet %d: media %v seq %d PT %d, want media %d seq %d PT %d", i,
					r.media.Type, r.pkt.SequenceNumber, r.pkt.PayloadType, w.media, w.seq, w.pt)
			}
		}
	}
	// The GOP cache first, in order, then a live packet.
	if err := pub.WriteRTP(0, rtpBytes(t, 100, 4, 6000, true, []byte{0x41, 6})); err != nil {
		t.Fatal(err)
	}
	expect(got1, desc, []want{{0, 1, 96}, {0, 2, 96}, {0, 3, 96}, {1, 7, 97}, {0, 4, 96}})

	// A second reader shares the subscription and gets the GOP too.
	c2, desc2, got2 := play(t, addr, "s")
	defer c2.Close()
	if err := pub.WriteRTP(0, rtpBytes(t, 100, 5, 9000, true, []byte{0x41, 7})); err != nil {
		t.Fatal(err)
	}
	expect(got2, desc2, []want{{0, 1, 96}, {0, 2, 96}, {0, 3, 96}, {1, 7, 97}, {0, 4, 96}, {0, 5, 96}})
	expect(got1, desc, []want{{0, 5, 96}})
	if n := subscribers(hub, "s"); n != 1 {
		t.Errorf("%d hub subscribers for two RTSP readers, want 1", n)
	}
	c2.Close()
	time.Sleep(100 * time.Millisecond)
	if n := subscribers(hub, "s"); n != 1 {
		t.Errorf("%d hub subscribers after one of two readers left, want 1", n)
	}

	// The last reader leaving unsubscribes.
	c1.Close()
	deadline := time.Now().Add(5 * time.Second)
	for subscribers(hub, "s") != 0 {
		if time.Now().After(deadline) {
			t.Fatal("still subscribed 5 s after the last reader left")
		}
		time.Sleep(20 * time.Millisecond)
	}

	pub.Close()
	e.Close()
	srv.Close()
	hub.Close()
}

// play reads a stream with a gortsplib client over TCP.
func play(t *testing.T, addr, name string) (*gortsplib.Client, *description.Session, chan received) {
	t.Helper()
	c := &gortsplib.Client{Scheme: "rtsp", Host: addr, Transport: ptr(gortsplib.TransportTCP)}
	if err := c.Start2(); err != nil {
		t.Fatal(err)
	}
	u, _ := base.ParseURL("rtsp://" + addr + "/" + name)
	desc, _, err := c.Describe(u)
	if err != nil {
		t.Fatal(err)
	}
	if len(desc.Medias) != 2 {
		t.Fatalf("%d medias, want 2", len(desc.Medias))
	}
	if err := c.SetupAll(desc.BaseURL, desc.Medias); err != nil {
		t.Fatal(err)
	}
	got := make(chan received, 100)
	c.OnPacketRTPAny(func(m *description.Media, _ format.Format, p *rtp.Packet) {
		got <- received{m, p}
	})
	if _, err := c.Play(nil); err != nil {
		t.Fatal(err)
	}
	return c, desc, got
}

func subscribers(h *relay.Hub, name string) int {
	for _, s := range h.Streams() {
		if s.Name == name {
			return s.Subscribers
		}
	}
	return 0
}

func naluSTAPA() byte { return 24 }

func ptr[T any](v T) *T { return &v }
