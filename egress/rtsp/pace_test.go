package rtsp

import (
	"encoding/base64"
	"fmt"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bluenviron/gortsplib/v4"
	"github.com/bluenviron/gortsplib/v4/pkg/base"
	"github.com/bluenviron/gortsplib/v4/pkg/description"
	"github.com/bluenviron/gortsplib/v4/pkg/format"
	"github.com/pion/rtp"

	"github.com/stemflow/stemflow/internal/rtc/rtctest"
	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/relay"
)

// livePublisher writes a 30 fps H264 stream with a 2 s GOP and Opus into
// the hub, as a publisher would, until the test ends.
type livePublisher struct {
	frames, lastKey atomic.Int64
	stop            chan struct{}
	wg              sync.WaitGroup
}

func publishLive(t *testing.T, hub *relay.Hub, name string, frameBytes int) *livePublisher {
	t.Helper()
	fmtp := "packetization-mode=1;profile-level-id=42c01f;sprop-parameter-sets=" +
		base64.StdEncoding.EncodeToString(rtctest.SPS) + "," + base64.StdEncoding.EncodeToString(rtctest.PPS)
	pub, err := hub.Publish(name, relay.Description{Tracks: []relay.Track{
		{Kind: relay.KindVideo, MimeType: relay.MimeH264, ClockRate: 90000, PayloadType: 96, Fmtp: fmtp},
		{Kind: relay.KindAudio, MimeType: relay.MimeOpus, ClockRate: 48000, Channels: 2, PayloadType: 111},
	}}, relay.PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p := &livePublisher{stop: make(chan struct{})}
	src := rtctest.H264Source{GOP: 60, FrameBytes: frameBytes}
	var opus rtctest.OpusSource
	p.wg.Go(func() {
		tick := time.NewTicker(time.Second / 30)
		defer tick.Stop()
		audioDue := time.Now()
		for {
			pkts, key := src.NextFrame()
			if key {
				p.lastKey.Store(p.frames.Load())
			}
			for _, b := range pkts {
				_ = pub.WriteRTP(0, b)
			}
			for ; !audioDue.After(time.Now()); audioDue = audioDue.Add(20 * time.Millisecond) {
				_ = pub.WriteRTP(1, opus.Next())
			}
			p.frames.Add(1)
			select {
			case <-p.stop:
				return
			case <-tick.C:
			}
		}
	})
	t.Cleanup(func() {
		close(p.stop)
		p.wg.Wait()
		pub.Close()
	})
	return p
}

// udpPorts returns an even UDP port of 127.0.0.1 whose successor is free
// too, for the RTSP server's RTP and RTCP listeners.
func udpPorts(t *testing.T) (int, int) {
	t.Helper()
	for range 100 {
		port := 20000 + 2*rand.IntN(20000)
		a, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
		if err != nil {
			continue
		}
		b, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port + 1})
		a.Close()
		if err != nil {
			continue
		}
		b.Close()
		return port, port + 1
	}
	t.Fatal("no free pair of UDP ports")
	return 0, 0
}

// rtspJoin is what one RTSP reader joining a stream saw.
type rtspJoin struct {
	drops        uint64 // the kernel's, on the reader's UDP sockets
	video, audio []uint16
	keyFirst     bool
}

// gaps counts sequence numbers missing and packets out of order.
func gaps(seqs []uint16) (missing, reordered int) {
	for i := 1; i < len(seqs); i++ {
		switch d := int16(seqs[i] - seqs[i-1]); {
		case d == 1:
		case d > 1:
			missing += int(d) - 1
		default:
			reordered++
		}
	}
	return missing, reordered
}

func (j rtspJoin) String() string {
	vm, vr := gaps(j.video)
	am, ar := gaps(j.audio)
	return fmt.Sprintf("kernel drops %d; video %d pkts, %d missing, %d out of order; audio %d pkts, %d missing, %d out of order",
		j.drops, len(j.video), vm, vr, len(j.audio), am, ar)
}

func (j rtspJoin) clean() bool {
	vm, vr := gaps(j.video)
	am, ar := gaps(j.audio)
	return j.keyFirst && j.drops == 0 && vm+vr+am+ar == 0
}

