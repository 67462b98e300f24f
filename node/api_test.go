package node

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bluenviron/gortsplib/v4"
	"github.com/bluenviron/gortsplib/v4/pkg/base"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/stemflow/stemflow/internal/rtc/rtctest"
	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/relay"
)

// evenUDPPair returns a free even UDP port of 127.0.0.1 whose successor is
// free too, for RTSP's RTP and RTCP ports.
func evenUDPPair(t *testing.T) int {
	t.Helper()
	for range 100 {
		c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		p := c.LocalAddr().(*net.UDPAddr).Port
		c.Close()
		p += p % 2
		a, err1 := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: p})
		b, err2 := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: p + 1})
		if a != nil {
			a.Close()
		}
		if b != nil {
			b.Close()
		}
		if err1 == nil && err2 == nil {
			return p
		}
	}
	t.Fatal("no free even UDP port pair")
	return 0
}

// startPair starts datacenters a and b on loopback, every port picked
// free, linked to each other, and waits for the link.
func startPair(t *testing.T) (a, b *Node) {
	t.Helper()
	ca, err := relay.NewClusterCA()
	if err != nil {
		t.Fatal(err)
	}
	nodes := map[string]*Node{}
	overlay := map[string]string{}
	for _, dc := range []string{"b", "a"} { // b first: a dials it
		id, err := ca.Issue(dc)
		if err != nil {
			t.Fatal(err)
		}
		cfg := &Config{Datacenter: dc, identity: &id}
		cfg.HTTP.Listen = "127.0.0.1:0"
		cfg.RTSP.Listen = "127.0.0.1:0"
		p := evenUDPPair(t)
		cfg.RTSP.RTPAddress = fmt.Sprintf("127.0.0.1:%d", p)
		cfg.RTSP.RTCPAddress = fmt.Sprintf("127.0.0.1:%d", p+1)
		cfg.Overlay.Listen = "127.0.0.1:0"
		cfg.Overlay.Neighbours = map[string]string{}
		if dc == "a" {
			cfg.Overlay.Neighbours["b"] = overlay["b"]
		} else {
			// a dials b: listed so that b accepts it; its address is not used.
			cfg.Overlay.Neighbours["a"] = "127.0.0.1:0"
		}
		cfg.WebRTC.IPs = []string{"127.0.0.1"}
		cfg.SetDefaults()
		if err := cfg.Validate(); err != nil {
			t.Fatal(err)
		}
		n, err := Start(cfg, testutil.Logger())
		if err != nil {
			t.Fatalf("%s: %v", dc, err)
		}
		t.Cleanup(n.Close)
		nodes[dc] = n
		overlay[dc] = n.OverlayAddr().String()
	}
	a, b = nodes["a"], nodes["b"]
	testutil.WaitFor(t, "the link a–b", func() bool { return len(a.Hub().Links()) == 1 && len(b.Hub().Links()) == 1 })
	return a, b
}

// testFmtp is the H264 track's fmtp, with rtctest's parameter sets.
var testFmtp = "packetization-mode=1;profile-level-id=42c01f;sprop-parameter-sets=" +
	base64.StdEncoding.EncodeToString(rtctest.SPS) + "," + base64.StdEncoding.EncodeToString(rtctest.PPS)

// publish publishes a 30 fps H264 + Opus stream at n until the test ends.
func publish(t *testing.T, n *Node, name string) {
	t.Helper()
	pub, err := n.Hub().Publish(name, relay.Description{Tracks: []relay.Track{
		{Kind: relay.KindVideo, MimeType: relay.MimeH264, ClockRate: 90000, PayloadType: 96, Fmtp: testFmtp},
		{Kind: relay.KindAudio, MimeType: relay.MimeOpus, ClockRate: 48000, Channels: 2, PayloadType: 111},
	}}, relay.PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		src := rtctest.H264Source{GOP: 30}
		var opus rtctest.OpusSource
		tick := time.NewTicker(time.Second / 30)
		defer tick.Stop()
		for {
			pkts, _ := src.NextFrame()
			for _, p := range pkts {
				pub.WriteRTP(0, p)
			}
			pub.WriteRTP(1, opus.Next())
			pub.WriteRTP(1, opus.Next())
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	})
	t.Cleanup(func() {
		close(stop)
		wg.Wait()
		pub.Close()
	})
}

