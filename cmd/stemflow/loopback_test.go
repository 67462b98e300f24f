package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
)

// TestLoopbackSample runs deploy/loopback as a user would: the stemflow
// binary built with `go build`, certificates from `stemflow certs`, and
// three `stemflow node --config` processes (the samples copied with their
// ports replaced by free ones). ffmpeg publishes at a over RTSP (RTP over
// UDP) and another ffmpeg decodes 30 frames at c; SIGTERM then stops every
// node, which must exit 0.
func TestLoopbackSample(t *testing.T) {
	testutil.Watchdog(t, 180*time.Second)
	dir := t.TempDir()
	bin := stemflowBinary(t)
	if out, err := exec.Command(bin, "certs", "--dcs", "a,b,c", "--out", filepath.Join(dir, "tls")).CombinedOutput(); err != nil {
		t.Fatalf("stemflow certs: %v\n%s", err, out)
	}
	ports := loopbackPorts(t)
	httpAddr, rtspAddr := map[string]string{}, map[string]string{}
	for _, dc := range []string{"a", "b", "c"} {
		sample, err := os.ReadFile(filepath.Join("..", "..", "deploy", "loopback", dc+".yaml"))
		if err != nil {
			t.Fatal(err)
		}
		cfg := ports.rewrite(t, string(sample))
		httpAddr[dc] = field(t, cfg, "http", "listen")
		rtspAddr[dc] = field(t, cfg, "rtsp", "listen")
		if err := os.WriteFile(filepath.Join(dir, dc+".yaml"), []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	var nodes []*process
	for _, dc := range []string{"c", "b", "a"} {
		nodes = append(nodes, startNodeProcess(t, bin, dc, filepath.Join(dir, dc+".yaml")))
	}
	for _, n := range nodes {
		select {
		case <-n.ready:
		case <-n.exited:
			t.Fatalf("node %s exited before it was ready:\n%s", n.dc, n.log())
		case <-time.After(testutil.Scale(20 * time.Second)):
			t.Fatalf("node %s did not log \"node ready\" within 20 s:\n%s", n.dc, n.log())
		}
		resp, err := http.Get("http://" + httpAddr[n.dc] + "/healthz")
		if err != nil {
			t.Fatalf("node %s /healthz: %v", n.dc, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("node %s /healthz: %s", n.dc, resp.Status)
		}
	}
	testutil.WaitFor(t, "b's links to a and c", func() bool {
		body := get(t, "http://"+httpAddr["b"]+"/api/v1/links")
		return strings.Contains(body, `"peer": "a"`) && strings.Contains(body, `"peer": "c"`)
	})

	pubCtx, stopPub := context.WithCancel(context.Background())
	defer stopPub()
	pub := exec.CommandContext(pubCtx, "ffmpeg", "-hide_banner", "-loglevel", "error", "-re",
		"-f", "lavfi", "-i", "testsrc=size=640x360:rate=30", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
		"-pix_fmt", "yuv420p", "-c:v", "libx264", "-bf", "0", "-g", "30", "-c:a", "libopus",
		"-f", "rtsp", "rtsp://"+rtspAddr["a"]+"/x")
	var pubErr strings.Builder
	pub.Stderr = &pubErr
	if err := pub.Start(); err != nil {
		t.Fatalf("starting ffmpeg (bash scripts/test.sh installs it): %v", err)
	}
	pubDone := make(chan struct{})
	go func() { pub.Wait(); close(pubDone) }()
	defer func() { stopPub(); <-pubDone }()

	// Read at c: retry while the stream is not yet known there.
	deadline := time.Now().Add(testutil.Scale(30 * time.Second))
	var frames int
	var readErr string
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(20*time.Second))
		out, err := exec.CommandContext(ctx, "ffmpeg", "-hide_banner", "-loglevel", "error", "-rtsp_transport", "tcp",
			"-i", "rtsp://"+rtspAddr["c"]+"/x", "-map", "0:v", "-frames:v", "30", "-f", "framemd5", "-").Output()
		cancel()
		frames = 0
		for _, line := range strings.Split(string(out), "\n") {
			if line != "" && !strings.HasPrefix(line, "#") {
				frames++
			}
		}
		if err == nil && frames == 30 {
			break
		}
		readErr = fmt.Sprint(err)
		time.Sleep(200 * time.Millisecond)
	}
	if frames != 30 {
		t.Fatalf("ffmpeg at c decoded %d frames, want 30 (last error %s); publisher: %s\nlogs:\n%s%s%s",
			frames, readErr, pubErr.String(), nodes[0].log(), nodes[1].log(), nodes[2].log())
	}
	stopPub()
	<-pubDone

	for _, n := range nodes {
		if err := n.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range nodes {
		select {
		case <-n.exited:
		case <-time.After(testutil.Scale(15 * time.Second)):
			t.Fatalf("node %s still running 15 s after SIGTERM:\n%s", n.dc, n.log())
		}
		if code := n.cmd.ProcessState.ExitCode(); code != 0 {
			t.Errorf("node %s exited with %d after SIGTERM:\n%s", n.dc, code, n.log())
		}
		if strings.Contains(n.log(), "level=ERROR") {
			t.Errorf("node %s logged errors:\n%s", n.dc, n.log())
		}
	}
}

// startNodeProcess starts one `stemflow node`; it is ready at its "node
// ready" log line.
func startNodeProcess(t *testing.T, bin, dc, config string) *process {
	t.Helper()
	p := startProcess(t, "node "+dc, `msg="node ready"`, bin, "node", "--config", config)
	p.dc = dc
	return p
}

func get(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// field returns the value of key in the YAML section of a sample (a flat
// two-level read, enough for the samples' listen addresses).
func field(t *testing.T, yaml, section, key string) string {
	t.Helper()
	m := regexp.MustCompile(`(?m)^` + section + `:\n(?:  .*\n)*?  ` + key + `: (\S+)`).FindStringSubmatch(yaml)
	if m == nil {
		t.Fatalf("no %s.%s in the sample:\n%s", section, key, yaml)
	}
	return m[1]
}

// portMap maps the samples' fixed ports to free ones, consistently across
// the three files.
type portMap map[int]int

var samplePort = regexp.MustCompile(`127\.0\.0\.1:(\d+)`)

// loopbackPorts picks free ports for every port the samples use: an
// even/odd UDP pair for each rtp_address/rtcp_address, and ports free over
// both TCP and UDP for the rest.
func loopbackPorts(t *testing.T) portMap {
	t.Helper()
	m := portMap{}
	taken := map[int]bool{}
	for _, dc := range []string{"a", "b", "c"} {
		sample, err := os.ReadFile(filepath.Join("..", "..", "deploy", "loopback", dc+".yaml"))
		if err != nil {
			t.Fatal(err)
		}
		if rtp := regexp.MustCompile(`rtp_address: 127\.0\.0\.1:(\d+)`).FindSubmatch(sample); rtp != nil {
			p, _ := strconv.Atoi(string(rtp[1]))
			free := freeUDPPair(t, taken)
			m[p], m[p+1] = free, free+1
		}
		for _, sm := range samplePort.FindAllSubmatch(sample, -1) {
			p, _ := strconv.Atoi(string(sm[1]))
			if _, ok := m[p]; !ok {
				m[p] = freeTCPAndUDP(t, taken)
			}
		}
	}
	return m
}

func (m portMap) rewrite(t *testing.T, sample string) string {
	return samplePort.ReplaceAllStringFunc(sample, func(s string) string {
		p, _ := strconv.Atoi(strings.TrimPrefix(s, "127.0.0.1:"))
		return "127.0.0.1:" + strconv.Itoa(m[p])
	})
}

func freeTCPAndUDP(t *testing.T, taken map[int]bool) int {
	t.Helper()
	for range 100 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := ln.Addr().(*net.TCPAddr).Port
		c, err := net.ListenPacket("udp", "127.0.0.1:"+strconv.Itoa(p))
		ln.Close()
		if err != nil || taken[p] {
			continue
		}
		c.Close()
		taken[p] = true
		return p
	}
	t.Fatal("no port free over both TCP and UDP")
	return 0
}

func freeUDPPair(t *testing.T, taken map[int]bool) int {
	t.Helper()
	for range 200 {
		a, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := a.LocalAddr().(*net.UDPAddr).Port
		if p%2 != 0 || p == 65535 || taken[p] || taken[p+1] {
			a.Close()
			continue
		}
		b, err := net.ListenPacket("udp", "127.0.0.1:"+strconv.Itoa(p+1))
		a.Close()
		if err != nil {
			continue
		}
		b.Close()
		taken[p], taken[p+1] = true, true
		return p
	}
	t.Fatal("no free even/odd UDP port pair")
	return 0
}
