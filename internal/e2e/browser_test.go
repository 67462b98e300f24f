package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/rtc/rtctest"
)

// TestBrowserPublishWatch publishes a fake camera from headless Chromium to
// datacenter a with the /publish page (WHIP) and watches it from datacenter c
// with the /watch page (WHEP), all inside a network namespace that has only
// loopback. It asserts what a viewer sees: a "waiting" state before the
// stream exists, then decoded frames of a real size that keep coming, the stream in c's list, a clear 409 for a second publisher of
// the same name in b, and the player falling back to "waiting" once the
// publisher stops. Screenshots of every page go to $STEMFLOW_ARTIFACTS
// (default internal/e2e/artifacts).
func TestBrowserPublishWatch(t *testing.T) {
	if !inNetns() {
		requireChromium(t)
		runInNetns(t, rtctest.Scale(100*time.Second))
		return
	}
	rtctest.CheckLeaks(t)
	rtctest.Watchdog(t, 90*time.Second)
	requireLoopbackOnly(t)
	ctx, cancel := context.WithTimeout(context.Background(), rtctest.Scale(85*time.Second))
	t.Cleanup(cancel)

	urls := startCluster(t, ctx) // datacenters a, b, c
	a, b, c := urls[0], urls[1], urls[2]
	br := startBrowser(t, ctx)

	// A viewer at c who arrives before the stream is told to wait.
	watch := br.newTab("watch-c")
	watch.navigate(c + "/watch/x")
	waitFor(watch, "the watch page at c waits for x before it is published",
		`window.stemflowStats || null`, 15*time.Second,
		func(s watchStats) bool { return s.State == "waiting" })
	watch.screenshot("watch-before.png")

	// Publish the fake camera and microphone at a.
	pub := br.newTab("publish-a")
	pub.navigate(a + "/publish/x?autostart=1")
	live := waitFor(pub, "the publish page reports it is live",
		`window.stemflowPublish || null`, 20*time.Second,
		func(p publishState) bool {
			if p.State == "error" {
				pub.fatalf("publishing failed: %s", p.Error)
			}
			return p.State == "live" && p.FramesEncoded > 0
		})
	t.Logf("publishing at a: %s+%s %dx%d, encoder %s", live.VideoCodec, live.AudioCodec, live.FrameWidth, live.FrameHeight, live.Encoder)

	// The viewer at c starts playing by itself: the stream crosses the
	// overlay a → b → c.
	first := waitFor(watch, "the watch page decodes frames",
		`window.stemflowStats || null`, 25*time.Second,
		func(s watchStats) bool { return s.FramesDecoded > 0 && s.VideoWidth > 0 && s.VideoHeight > 0 })
	t.Logf("watching at c: first frames after %d session(s): %dx%d %s", first.Sessions, first.VideoWidth, first.VideoHeight, first.VideoCodec)

	// Frames must keep coming: a live stream, not one replayed keyframe.
	playing := waitFor(watch, "the watch page keeps decoding (at least 30 more frames)",
		`window.stemflowStats || null`, 10*time.Second,
		func(s watchStats) bool { return s.State == "playing" && s.FramesDecoded >= first.FramesDecoded+30 })
	t.Logf("watch stats at c: %+v", playing)
	if playing.VideoCodec == "" || playing.Bitrate <= 0 {
		watch.fatalf("stats overlay has no codec or bitrate: %+v", playing)
	}
	// Only now is the picture certain to be on screen.
	watch.screenshot("watch.png")
	pub.screenshot("publish.png")

	// The stream list at c shows x, published at a.
	list := br.newTab("streams-c")
	list.navigate(c + "/")
	origin := waitFor(list, "the stream list at c shows x",
		`(() => { const a = document.querySelector('#rows a[href="/watch/x"]');
		          return a ? a.closest('tr').cells[1].innerText : ''; })()`, 10*time.Second,
		func(s string) bool { return s != "" })
	if strings.Fields(origin)[0] != "a" {
		list.fatalf("the row of x names origin %q, want a", origin)
	}
	list.screenshot("streams.png")

	// A second publisher of x, at b, is refused with a message that says why.
	dup := br.newTab("publish-b")
	dup.navigate(b + "/publish/x?autostart=1")
	refused := waitFor(dup, "the second publisher of x is refused with 409",
		`window.stemflowPublish || null`, 15*time.Second,
		func(p publishState) bool {
			if p.State == "live" {
				dup.fatalf("a second publisher of x went live at b; want a 409 conflict")
			}
			return p.State == "error" && p.ErrorStatus != 0
		})
	if refused.ErrorStatus != 409 || !strings.Contains(refused.Error, "already being published") {
		dup.fatalf("want the 409 conflict message, got status %d: %q", refused.ErrorStatus, refused.Error)
	}
	dup.screenshot("publish-conflict.png")

	// The viewer at c notices the end of the stream and waits for it again.
	if err := pub.eval(`document.getElementById('stop').click(), true`, new(bool)); err != nil {
		pub.fatalf("cannot press Stop: %v", err)
	}
	waitFor(watch, "the watch page waits for x again after the publisher stopped",
		`window.stemflowStats || null`, 20*time.Second,
		func(s watchStats) bool { return s.State == "waiting" })
	watch.screenshot("watch-waiting.png")
}

// publishState mirrors window.stemflowPublish (player/assets/static/publish.js).
type publishState struct {
	State         string  `json:"state"`
	Error         string  `json:"error"`
	ErrorStatus   int     `json:"errorStatus"`
	VideoCodec    string  `json:"videoCodec"`
	AudioCodec    string  `json:"audioCodec"`
	FramesEncoded int     `json:"framesEncoded"`
	FrameWidth    int     `json:"frameWidth"`
	FrameHeight   int     `json:"frameHeight"`
	Bitrate       float64 `json:"bitrate"`
	Encoder       string  `json:"encoder"`
}

// watchStats mirrors window.stemflowStats (player/assets/static/watch.js).
type watchStats struct {
	State         string   `json:"state"`
	FramesDecoded int      `json:"framesDecoded"`
	VideoWidth    int      `json:"videoWidth"`
	VideoHeight   int      `json:"videoHeight"`
	FPS           float64  `json:"fps"`
	Bitrate       float64  `json:"bitrate"`
	RTTMs         *float64 `json:"rttMs"`
	PacketsLost   int      `json:"packetsLost"`
	VideoCodec    string   `json:"videoCodec"`
	AudioCodec    string   `json:"audioCodec"`
	Sessions      int      `json:"sessions"`
}
