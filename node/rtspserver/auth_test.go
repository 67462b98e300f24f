package rtspserver

import (
	"encoding/base64"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bluenviron/gortsplib/v4"
	"github.com/bluenviron/gortsplib/v4/pkg/base"
	"github.com/bluenviron/gortsplib/v4/pkg/conn"
	"github.com/bluenviron/gortsplib/v4/pkg/description"
	"github.com/bluenviron/gortsplib/v4/pkg/format"
	"github.com/bluenviron/gortsplib/v4/pkg/format/rtph264"
	"github.com/bluenviron/gortsplib/v4/pkg/liberrors"

	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/relay"
)

// TestPublishToken publishes with ffmpeg to a server that has a publish
// token: without it and with a wrong one ffmpeg is refused with 401 and
// nothing is published; with it (the password of the URL, answered with
// Digest) the stream publishes and plays without a token, and a stream
// flowing meanwhile is undisturbed.
func TestPublishToken(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 120*time.Second)
	const token = "tok-9f3ae1"
	logs := &logBuffer{}
	hub := newHub(t, "a")
	srv := startServerConfig(t, Config{Hub: hub, Logger: logs.Logger(), PublishToken: token})
	open := "rtsp://" + srv.Addr() + "/"
	withToken := "rtsp://obs:" + token + "@" + srv.Addr() + "/"

	// Long enough for the whole test on a busy machine; killed at its end.
	startFFmpeg(t, publishArgs(withToken+"good", "tcp", 600)...)
	sub, q := subscribe(t, hub, "good", 15*time.Second)

	cases := []struct {
		name, url string
		want      []string // in ffmpeg's error
		log       []string // in the server's log
	}{
		{"none", open + "none",
			[]string{"401", "publish token", "rtsp://user:TOKEN@"},
			[]string{"RTSP publisher refused", "stream=none", "remote=127.0.0.1:", "no credentials"}},
		{"wrong", "rtsp://obs:not-it@" + srv.Addr() + "/wrong",
			[]string{"401", "wrong publish token"},
			[]string{"RTSP publisher refused", "stream=wrong", "remote=127.0.0.1:", "wrong publish token", "user=obs"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := startFFmpeg(t, publishArgs(c.url, "tcp", 5)...)
			if err := f.wait(t, 30*time.Second); err == nil {
				t.Fatal("ffmpeg published without the right token")

			}
			for _, w := range c.want {
				if !strings.Contains(f.Stderr(), w) {
					t.Errorf("ffmpeg's error lacks %q:\n%s", w, tail(f.Stderr(), 1500))
				}
			}
			if live(hub, c.name) {
				t.Errorf("stream %q was published", c.name)
			}
			testutil.WaitFor(t, "the refusal's log line", func() bool {
				for l := range strings.SplitSeq(logs.String(), "\n") {
					if containsAll(l, c.log) {
						return true
					}
				}
				return false
			})
		})
	}

	t.Run("basic", func(t *testing.T) {
		for _, c := range []struct {
			user, pass string
			want       base.StatusCode
		}{
			{"anyone", token, base.StatusOK},
			{"", token, base.StatusOK},
			{"anyone", "nope", base.StatusUnauthorized},
		} {
			res := rawAnnounce(t, hub, srv.Addr(), "basic", "Basic "+base64.StdEncoding.EncodeToString([]byte(c.user+":"+c.pass)))
			if res.StatusCode != c.want {
				t.Errorf("Basic %q:%q: %d %s, want %d", c.user, c.pass, res.StatusCode, res.StatusMessage, c.want)
			}
		}
	})

	t.Run("read without token", func(t *testing.T) {
		f := startFFmpeg(t, "-loglevel", "error", "-rtsp_transport", "tcp", "-i", open+"good",
			"-map", "0:v", "-frames:v", "30", "-f", "framemd5", "-")
		if err := f.wait(t, 30*time.Second); err != nil {
			t.Fatalf("ffmpeg reading: %v", err)
		}
		if n := strings.Count(f.stdout.String(), "\n0,"); n < 29 {
			t.Errorf("ffmpeg decoded %d frames, want 30", n)
		}
	})

	q.Drain()
	if r := collect(t, sub, q, 60); r.seqGaps != 0 {
		t.Errorf("the published stream was disturbed: %v", r)
	}
	for _, secret := range []string{token, "not-it", "nope"} {
		if strings.Contains(logs.String(), secret) {
			t.Errorf("the log shows the password %q", secret)
		}
	}
}

