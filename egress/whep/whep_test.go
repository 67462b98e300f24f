package whep

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"

	"github.com/pion/rtcp"
	"github.com/pion/rtp"
	"github.com/pion/webrtc/v4"

	"github.com/stemflow/stemflow/internal/rtc"
	"github.com/stemflow/stemflow/internal/rtc/rtctest"
	"github.com/stemflow/stemflow/relay"
)

type env struct {
	hub *relay.Hub
	srv *Server
	url string
	eng *rtc.Engine
	ctx context.Context
}

func setup(t testing.TB) *env {
	t.Helper()
	return setupLogger(t, rtctest.Quiet)
}

// setupLogger is setup with the server logging to log.
func setupLogger(t testing.TB, log *slog.Logger) *env {
	t.Helper()
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 90*time.Second)
	e := &env{hub: rtctest.NewHub(t), eng: rtctest.NewEngine(t)}
	e.srv = New(Config{Hub: e.hub, RTC: e.eng, Logger: log})
	t.Cleanup(func() { e.srv.Close() })
	e.url = rtctest.Serve(t, Prefix, e.srv)
	e.ctx = rtctest.Context(t, 60*time.Second)
	return e
}

// source is a synthetic publisher: High-profile H264 (as ffmpeg sends it)
// and Opus, written into the hub at 30 fps by its own goroutine.
type source struct {
	pub     *relay.Publisher
	keyReqs atomic.Int64
	force   atomic.Bool
	frames  atomic.Int64
	lastKey atomic.Int64 // frames sent before the last keyframe
	maxSend atomic.Int64 // longest WriteRTP call, ns
	stop    chan struct{}
	wg      sync.WaitGroup
}

var highProfile = relay.Description{Tracks: []relay.Track{
	{Kind: relay.KindVideo, MimeType: relay.MimeH264, ClockRate: 90000, PayloadType: 96,
		Fmtp: "packetization-mode=1;profile-level-id=640c1f"},
	{Kind: relay.KindAudio, MimeType: relay.MimeOpus, ClockRate: 48000, Channels: 2, PayloadType: 111},
}}

type sourceOptions struct {
	GOP            int           // frames, default 30
	FPS            int           // default 30
	SkipFirstFrame bool          // start with P frames: no GOP cached until a keyframe request
	Period         time.Duration // overrides FPS pacing
	FrameBytes     int           // bytes of a P frame, default 8300 (2 Mbit/s at 30 fps)
	// IgnoreKeyframeRequests makes the source keep its GOP, as an RTSP
	// publisher does (RTSP cannot ask for a keyframe).
	IgnoreKeyframeRequests bool
}

func startSource(t testing.TB, hub *relay.Hub, name string, o sourceOptions) *source {
	t.Helper()
	s := &source{stop: make(chan struct{})}
	var err error
	s.pub, err = hub.Publish(name, highProfile, relay.PublishOptions{OnKeyframeRequest: func() {
		s.keyReqs.Add(1)
		s.force.Store(!o.IgnoreKeyframeRequests)
	}})
	if err != nil {
		t.Fatal(err)
	}
	if o.GOP == 0 {
		o.GOP = 30
	}
	if o.FPS == 0 {
		o.FPS = 30
	}
	if o.Period == 0 {
		o.Period = time.Second / time.Duration(o.FPS)
	}
	src := rtctest.H264Source{GOP: o.GOP, FPS: o.FPS, FrameBytes: o.FrameBytes}
	if o.SkipFirstFrame {
		src.NextFrame()
	}
	var opus rtctest.OpusSource
	s.wg.Go(func() {
		tick := time.NewTicker(o.Period)
		defer tick.Stop()
		audioDue := time.Now()
		for {
			if s.force.Swap(false) {
				src.ForceKeyframe()
			}
			pkts, key := src.NextFrame()
			if key {
				s.lastKey.Store(s.frames.Load())
			}
			for _, b := range pkts {
				start := time.Now()
				if err := s.pub.WriteRTP(0, b); err != nil {
					panic(err)
				}
				if d := int64(time.Since(start)); d > s.maxSend.Load() {
					s.maxSend.Store(d)
				}
			}
			for ; !audioDue.After(time.Now()); audioDue = audioDue.Add(20 * time.Millisecond) {
				_ = s.pub.WriteRTP(1, opus.Next())
			}
			s.frames.Add(1)
			select {
			case <-s.stop:
				return
			case <-tick.C:
			}
		}
	})
	t.Cleanup(s.close)
	return s
}

