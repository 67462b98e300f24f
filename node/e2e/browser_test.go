package e2e

import (
	"context"
	"encoding/json"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
)

// TestBrowserPublishWatch publishes a fake camera from headless Chromium to
// datacenter a with the /publish page (WHIP) and watches it from datacenter c
// with the /watch page (WHEP), all inside a network namespace that has only
// loopback. It asserts what a viewer sees: a "waiting" state before the
// stream exists, then decoded frames of a real size that keep coming, the stream in c's list, a clear 409 for a second publisher of
// the same name in b, and the player falling back to "waiting" once the
// publisher stops. Screenshots of every page go to $STEMFLOW_ARTIFACTS
// (default node/e2e/artifacts).
func TestBrowserPublishWatch(t *testing.T) {
	if !inNetns() {
		requireChromium(t)
		runInNetns(t, testutil.Scale(100*time.Second))
		return
	}
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 90*time.Second)
	requireLoopbackOnly(t)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(85*time.Second))
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
	// What is on screen, read from the <video> element itself: a picture
	// that is playing, not black, and changing.
	pic1 := videoPicture(watch)
	time.Sleep(time.Second)
	pic2 := videoPicture(watch)
	t.Logf("video element: %+v", pic2)
	if pic2.Width == 0 || pic2.Paused || pic2.CurrentTime <= pic1.CurrentTime {
		watch.fatalf("the <video> element is not playing: before %+v, after %+v", pic1, pic2)
	}
	if pic2.Bright == 0 {
		watch.fatalf("the <video> element shows a black picture: %+v", pic2)
	}
	if pic1.Hash == pic2.Hash {
		watch.fatalf("the picture did not change in a second: %+v", pic2)
	}
	// The stats overlay shows the path x takes to c, as c's API names it
	// (a → c, or a → b → c), with each hop's measured delay: every node of
	// the dev cluster measures its links and publishes them in etcd.
	hops := streamHops(t, c, "x")
	if len(hops) < 2 || hops[0] != "a" || hops[len(hops)-1] != "c" {
		t.Fatalf("c's /api/v1/streams gives x the hops %v; want a path from a to c", hops)
	}
	wantPath, hopDelays := pathLines(hops)
	overlay := waitFor(watch, "the stats overlay shows "+wantPath+" with every hop's delay",
		`document.getElementById('stats').innerText`, 15*time.Second,
		func(s string) bool {
			// The path may change once (a route replacing the announced path).
			if h := streamHops(t, c, "x"); !slices.Equal(h, hops) && len(h) >= 2 {
				hops = h
				wantPath, hopDelays = pathLines(h)
			}
			return strings.Contains(s, wantPath+"\n") && hopDelays.MatchString(s)
		})
	t.Logf("stats overlay at c:\n%s", overlay)
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
	// The list measures the stream's bitrate at c from two refreshes.
	rate := waitFor(list, "the stream list at c shows the bitrate of x",
		`document.querySelector('#rows a[href="/watch/x"]').closest('tr').cells[5].innerText`, 10*time.Second,
		func(s string) bool { return strings.HasSuffix(s, "b/s") && s != "0 kb/s" })
	t.Logf("stream list at c: x from %s at %s", origin, rate)
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
	stopped := time.Now()
	after := waitFor(watch, "the watch page waits for x again after the publisher stopped",
		`window.stemflowStats || null`, 20*time.Second,
		func(s watchStats) bool { return s.State == "waiting" })
	t.Logf("the watch page at c was waiting again %v after Stop (session ended: %s)", time.Since(stopped).Round(100*time.Millisecond), after.LastEnd)
	watch.screenshot("watch-waiting.png")
}

// pathLines returns the stats overlay's path line for hops ("path a → b →
// c") and a pattern of its delay line with a delay for every hop ("delay
// a→b 2.6 ms  b→c 0.4 ms").
func pathLines(hops []string) (string, *regexp.Regexp) {
	delays := `(?m)^delay`
	for i := 1; i < len(hops); i++ {
		delays += ` +` + regexp.QuoteMeta(hops[i-1]+"→"+hops[i]) + ` [0-9.]+ ms`
	}
	return "path " + strings.Join(hops, " → "), regexp.MustCompile(delays + `$`)
}

// streamHops returns a stream's hops in a node's /api/v1/streams.
func streamHops(t *testing.T, base, name string) []string {
	t.Helper()
	resp, err := http.Get(base + "/api/v1/streams")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var list struct {
		Streams []struct {
			Name string   `json:"name"`
			Hops []string `json:"hops"`
		} `json:"streams"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		t.Fatalf("GET %s/api/v1/streams: %v", base, err)
	}
	for _, s := range list.Streams {
		if s.Name == name {
			return s.Hops
		}
	}
	return nil
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
	State         string  `json:"state"`
	FramesDecoded int     `json:"framesDecoded"`
	VideoWidth    int     `json:"videoWidth"`
	VideoHeight   int     `json:"videoHeight"`
	FPS           float64 `json:"fps"`
	Bitrate       float64 `json:"bitrate"`
	RTTMs         float64 `json:"rttMs"` // 0 when unknown
	PacketsLost   int     `json:"packetsLost"`
	VideoCodec    string  `json:"videoCodec"`
	AudioCodec    string  `json:"audioCodec"`
	Sessions      int     `json:"sessions"`
	LastEnd       string  `json:"lastEnd"`
}

// picture is what a <video> element shows.
type picture struct {
	Width, Height int
	CurrentTime   float64
	Paused        bool
	Bright        int    // pixels of a 64×36 thumbnail that are not near black
	Hash          uint32 // of that thumbnail
}

// videoPicture reads the watch page's <video> element and a thumbnail of its
// current frame.
func videoPicture(tb *tab) picture {
	tb.b.t.Helper()
	var p picture
	err := tb.eval(`(() => {
		const v = document.getElementById('video');
		const c = document.createElement('canvas');
		c.width = 64; c.height = 36;
		const g = c.getContext('2d');
		g.drawImage(v, 0, 0, c.width, c.height);
		const px = g.getImageData(0, 0, c.width, c.height).data;
		let bright = 0, hash = 2166136261;
		for (let i = 0; i < px.length; i += 4) {
			if (px[i] + px[i + 1] + px[i + 2] > 60) bright++;
			hash = Math.imul(hash ^ px[i] ^ (px[i + 1] << 8) ^ (px[i + 2] << 16), 16777619) >>> 0;
		}
		return {Width: v.videoWidth, Height: v.videoHeight, CurrentTime: v.currentTime,
		        Paused: v.paused, Bright: bright, Hash: hash};
	})()`, &p)
	if err != nil {
		tb.fatalf("cannot read the <video> element: %v", err)
	}
	return p
}
