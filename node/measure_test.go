package node

import (
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/stemflow/stemflow/relay"
	"github.com/stemflow/stemflow/topology/store"
)

// fakeLinks feeds a meter link counters a test sets.
type fakeLinks struct{ stats []relay.LinkStats }

func (f *fakeLinks) links() []relay.LinkStats { return f.stats }

// fakePath is one interval's worth of traffic on top of p: sent packets of
// size bytes, lost of them declared lost.
func fakePath(p quic.ConnectionStats, rtt time.Duration, sent, lost, size uint64) quic.ConnectionStats {
	p.SmoothedRTT = rtt
	p.MeanDeviation = rtt / 20
	p.PacketsSent += sent
	p.PacketsLost += lost
	p.BytesSent += sent * size
	p.BytesLost += lost * size
	return p
}

// TestMeterHysteresis drives the meter with counters of a link whose RTT
// wobbles by ±3 %, then jumps; whose loss goes from 0 to 2 %; which goes
// down and up; and checks what the meter publishes: the first figures, no
// write for noise within hysteresis, a write for each real change, the
// refresh after 30 s, and the link down at once.
func TestMeterHysteresis(t *testing.T) {
	f := &fakeLinks{}
	m := newMeter("a", f.links, nil)
	now := time.Unix(1_800_000_000, 0)
	var path quic.ConnectionStats
	var queueDropped uint64
	step := func(rtt time.Duration, sent, lost uint64) []store.Link {
		now = now.Add(time.Second)
		path = fakePath(path, rtt, sent, lost, 1200)
		f.stats = []relay.LinkStats{{Peer: "b", RTT: rtt, Path: path, QueueDropped: queueDropped}}
		return m.sample(now)
	}
	pubs := step(100*time.Millisecond, 300, 0)
	if len(pubs) != 1 || pubs[0].From != "a" || pubs[0].To != "b" || pubs[0].RTTMs != 100 || pubs[0].Down {
		t.Fatalf("first sample published %+v, want a→b at 100 ms", pubs)
	}
	// Noise within ±3 %: nothing to publish for 20 s.
	for i := range 20 {
		rtt := 100 * time.Millisecond
		if i%2 == 0 {
			rtt = 103 * time.Millisecond
		} else {
			rtt = 97 * time.Millisecond
		}
		if p := step(rtt, 300, 0); len(p) != 0 {
			t.Fatalf("sample %d (RTT %v) published %+v: noise within hysteresis", i, rtt, p)
		}
	}
	// RTT 150 ms: published within a few samples, near 150.
	var got []store.Link
	for range 5 {
		got = append(got, step(150*time.Millisecond, 300, 0)...)
	}
	if len(got) == 0 || got[len(got)-1].RTTMs < 135 {
		t.Fatalf("RTT moved to 150 ms: published %+v", got)
	}
	// 2 % loss (6 of 300 per second): published, near 0.02.
	got = nil
	for range 8 {
		got = append(got, step(150*time.Millisecond, 300, 6)...)
	}
	if len(got) == 0 || got[len(got)-1].Loss < 0.01 {
		t.Fatalf("loss moved to 2 %%: published %+v", got)
	}
	// The link was never saturated: its bandwidth is unknown (0), not
	// the rate it happens to carry.
	if bw := got[len(got)-1].BandwidthKbps; bw != 0 {
		t.Errorf("an unsaturated link published bandwidth %v kbit/s, want 0 (unknown)", bw)
	}
	// Saturated (its send queue drops): the delivery rate is what it can
	// carry, published.
	got = nil
	for range 3 {
		queueDropped += 50
		got = append(got, step(150*time.Millisecond, 300, 6)...)
	}
	if len(got) == 0 {
		t.Fatal("a saturated link published no bandwidth")
	}
	if bw := got[len(got)-1].BandwidthKbps; bw < 2500 || bw > 3000 {
		t.Errorf("saturated link: bandwidth %v kbit/s, want the delivery rate, about 294×1200×8/1000 = 2822", bw)
	}
	// Idle (a handful of packets): loss and bandwidth keep their figures.
	for range 5 {
		step(150*time.Millisecond, 3, 1)
	}
	cur := m.measurements()[0]
	if cur.Loss < 0.01 || cur.Loss > 0.03 || cur.BandwidthKbps < 2500 {
		t.Errorf("an idle link's figures moved: %+v", cur)
	}
	// The refresh: 30 s after the last write even without change.
	got = nil
	for range 31 {
		got = append(got, step(150*time.Millisecond, 300, 6)...)
	}
	if len(got) == 0 {
		t.Error("no refresh in 31 s")
	}
	// Down: published at once; up again: published at once.
	f.stats = nil
	now = now.Add(time.Second)
	if p := m.sample(now); len(p) != 1 || !p[0].Down {
		t.Fatalf("link gone: published %+v, want it down", p)
	}
	path = quic.ConnectionStats{} // a new connection's counters start at 0
	if p := step(150*time.Millisecond, 300, 0); len(p) != 1 || p[0].Down {
		t.Fatalf("link back: published %+v, want it up", p)
	}
	// Silent (its connection still open, the neighbour dead for the
	// relay): down at once; heard again: up at once.
	f.stats[0].Silent = true
	now = now.Add(time.Second)
	if p := m.sample(now); len(p) != 1 || !p[0].Down {
		t.Fatalf("neighbour silent: published %+v, want the link down", p)
	}
	if p := step(150*time.Millisecond, 300, 0); len(p) != 1 || p[0].Down {
		t.Fatalf("neighbour heard again: published %+v, want it up", p)
	}
}

// TestMeterCapacity: a configured capacity is published as the bandwidth,
// whatever the link carries.
func TestMeterCapacity(t *testing.T) {
	f := &fakeLinks{}
	m := newMeter("a", f.links, func(peer string) int64 { return map[string]int64{"b": 4_000_000}[peer] })
	var path quic.ConnectionStats
	for i := range 3 {
		path = fakePath(path, 10*time.Millisecond, 300, 0, 1200)
		f.stats = []relay.LinkStats{{Peer: "b", Path: path}}
		m.sample(time.Unix(int64(i), 0))
	}
	if bw := m.measurements()[0].BandwidthKbps; bw != 4000 {
		t.Errorf("bandwidth %v kbit/s, want the configured 4000", bw)
	}
}
