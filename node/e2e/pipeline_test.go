package e2e

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"

	"github.com/pion/rtp"
	"github.com/pion/rtp/codecs"

	"github.com/stemflow/stemflow/internal/rtc/rtctest"
	"github.com/stemflow/stemflow/node"
)

func pipelineLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// startChain starts datacenters a, b and c (a full mesh) in process on loopback, every
// listener on a port the system picks, so that tests run beside a `stemflow
// dev` and each other.
func startChain(t *testing.T) *node.Cluster {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(20*time.Second))
	defer cancel()
	c, err := node.StartDev(ctx, node.DevConfig{
		DCs: []string{"a", "b", "c"}, Bind: "127.0.0.1", FreePorts: true,
		Logger: pipelineLogger(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// waitAnnounced waits until datacenter i knows that stream name is live.
func waitAnnounced(t *testing.T, c *node.Cluster, i int, name string) {
	t.Helper()
	deadline := time.Now().Add(testutil.Scale(10 * time.Second))
	for time.Now().Before(deadline) {
		for _, s := range c.Nodes[i].Hub().Streams() {
			if s.Name == name {
				return
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("datacenter %s never learned that %q is live", c.Datacenters()[i], name)
}

// waitFlowing waits until packets of stream name reach datacenter i: a live
// stream that a new viewer joins, past the encoder's start-up delay (x264's
// lookahead holds back the first frames for about a second).
func waitFlowing(t *testing.T, c *node.Cluster, i int, name string) {
	t.Helper()
	deadline := time.Now().Add(testutil.Scale(10 * time.Second))
	for time.Now().Before(deadline) {
		for _, s := range c.Nodes[i].Hub().Streams() {
			if s.Name == name && s.Packets > 100 {
				return
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no packets of %q reach datacenter %s", name, c.Datacenters()[i])
}

// ffmpegPublish publishes a 30 fps H264 (libx264 defaults: High profile,
// parameter sets only in the SDP, 1472-byte RTP packets) + Opus test stream
// over RTSP until the test ends.
func ffmpegPublish(t *testing.T, url string, tcp bool) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	args := []string{"-hide_banner", "-loglevel", "error", "-re",
		"-f", "lavfi", "-i", "testsrc=size=640x360:rate=30",
		"-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
		"-pix_fmt", "yuv420p", "-c:v", "libx264", "-g", "60", "-c:a", "libopus", "-f", "rtsp"}
	if tcp {
		args = append(args, "-rtsp_transport", "tcp")
	}
	cmd := exec.CommandContext(ctx, "ffmpeg", append(args, url)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting ffmpeg (bash scripts/test.sh installs it): %v", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cancel()
		<-done
		if t.Failed() {
			t.Logf("ffmpeg stderr: %s", stderr.String())
		}
	})
}

// h264AccessUnits encodes four seconds of test pattern as a browser would
// (constrained baseline, a keyframe every 2 s) and returns its access units
// in Annex-B form, so that what the test publishes is real, decodable video.
func h264AccessUnits(t *testing.T) [][]byte {
	es, err := exec.Command("ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=30",
		"-t", "4", "-pix_fmt", "yuv420p", "-c:v", "libx264", "-profile:v", "baseline", "-g", "60", "-bf", "0", "-f", "h264", "-").Output()
	if err != nil {
		t.Fatalf("encoding test video with ffmpeg: %v", err)
	}
	var aus [][]byte
	var au []byte
	for _, nal := range bytes.Split(es, []byte{0, 0, 1}) {
		nal = bytes.TrimRight(nal, "\x00")
		if len(nal) == 0 {
			continue
		}
		au = append(append(au, 0, 0, 0, 1), nal...)
		if typ := nal[0] & 0x1f; typ == 1 || typ == 5 { // a slice ends the access unit
			aus = append(aus, au)
			au = nil
		}
	}
	if len(aus) != 120 {
		t.Errorf("test video has %d frames, want 120", len(aus))
	}
	return aus
}

// view connects a WHEP viewer, retrying while the stream is not yet live.
func view(t *testing.T, ctx context.Context, endpoint string) *rtctest.Viewer {
	t.Helper()
	eng := rtctest.NewEngine(t)
	for {
		v, err := rtctest.View(ctx, eng, endpoint, rtctest.ViewOptions{})
		if err == nil {
			t.Cleanup(v.Close)
			return v
		}
		var se *rtctest.StatusError
		if !errors.As(err, &se) || se.Status != http.StatusNotFound || ctx.Err() != nil {
			t.Fatalf("WHEP %s: %v", endpoint, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// checkVideo asserts a viewer's video: the first packet is a keyframe, and
// over window after it the frame rate is at least minFPS with no sequence
// gaps.
func checkVideo(t *testing.T, pkts []rtctest.Packet, window time.Duration, minFPS int) {
	t.Helper()
	if len(pkts) == 0 {
		t.Fatal("no video packets")
	}
	if !pkts[0].Keyframe {
		t.Fatalf("first video packet (seq %d) is not a keyframe", pkts[0].Seq)
	}
	start := pkts[0].At
	frames := map[uint32]bool{}
	for i, p := range pkts {
		if i > 0 && p.Seq != pkts[i-1].Seq+1 {
			t.Fatalf("sequence gap: %d follows %d (packet %d of %d)", p.Seq, pkts[i-1].Seq, i, len(pkts))
		}
		if p.At.Sub(start) <= window {
			frames[p.Timestamp] = true
		}
	}
	if fps := float64(len(frames)) / window.Seconds(); fps < float64(minFPS) {
		t.Fatalf("%d frames in %v: %.1f fps, want at least %d", len(frames), window, fps, minFPS)
	}
}

func TestFFmpegRTSPAtAToWHEPAtC(t *testing.T) {
	for _, transport := range []string{"udp", "tcp"} {
		t.Run(transport, func(t *testing.T) {
			testutil.Watchdog(t, 60*time.Second)
			c := startChain(t)
			ffmpegPublish(t, c.RTSPURL(0, "x"), transport == "tcp")
			waitAnnounced(t, c, 2, "x")
			waitFlowing(t, c, 0, "x")
			ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(30*time.Second))
			defer cancel()
			v := view(t, ctx, c.HTTPURL(2)+"/whep/x")
			select {
			case <-v.FirstKeyframe():
				if d := time.Since(v.Started); d > testutil.Scale(time.Second) {
					t.Errorf("first keyframe after %v, want within 1 s", d)
				}
			case <-time.After(testutil.Scale(time.Second)):
				t.Fatal("no H264 keyframe within 1 s")
			}
			codec, _ := v.VideoCodec()
			if !strings.EqualFold(codec.MimeType, "video/H264") {
				t.Fatalf("negotiated %s, want H264", codec.MimeType)
			}
			time.Sleep(5500 * time.Millisecond)
			checkVideo(t, v.Video(), 5*time.Second, 25)
			audio := v.Audio()
			if len(audio) < 100 { // 50 packets/s of 20 ms Opus
				t.Fatalf("%d Opus packets in 5 s", len(audio))
			}
			for i := 1; i < len(audio); i++ {
				if audio[i].Seq != audio[i-1].Seq+1 {
					t.Fatalf("Opus sequence gap: %d follows %d", audio[i].Seq, audio[i-1].Seq)
				}
			}
		})
	}
}

func TestWHIPAtAToWHEPAtCAndRTSPAtB(t *testing.T) {
	testutil.Watchdog(t, 60*time.Second)
	c := startChain(t)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(30*time.Second))
	defer cancel()
	pub, err := rtctest.Publish(ctx, rtctest.NewEngine(t), c.HTTPURL(0)+"/whip/y", rtctest.PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pub.Close)
	// Send 30 fps H264 with a 2 s GOP, and Opus, until the test ends.
	aus := h264AccessUnits(t)
	if len(aus) == 0 {
		t.FailNow()
	}
	stop := make(chan struct{})
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		packetizer := rtp.NewPacketizer(1200, 96, 0x1234, &codecs.H264Payloader{}, rtp.NewRandomSequencer(), 90000)
		var audio rtctest.OpusSource
		tick := time.NewTicker(time.Second / 30)
		defer tick.Stop()
		// Catch up with the clock after each tick: a ticker drops ticks
		// when this goroutine runs late on a busy machine, and the source
		// must stay at 30 fps for the frame rate at c to mean anything.
		start := time.Now()
		for n := 0; ; {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			for due := int(time.Since(start) * 30 / time.Second); n <= due; n++ {
				for _, p := range packetizer.Packetize(aus[n%len(aus)], 3000) {
					pub.Video.WriteRTP(p)
				}
				if n%3 != 2 { // ~20 ms of Opus per 33 ms frame on average
					pub.Audio.Write(audio.Next())
				}
			}
		}
	}()
	t.Cleanup(func() { close(stop); <-sent })
	waitAnnounced(t, c, 2, "y")

	v := view(t, ctx, c.HTTPURL(2)+"/whep/y")
	select {
	case <-v.FirstKeyframe():
	case <-time.After(testutil.Scale(time.Second)):
		t.Fatal("WHEP viewer at c got no keyframe within 1 s")
	}

	// An RTSP reader at b decodes frames of the same stream.
	rctx, rcancel := context.WithTimeout(ctx, testutil.Scale(20*time.Second))
	defer rcancel()
	out, err := exec.CommandContext(rctx, "ffmpeg", "-hide_banner", "-loglevel", "error", "-rtsp_transport", "tcp",
		"-i", c.RTSPURL(1, "y"), "-map", "0:v", "-frames:v", "30", "-f", "framemd5", "-").Output()
	if err != nil {
		t.Fatalf("ffmpeg reading %s: %v", c.RTSPURL(1, "y"), err)
	}
	frames := 0
	for _, line := range strings.Split(string(out), "\n") {
		if line != "" && !strings.HasPrefix(line, "#") {
			frames++
		}
	}
	if frames != 30 {
		t.Fatalf("ffmpeg at b decoded %d frames, want 30:\n%s", frames, out)
	}

	time.Sleep(2 * time.Second)
	checkVideo(t, v.Video(), 2*time.Second, 25)
	if len(v.Audio()) == 0 {
		t.Fatal("no Opus at c")
	}
}

func TestSecondPublisherElsewhereIsRefused(t *testing.T) {
	testutil.Watchdog(t, 60*time.Second)
	c := startChain(t)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(30*time.Second))
	defer cancel()
	eng := rtctest.NewEngine(t)
	pub, err := rtctest.Publish(ctx, eng, c.HTTPURL(0)+"/whip/z", rtctest.PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pub.Close)
	waitAnnounced(t, c, 2, "z")
	_, err = rtctest.Publish(ctx, eng, c.HTTPURL(2)+"/whip/z", rtctest.PublishOptions{})
	var se *rtctest.StatusError
	if !errors.As(err, &se) || se.Status != http.StatusConflict || !strings.Contains(se.Body, "datacenter a") {
		t.Fatalf("second publisher of z at c: %v, want 409 naming datacenter a", err)
	}
	// The first publication is undisturbed: still live, from a.
	for _, s := range c.Nodes[2].Hub().Streams() {
		if s.Name == "z" && s.Origin != "a" {
			t.Fatalf("after the refused publisher, z's origin is %s", s.Origin)
		}
	}
	if pub.PC.ConnectionState().String() != "connected" {
		t.Fatalf("first publisher is %s", pub.PC.ConnectionState())
	}
}
