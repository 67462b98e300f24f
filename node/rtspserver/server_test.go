package rtspserver

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"

	"github.com/stemflow/stemflow/relay"
)

// mediaReport is what a relay subscriber saw of a stream.
type mediaReport struct {
	videoPackets, audioPackets int
	maxSize                    int
	videoTimestamps            map[uint32]bool
	idrWithParams, idrWithout  int
	seqGaps                    int
	firstIsKeyframe            bool
}

func (r *mediaReport) String() string {
	return fmt.Sprintf("video packets %d (%d timestamps), audio packets %d, max size %d, IDR with SPS/PPS before %d, without %d, seq gaps %d, first packet keyframe %v",
		r.videoPackets, len(r.videoTimestamps), r.audioPackets, r.maxSize, r.idrWithParams, r.idrWithout, r.seqGaps, r.firstIsKeyframe)
}

// collect reads the subscription's packets until it has seen frames video
// frames and as many Opus packets, and analyses them. It counts rather than
// times: a busy machine runs ffmpeg -re below real time (0.3x seen at a load
// of 60 on 2 cores), so a stream is broken only when it stalls, after 30 s
// (scaled).
func collect(t *testing.T, sub *relay.Subscription, q *relay.Queue, frames int) *mediaReport {
	t.Helper()
	desc := sub.Description()
	video, audio := desc.TrackOf(relay.KindVideo), desc.TrackOf(relay.KindAudio)
	if video < 0 || audio < 0 || desc.Tracks[video].MimeType != relay.MimeH264 || desc.Tracks[audio].MimeType != relay.MimeOpus {
		t.Fatalf("want H264 and Opus tracks, got %+v", desc.Tracks)
	}
	fmtp := desc.Tracks[video].Fmtp
	for _, want := range []string{"packetization-mode=1", "profile-level-id=64", "sprop-parameter-sets="} {
		if !strings.Contains(fmtp, want) {
			t.Errorf("H264 fmtp %q lacks %q", fmtp, want)
		}
	}

	r := &mediaReport{videoTimestamps: make(map[uint32]bool)}
	var (
		haveSeq bool
		lastSeq uint16
		seen    = map[uint32]map[byte]bool{} // NAL types seen per timestamp
	)
	timeout := time.After(testutil.Scale(30 * time.Second))
	firstVideo := true
	for {
		if len(r.videoTimestamps) >= frames && r.audioPackets >= frames {
			if q.Dropped() != 0 {
				t.Errorf("test queue dropped %d packets", q.Dropped())
			}
			return r
		}
		var b *relay.Buffer
		select {
		case b = <-q.C():
		case <-timeout:
			t.Fatalf("stream stalled: %d video frames and %d Opus packets of %d in %s: %v",
				len(r.videoTimestamps), r.audioPackets, frames, testutil.Scale(30*time.Second), r)
		case <-sub.Done():
			t.Fatalf("stream ended: %v", sub.Err())
		}
		data := b.Data()
		// Audio may come first when the subscriber joined before the
		// first keyframe; video must start with one.
		if int(b.Track) == video && firstVideo {
			r.firstIsKeyframe, firstVideo = b.Keyframe, false
		}
		r.maxSize = max(r.maxSize, len(data))
		switch int(b.Track) {
		case audio:
			r.audioPackets++
		case video:
			r.videoPackets++
			seq := relay.RTPSequence(data)
			if haveSeq && seq != lastSeq+1 {
				r.seqGaps++
			}
			haveSeq, lastSeq = true, seq
			ts := uint32(data[4])<<24 | uint32(data[5])<<16 | uint32(data[6])<<8 | uint32(data[7])
			r.videoTimestamps[ts] = true
			if seen[ts] == nil {
				seen[ts] = map[byte]bool{}
			}
			for _, typ := range naluTypes(data[12:]) {
				if typ == 5 && !seen[ts][5] {
					if seen[ts][7] && seen[ts][8] {
						r.idrWithParams++
					} else {
						r.idrWithout++
					}
				}
				seen[ts][typ] = true
			}
		}
		b.Release()
	}
}

// naluTypes returns the NAL unit types an H264 RTP payload starts or holds.
func naluTypes(p []byte) []byte {
	if len(p) == 0 {
		return nil
	}
	switch typ := p[0] & 0x1f; typ {
	case 24:
		var out []byte
		for p = p[1:]; len(p) > 2; {
			n := int(p[0])<<8 | int(p[1])
			if len(p) < 2+n || n == 0 {
				break
			}
			out = append(out, p[2]&0x1f)
			p = p[2+n:]
		}
		return out
	case 28:
		if len(p) > 1 && p[1]&0x80 != 0 {
			return []byte{p[1] & 0x1f}
		}
		return nil
	default:
		return []byte{typ}
	}
}