func get(t *testing.T, n *Node, path string) (int, http.Header, []byte) {
	t.Helper()
	resp, err := http.Get("http://" + n.HTTPAddr().String() + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header, body
}

// getJSON decodes a JSON API response into generic maps, so that the test
// sees the keys a client sees, not Go field names.
func getJSON(t *testing.T, n *Node, path string) map[string]any {
	t.Helper()
	status, h, body := get(t, n, path)
	if status != 200 || h.Get("Content-Type") != "application/json" {
		t.Fatalf("GET %s: %d %s: %s", path, status, h.Get("Content-Type"), body)
	}
	var v map[string]any
	if err := json.Unmarshal(body, &v); err != nil {
		t.Fatalf("GET %s: %v: %s", path, err, body)
	}
	return v
}

func keys(m map[string]any) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func findStream(t *testing.T, doc map[string]any, name string) map[string]any {
	t.Helper()
	streams, ok := doc["streams"].([]any)
	if !ok {
		t.Fatalf("no streams array: %v", doc)
	}
	for _, s := range streams {
		if m, ok := s.(map[string]any); ok && m["name"] == name {
			return m
		}
	}
	return nil
}

// TestAPIStreamsAndLinks decodes the real /api/v1/streams and /api/v1/links
// responses of two linked nodes and checks every key and value a client
// reads: snake_case keys, track kinds and codecs in words, viewers by
// protocol, what packets and bytes count, and the link RTT in milliseconds.
func TestAPIStreamsAndLinks(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 90*time.Second)
	a, b := startPair(t)
	publish(t, a, "x")
	start := time.Now()

	// At b the stream is known by announcement only: nothing flows there.
	testutil.WaitFor(t, "b to list x", func() bool { return findStream(t, getJSON(t, b, "/api/v1/streams"), "x") != nil })
	doc := getJSON(t, b, "/api/v1/streams")
	if doc["datacenter"] != "b" {
		t.Errorf("datacenter %v, want b", doc["datacenter"])
	}
	s := findStream(t, doc, "x")
	wantKeys := []string{"b_frames", "bytes", "bytes_out", "hops", "local", "name", "origin", "packets", "packets_out", "subscribers", "tracks", "viewers"}
	if got := keys(s); !slices.Equal(got, wantKeys) {
		t.Errorf("announced stream's keys %v, want %v", got, wantKeys)
	}
	if s["origin"] != "a" || s["local"] != false || !reflect.DeepEqual(s["hops"], []any{"a", "b"}) {
		t.Errorf("announced stream at b: %v", s)
	}

	// A WHEP viewer at b makes it flow there.
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(30*time.Second))
	defer cancel()
	v, err := rtctest.View(ctx, rtctest.NewEngine(t), "http://"+b.HTTPAddr().String()+"/whep/x", rtctest.ViewOptions{CountOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Close)
	testutil.WaitFor(t, "the viewer to receive packets", func() bool { return v.Count() > 50 })

	s = findStream(t, getJSON(t, b, "/api/v1/streams"), "x")
	wantKeys = []string{"b_frames", "bytes", "bytes_out", "hops", "local", "name", "origin", "packets", "packets_out", "since", "subscribers", "tracks", "viewers"}
	if got := keys(s); !slices.Equal(got, wantKeys) {
		t.Errorf("flowing stream's keys %v, want %v", got, wantKeys)
	}
	if s["local"] != true {
		t.Errorf("local %v at b with a viewer, want true", s["local"])
	}
	// rtctest's H264 slices have random bodies, which the B-frame
	// detector may read as B slices: check the type, not the value.
	if _, ok := s["b_frames"].(bool); !ok {
		t.Errorf("b_frames %v, want a boolean", s["b_frames"])
	}
	if got := s["viewers"]; !reflect.DeepEqual(got, map[string]any{"whep": 1.0, "rtsp": 0.0}) {
		t.Errorf("viewers %v, want whep 1, rtsp 0", got)
	}
	if n, _ := s["packets"].(float64); n < 50 {
		t.Errorf("packets %v at b, want the packets relayed so far (≥ 50)", s["packets"])
	}
	if n, _ := s["bytes"].(float64); n < 50*100 {
		t.Errorf("bytes %v at b, want ≥ 5000", s["bytes"])
	}
	since, err := time.Parse(time.RFC3339Nano, fmt.Sprint(s["since"]))
	if err != nil || since.Before(start.Add(-time.Second)) || since.After(time.Now()) {
		t.Errorf("since %v (%v): want when the stream started flowing at b, after %v", s["since"], err, start)
	}
	tracks, _ := s["tracks"].([]any)
	want := []any{
		map[string]any{"kind": "video", "codec": "H264", "payload_type": 96.0, "clock_rate": 90000.0, "fmtp": testFmtp},
		map[string]any{"kind": "audio", "codec": "opus", "payload_type": 111.0, "clock_rate": 48000.0, "channels": 2.0},
	}
	if !reflect.DeepEqual(tracks, want) {
		t.Errorf("tracks\n%v\nwant\n%v", tracks, want)
	}

	// The origin counts since it was published, and its packets keep growing.
	sa := findStream(t, getJSON(t, a, "/api/v1/streams"), "x")
	if sa["local"] != true || sa["since"] == nil {
		t.Errorf("stream at its origin: %v", sa)
	}

	links := getJSON(t, a, "/api/v1/links")
	ls, _ := links["links"].([]any)
	if links["datacenter"] != "a" || len(ls) != 1 {
		t.Fatalf("links at a: %v", links)
	}
	l := ls[0].(map[string]any)
	wantKeys = []string{"datagram_budget", "datagrams_received", "datagrams_sent", "duplicates", "fragments_given_up", "hop_lost", "malformed",
		"packets_received", "packets_sent", "peer", "queue_dropped", "receive_dropped", "rtt_ms", "send_errors", "unknown_subscription"}
	if got := keys(l); !slices.Equal(got, wantKeys) {
		t.Errorf("link keys %v, want %v", got, wantKeys)
	}
	if l["peer"] != "b" {
		t.Errorf("peer %v, want b", l["peer"])
	}
	if n, _ := l["packets_sent"].(float64); n < 50 {
		t.Errorf("packets_sent %v, want ≥ 50", l["packets_sent"])
	}
	if n, _ := l["datagrams_sent"].(float64); n < l["packets_sent"].(float64) {
		t.Errorf("datagrams_sent %v < packets_sent %v", l["datagrams_sent"], l["packets_sent"])
	}
	if n, _ := l["datagram_budget"].(float64); n < 1200 {
		t.Errorf("datagram_budget %v, want at least quic-go's initial 1200 bytes", l["datagram_budget"])
	}
	// Loopback RTT is well under a second, and not 0 once packets flowed.
	if rtt, ok := l["rtt_ms"].(float64); !ok || rtt <= 0 || rtt > 1000 {
		t.Errorf("rtt_ms %v, want milliseconds in (0, 1000]", l["rtt_ms"])
	}
}

