package e2e

import (
	"bytes"
	"context"
	"os/exec"
	"testing"
	"time"

	"github.com/pion/rtp"
	"github.com/pion/rtp/codecs"

	"github.com/stemflow/stemflow/internal/rtc/rtctest"
	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/node"
	"github.com/stemflow/stemflow/relay"
)

// x264Frames encodes two seconds of test pattern with libx264 and the extra
// arguments and returns its access units in Annex-B form.
func x264Frames(t *testing.T, args ...string) [][]byte {
	t.Helper()
	cmd := append([]string{"-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=30",
		"-t", "2", "-pix_fmt", "yuv420p", "-c:v", "libx264", "-g", "30"}, args...)
	es, err := exec.Command("ffmpeg", append(cmd, "-f", "h264", "-")...).Output()
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
		if typ := nal[0] & 0x1f; typ == 1 || typ == 5 {
			aus = append(aus, au)
			au = nil
		}
	}
	return aus
}

// TestWHIPBFramesFlagged publishes libx264 output over WHIP at a, with and
// without B-frames, and checks the stream's b_frames flag at a and, once a
// WHEP viewer watches there, at c.
func TestWHIPBFramesFlagged(t *testing.T) {
	testutil.Watchdog(t, 60*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(40*time.Second))
	defer cancel()
	c, err := node.StartDev(ctx, node.DevConfig{DCs: []string{"a", "b", "c"}, FreePorts: true, Logger: pipelineLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	eng := rtctest.NewEngine(t)
	for _, tc := range []struct {
		name string
		args []string
		want bool
	}{
		{"bf0", []string{"-bf", "0"}, false},
		{"defaults", nil, true},
	} {
		aus := x264Frames(t, tc.args...)
		pub, err := rtctest.Publish(ctx, eng, c.HTTPURL(0)+"/whip/"+tc.name, rtctest.PublishOptions{})
		if err != nil {
			t.Fatal(err)
		}
		stop := make(chan struct{})
		sent := make(chan struct{})
		go func() {
			defer close(sent)
			p := rtp.NewPacketizer(1200, 96, 0x1234, &codecs.H264Payloader{}, rtp.NewRandomSequencer(), 90000)
			tick := time.NewTicker(time.Second / 30)
			defer tick.Stop()
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				for _, pkt := range p.Packetize(aus[n%len(aus)], 3000) {
					pub.Video.WriteRTP(pkt)
				}
			}
		}()
		waitAnnounced(t, c, 2, tc.name)
		v := view(t, ctx, c.HTTPURL(2)+"/whep/"+tc.name)
		select {
		case <-v.FirstKeyframe():
		case <-time.After(testutil.Scale(5 * time.Second)):
			t.Fatalf("%s: no keyframe at c", tc.name)
		}
		time.Sleep(500 * time.Millisecond) // 15 frames: x264's first B-frame is the second or third
		for i, dc := range []string{"a", "c"} {
			// a finds the B-frames as they arrive from the publisher; c
			// learns of them from a, a message later: wait for the flag
			// (at most 5 s, scaled), not for a fixed time.
			var info relay.StreamInfo
			for deadline := time.Now().Add(testutil.Scale(5 * time.Second)); ; {
				for _, s := range c.Nodes[2*i].Hub().Streams() {
					if s.Name == tc.name {
						info = s
					}
				}
				if info.BFrames == tc.want && info.Local || time.Now().After(deadline) {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			if info.BFrames != tc.want || !info.Local {
				t.Errorf("%s over WHIP: datacenter %s lists %+v, want b_frames %v", tc.name, dc, info, tc.want)
			}
		}
		close(stop)
		<-sent
		v.Close()
		pub.Close()
	}
}