func (s *source) close() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	s.wg.Wait()
	s.pub.Close()
}

func (e *env) view(t testing.TB, name string, opts rtctest.ViewOptions) *rtctest.Viewer {
	t.Helper()
	v, err := rtctest.View(e.ctx, rtctest.NewEngine(t), e.url+"/whep/"+name, opts)
	if err != nil {
		t.Fatalf("view %s: %v", name, err)
	}
	t.Cleanup(v.Close)
	return v
}

// checkVideo asserts the keyframe comes first and sequence numbers have no
// gap (a retransmitted duplicate is allowed).
func checkVideo(t *testing.T, who string, pkts []rtctest.Packet) {
	t.Helper()
	if len(pkts) == 0 {
		t.Fatalf("%s: no video", who)
	}
	if !pkts[0].Keyframe {
		t.Errorf("%s: first video packet (seq %d) is not a keyframe", who, pkts[0].Seq)
	}
	for i := 1; i < len(pkts); i++ {
		if d := pkts[i].Seq - pkts[i-1].Seq; d != 1 && d != 0 {
			t.Errorf("%s: sequence gap %d -> %d at packet %d", who, pkts[i-1].Seq, pkts[i].Seq, i)
			return
		}
	}
}

func TestViewH264AndOpus(t *testing.T) {
	e := setup(t)
	startSource(t, e.hub, "cam", sourceOptions{})
	time.Sleep(100 * time.Millisecond) // a GOP in progress: the viewer joins mid-GOP
	v := e.view(t, "cam", rtctest.ViewOptions{})
	testutil.WaitFor(t, "a second of media", func() bool { return len(v.Video()) > 250 && len(v.Audio()) > 40 })

	video, audio := v.Video(), v.Audio()
	checkVideo(t, "viewer", video)
	codec, ssrc := v.VideoCodec()
	// The High-profile stream is sent as the constrained-baseline payload
	// type the viewer offered.
	if codec.PayloadType != 109 || !strings.Contains(codec.SDPFmtpLine, "42e01f") || !strings.Contains(codec.SDPFmtpLine, "packetization-mode=1") {
		t.Errorf("video codec = %+v, want PT 109 (42e01f, packetization-mode=1)", codec)
	}
	for _, p := range video {
		if p.PT != 109 || p.SSRC != ssrc || p.SSRC == 0x11223344 {
			t.Fatalf("video packet PT %d SSRC %x: want PT 109 and the viewer's own SSRC %x", p.PT, p.SSRC, ssrc)
		}
	}
	for _, p := range audio {
		if p.PT != 111 || p.SSRC == 0x55667788 {
			t.Fatalf("audio packet PT %d SSRC %x: want PT 111 and a rewritten SSRC", p.PT, p.SSRC)
		}
	}
	// The answer holds only the stream's codecs.
	answer := v.PC.RemoteDescription().SDP
	for line := range strings.SplitSeq(answer, "\n") {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "m=video") && !strings.HasSuffix(line, " 109") {
			t.Errorf("answer's video section %q: want only payload type 109", line)
		}
		if strings.HasPrefix(line, "m=audio") && !strings.HasSuffix(line, " 111") {
			t.Errorf("answer's audio section %q: want only payload type 111", line)
		}
		if strings.Contains(line, "VP8") {
			t.Errorf("answer offers VP8 for an H264 stream: %q", line)
		}
	}
}

