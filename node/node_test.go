package node

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/rtc/rtctest"
	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/relay"
)

func freeUDPPort(t *testing.T) int {
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port
}

// TestNodesFromConfigFiles runs two nodes the way a real deployment does:
// certificates in files, one YAML config each, and checks that they link and
// that a stream published at one is listed at the other.
func TestNodesFromConfigFiles(t *testing.T) {
	dir := t.TempDir()
	ca, err := relay.NewClusterCA()
	if err != nil {
		t.Fatal(err)
	}
	caPEM, _, err := ca.PEM()
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "ca.pem"), caPEM, 0o600)
	ports := map[string]int{"eu": freeUDPPort(t), "us": freeUDPPort(t)}
	var nodes []*Node
	for _, dc := range []string{"us", "eu"} { // us first: eu dials it
		cert, key, err := ca.IssuePEM(dc)
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dir, dc+".pem"), cert, 0o600)
		os.WriteFile(filepath.Join(dir, dc+"-key.pem"), key, 0o600)
		other := map[string]string{"eu": "us", "us": "eu"}[dc]
		rtp, err := freeUDPPair("127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		yaml := fmt.Sprintf(`datacenter: %[1]s
http: {listen: "127.0.0.1:0"}
rtsp:
  listen: "127.0.0.1:0"
  rtp_address: "127.0.0.1:%[4]d"
  rtcp_address: "127.0.0.1:%[5]d"
overlay:
  listen: "127.0.0.1:%[2]d"
  neighbours: {%[3]s: "127.0.0.1:%[6]d"}
  tls: {ca: %[7]s/ca.pem, cert: %[7]s/%[1]s.pem, key: %[7]s/%[1]s-key.pem}
webrtc: {ips: [127.0.0.1]}
`, dc, ports[dc], other, rtp, rtp+1, ports[other], dir)
		path := filepath.Join(dir, dc+".yaml")
		os.WriteFile(path, []byte(yaml), 0o600)
		cfg, err := LoadConfig(path)
		if err != nil {
			t.Fatal(err)
		}
		n, err := Start(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
		if err != nil {
			t.Fatalf("%s: %v", dc, err)
		}
		t.Cleanup(n.Close)
		nodes = append(nodes, n)
	}
	us, eu := nodes[0], nodes[1]
	pub, err := eu.Hub().Publish("talk", relay.Description{Tracks: []relay.Track{
		{Kind: relay.KindAudio, MimeType: relay.MimeOpus, ClockRate: 48000, Channels: 2, PayloadType: 111}}}, relay.PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get("http://" + us.HTTPAddr().String() + "/api/v1/streams")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if strings.Contains(string(body), `"name": "talk"`) && strings.Contains(string(body), `"origin": "eu"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("us never listed eu's stream: %s", body)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestNodeRejectsBadCertificateFiles(t *testing.T) {
	cfg, err := ParseConfig([]byte(`datacenter: eu
overlay: {tls: {ca: /nonexistent/ca.pem, cert: /nonexistent/eu.pem, key: /nonexistent/eu-key.pem}}
webrtc: {ips: [127.0.0.1]}
`))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Start(cfg, slog.New(slog.NewTextHandler(io.Discard, nil))); err == nil || !strings.Contains(err.Error(), "overlay.tls") {
		t.Fatalf("Start with missing certificate files: %v, want an overlay.tls error", err)
	}
}

// writeCerts writes a cluster CA and certificates for dcs into dir, as
// `stemflow certs` does.
func writeCerts(t *testing.T, dir string, dcs ...string) {
	t.Helper()
	ca, err := relay.NewClusterCA()
	if err != nil {
		t.Fatal(err)
	}
	caPEM, _, err := ca.PEM()
	if err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(dir, 0o700)
	os.WriteFile(filepath.Join(dir, "ca.pem"), caPEM, 0o600)
	for _, dc := range dcs {
		cert, key, err := ca.IssuePEM(dc)
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dir, dc+".pem"), cert, 0o600)
		os.WriteFile(filepath.Join(dir, dc+"-key.pem"), key, 0o600)
	}
}

