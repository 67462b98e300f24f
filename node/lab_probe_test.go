package node

import (
	"math"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/relay"
	"github.com/stemflow/stemflow/topology/store"
)

// TestLabProbedBandwidth: a lab whose nodes measure bandwidth rather than
// publish the rate caps (probe_bandwidth), a–b at 4 Mbit/s and a–c at
// 20 Mbit/s, 5 ms each way, no stream on them. Once each end has taken its
// first five estimates (a second apart), what etcd has and what the nodes
// hold now are within 25 % of the rates set, both directions.
func TestLabProbedBandwidth(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 120*time.Second)
	l := startLab(t, "datacenters: [a, b, c]\nprobe_bandwidth: true\nlinks:\n"+
		"  - {between: [a, b], delay: 5ms, rate: 4mbit}\n  - {between: [a, c], delay: 5ms, rate: 20mbit}\n")
	s := labStore(t, l)
	want := map[[2]string]float64{{"a", "b"}: 4000, {"b", "a"}: 4000, {"a", "c"}: 20000, {"c", "a"}: 20000}
	start := time.Now()
	stats := func(k [2]string) relay.LinkStats {
		for _, ls := range l.Node(k[0]).Hub().Links() {
			if ls.Peer == k[1] {
				return ls
			}
		}
		return relay.LinkStats{}
	}
	testutil.WaitForWithin(t, 60*time.Second, "five probe estimates on every rated link, each way", func() bool {
		for k := range want {
			if stats(k).ProbeEstimates < 5 {
				return false
			}
		}
		return true
	})
	// etcd has the figure once it moved past hysteresis, at a sample
	// interval (1 s) after the last estimate or later on a busy machine:
	// wait for it, then report every link.
	nodeKbps := func(k [2]string) float64 {
		for _, m := range l.Node(k[0]).Measurements() {
			if m.To == k[1] {
				return m.BandwidthKbps
			}
		}
		return 0
	}
	settled := func() bool {
		for k, kbps := range want {
			ln, found := etcdLink(t, s, k[0], k[1])
			if !found || math.Abs(ln.BandwidthKbps-kbps) > 0.25*kbps || math.Abs(nodeKbps(k)-kbps) > 0.25*kbps {
				return false
			}
		}
		return true
	}
	for deadline := time.Now().Add(testutil.Scale(5 * time.Second)); !settled() && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond)
	}
	for k, kbps := range want {
		ln, found := etcdLink(t, s, k[0], k[1])
		now := nodeKbps(k)
		ls := stats(k)
		t.Logf("after %v: %s→%s set %.0f kbit/s: etcd has %.0f (jitter %.1f ms, loss %.2f %%), the node %.0f; its relay's last of %d estimates %.0f; "+
			"probes sent %d datagrams, %d bytes, %d lost",
			time.Since(start).Round(100*time.Millisecond), k[0], k[1], kbps, ln.BandwidthKbps, ln.JitterMs, ln.Loss*100, now, ls.ProbeEstimates, ls.ProbeKbps,
			ls.ProbeDatagramsSent, ls.ProbeBytesSent, ls.ProbeDatagramsLost)
		if !found || math.Abs(ln.BandwidthKbps-kbps) > 0.25*kbps {
			t.Errorf("%s→%s: etcd has %.0f kbit/s (found %v), set %.0f: want within 25 %%", k[0], k[1], ln.BandwidthKbps, found, kbps)
		}
		if math.Abs(now-kbps) > 0.25*kbps {
			t.Errorf("%s→%s: the node holds %.0f kbit/s, set %.0f: want within 25 %%", k[0], k[1], now, kbps)
		}
	}
	if bc, ok := etcdLink(t, s, "b", "c"); ok {
		t.Logf("b→c (unimpaired loopback) has %.0f kbit/s (jitter %.1f ms); b's relay's last estimate %.0f", bc.BandwidthKbps, bc.JitterMs,
			stats([2]string{"b", "c"}).ProbeKbps)
	}
}

// TestMeterProbes: on an idle link the relay's probe estimates become the
// published bandwidth, smoothed; an estimate the relay has not renewed is
// not counted again; probe datagrams and their losses stay out of the loss
// figure; a configured capacity still wins.
func TestMeterProbes(t *testing.T) {
	f := &fakeLinks{}
	m := newMeter("a", f.links, nil)
	now := time.Unix(1_800_000_000, 0)
	var path quic.ConnectionStats
	var probe relay.LinkStats
	step := func(kbps float64, newEstimate bool, probes, probesLost uint64) []store.Link {
		now = now.Add(time.Second)
		// A few heartbeats and a train of probes, some lost.
		path = fakePath(path, 20*time.Millisecond, 5+probes, probesLost, 1200)
		if newEstimate {
			probe.ProbeEstimates++
			probe.ProbeKbps = kbps
		}
		probe.ProbeDatagramsSent += probes
		probe.ProbeBytesSent += probes * 1200
		probe.ProbeDatagramsLost += probesLost
		ls := probe
		ls.Peer, ls.Path = "b", path
		f.stats = []relay.LinkStats{ls}
		return m.sample(now)
	}
	step(0, false, 0, 0)
	pubs := step(4100, true, 30, 0)
	if len(pubs) != 1 || pubs[0].BandwidthKbps != 4100 {
		t.Fatalf("first probe estimate: published %+v, want 4100 kbit/s", pubs)
	}
	// Estimates around 4000, a train losing 20 of 30 (its bottleneck's
	// queue overflowed): the bandwidth stays near 4000, no loss.
	for i := range 10 {
		step(3900+float64(i%2)*200, true, 30, 20)
	}
	cur := m.measurements()[0]
	if math.Abs(cur.BandwidthKbps-4000) > 200 || cur.Loss != 0 {
		t.Errorf("after noisy estimates and lossy trains: bandwidth %.0f kbit/s, loss %.3f; want about 4000 and 0", cur.BandwidthKbps, cur.Loss)
	}
	// No new estimate: nothing moves.
	for range 5 {
		step(0, false, 0, 0)
	}
	if bw := m.measurements()[0].BandwidthKbps; math.Abs(bw-cur.BandwidthKbps) > 1e-9 {
		t.Errorf("without a new estimate the bandwidth moved from %.0f to %.0f", cur.BandwidthKbps, bw)
	}
	// The link became 20 Mbit/s: the figure follows and is published.
	var got []store.Link
	for range 8 {
		got = append(got, step(20000, true, 30, 0)...)
	}
	if len(got) == 0 || got[len(got)-1].BandwidthKbps < 16000 {
		t.Errorf("estimates of 20000 kbit/s: published %+v", got)
	}

	// A configured capacity wins over probes.
	f2 := &fakeLinks{}
	m2 := newMeter("a", f2.links, func(string) int64 { return 8_000_000 })
	path = quic.ConnectionStats{}
	for i := range 3 {
		path = fakePath(path, 10*time.Millisecond, 40, 0, 1200)
		f2.stats = []relay.LinkStats{{Peer: "b", Path: path, ProbeKbps: 3000, ProbeEstimates: uint64(i + 1)}}
		m2.sample(time.Unix(int64(i), 0))
	}
	if bw := m2.measurements()[0].BandwidthKbps; bw != 8000 {
		t.Errorf("configured 8 Mbit/s and probes of 3: bandwidth %v, want 8000", bw)
	}
}