// TestHealthz checks the liveness answer.
func TestHealthz(t *testing.T) {
	a, _ := startPair(t)
	status, h, body := get(t, a, "/healthz")
	if status != 200 || string(body) != "ok\n" || !strings.HasPrefix(h.Get("Content-Type"), "text/plain") {
		t.Errorf("GET /healthz: %d %q %q", status, h.Get("Content-Type"), body)
	}
}

// scrape reads a node's /metrics, checks it with promtool and parses it.
func scrape(t *testing.T, n *Node) map[string]*dto.MetricFamily {
	t.Helper()
	status, h, body := get(t, n, "/metrics")
	if status != 200 {
		t.Fatalf("GET /metrics: %d: %s", status, body)
	}
	if !strings.HasPrefix(h.Get("Content-Type"), "text/plain") {
		t.Errorf("GET /metrics: Content-Type %q, want the text format", h.Get("Content-Type"))
	}
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatalf("promtool not found (Debian package prometheus; scripts/test.sh installs it): %v", err)
	}
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = bytes.NewReader(body)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("parsing /metrics: %v\n%s", err, body)
	}
	return fams
}

// value returns the value of the series of family name whose labels include
// labels (name=value pairs), and whether there is one.
func value(fams map[string]*dto.MetricFamily, name string, labels ...string) (float64, bool) {
	f := fams[name]
	if f == nil {
		return 0, false
	}
next:
	for _, m := range f.Metric {
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, lp := range m.Label {
				if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		}
	}
	return 0, false
}

