package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/node"
)

// readmeFFmpeg returns the ffmpeg command the README tells a new user to
// publish with, split into arguments.
func readmeFFmpeg(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("`(ffmpeg -re [^`]+)`").FindSubmatch(b)
	if m == nil {
		t.Fatal("README.md has no `ffmpeg -re …` publishing command")
	}
	return strings.Fields(string(m[1]))
}

// lighten makes a publishing command cheap enough for a shared 2-core test
// machine without changing what the browser gets: a 640×360 test source and
// libx264's superfast preset, which keeps libx264's default B-frames (only
// ultrafast turns them off, and would hide a command without -bf 0).
func lighten(args []string, url string) []string {
	out := []string{"-hide_banner", "-loglevel", "error", "-progress", "pipe:1", "-stats_period", "1"}
	for i, a := range args[1:] { // args[0] is "ffmpeg"
		switch {
		case strings.HasPrefix(a, "testsrc="):
			a = regexp.MustCompile(`size=\d+x\d+`).ReplaceAllString(a, "size=640x360")
		case strings.HasPrefix(a, "rtsp://"):
			a = url
		}
		out = append(out, a)
		if a == "libx264" && args[i] == "-c:v" {
			out = append(out, "-preset", "superfast")
		}
	}
	return out
}

// ffmpegProc is a running ffmpeg publisher.
type ffmpegProc struct {
	cmd    *exec.Cmd
	cancel context.CancelFunc
	done   chan struct{}
	stderr strings.Builder

	mu     sync.Mutex // guards the following fields
	frames int        // frames encoded, from -progress
	at     time.Time  // when frames was reported
}

// startFFmpeg runs ffmpeg with args until stop or the end of the test.
func startFFmpeg(t *testing.T, args []string) *ffmpegProc {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	p := &ffmpegProc{cancel: cancel, done: make(chan struct{})}
	p.cmd = exec.CommandContext(ctx, "ffmpeg", args...)
	p.cmd.Stderr = &p.stderr
	out, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ffmpeg %s", strings.Join(args, " "))
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting ffmpeg (bash scripts/test.sh installs it): %v", err)
	}
	go func() {
		defer close(p.done)
		buf := make([]byte, 4096)
		var line []byte
		for {
			n, err := out.Read(buf)
			for _, c := range buf[:n] {
				if c != '\n' {
					line = append(line, c)
					continue
				}
				var f int
				if _, e := fmt.Sscanf(string(line), "frame=%d", &f); e == nil {
					p.mu.Lock()
					p.frames, p.at = f, time.Now()
					p.mu.Unlock()
				}
				line = line[:0]
			}
			if err != nil {
				p.cmd.Wait()
				return
			}
		}
	}()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("ffmpeg stderr: %s", p.stderr.String())
		}
	})
	return p
}

func (p *ffmpegProc) stop() {
	p.cancel()
	<-p.done
}

// progress returns the frames ffmpeg has encoded and when it said so.
func (p *ffmpegProc) progress() (int, time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.frames, p.at
}

// listedStream is a stream as /api/v1/streams lists it.
type listedStream struct {
	Name    string `json:"name"`
	Local   bool   `json:"local"`
	BFrames bool   `json:"b_frames"`
}

// apiStream reads how the node at base lists stream name.
func apiStream(t *testing.T, base, name string) (listedStream, bool) {
	t.Helper()
	res, err := http.Get(base + "/api/v1/streams")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	var body struct {
		Streams []listedStream `json:"streams"`
	}
	if err := json.NewDecoder(res.Body).Decode(&body); err != nil {
		t.Fatalf("GET %s/api/v1/streams: %v", base, err)
	}
	for _, s := range body.Streams {
		if s.Name == name {
			return s, true
		}
	}
	return listedStream{}, false
}

// playback is what the watch page measured over a window.
type playback struct {
	fps, dropped   float64 // frames decoded per second; dropped ÷ (decoded + dropped)
	decoded, drops int
	window         time.Duration
	ffmpegFPS      float64 // frames ffmpeg encoded per second in about the same window
	state, message string
	packetsLost    int
}

func (p playback) String() string {
	return fmt.Sprintf("%.1f fps decoded, %d of %d frames dropped (%.1f %%), %d packets lost, over %v (ffmpeg encoded %.1f fps); page state %q",
		p.fps, p.drops, p.decoded+p.drops, 100*p.dropped, p.packetsLost, p.window.Round(100*time.Millisecond), p.ffmpegFPS, p.state)
}

// pageStats mirrors the fields of window.stemflowStats read here.
type pageStats struct {
	State         string `json:"state"`
	Message       string `json:"message"`
	Detail        string `json:"detail"`
	BFrames       bool   `json:"bFrames"`
	FramesDecoded int    `json:"framesDecoded"`
	FramesDropped int    `json:"framesDropped"`
	PacketsLost   int    `json:"packetsLost"`
	Sessions      int    `json:"sessions"`
	Updated       int64  `json:"updated"`
}