// TestNodeRefusesAnotherDatacentersCertificate: a node given the
// certificate of another datacenter, or one its CA did not sign, does not
// start (before: it ran, answered /healthz 200, and its links failed
// silently at INFO).
func TestNodeRefusesAnotherDatacentersCertificate(t *testing.T) {
	testutil.CheckLeaks(t)
	dir := t.TempDir()
	writeCerts(t, dir, "a", "b")
	writeCerts(t, filepath.Join(dir, "other"), "b")
	for _, tc := range []struct{ cert, key, want string }{
		{"a.pem", "a-key.pem", `overlay.tls.cert ` + filepath.Join(dir, "a.pem") + ` is for datacenter "a" but this node is datacenter "b": use the certificate and key made for "b"`},
		{"other/b.pem", "other/b-key.pem", "overlay.tls.cert " + filepath.Join(dir, "other/b.pem") + " is not signed by the cluster CA"},
	} {
		cfg, err := ParseConfig([]byte(fmt.Sprintf(`datacenter: b
http: {listen: "127.0.0.1:0"}
rtsp: {listen: "127.0.0.1:0", udp: false}
overlay: {listen: "127.0.0.1:0", tls: {ca: %[1]s/ca.pem, cert: %[1]s/%[2]s, key: %[1]s/%[3]s}}
webrtc: {ips: [127.0.0.1]}
`, dir, tc.cert, tc.key)))
		if err != nil {
			t.Fatal(err)
		}
		n, err := Start(cfg, testutil.Logger())
		if err == nil {
			n.Close()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("node b with %s: %v, want an error containing %q", tc.cert, err, tc.want)
		}
	}
}

// TestNodeWithRTSPOverUDPOff: rtsp.udp: false reaches the RTSP server: a
// node starts on an odd RTSP port and opens no RTP/RTCP UDP ports (before:
// the RTSP server refused the odd port).
func TestNodeWithRTSPOverUDPOff(t *testing.T) {
	testutil.CheckLeaks(t)
	dir := t.TempDir()
	writeCerts(t, dir, "a")
	// The UDP ports the node must not open have to be free before it
	// starts: other tests running at once hold ephemeral UDP ports
	// (WebRTC, QUIC), and one of those is no port the node took.
	udpFree := func(p int) bool {
		c, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			return false
		}
		c.Close()
		return true
	}
	var odd int
	for odd = testutil.FreePort(t); odd%2 == 0 || odd+1001 > 65535 || !udpFree(odd+1000) || !udpFree(odd+1001); odd = testutil.FreePort(t) {
	}
	cfg, err := ParseConfig([]byte(fmt.Sprintf(`datacenter: a
http: {listen: "127.0.0.1:0"}
rtsp: {listen: "127.0.0.1:%[2]d", udp: false}
overlay: {listen: "127.0.0.1:0", tls: {ca: %[1]s/ca.pem, cert: %[1]s/a.pem, key: %[1]s/a-key.pem}}
webrtc: {ips: [127.0.0.1]}
`, dir, odd)))
	if err != nil {
		t.Fatal(err)
	}
	n, err := Start(cfg, testutil.Logger())
	if err != nil {
		t.Fatalf("node with rtsp.udp: false on port %d: %v", odd, err)
	}
	defer n.Close()
	for _, p := range []int{odd + 1000, odd + 1001} {
		c, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			t.Errorf("UDP port %d is taken with rtsp.udp: false: %v", p, err)
			continue
		}
		c.Close()
	}
}