func checkReport(t *testing.T, r *mediaReport) {
	t.Helper()
	t.Log(r)
	if !r.firstIsKeyframe {
		t.Error("the first video packet a new subscriber gets is not a keyframe")
	}
	if r.idrWithParams == 0 {
		t.Error("no H264 IDR frame with SPS and PPS in-band before it")
	}
	if r.idrWithout != 0 {
		t.Errorf("%d IDR frames without SPS/PPS in-band before them", r.idrWithout)
	}
	if r.maxSize > relay.OverlayPacketSize {
		t.Errorf("packets up to %d bytes, want at most %d (one overlay datagram)", r.maxSize, relay.OverlayPacketSize)
	}
	if r.seqGaps != 0 {
		t.Errorf("%d gaps in the video sequence numbers", r.seqGaps)
	}
}

func TestPublishFFmpeg(t *testing.T) {
	for _, transport := range []string{"udp", "tcp"} {
		t.Run(transport, func(t *testing.T) {
			testutil.CheckLeaks(t)
			testutil.Watchdog(t, 60*time.Second)
			hub := newHub(t, "a")
			srv := startServer(t, hub, nil)
			name := "cam-" + transport
			pub := startFFmpeg(t, publishArgs("rtsp://"+srv.Addr()+"/"+name, transport, 30)...)
			sub, q := subscribe(t, hub, name, 15*time.Second)
			r := collect(t, sub, q, 90)
			checkReport(t, r)
			select {
			case <-pub.done:
				t.Fatalf("ffmpeg exited early: %v", pub.err)
			default:
			}
		})
	}
}

func TestPublisherLeavingEndsStream(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	hub := newHub(t, "a")
	srv := startServer(t, hub, nil)
	pub := startFFmpeg(t, publishArgs("rtsp://"+srv.Addr()+"/short", "udp", 3)...)
	sub, _ := subscribe(t, hub, "short", 15*time.Second)
	if err := pub.wait(t, 30*time.Second); err != nil {
		t.Fatalf("ffmpeg: %v", err)
	}
	select {
	case <-sub.Done():
	case <-time.After(testutil.Scale(5 * time.Second)):
		t.Fatal("stream still live 5 s after the publisher left")
	}
}

func TestRefusals(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 90*time.Second)
	hub := newHub(t, "a")
	srv := startServer(t, hub, nil)
	base := "rtsp://" + srv.Addr() + "/"
	startFFmpeg(t, publishArgs(base+"good", "tcp", 600)...)
	sub, q := subscribe(t, hub, "good", 15*time.Second)

	cases := []struct {
		name string
		args []string
		want []string
	}{
		{"aac only", []string{"-f", "lavfi", "-i", "sine", "-t", "5", "-c:a", "aac", "-f", "rtsp", base + "bad"},
			[]string{"415", "MPEG-4 Audio", "publish H264, VP8 or Opus"}},
		{"mpeg4 video", []string{"-f", "lavfi", "-i", "testsrc", "-t", "5", "-c:v", "mpeg4", "-f", "rtsp", base + "bad"},
			[]string{"415", "MPEG-4 Video", "publish H264, VP8 or Opus"}},
		{"name in use", publishArgs(base+"good", "tcp", 5),
			[]string{"403", `"good" is live at datacenter a`, "pick another name"}},
		{"bad name", publishArgs(base+"a/b", "tcp", 5),
			[]string{"403", "stream name", "has the character"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := startFFmpeg(t, c.args...)
			if err := f.wait(t, 30*time.Second); err == nil {
				t.Fatal("ffmpeg succeeded, want a refusal")
			}
			for _, w := range c.want {
				if !strings.Contains(f.Stderr(), w) {
					t.Errorf("ffmpeg's error lacks %q:\n%s", w, tail(f.Stderr(), 1500))
				}
			}
		})
	}

	// The live stream kept flowing.
	q.Drain()
	if r := collect(t, sub, q, 60); r.seqGaps != 0 {
		t.Errorf("live stream disturbed by the refusals: %v", r)
	}
}