// measure reads the watch page's getStats() figures twice, window apart.
func measure(tb *tab, pub *ffmpegProc, window time.Duration) playback {
	tb.b.t.Helper()
	const expr = `window.stemflowStats || null`
	first := waitFor(tb, "a fresh getStats() sample", expr, 5*time.Second, func(s pageStats) bool { return s.Updated > 0 })
	f0, t0 := pub.progress()
	last := waitFor(tb, fmt.Sprintf("a getStats() sample %v later", window), expr, window+5*time.Second,
		func(s pageStats) bool { return s.Updated-first.Updated >= window.Milliseconds() })
	f1, t1 := pub.progress()
	if last.Sessions != first.Sessions {
		tb.fatalf("the page reconnected while measuring (sessions %d → %d)", first.Sessions, last.Sessions)
	}
	p := playback{
		decoded: last.FramesDecoded - first.FramesDecoded,
		drops:   last.FramesDropped - first.FramesDropped,
		window:  time.Duration(last.Updated-first.Updated) * time.Millisecond,
		state:   last.State, message: last.Message, packetsLost: last.PacketsLost,
	}
	p.fps = float64(p.decoded) / p.window.Seconds()
	if p.decoded+p.drops > 0 {
		p.dropped = float64(p.drops) / float64(p.decoded+p.drops)
	}
	if d := t1.Sub(t0); d > 0 {
		p.ffmpegFPS = float64(f1-f0) / d.Seconds()
	}
	return p
}