func TestViewErrors(t *testing.T) {
	e := setup(t)
	startSource(t, e.hub, "live", sourceOptions{})
	healthy := e.view(t, "live", rtctest.ViewOptions{})

	vp8Only := func(m *webrtc.MediaEngine) error {
		return m.RegisterCodec(webrtc.RTPCodecParameters{PayloadType: 96, RTPCodecCapability: webrtc.RTPCodecCapability{
			MimeType: webrtc.MimeTypeVP8, ClockRate: 90000}}, webrtc.RTPCodecTypeVideo)
	}
	_, err := rtctest.View(e.ctx, rtctest.NewEngine(t), e.url+"/whep/live", rtctest.ViewOptions{Register: vp8Only, NoAudio: true})
	if se, ok := err.(*rtctest.StatusError); !ok || se.Status != 400 || !strings.Contains(se.Body, "does not offer H264 with packetization-mode=1") {
		t.Errorf("VP8-only viewer of an H264 stream: %v, want 400 naming H264", err)
	}
	_, err = rtctest.View(e.ctx, rtctest.NewEngine(t), e.url+"/whep/nope", rtctest.ViewOptions{})
	if se, ok := err.(*rtctest.StatusError); !ok || se.Status != 404 || !strings.Contains(se.Body, `stream "nope" is not live`) {
		t.Errorf("unknown stream: %v, want 404 is not live", err)
	}

	for _, tc := range []struct {
		name, url, ct, body string
		status              int
		want                string
	}{
		{"content type", e.url + "/whep/live", "application/json", "{}", 415, "application/sdp"},
		{"too large", e.url + "/whep/live", "application/sdp", strings.Repeat("v", 70<<10), 413, "larger than 64 KiB"},
		{"malformed", e.url + "/whep/live", "application/sdp", "garbage", 400, "not valid SDP"},
		{"bad name", e.url + "/whep/a$b", "application/sdp", "v=0", 400, "stream name"},
	} {
		req, _ := http.NewRequest(http.MethodPost, tc.url, strings.NewReader(tc.body))
		req.Header.Set("Content-Type", tc.ct)
		status, body, h := rtctest.Do(t, req)
		if status != tc.status || !strings.Contains(body, tc.want) {
			t.Errorf("%s: got %d %q, want %d containing %q", tc.name, status, body, tc.status, tc.want)
		}
		if h.Get("Access-Control-Allow-Origin") != "*" {
			t.Errorf("%s: no CORS header", tc.name)
		}
	}
	req, _ := http.NewRequest(http.MethodDelete, e.url+"/whep/live/nosuch", nil)
	if status, body, _ := rtctest.Do(t, req); status != 404 || !strings.Contains(body, "no session") {
		t.Errorf("DELETE unknown: %d %q", status, body)
	}
	req, _ = http.NewRequest(http.MethodOptions, e.url+"/whep/live", nil)
	if status, _, h := rtctest.Do(t, req); status != 204 || !strings.Contains(h.Get("Access-Control-Expose-Headers"), "Location") {
		t.Errorf("OPTIONS: %d %v", status, h)
	}

	n := len(healthy.Video())
	testutil.WaitFor(t, "the healthy viewer to keep receiving", func() bool { return len(healthy.Video()) > n+30 })
	if st := e.srv.Stats(); st.Viewers != 1 {
		t.Errorf("stats = %+v, want 1 viewer", st)
	}
}

// blockingWriter stands for a viewer whose network writes hang.
type blockingWriter struct{ release chan struct{} }

func (w *blockingWriter) WriteRTP(*rtp.Header, []byte) (int, error) {
	<-w.release
	return 0, io.ErrClosedPipe
}
func (w *blockingWriter) Write([]byte) (int, error) { <-w.release; return 0, io.ErrClosedPipe }

func (e *env) serverViewer(t *testing.T, v *rtctest.Viewer) *viewer {
	t.Helper()
	id := v.Session[strings.LastIndex(v.Session, "/")+1:]
	for _, sv := range e.srv.ep.Sessions() {
		if sv.ID() == id {
			return sv
		}
	}
	t.Fatalf("no server viewer %s", id)
	return nil
}