func containsAll(s string, subs []string) bool {
	for _, w := range subs {
		if !strings.Contains(s, w) {
			return false
		}
	}
	return true
}

// rawAnnounce sends one ANNOUNCE of an H264 stream (parameters in the SDP,
// so that it publishes at once) with the given Authorization header on a new
// connection, and returns the response. A 200 is checked to have published
// the stream, and the connection is closed.
func rawAnnounce(t *testing.T, hub *relay.Hub, addr, name, authorization string) *base.Response {
	t.Helper()
	desc := &description.Session{Medias: []*description.Media{{Type: description.MediaTypeVideo,
		Formats: []format.Format{&format.H264{PayloadTyp: 96, PacketizationMode: 1,
			SPS: x264SPS, PPS: x264PPS}}}}}
	sdp, err := desc.Marshal(false)
	if err != nil {
		t.Fatal(err)
	}
	u, err := base.ParseURL("rtsp://" + addr + "/" + name)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if err := nc.SetDeadline(time.Now().Add(testutil.Scale(10 * time.Second))); err != nil {
		t.Fatal(err)
	}
	c := conn.NewConn(nc)
	err = c.WriteRequest(&base.Request{Method: base.Announce, URL: u, Header: base.Header{
		"CSeq":           base.HeaderValue{"1"},
		"Content-Type":   base.HeaderValue{"application/sdp"},
		"Content-Length": base.HeaderValue{strconv.Itoa(len(sdp))},
		"Authorization":  base.HeaderValue{authorization},
	}, Body: sdp})
	if err != nil {
		t.Fatal(err)
	}
	res, err := c.ReadResponse()
	if err != nil {
		t.Fatalf("reading the ANNOUNCE response: %v", err)
	}
	if res.StatusCode == base.StatusOK {
		if !live(hub, name) {
			t.Errorf("ANNOUNCE answered 200 but stream %q is not live", name)
		}
		nc.Close()
		testutil.WaitFor(t, "the stream to end with its connection", func() bool { return !live(hub, name) })
	} else if live(hub, name) {
		t.Errorf("ANNOUNCE answered %d but stream %q is live", res.StatusCode, name)
	}
	return res
}

func live(hub *relay.Hub, name string) bool {
	for _, info := range hub.Streams() {
		if info.Name == name {
			return true
		}
	}
	return false
}

// libx264's parameter sets for 640x360 High (as ffmpeg announces them).
var (
	x264SPS = []byte{0x67, 0x64, 0x00, 0x1e, 0xac, 0xd9, 0x40, 0xa0, 0x2f, 0xf9, 0x70, 0x11, 0x00, 0x00, 0x03, 0x00, 0x01, 0x00, 0x00, 0x03, 0x00, 0x3c, 0x0f, 0x16, 0x2d, 0x96}
	x264PPS = []byte{0x68, 0xef, 0x8f, 0xcb}
)

// camera is an RTSP camera that asks its readers for a user name and
// password (Basic or Digest, as gortsplib offers) and sends 30 fps H264.
type camera struct {
	user, pass string
	srv        *gortsplib.Server
	stream     *gortsplib.ServerStream
	refused    atomic.Int64
	wg         sync.WaitGroup
	stop       chan struct{}
}

func startCamera(t *testing.T, user, pass string) *camera {
	t.Helper()
	c := &camera{user: user, pass: pass, stop: make(chan struct{})}
	c.srv = &gortsplib.Server{Handler: c, RTSPAddress: "127.0.0.1:" + strconv.Itoa(testutil.FreePort(t))}
	if err := c.srv.Start(); err != nil {
		t.Fatal(err)
	}
	media := &description.Media{Type: description.MediaTypeVideo,
		Formats: []format.Format{&format.H264{PayloadTyp: 96, PacketizationMode: 1, SPS: x264SPS, PPS: x264PPS}}}
	c.stream = &gortsplib.ServerStream{Server: c.srv, Desc: &description.Session{Medias: []*description.Media{media}}}
	if err := c.stream.Initialize(); err != nil {
		t.Fatal(err)
	}
	enc := &rtph264.Encoder{PayloadType: 96, PayloadMaxSize: 1400, PacketizationMode: 1}
	if err := enc.Init(); err != nil {
		t.Fatal(err)
	}
	c.wg.Go(func() {
		tick := time.NewTicker(33 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			au := [][]byte{{0x41, byte(i), 2, 3, 4, 5}}
			if i%30 == 0 {
				au = [][]byte{x264SPS, x264PPS, append([]byte{0x65}, make([]byte, 3000)...)}
			}
			pkts, err := enc.Encode(au)
			if err != nil {
				panic(err)
			}
			for _, p := range pkts {
				p.Timestamp = uint32(i * 3000)
				_ = c.stream.WritePacketRTP(media, p)
			}
			select {
			case <-c.stop:
				return
			case <-tick.C:
			}
		}
	})
	t.Cleanup(func() {
		close(c.stop)
		c.wg.Wait()
		c.stream.Close()
		c.srv.Close()
	})
	return c
}