// TestNodeNamesYAMLKeysForForeignIP: a webrtc.ips entry this machine does
// not have is refused naming the YAML keys, not the Go field NAT1To1IPs.
func TestNodeNamesYAMLKeysForForeignIP(t *testing.T) {
	testutil.CheckLeaks(t)
	dir := t.TempDir()
	writeCerts(t, dir, "a")
	cfg, err := ParseConfig([]byte(fmt.Sprintf(`datacenter: a
http: {listen: "127.0.0.1:0"}
rtsp: {listen: "127.0.0.1:0", udp: false}
overlay: {listen: "127.0.0.1:0", tls: {ca: %[1]s/ca.pem, cert: %[1]s/a.pem, key: %[1]s/a-key.pem}}
webrtc: {ips: [192.0.2.55]}
`, dir)))
	if err != nil {
		t.Fatal(err)
	}
	n, err := Start(cfg, testutil.Logger())
	if err == nil {
		n.Close()
	}
	if err == nil || !strings.Contains(err.Error(), "webrtc.ips: rtc: IP 192.0.2.55 is not assigned to any network interface") ||
		!strings.Contains(err.Error(), "webrtc.nat_1to1_ips") || strings.Contains(err.Error(), "NAT1To1IPs") {
		t.Fatalf("node with a foreign webrtc.ips: %v, want an error naming webrtc.ips and webrtc.nat_1to1_ips only", err)
	}
}

// syncBuffer collects log output from many goroutines.
type syncBuffer struct {
	mu sync.Mutex // guards b
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestLogLines runs a three-datacenter cluster with a WHIP publisher at a
// and a WHEP viewer at c, and checks its log: every line names its
// datacenter exactly once (before: "dc=a component=relay dc=a"), and every
// node logs its HTTP, RTSP and overlay addresses, the real bound ones, and
// that it is ready.
func TestLogLines(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	var buf syncBuffer
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(20*time.Second))
	defer cancel()
	c, err := StartDev(ctx, DevConfig{FreePorts: true, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	eng := rtctest.NewEngine(t)
	pub, err := rtctest.Publish(ctx, eng, c.HTTPURL(0)+"/whip/x", rtctest.PublishOptions{})
	if err != nil {
		c.Close()
		t.Fatal(err)
	}
	stop := make(chan struct{})
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		var src rtctest.H264Source
		tick := time.NewTicker(time.Second / 30)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			pkts, _ := src.NextFrame()
			for _, p := range pkts {
				pub.Video.Write(p)
			}
		}
	}()
	var v *rtctest.Viewer
	testutil.WaitFor(t, "a WHEP viewer at c", func() bool {
		v, err = rtctest.View(ctx, eng, c.HTTPURL(2)+"/whep/x", rtctest.ViewOptions{})
		return err == nil
	})
	select {
	case <-v.FirstKeyframe():
	case <-time.After(testutil.Scale(5 * time.Second)):
		t.Error("no keyframe at c")
	}
	v.Close()
	close(stop)
	<-sent
	pub.Close()
	c.Close()

	out := buf.String()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) < 20 {
		t.Fatalf("only %d log lines:\n%s", len(lines), out)
	}
	for _, line := range lines {
		if n := strings.Count(line, " dc="); n != 1 {
			t.Errorf("log line names dc %d times: %s", n, line)
		}
	}
	for i, dc := range c.Datacenters() {
		n := c.Nodes[i]
		for _, want := range []string{
			`msg="HTTP listening" dc=` + dc + ` address=` + n.HTTPAddr().String(),
			`msg="RTSP server listening" dc=` + dc + ` component=rtspserver address=` + n.RTSPAddr(),
			`msg="overlay listening" dc=` + dc + ` address=` + n.OverlayAddr().String(),
			`msg="node ready" dc=` + dc + ` http=` + n.HTTPAddr().String() + ` rtsp=` + n.RTSPAddr() + ` overlay=` + n.OverlayAddr().String(),
		} {
			if strings.Count(out, want) != 1 {
				t.Errorf("want one log line with %q, got %d", want, strings.Count(out, want))
			}
		}
	}
	if t.Failed() {
		t.Logf("log:\n%s", out)
	}
}