func TestSlowViewerDoesNotHoldBackOthers(t *testing.T) {
	e := setup(t)
	e.srv.cfg.QueueSize = 64
	src := startSource(t, e.hub, "s", sourceOptions{})
	healthy := e.view(t, "s", rtctest.ViewOptions{})
	stuck := e.view(t, "s", rtctest.ViewOptions{})
	testutil.WaitFor(t, "both viewers to receive", func() bool { return len(healthy.Video()) > 10 && len(stuck.Video()) > 10 })

	// The stuck viewer's writes now hang, as a blocked socket would.
	sv := e.serverViewer(t, stuck)
	bw := &blockingWriter{release: make(chan struct{})}
	b := *sv.tracks[0].bound.Load()
	b.w = bw
	sv.tracks[0].bound.Store(&b)
	stuck.Stall.Store(true) // and it stops reading too

	start := len(healthy.Video())
	testutil.WaitFor(t, "the healthy viewer to get 2 s of video", func() bool { return len(healthy.Video()) > start+450 })
	close(bw.release)

	checkVideo(t, "healthy viewer", healthy.Video())
	st := e.srv.Stats()
	if st.PacketsDropped == 0 {
		t.Errorf("stats = %+v: the stuck viewer's queue should have dropped packets", st)
	}
	// A publisher held back by the stuck viewer would wait the whole 2 s
	// until the writer is released; a busy machine alone can make one call
	// take tens of milliseconds, so the bound sits between the two.
	if d := time.Duration(src.maxSend.Load()); d > time.Second {
		t.Errorf("the publisher's WriteRTP took up to %v: a stuck viewer held it back", d)
	}
}

func TestDeleteViewer(t *testing.T) {
	e := setup(t)
	startSource(t, e.hub, "d", sourceOptions{})
	v := e.view(t, "d", rtctest.ViewOptions{})
	testutil.WaitFor(t, "video", func() bool { return len(v.Video()) > 0 })
	status, err := v.Delete(e.ctx)
	if err != nil || status != 200 {
		t.Fatalf("DELETE: %d %v", status, err)
	}
	if st := e.srv.Stats(); st.Viewers != 0 {
		t.Errorf("after DELETE: %+v", st)
	}
	select {
	case <-v.Closed():
	case <-time.After(testutil.Scale(10 * time.Second)):
		t.Error("viewer's connection still up after DELETE")
	}
	if status, _ := v.Delete(e.ctx); status != 404 {
		t.Errorf("second DELETE: %d, want 404", status)
	}
	e.srv.mu.Lock()
	caches := len(e.srv.caches)
	e.srv.mu.Unlock()
	if caches != 0 {
		t.Errorf("%d retransmission caches left after the last viewer", caches)
	}
}

func TestStreamEndClosesViewer(t *testing.T) {
	e := setup(t)
	src := startSource(t, e.hub, "end", sourceOptions{})
	v := e.view(t, "end", rtctest.ViewOptions{})
	testutil.WaitFor(t, "video", func() bool { return len(v.Video()) > 0 })
	src.close()
	select {
	case <-v.Closed():
	case <-time.After(testutil.Scale(10 * time.Second)):
		t.Fatal("viewer's connection still up after the stream ended")
	}
	testutil.WaitFor(t, "the server to drop the viewer", func() bool { return e.srv.Stats().Viewers == 0 })
}

func TestPLIFromViewerReachesPublisher(t *testing.T) {
	e := setup(t)
	src := startSource(t, e.hub, "pli", sourceOptions{GOP: 1000})
	v := e.view(t, "pli", rtctest.ViewOptions{})
	testutil.WaitFor(t, "video", func() bool { return len(v.Video()) > 0 })
	_, ssrc := v.VideoCodec()
	for _, req := range []rtcp.Packet{
		&rtcp.PictureLossIndication{MediaSSRC: ssrc},
		// RFC 5104: a FIR names the stream in its entries, with 0 as the
		// header's media SSRC (as browsers send it).
		&rtcp.FullIntraRequest{FIR: []rtcp.FIREntry{{SSRC: ssrc, SequenceNumber: 1}}},
	} {
		time.Sleep(600 * time.Millisecond) // past the hub's keyframe request coalescing
		before, counted := src.keyReqs.Load(), e.srv.Stats().KeyframeRequests
		if err := v.PC.WriteRTCP([]rtcp.Packet{req}); err != nil {
			t.Fatal(err)
		}
		testutil.WaitFor(t, fmt.Sprintf("the publisher's OnKeyframeRequest after a %T", req),
			func() bool { return src.keyReqs.Load() > before })
		if st := e.srv.Stats(); st.KeyframeRequests != counted+1 {
			t.Errorf("after a %T: stats = %+v, want %d keyframe requests", req, st, counted+1)
		}
	}
}