func (c *camera) authorized(sc *gortsplib.ServerConn, req *base.Request) bool {
	if sc.VerifyCredentials(req, c.user, c.pass) {
		return true
	}
	c.refused.Add(1)
	return false
}

func (c *camera) OnDescribe(ctx *gortsplib.ServerHandlerOnDescribeCtx) (*base.Response, *gortsplib.ServerStream, error) {
	if !c.authorized(ctx.Conn, ctx.Request) {
		return &base.Response{StatusCode: base.StatusUnauthorized}, nil, liberrors.ErrServerAuth{}
	}
	return &base.Response{StatusCode: base.StatusOK}, c.stream, nil
}

func (c *camera) OnSetup(ctx *gortsplib.ServerHandlerOnSetupCtx) (*base.Response, *gortsplib.ServerStream, error) {
	if !c.authorized(ctx.Conn, ctx.Request) {
		return &base.Response{StatusCode: base.StatusUnauthorized}, nil, liberrors.ErrServerAuth{}
	}
	return &base.Response{StatusCode: base.StatusOK}, c.stream, nil
}

func (c *camera) OnPlay(*gortsplib.ServerHandlerOnPlayCtx) (*base.Response, error) {
	return &base.Response{StatusCode: base.StatusOK}, nil
}

// TestPullSourceCredentials pulls from a camera that wants a user name and
// password in the source URL: with the right ones the stream publishes and
// flows, with wrong ones it never publishes; the password never shows in the
// log.
func TestPullSourceCredentials(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 90*time.Second)
	const pass = "cam-p4ss"
	cam := startCamera(t, "admin", pass)
	logs := &logBuffer{}
	hub := newHub(t, "a")
	startServerConfig(t, Config{Hub: hub, Logger: logs.Logger(), DisableUDP: true, Sources: map[string]string{
		"pulled": "rtsp://admin:" + pass + "@" + cam.srv.RTSPAddress + "/cam",
		"denied": "rtsp://admin:wr0ng-p4ss@" + cam.srv.RTSPAddress + "/cam",
	}})
	sub, q := subscribe(t, hub, "pulled", 30*time.Second)
	if d := sub.Description(); len(d.Tracks) != 1 || d.Tracks[0].MimeType != relay.MimeH264 {
		t.Fatalf("pulled stream: %+v", d.Tracks)
	}
	frames := map[uint32]bool{}
	timeout := time.After(testutil.Scale(3 * time.Second))
	for len(frames) < 30 {
		select {
		case b := <-q.C():
			data := b.Data()
			frames[uint32(data[4])<<24|uint32(data[5])<<16|uint32(data[6])<<8|uint32(data[7])] = true
			b.Release()
		case <-timeout:
			t.Fatalf("%d frames of the pulled stream in 3 s, want 30", len(frames))
		}
	}
	testutil.WaitFor(t, "the camera to refuse the wrong password", func() bool { return cam.refused.Load() > 0 })
	testutil.WaitFor(t, "the refused pull's log line", func() bool {
		return containsAll(logs.String(), []string{"camera stream unavailable", "source=denied", "401", "refused the user name and password"})
	})
	if live(hub, "denied") {
		t.Error("the source with the wrong password published")
	}
	for _, secret := range []string{pass, "wr0ng-p4ss"} {
		if strings.Contains(logs.String(), secret) {
			t.Errorf("the log shows the password %q:\n%s", secret, logs.String())
		}
	}
	if !strings.Contains(logs.String(), "url=rtsp://admin:xxxxx@") {
		t.Errorf("the log does not name the camera URL (redacted):\n%s", logs.String())
	}
}