// TestMetrics scrapes two nodes' /metrics (two nodes in one process, as in
// `stemflow dev`: each has its own registry), lints the output with promtool,
// and checks that the figures move when viewers join and leave: a WHEP
// viewer at b (relayed from a) and an RTSP reader at a.
func TestMetrics(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 90*time.Second)
	a, b := startPair(t)
	publish(t, a, "x")
	testutil.WaitFor(t, "x to flow at a", func() bool {
		v, _ := value(scrape(t, a), "stemflow_stream_received_packets_total", "stream", "x")
		return v > 30
	})

	fa := scrape(t, a)
	if v, ok := value(fa, "stemflow_viewers", "dc", "a", "stream", "x", "protocol", "rtsp"); !ok || v != 0 {
		t.Errorf("RTSP viewers of x at a before any joined: %v (present %v), want 0", v, ok)
	}
	if v, ok := value(fa, "stemflow_viewers", "stream", "x", "protocol", "whep"); !ok || v != 0 {
		t.Errorf("WHEP viewers of x at a: %v (present %v), want 0", v, ok)
	}
	if v, ok := value(fa, "stemflow_link_rtt_seconds", "dc", "a", "peer", "b"); !ok || v <= 0 || v > 1 {
		t.Errorf("stemflow_link_rtt_seconds{peer=b} at a: %v (present %v), want seconds in (0, 1]", v, ok)
	}
	sentBefore, _ := value(fa, "stemflow_link_sent_packets_total", "peer", "b")
	fb := scrape(t, b)
	// Each node serves its own registry: only its own datacenter's series.
	for name, f := range fb {
		for _, m := range f.Metric {
			for _, lp := range m.Label {
				if lp.GetName() == "dc" && lp.GetValue() != "b" {
					t.Errorf("b's /metrics has %s{dc=%q}", name, lp.GetValue())
				}
			}
		}
	}
	if _, ok := value(fb, "stemflow_viewers", "stream", "x"); ok {
		t.Errorf("b has viewer series for x before it flows there")
	}
	whepBefore, ok := value(fb, "stemflow_whep_sent_packets_total", "dc", "b")
	if !ok {
		t.Errorf("no stemflow_whep_sent_packets_total at b")
	}
	linkReasons := []string{"link_queue", "link_send_error", "link_receive_queue", "unknown_subscription", "duplicate", "fragments_given_up", "malformed"}
	for _, reason := range append(slices.Clone(linkReasons), "whep_viewer_queue", "whep_write_error", "rtsp_reader_queue") {
		if _, ok := value(fb, "stemflow_dropped_packets_total", "dc", "b", "reason", reason); !ok {
			t.Errorf("no stemflow_dropped_packets_total{reason=%q} at b", reason)
		}
	}
	for _, reason := range linkReasons {
		if _, ok := value(fb, "stemflow_link_dropped_total", "dc", "b", "peer", "a", "reason", reason); !ok {
			t.Errorf("no stemflow_link_dropped_total{peer=a,reason=%q} at b", reason)
		}
	}
	if v, _ := value(fb, "stemflow_link_datagram_budget_bytes", "peer", "a"); v < 1200 {
		t.Errorf("stemflow_link_datagram_budget_bytes{peer=a} at b: %v, want ≥ 1200", v)
	}

	// A WHEP viewer at b.
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(30*time.Second))
	defer cancel()
	viewer, err := rtctest.View(ctx, rtctest.NewEngine(t), "http://"+b.HTTPAddr().String()+"/whep/x", rtctest.ViewOptions{CountOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, "the viewer to receive packets", func() bool { return viewer.Count() > 50 })
	// An RTSP reader at a.
	rc := &gortsplib.Client{Scheme: "rtsp", Host: a.rtsp.Addr(), Transport: ptr(gortsplib.TransportTCP)}
	if err := rc.Start2(); err != nil {
		t.Fatal(err)
	}
	u, _ := base.ParseURL("rtsp://" + a.rtsp.Addr() + "/x")
	desc, _, err := rc.Describe(u)
	if err != nil {
		t.Fatal(err)
	}
	if err := rc.SetupAll(desc.BaseURL, desc.Medias); err != nil {
		t.Fatal(err)
	}
	if _, err := rc.Play(nil); err != nil {
		t.Fatal(err)
	}

	// The viewer counts a packet when it arrives; the server counts a
	// batch of up to 65 once it has written them all, so the viewer can be
	// ahead of stemflow_whep_sent_packets_total for a moment.
	testutil.WaitFor(t, fmt.Sprintf("stemflow_whep_sent_packets_total at b above %v (the viewer got more than 50 packets)", whepBefore+50), func() bool {
		fb = scrape(t, b)
		v, _ := value(fb, "stemflow_whep_sent_packets_total")
		return v > whepBefore+50
	})
	if v, _ := value(fb, "stemflow_viewers", "dc", "b", "stream", "x", "protocol", "whep"); v != 1 {
		t.Errorf("WHEP viewers of x at b with one watching: %v, want 1", v)
	}
	if v, _ := value(fb, "stemflow_stream_received_packets_total", "stream", "x"); v < 50 {
		t.Errorf("stemflow_stream_received_packets_total{stream=x} at b: %v, want ≥ 50", v)
	}
	if v, _ := value(fb, "stemflow_link_received_datagrams_total", "peer", "a"); v < 50 {
		t.Errorf("stemflow_link_received_datagrams_total{peer=a} at b: %v, want ≥ 50", v)
	}
	if v, _ := value(fb, "stemflow_link_received_packets_total", "peer", "a"); v < 50 {
		t.Errorf("stemflow_link_received_packets_total{peer=a} at b: %v, want ≥ 50", v)
	}
	if v, ok := value(fb, "stemflow_stream_bframes", "stream", "x"); !ok || v != 0 && v != 1 {
		t.Errorf("stemflow_stream_bframes{stream=x} at b: %v (present %v), want 0 or 1", v, ok)
	}
	if v, _ := value(fb, "stemflow_stream_start_time_seconds", "stream", "x"); v < float64(time.Now().Add(-time.Minute).Unix()) {
		t.Errorf("stemflow_stream_start_time_seconds{stream=x} at b: %v, want about now", v)
	}
	fa = scrape(t, a)
	if v, _ := value(fa, "stemflow_viewers", "stream", "x", "protocol", "rtsp"); v != 1 {
		t.Errorf("RTSP viewers of x at a with one reading: %v, want 1", v)
	}
	if v, _ := value(fa, "stemflow_link_sent_packets_total", "peer", "b"); v <= sentBefore+50 {
		t.Errorf("stemflow_link_sent_packets_total{peer=b} at a: %v, want > %v", v, sentBefore+50)
	}
	if v, _ := value(fa, "stemflow_link_sent_datagrams_total", "peer", "b"); v <= sentBefore+50 {
		t.Errorf("stemflow_link_sent_datagrams_total{peer=b} at a: %v, want > %v", v, sentBefore+50)
	}

	// They leave: the gauges fall back to 0.
	viewer.Close()
	rc.Close()
	testutil.WaitFor(t, "the viewer counts to drop to 0", func() bool {
		wb, okb := value(scrape(t, b), "stemflow_viewers", "stream", "x", "protocol", "whep")
		ra, _ := value(scrape(t, a), "stemflow_viewers", "stream", "x", "protocol", "rtsp")
		return (!okb || wb == 0) && ra == 0
	})
}