func TestReadFFmpeg(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 90*time.Second)
	hub := newHub(t, "a")
	srv := startServer(t, hub, nil)
	base := "rtsp://" + srv.Addr() + "/"
	startFFmpeg(t, publishArgs(base+"show", "udp", 600)...)
	subscribe(t, hub, "show", 15*time.Second)

	// 90 frames span the GOP replayed at the start and live frames after
	// the next IDR.
	for transport, want := range map[string]int{"tcp": 90, "udp": 30} {
		t.Run(transport, func(t *testing.T) {
			f := startFFmpeg(t, "-loglevel", "error", "-rtsp_transport", transport, "-i", base+"show",
				"-map", "0:v", "-frames:v", strconv.Itoa(want), "-f", "framemd5", "-")
			if err := f.wait(t, 30*time.Second); err != nil {
				t.Fatalf("ffmpeg reading: %v", err)
			}
			frames := 0
			for _, l := range strings.Split(f.stdout.String(), "\n") {
				if strings.HasPrefix(l, "0,") {
					frames++
				}
			}
			if frames != want {
				t.Errorf("ffmpeg decoded %d frames, want %d", frames, want)
			}
			if s := f.Stderr(); strings.Contains(s, "error") || strings.Contains(s, "non-existing PPS") {
				t.Errorf("ffmpeg reported decoding errors:\n%s", tail(s, 1500))
			}
		})
	}

	t.Run("not found", func(t *testing.T) {
		f := startFFmpeg(t, "-rtsp_transport", "tcp", "-i", base+"nothing", "-f", "null", "-")
		if err := f.wait(t, 30*time.Second); err == nil {
			t.Fatal("ffmpeg succeeded reading a stream that does not exist")
		}
		for _, w := range []string{"404", `stream "nothing" is not live`} {
			if !strings.Contains(f.Stderr(), w) {
				t.Errorf("ffmpeg's error lacks %q:\n%s", w, tail(f.Stderr(), 1500))
			}
		}
	})
}

func TestPullSource(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 90*time.Second)
	camHub := newHub(t, "cam")
	camera := startServer(t, camHub, nil)
	hub := newHub(t, "a")
	// The source starts before the camera has a stream: it must retry.
	startServer(t, hub, map[string]string{"pulled": "rtsp://" + camera.Addr() + "/cam"})
	time.Sleep(testutil.Scale(1500 * time.Millisecond))
	if len(hub.Streams()) != 0 {
		t.Fatalf("stream published before the camera had one: %+v", hub.Streams())
	}
	startFFmpeg(t, publishArgs("rtsp://"+camera.Addr()+"/cam", "udp", 600)...)
	sub, q := subscribe(t, hub, "pulled", 30*time.Second)
	r := collect(t, sub, q, 90)
	checkReport(t, r)
}

func TestConfigErrors(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 20*time.Second)
	hub := newHub(t, "a")
	for _, c := range []struct {
		cfg  Config
		want string
	}{
		{Config{Address: "127.0.0.1:8555", Hub: hub}, "must be even"},
		{Config{Address: "127.0.0.1:0", Hub: hub}, "must be even"},
		{Config{Address: "127.0.0.1:8554", Hub: hub, UDPRTPAddress: "127.0.0.1:9000"}, "set both"},
		{Config{Address: "nonsense", Hub: hub}, "want host:port"},
		{Config{Address: "127.0.0.1:0", Hub: hub, DisableUDP: true, Sources: map[string]string{"cam": "http://x"}}, "not an rtsp:// URL"},
		{Config{Address: "127.0.0.1:0", Hub: hub, DisableUDP: true, Sources: map[string]string{"cam": "http://admin:s3cret@cam/x"}}, `"http://admin:xxxxx@cam/x" is not an rtsp:// URL`},
		{Config{Address: "127.0.0.1:0", Hub: hub, DisableUDP: true, Sources: map[string]string{"cam": "rtsp://admin:s3cret@cam:port/x"}}, `"rtsp://xxxxx@cam:port/x" is not an rtsp:// URL`},
	} {
		s, err := New(c.cfg)
		if err == nil {
			s.Close()
			t.Errorf("%+v: no error", c.cfg)
			continue
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: error %q lacks %q", c.cfg, err, c.want)
		}
	}
	// TCP only on an ephemeral port: Addr tells the port.
	s, err := New(Config{Address: "127.0.0.1:0", Hub: hub, DisableUDP: true, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if strings.HasSuffix(s.Addr(), ":0") {
		t.Errorf("Addr() = %q", s.Addr())
	}
}

// TestUnplayablePixelFormatWarning publishes libx264 4:4:4 (what testsrc
// gives without -pix_fmt yuv420p) and checks that the log says browsers
// cannot decode it and how to fix it, while the stream still publishes for
// RTSP readers.
func TestUnplayablePixelFormatWarning(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	logs := &logBuffer{}
	hub := newHub(t, "a")
	srv := startServerConfig(t, Config{Hub: hub, Logger: logs.Logger()})
	startFFmpeg(t, "-re", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=30", "-t", "600",
		"-c:v", "libx264", "-preset", "veryfast", "-f", "rtsp", "-rtsp_transport", "tcp", "rtsp://"+srv.Addr()+"/rgb")
	sub, _ := subscribe(t, hub, "rgb", 15*time.Second)
	if fmtp := sub.Description().Tracks[0].Fmtp; !strings.Contains(fmtp, "profile-level-id=f4") {
		t.Errorf("fmtp %q: want High 4:4:4 Predictive (f4)", fmtp)
	}
	testutil.WaitFor(t, "the warning", func() bool {
		return strings.Contains(logs.String(), "H264 High 4:4:4 Predictive profile, 4:4:4 chroma: browsers cannot decode it; encode 4:2:0 8-bit (ffmpeg -pix_fmt yuv420p)")
	})
}