// readRTSP plays the stream with a gortsplib client until it has had want
// video packets, and returns what it got.
func readRTSP(t *testing.T, addr, name string, transport gortsplib.Transport, want int) rtspJoin {
	t.Helper()
	before := map[uint64]bool{}
	socks, err := testutil.UDPSockets()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range socks {
		before[s.Inode] = true
	}
	c := &gortsplib.Client{Scheme: "rtsp", Host: addr, Transport: &transport}
	if err := c.Start2(); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	u, _ := base.ParseURL("rtsp://" + addr + "/" + name)
	desc, _, err := c.Describe(u)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetupAll(desc.BaseURL, desc.Medias); err != nil {
		t.Fatal(err)
	}
	var (
		mu sync.Mutex
		j  rtspJoin
	)
	c.OnPacketRTPAny(func(m *description.Media, _ format.Format, p *rtp.Packet) {
		mu.Lock()
		defer mu.Unlock()
		if m.Type == description.MediaTypeVideo {
			if len(j.video) == 0 {
				j.keyFirst = relay.IsKeyframe(relay.MimeH264, p.Payload)
			}
			j.video = append(j.video, p.SequenceNumber)
		} else {
			j.audio = append(j.audio, p.SequenceNumber)
		}
	})
	if _, err := c.Play(nil); err != nil {
		t.Fatal(err)
	}
	testutil.WaitForWithin(t, 20*time.Second, "the GOP and 2 s of live video", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(j.video) >= want
	})
	time.Sleep(100 * time.Millisecond)
	socks, err = testutil.UDPSockets()
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, s := range socks {
		if !before[s.Inode] {
			j.drops += s.Drops
		}
	}
	j.video, j.audio = append([]uint16(nil), j.video...), append([]uint16(nil), j.audio...)
	return j
}

// TestGOPReplayPacedToRTSPReaders joins RTSP readers, over UDP with the
// kernel's default receive buffer and over TCP, at several points of a 2 s
// GOP of a 4 Mbit/s stream: each must get the GOP then live packets with
// nothing dropped by the kernel or by gortsplib's write queue, no gap and
// nothing out of order. A join that loses packets is tried again, up to
// three times, as a receiver starved of CPU on a loaded machine loses packets
// whatever the server does.
func TestGOPReplayPacedToRTSPReaders(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 120*time.Second)
	hub := relay.NewHub(relay.Config{Datacenter: "a", Logger: testLogger()})
	defer hub.Close()
	const frameBytes = 16600 // 4 Mbit/s
	framePackets := (frameBytes + 1099) / 1100
	src := publishLive(t, hub, "s", frameBytes)

	var addr string
	rtpPort, rtcpPort := udpPorts(t)
	srv := &gortsplib.Server{
		RTSPAddress:    "127.0.0.1:0",
		UDPRTPAddress:  "127.0.0.1:" + strconv.Itoa(rtpPort),
		UDPRTCPAddress: "127.0.0.1:" + strconv.Itoa(rtcpPort),
		Listen: func(n, a string) (net.Listener, error) {
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
	testutil.WaitFor(t, "a full GOP", func() bool { return src.frames.Load() > 62 })

	for _, transport := range []gortsplib.Transport{gortsplib.TransportUDP, gortsplib.TransportTCP} {
		for _, at := range []int{30, 57} {
			var j rtspJoin
			for try := 1; try <= 3; try++ {
				testutil.WaitFor(t, fmt.Sprintf("frame %d of a GOP", at), func() bool {
					return (src.frames.Load()-src.lastKey.Load())%60 == int64(at)
				})
				j = readRTSP(t, addr, "s", transport, (at+2)*framePackets+60*framePackets)
				t.Logf("%s join at frame %d, try %d: %v", transport, at, try, j)
				if j.clean() {
					break
				}
			}
			if !j.keyFirst {
				t.Errorf("%s join at frame %d: video does not start with a keyframe", transport, at)
			}
			if !j.clean() {
				t.Errorf("%s join at frame %d: three tries lost packets, the last %v", transport, at, j)
			}
		}
	}
}