// TestBrowserBFrames publishes over RTSP at a with ffmpeg and watches at c in
// headless Chromium, inside a network namespace with only loopback:
//
//   - the README's command (lightened: 640×360, superfast) plays at ≥ 25 fps
//     with ≤ 2 % of frames dropped;
//   - libx264 with its defaults (B-frames) is flagged "b_frames": true at a
//     and c, listed so at c, and the watch page says in words what is wrong
//     and how the publisher fixes it, while RTSP readers still get the stream.
func TestBrowserBFrames(t *testing.T) {
	if !inNetns() {
		requireChromium(t)
		runInNetns(t, testutil.Scale(170*time.Second))
		return
	}
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 160*time.Second)
	requireLoopbackOnly(t)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(150*time.Second))
	t.Cleanup(cancel)

	sctx, scancel := context.WithTimeout(ctx, testutil.Scale(20*time.Second))
	c, err := node.StartDev(sctx, node.DevConfig{DCs: []string{"a", "b", "c"}, Bind: "127.0.0.1", HTTPPort: 18080, RTSPPort: 18554})
	scancel()
	if err != nil {
		t.Fatalf("cannot start the dev cluster: %v", err)
	}
	t.Cleanup(c.Close)
	atA, atC := c.HTTPURL(0), c.HTTPURL(2)
	br := startBrowser(t, ctx)

	// 1. The README's command plays smoothly.
	readme := readmeFFmpeg(t)
	pub := startFFmpeg(t, lighten(readme, c.RTSPURL(0, "x")))
	watch := br.newTab("watch-x")
	watch.navigate(atC + "/watch/x")
	waitFor(watch, "the watch page at c plays x", `window.stemflowStats || null`, 30*time.Second,
		func(s pageStats) bool { return s.State == "playing" && s.FramesDecoded > 0 })
	time.Sleep(2 * time.Second) // past the start: the jitter buffer settles
	// Up to three 5 s windows: on a loaded machine (the race detector, other
	// tests' browsers) Chromium's decoder falls behind now and then and drops
	// frames. A stream with B-frames passes none: it decodes 1–2 fps.
	var windows []string
	for attempt := 1; ; attempt++ {
		smooth := measure(watch, pub, 5*time.Second)
		windows = append(windows, smooth.String())
		t.Logf("README command (%s), window %d: %v", strings.Join(readme, " "), attempt, smooth)
		if smooth.fps >= 25 && smooth.dropped <= 0.02 && smooth.state == "playing" {
			break
		}
		if attempt == 3 {
			watch.fatalf("the README's command plays at\n  %s\nwant ≥ 25 fps, ≤ 2 %% dropped, state playing in one 5 s window", strings.Join(windows, "\n  "))
		}
	}
	watch.screenshot("bframes-readme.png")
	if s, _ := apiStream(t, atA, "x"); s.BFrames {
		t.Errorf("a lists x, published with the README's command, with b_frames: %+v", s)
	}
	pub.stop()

	// 2. libx264 with its defaults: B-frames.
	bpub := startFFmpeg(t, []string{"-hide_banner", "-loglevel", "error", "-progress", "pipe:1", "-stats_period", "1",
		"-re", "-f", "lavfi", "-i", "testsrc=size=320x180:rate=30", "-f", "lavfi", "-i", "sine",
		"-pix_fmt", "yuv420p", "-c:v", "libx264", "-g", "60", "-c:a", "libopus", "-f", "rtsp", c.RTSPURL(0, "y")})
	bwatch := br.newTab("watch-y")
	bwatch.navigate(atC + "/watch/y")
	told := waitFor(bwatch, "the watch page at c says why y cannot play", `window.stemflowStats || null`, 30*time.Second,
		func(s pageStats) bool { return s.State == "unplayable" })
	var shown struct {
		Text, Detail string
		Visible      bool
		VideoHidden  bool
	}
	if err := bwatch.eval(`(() => {
		const box = document.getElementById('state');
		return {Text: document.getElementById('state-text').innerText,
		        Detail: document.getElementById('state-detail').innerText,
		        Visible: !box.hidden && box.getBoundingClientRect().height > 0,
		        VideoHidden: getComputedStyle(document.getElementById('video')).visibility === 'hidden'};
	})()`, &shown); err != nil {
		bwatch.fatalf("cannot read the page: %v", err)
	}
	bwatch.screenshot("bframes-explained.png")
	t.Logf("the watch page at c says: %q / %q", shown.Text, shown.Detail)
	if !shown.Visible || !shown.VideoHidden || !strings.Contains(shown.Text, "B-frames") || !strings.Contains(shown.Detail, "-bf 0") {
		bwatch.fatalf("the page shows %+v (stats %+v); want a visible message naming B-frames and -bf 0 instead of the picture", shown, told)
	}
	for _, at := range []struct{ dc, url string }{{"a", atA}, {"c", atC}} {
		if s, ok := apiStream(t, at.url, "y"); !ok || !s.BFrames || !s.Local {
			t.Errorf("datacenter %s lists y as %+v (found %v); want it flowing there with b_frames: true", at.dc, s, ok)
		}
	}
	list := br.newTab("streams-c")
	list.navigate(atC + "/")
	tag := waitFor(list, "the stream list at c marks y", `(() => {
		const a = document.querySelector('#rows a[href="/watch/y"]');
		const tag = a && a.closest('tr').querySelector('.b-frames');
		return tag ? tag.innerText + ' | ' + tag.title : '';
	})()`, 10*time.Second, func(s string) bool { return s != "" })
	t.Logf("the stream list at c marks y: %q", tag)
	if !strings.Contains(tag, "B-frames") || !strings.Contains(tag, "-bf 0") {
		list.fatalf("the mark of y says %q; want it to name B-frames and -bf 0", tag)
	}
	list.screenshot("bframes-list.png")

	// What Chromium makes of the B-frames, for the record: the session
	// stays open behind the message.
	t.Logf("libx264 defaults (B-frames), behind the message: %v", measure(bwatch, bpub, 5*time.Second))

	// RTSP readers get the stream as it is.
	rctx, rcancel := context.WithTimeout(ctx, testutil.Scale(20*time.Second))
	defer rcancel()
	out, err := exec.CommandContext(rctx, "ffmpeg", "-hide_banner", "-loglevel", "error", "-rtsp_transport", "tcp",
		"-i", c.RTSPURL(2, "y"), "-map", "0:v", "-frames:v", "30", "-f", "framemd5", "-").Output()
	if err != nil {
		t.Fatalf("ffmpeg reading %s: %v", c.RTSPURL(2, "y"), err)
	}
	frames := 0
	for _, line := range strings.Split(string(out), "\n") {
		if line != "" && !strings.HasPrefix(line, "#") {
			frames++
		}
	}
	if frames != 30 {
		t.Fatalf("ffmpeg reading y over RTSP at c decoded %d frames, want 30:\n%s", frames, out)
	}
}

// TestDocsPublishWithoutBFrames checks that every ffmpeg command in the
// README and the deployment notes that encodes with libx264 turns B-frames
// off: browsers cannot play them over WebRTC.
func TestDocsPublishWithoutBFrames(t *testing.T) {
	docs, _ := filepath.Glob(filepath.Join("..", "..", "deploy", "*.md"))
	docs = append(docs, filepath.Join("..", "..", "README.md"))
	found := 0
	for _, doc := range docs {
		b, err := os.ReadFile(doc)
		if err != nil {
			t.Fatal(err)
		}
		for _, cmd := range regexp.MustCompile("`ffmpeg [^`]*`").FindAllString(string(b), -1) {
			cmd = strings.Join(strings.Fields(strings.Trim(cmd, "`")), " ") // commands may wrap
			if !strings.Contains(cmd, "libx264") {
				continue
			}
			found++
			if !strings.Contains(cmd, "-bf 0") && !strings.Contains(cmd, "-tune zerolatency") {
				t.Errorf("%s: %q makes B-frames (libx264's default), which browsers cannot play: add -bf 0", doc, cmd)
			}
		}
	}
	if found < 3 {
		t.Fatalf("%d ffmpeg commands with libx264 in the README and deploy/, want at least 3 (README, deploy notes, loopback sample)", found)
	}
}