func ptr[T any](v T) *T { return &v }

// TestStreamSentCounters: what a stream hands to its subscribers at a node
// (stemflow_stream_sent_*, packets_out/bytes_out) grows with the viewers
// there: about as fast as what arrives with one WHEP viewer, about twice as
// fast with two, and the same in /metrics and /api/v1/streams.
func TestStreamSentCounters(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 120*time.Second)
	a, b := startPair(t)
	publish(t, a, "x")
	testutil.WaitFor(t, "x to be announced at b", func() bool {
		s := findStream(t, getJSON(t, b, "/api/v1/streams"), "x")
		return s != nil
	})
	// in and out of x at b, read from /metrics.
	read := func() (pin, pout, bin, bout float64) {
		f := scrape(t, b)
		var ok [4]bool
		pin, ok[0] = value(f, "stemflow_stream_received_packets_total", "dc", "b", "stream", "x")
		pout, ok[1] = value(f, "stemflow_stream_sent_packets_total", "dc", "b", "stream", "x")
		bin, ok[2] = value(f, "stemflow_stream_received_bytes_total", "dc", "b", "stream", "x")
		bout, ok[3] = value(f, "stemflow_stream_sent_bytes_total", "dc", "b", "stream", "x")
		if ok != [4]bool{true, true, true, true} {
			t.Fatalf("x at b: received/sent packets/bytes series present: %v, want all", ok)
		}
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(30*time.Second))
	defer cancel()
	url := "http://" + b.HTTPAddr().String() + "/whep/x"
	v1, err := rtctest.View(ctx, rtctest.NewEngine(t), url, rtctest.ViewOptions{CountOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer v1.Close()
	testutil.WaitFor(t, "the first viewer to receive packets", func() bool { return v1.Count() > 50 })
	pin0, pout0, bin0, bout0 := read()
	testutil.WaitFor(t, "x to flow on at b", func() bool { pin, _, _, _ := read(); return pin > pin0+150 })
	pin1, pout1, bin1, bout1 := read()
	if pout1 <= pout0 || bout1 <= bout0 {
		t.Errorf("one viewer: sent packets %v → %v, bytes %v → %v: want growing", pout0, pout1, bout0, bout1)
	}
	if pin1 < pout1 || bin1 < bout1 {
		t.Errorf("one viewer: received %v packets (%v bytes), sent %v (%v bytes): want received ≥ sent", pin1, bin1, pout1, bout1)
	}
	if r := (pout1 - pout0) / (pin1 - pin0); r < 0.9 || r > 1.1 {
		t.Errorf("one viewer: sent/received packets over %v received = %.2f, want about 1", pin1-pin0, r)
	}
	if r := (bout1 - bout0) / (bin1 - bin0); r < 0.9 || r > 1.1 {
		t.Errorf("one viewer: sent/received bytes over %v received = %.2f, want about 1", bin1-bin0, r)
	}

	v2, err := rtctest.View(ctx, rtctest.NewEngine(t), url, rtctest.ViewOptions{CountOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close()
	testutil.WaitFor(t, "the second viewer to receive packets", func() bool { return v2.Count() > 50 })
	pin2, pout2, bin2, bout2 := read()
	testutil.WaitFor(t, "x to flow on at b", func() bool { pin, _, _, _ := read(); return pin > pin2+150 })
	pin3, pout3, bin3, bout3 := read()
	if r := (pout3 - pout2) / (pin3 - pin2); r < 1.8 || r > 2.2 {
		t.Errorf("two viewers: sent/received packets over %v received = %.2f, want about 2", pin3-pin2, r)
	}
	if r := (bout3 - bout2) / (bin3 - bin2); r < 1.8 || r > 2.2 {
		t.Errorf("two viewers: sent/received bytes over %v received = %.2f, want about 2", bin3-bin2, r)
	}

	s := findStream(t, getJSON(t, b, "/api/v1/streams"), "x")
	po, _ := s["packets_out"].(float64)
	bo, _ := s["bytes_out"].(float64)
	if po < pout3 || bo < bout3 {
		t.Errorf("/api/v1/streams x at b: packets_out %v, bytes_out %v (keys %v), want ≥ %v and %v as /metrics said before", s["packets_out"], s["bytes_out"], keys(s), pout3, bout3)
	}
}