func TestFirstFrameWithoutReplayWaitsForKeyframe(t *testing.T) {
	e := setup(t)
	// A long GOP whose keyframe the hub never saw: nothing to replay.
	src := startSource(t, e.hub, "late", sourceOptions{GOP: 100000, SkipFirstFrame: true})
	time.Sleep(200 * time.Millisecond)
	v := e.view(t, "late", rtctest.ViewOptions{})
	select {
	case <-v.FirstKeyframe():
	case <-time.After(testutil.Scale(5 * time.Second)):
		t.Fatal("no keyframe: the server did not ask the publisher for one")
	}
	if src.keyReqs.Load() == 0 {
		t.Error("the publisher got no keyframe request")
	}
	testutil.WaitFor(t, "more video", func() bool { return len(v.Video()) > 20 })
	checkVideo(t, "viewer", v.Video())
}

// lossyWriter loses every 25th packet the first time it is sent, as a
// lossy network would.
type lossyWriter struct {
	w       webrtc.TrackLocalWriter
	mu      sync.Mutex
	n       int
	dropped map[uint16]bool
}

func (l *lossyWriter) WriteRTP(h *rtp.Header, payload []byte) (int, error) {
	l.mu.Lock()
	l.n++
	drop := l.n%25 == 0 && !l.dropped[h.SequenceNumber]
	if drop {
		l.dropped[h.SequenceNumber] = true
	}
	l.mu.Unlock()
	if drop {
		return len(payload) + 12, nil
	}
	return l.w.WriteRTP(h, payload)
}

func (l *lossyWriter) Write(b []byte) (int, error) { return l.w.Write(b) }

func TestNACKAnsweredFromSharedCache(t *testing.T) {
	e := setup(t)
	startSource(t, e.hub, "nack", sourceOptions{})
	v1 := e.view(t, "nack", rtctest.ViewOptions{})
	v2 := e.view(t, "nack", rtctest.ViewOptions{})
	testutil.WaitFor(t, "video", func() bool { return len(v1.Video()) > 50 && len(v2.Video()) > 0 })
	e.srv.mu.Lock()
	caches := len(e.srv.caches)
	e.srv.mu.Unlock()
	if caches != 1 {
		t.Errorf("%d retransmission caches for one stream, want 1 shared", caches)
	}

	sv := e.serverViewer(t, v1)
	lw := &lossyWriter{dropped: map[uint16]bool{}}
	b := *sv.tracks[0].bound.Load()
	lw.w = b.w
	b.w = lw
	sv.tracks[0].bound.Store(&b)
	from := len(v1.Video())
	testutil.WaitFor(t, "1.5 s of lossy video", func() bool { return len(v1.Video()) > from+350 })
	time.Sleep(300 * time.Millisecond) // the last NACKs

	pkts := v1.Video()[from:]
	got := map[uint16]bool{}
	for _, p := range pkts {
		got[p.Seq] = true
	}
	lw.mu.Lock()
	lost := len(lw.dropped)
	var missing []uint16
	for seq := range lw.dropped {
		if !got[seq] {
			missing = append(missing, seq)
		}
	}
	lw.mu.Unlock()
	if lost < 10 {
		t.Fatalf("only %d packets lost: the test did not exercise NACK", lost)
	}
	if len(missing) > 2 { // the newest losses may still be in flight
		t.Errorf("%d of %d lost packets never recovered: %v", len(missing), lost, missing)
	}
	if st := e.srv.Stats(); st.Retransmissions < uint64(lost-2) {
		t.Errorf("stats = %+v, want about %d retransmissions", st, lost)
	}
}

func TestCloseEndsViewers(t *testing.T) {
	e := setup(t)
	startSource(t, e.hub, "c", sourceOptions{})
	v := e.view(t, "c", rtctest.ViewOptions{})
	testutil.WaitFor(t, "video", func() bool { return len(v.Video()) > 0 })
	if err := e.srv.Close(); err != nil {
		t.Fatal(err)
	}
	if st := e.srv.Stats(); st.Viewers != 0 {
		t.Errorf("after Close: %+v", st)
	}
	select {
	case <-v.Closed():
	case <-time.After(testutil.Scale(10 * time.Second)):
		t.Error("viewer still connected after Close")
	}
}
