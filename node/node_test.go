package node

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
`, dc, ports[dc], other, 20000+2*ports[dc]%20000, 20001+2*ports[dc]%20000, ports[other], dir)
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
