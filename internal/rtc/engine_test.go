package rtc_test

import (
	"context"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"

	"github.com/pion/interceptor"
	"github.com/pion/webrtc/v4"

	"github.com/stemflow/stemflow/internal/rtc"
	"github.com/stemflow/stemflow/internal/rtc/rtctest"
	"github.com/stemflow/stemflow/relay"
)

// candidateAddrs returns the connection address of every a=candidate line.
func candidateAddrs(t *testing.T, sdp string) []string {
	t.Helper()
	var out []string
	for line := range strings.SplitSeq(sdp, "\n") {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "a=candidate:") {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 8 {
			t.Fatalf("short candidate line %q", line)
		}
		out = append(out, f[4]+" "+f[7]+" "+f[2]) // address, type, transport
	}
	return out
}

// answerWith makes a pion offerer and answers it with an engine's API.
func answerWith(t *testing.T, e *rtc.Engine) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(10*time.Second))
	defer cancel()
	client := rtctest.NewEngine(t)
	cm := &webrtc.MediaEngine{}
	if err := rtctest.ChromiumCodecs(cm); err != nil {
		t.Fatal(err)
	}
	offerer, err := client.NewAPI(cm, &interceptor.Registry{}).NewPeerConnection(webrtc.Configuration{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = offerer.Close() })
	if _, err := offerer.AddTransceiverFromKind(webrtc.RTPCodecTypeVideo, webrtc.RTPTransceiverInit{Direction: webrtc.RTPTransceiverDirectionRecvonly}); err != nil {
		t.Fatal(err)
	}
	offer, err := offerer.CreateOffer(nil)
	if err != nil {
		t.Fatal(err)
	}
	gathered := webrtc.GatheringCompletePromise(offerer)
	if err := offerer.SetLocalDescription(offer); err != nil {
		t.Fatal(err)
	}
	<-gathered

	m := &webrtc.MediaEngine{}
	if err := m.RegisterDefaultCodecs(); err != nil {
		t.Fatal(err)
	}
	answerer, err := e.NewAPI(m, &interceptor.Registry{}).NewPeerConnection(webrtc.Configuration{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = answerer.Close() })
	answer, err := rtc.Answer(ctx, answerer, offerer.LocalDescription().SDP)
	if err != nil {
		t.Fatal(err)
	}
	return answer
}

func TestAnswerCandidatesOnlyConfiguredIP(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 30*time.Second)
	for _, port := range []int{0, freeUDPPort(t)} {
		e, err := rtc.New(rtc.Config{IPs: []string{"127.0.0.1"}, UDPPort: port})
		if err != nil {
			t.Fatal(err)
		}
		answer := answerWith(t, e)
		addrs := candidateAddrs(t, answer)
		if len(addrs) == 0 {
			t.Fatalf("UDPPort %d: answer has no candidates:\n%s", port, answer)
		}
		for _, a := range addrs {
			if !strings.HasPrefix(a, "127.0.0.1 host udp") {
				t.Errorf("UDPPort %d: candidate %q: want only host UDP candidates on 127.0.0.1", port, a)
			}
		}
		if port > 0 && !strings.Contains(answer, " 127.0.0.1 "+strconv.Itoa(port)+" typ host") {
			t.Errorf("UDPPort %d: candidates do not use the shared port: %v", port, addrs)
		}
		t.Cleanup(func() { _ = e.Close() })
	}
}

func TestNAT1To1ReplacesHostAddress(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 30*time.Second)
	e, err := rtc.New(rtc.Config{IPs: []string{"127.0.0.1"}, NAT1To1IPs: []string{"203.0.113.7"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close() })
	for _, a := range candidateAddrs(t, answerWith(t, e)) {
		if !strings.HasPrefix(a, "203.0.113.7 host") {
			t.Errorf("candidate %q: want the NAT 1:1 address only", a)
		}
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	for _, tc := range []struct {
		cfg  rtc.Config
		want string
	}{
		{rtc.Config{}, "no IPs configured"},
		{rtc.Config{IPs: []string{"0.0.0.0"}}, "not a host IP"},
		{rtc.Config{IPs: []string{"nonsense"}}, "not a host IP"},
		{rtc.Config{IPs: []string{"192.0.2.55"}}, "not assigned to any network interface"},
		{rtc.Config{IPs: []string{"127.0.0.1"}, UDPPort: 70000}, "out of range"},
		{rtc.Config{IPs: []string{"127.0.0.1"}, NAT1To1IPs: []string{"1.2.3.4", "5.6.7.8"}}, "NAT 1:1"},
	} {
		_, err := rtc.New(tc.cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) = %v, want an error containing %q", tc.cfg, err, tc.want)
		}
	}
}

func TestParseOffer(t *testing.T) {
	const offer = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n" +
		"m=video 9 UDP/TLS/RTP/SAVPF 96 102 103\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendonly\r\n" +
		"a=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 nack\r\na=rtcp-fb:96 nack pli\r\n" +
		"a=rtpmap:102 h264/90000\r\na=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=640c1f\r\n" +
		"a=rtpmap:103 H264/90000\r\na=fmtp:103 packetization-mode=0;profile-level-id=42e01f\r\n" +
		"m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=rtpmap:111 opus/48000/2\r\n"
	o, err := rtc.ParseOffer(offer)
	if err != nil {
		t.Fatal(err)
	}
	if len(o.Media) != 2 || o.Media[0].Kind != relay.KindVideo || o.Media[1].Kind != relay.KindAudio {
		t.Fatalf("media = %+v", o.Media)
	}
	v := o.Media[0]
	if v.MID != "0" || v.Direction != "sendonly" || len(v.Codecs) != 3 {
		t.Fatalf("video = %+v", v)
	}
	if c := v.Codecs[0]; c.MimeType != relay.MimeVP8 || !c.Supported() || len(c.Feedback) != 2 {
		t.Errorf("VP8 = %+v", c)
	}
	if c := v.Codecs[1]; c.MimeType != relay.MimeH264 || !c.Supported() || c.ProfileLevelID() != "640c1f" {
		t.Errorf("H264 pm=1 = %+v", c)
	}
	if c := v.Codecs[2]; c.Supported() {
		t.Errorf("H264 packetization-mode=0 must not be supported: %+v", c)
	}
	a := o.Media[1]
	if c := a.Codecs[0]; c.MimeType != relay.MimeOpus || c.Channels != 2 || !c.Supported() || a.Direction != "sendrecv" {
		t.Errorf("opus = %+v, direction %s", c, a.Direction)
	}
	tr := v.Codecs[1].Track()
	if tr.Kind != relay.KindVideo || tr.PayloadType != 102 || tr.ClockRate != 90000 || !strings.Contains(tr.Fmtp, "640c1f") {
		t.Errorf("track = %+v", tr)
	}

	for _, bad := range []string{"", "hello", "v=0\r\n", "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"} {
		if _, err := rtc.ParseOffer(bad); err == nil {
			t.Errorf("ParseOffer(%q) succeeded", bad)
		}
	}
}

func TestTrimOffer(t *testing.T) {
	const offer = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n" +
		"m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\n" +
		"a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\n" +
		"a=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 nack\r\na=rtcp-fb:96 nack pli\r\n" +
		"a=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\na=rtcp-fb:* transport-cc\r\n" +
		"a=rtpmap:102 H264/90000\r\na=rtcp-fb:102 nack\r\n" +
		"a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n" +
		"a=rtpmap:103 H264/90000\r\na=fmtp:103 packetization-mode=0;profile-level-id=42e01f\r\n" +
		"m=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=rtpmap:111 opus/48000/2\r\na=rtpmap:0 PCMU/8000\r\n"
	got := rtc.TrimOffer(offer, map[int]uint8{0: 102})
	want := "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n" +
		"m=video 9 UDP/TLS/RTP/SAVPF 102\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\n" +
		"a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\n" +
		"a=rtcp-fb:* transport-cc\r\n" +
		"a=rtpmap:102 H264/90000\r\na=rtcp-fb:102 nack\r\n" +
		"a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n" +
		"m=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=rtpmap:111 opus/48000/2\r\na=rtpmap:0 PCMU/8000\r\n"
	if got != want {
		t.Errorf("trimmed offer:\n%s\nwant:\n%s", got, want)
	}
	o, err := rtc.ParseOffer(got)
	if err != nil {
		t.Fatal(err)
	}
	if c := o.Media[0].Codecs; len(c) != 1 || c[0].PayloadType != 102 || !c[0].Supported() || len(c[0].Feedback) != 1 {
		t.Errorf("trimmed video codecs = %+v", c)
	}
	if both := rtc.TrimOffer(offer, map[int]uint8{0: 96, 1: 111}); !strings.Contains(both, "SAVPF 96\r\n") ||
		!strings.Contains(both, "SAVPF 111\r\n") || strings.Contains(both, "PCMU") || strings.Contains(both, "rtx") {
		t.Errorf("offer trimmed to VP8 and Opus:\n%s", both)
	}
	// A payload type the section does not offer leaves it alone, as does
	// an offer with LF line ends only its lines' formats.
	if same := rtc.TrimOffer(offer, map[int]uint8{0: 50}); same != offer {
		t.Errorf("offer trimmed to an unoffered payload type:\n%s", same)
	}
	lf := strings.ReplaceAll(offer, "\r\n", "\n")
	if got := rtc.TrimOffer(lf, map[int]uint8{0: 102}); got != strings.ReplaceAll(want, "\r\n", "\n") {
		t.Errorf("LF offer trimmed:\n%s", got)
	}
}

func FuzzParseOffer(f *testing.F) {
	f.Add("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\na=fmtp:96 x=1\r\n")
	f.Add("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\na=rtcp-fb:111 nack\r\n")
	f.Fuzz(func(t *testing.T, s string) {
		o, err := rtc.ParseOffer(s)
		if err != nil {
			return
		}
		for _, m := range o.Media {
			for _, c := range m.Codecs {
				c.Supported()
				c.Track()
				c.Parameters(rtc.FeedbackNACK)
			}
		}
	})
}

func freeUDPPort(t *testing.T) int {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	port := c.LocalAddr().(*net.UDPAddr).Port
	c.Close()
	return port
}
