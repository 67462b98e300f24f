package node

import (
	"context"
	"math"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/stemflow/stemflow/relay"
	"github.com/stemflow/stemflow/topology/store"
)

// Link measurement. Every interval the node reads each overlay link's
// counters (relay.LinkStats, with quic-go's connection statistics) and
// derives, for the direction it sends on:
//
//   - RTT: quic-go's smoothed RTT (RFC 9002), smoothed once more;
//   - jitter: the interarrival jitter (RFC 3550) of this node's heartbeats
//     at the neighbour, which reports it back in its own heartbeats
//     (relay/heartbeat.go), smoothed; quic-go's RTT mean deviation only
//     until the neighbour reported (it also counts ACK delays and queueing
//     behind media: 23–104 ms on lab links with no jitter set). A
//     heartbeat waits in quic-go's datagram queue like media does, so on
//     a link whose congestion window holds media back (loss on a long
//     link) the figure includes that wait: the variation media sees;
//   - loss: packets quic-go declared lost over packets sent in the interval
//     (the sending end's view of what it sends: acknowledgements tell it),
//     counted only in intervals that sent at least minLossSample packets,
//     so that an idle link keeps its last figure instead of noise. Probe
//     datagrams, and those of them the neighbour reported missing, are
//     left out: a train that overflows a bottleneck's queue is no loss
//     media meets;
//   - bandwidth (what the link can carry in all, as the manager's trees
//     take it: they subtract their own load): the link's configured
//     capacity when one is set (overlay.capacity; the lab's rate caps
//     unless its profile has probe_bandwidth). Otherwise it is measured:
//     under load, when the link is saturated — its send queue dropped
//     packets in the interval, so quic-go's congestion control delivered
//     all it could — by the delivery rate then (bytes sent minus bytes lost
//     per second, probes left out); when idle, by the relay's probe trains
//     (relay/probe.go: a train's dispersion at the receiver, a few seconds
//     apart, only while the link carries under a fifth of its estimate;
//     a link faster than a train can time, ~100 Mbit/s, goes back to 0).
//     Both are smoothed into one figure, raised whenever the link delivers
//     more without dropping. A link neither saturated nor probed (a long
//     idle link whose congestion window paces a train below its rate) has
//     bandwidth 0, which the trees read as unknown (unlimited). Publishing
//     the delivery rate of an unsaturated link would tell the manager the
//     link is full when it only carries what its trees send.
//
// Figures are smoothed with an EWMA and published to etcd (links/{from}/{to},
// leased by the node) only when they move beyond hysteresis, or every
// refreshEvery, or when the link goes down or comes back. A link is down
// when it is gone, and also while its neighbour is silent (no sign of life
// for the relay's DeadAfter, 300 ms: relay/heartbeat.go), so that the
// manager routes around a dead node at the next sample, not when its lease
// or QUIC connection expires.
const (
	rttAlpha      = 0.5
	lossAlpha     = 0.3
	bwAlpha       = 0.3
	minLossSample = 20
	loadedKbps    = 100
	refreshEvery  = 30 * time.Second
)

// Hysteresis: a new figure is published only past these.
const (
	rttChange     = 0.10  // ±10 % …
	rttChangeMin  = 1.0   // … and at least 1 ms
	lossChange    = 0.005 // ±0.5 point
	bwChange      = 0.20  // ±20 %
	jitterChange  = 0.50  // ±50 % …
	jitterChangeM = 2.0   // … and at least 2 ms
)

// meter keeps the smoothed figures of every link of one node.
type meter struct {
	dc        string
	readLinks func() []relay.LinkStats // the hub's Links
	capacity  func(peer string) int64  // configured, bits per second; 0: none

	mu    sync.Mutex // guards links
	links map[string]*linkMeter
}

// linkMeter is one link's state.
type linkMeter struct {
	last   relay.LinkStats
	lastAt time.Time
	have   bool // last is a sample of the current connection

	cur       store.Link // smoothed, as it stands now
	lossKnown bool
	bwKnown   bool

	pub   store.Link // as last published
	pubAt time.Time
	dirty bool // publish at the next chance (new, down, up, registered again)
}

func newMeter(dc string, links func() []relay.LinkStats, capacity func(peer string) int64) *meter {
	if capacity == nil {
		capacity = func(string) int64 { return 0 }
	}
	return &meter{dc: dc, readLinks: links, capacity: capacity, links: map[string]*linkMeter{}}
}

func ewma(old, sample, alpha float64) float64 { return old + alpha*(sample-old) }

// sample reads every link once and updates the smoothed figures. It
// returns the links due for publication.
func (m *meter) sample(now time.Time) []store.Link {
	stats := m.readLinks()
	caps := make(map[string]int64, len(stats))
	for _, ls := range stats {
		caps[ls.Peer] = m.capacity(ls.Peer)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	up := map[string]bool{}
	var due []store.Link
	for _, ls := range stats {
		if ls.Silent {
			continue // down, below: it is dead for the relay already
		}
		up[ls.Peer] = true
		lm := m.links[ls.Peer]
		if lm == nil {
			lm = &linkMeter{dirty: true}
			lm.cur = store.Link{From: m.dc, To: ls.Peer, FromNode: m.dc, ToNode: ls.Peer}
			m.links[ls.Peer] = lm
		}
		if lm.cur.Down {
			lm.cur.Down, lm.dirty, lm.have = false, true, false
		}
		// A reconnected link's counters start from 0 again.
		if lm.have && (ls.Path.PacketsSent < lm.last.Path.PacketsSent || ls.Path.BytesSent < lm.last.Path.BytesSent) {
			lm.have = false
		}
		m.update(lm, ls, caps[ls.Peer], now)
		lm.last, lm.lastAt, lm.have = ls, now, true
		if lm.due(now) {
			due = append(due, lm.publishLocked(now))
		}
	}
	for peer, lm := range m.links {
		if !up[peer] && !lm.cur.Down {
			lm.cur.Down, lm.have, lm.dirty = true, false, true
		}
		if !up[peer] && lm.due(now) {
			due = append(due, lm.publishLocked(now))
		}
	}
	return due
}

// update folds one sample into lm's smoothed figures.
func (m *meter) update(lm *linkMeter, ls relay.LinkStats, capBps int64, now time.Time) {
	rtt := float64(ls.Path.SmoothedRTT) / float64(time.Millisecond)
	dev := float64(ls.Path.MeanDeviation) / float64(time.Millisecond)
	if ls.Jitter >= 0 {
		dev = float64(ls.Jitter) / float64(time.Millisecond)
	}
	if lm.cur.RTTMs == 0 {
		lm.cur.RTTMs, lm.cur.JitterMs = rtt, dev
	} else if rtt > 0 {
		lm.cur.RTTMs = ewma(lm.cur.RTTMs, rtt, rttAlpha)
		lm.cur.JitterMs = ewma(lm.cur.JitterMs, dev, rttAlpha)
	}
	if capBps > 0 {
		lm.cur.BandwidthKbps, lm.bwKnown = float64(capBps)/1000, true
	}
	if !lm.have {
		return
	}
	dt := now.Sub(lm.lastAt).Seconds()
	probes := float64(ls.ProbeDatagramsSent) - float64(lm.last.ProbeDatagramsSent)
	probesLost := float64(ls.ProbeDatagramsLost) - float64(lm.last.ProbeDatagramsLost)
	sent := float64(ls.Path.PacketsSent) - float64(lm.last.Path.PacketsSent) - probes
	// quic-go's lost counters can go down (a packet declared lost arrives
	// after all): count the interval's net loss, never below 0.
	lost := max(0, float64(ls.Path.PacketsLost)-float64(lm.last.Path.PacketsLost)-probesLost)
	if sent >= minLossSample {
		frac := min(1, lost/sent)
		if !lm.lossKnown {
			lm.cur.Loss, lm.lossKnown = frac, true
		} else {
			lm.cur.Loss = ewma(lm.cur.Loss, frac, lossAlpha)
		}
	}
	if capBps > 0 || dt <= 0 {
		return
	}
	bytes := float64(ls.Path.BytesSent) - float64(lm.last.Path.BytesSent) -
		max(0, float64(ls.Path.BytesLost)-float64(lm.last.Path.BytesLost)) -
		(float64(ls.ProbeBytesSent) - float64(lm.last.ProbeBytesSent))
	kbps := max(0, bytes) * 8 / 1000 / dt
	saturated := ls.QueueDropped > lm.last.QueueDropped && kbps >= loadedKbps
	probed := ls.ProbeEstimates > lm.last.ProbeEstimates
	switch {
	case saturated && !lm.bwKnown:
		lm.cur.BandwidthKbps, lm.bwKnown = kbps, true
	case saturated:
		lm.cur.BandwidthKbps = ewma(lm.cur.BandwidthKbps, kbps, bwAlpha)
	case probed && ls.ProbeKbps <= 0:
		// Faster than a probe train can time: unknown (unlimited).
		lm.cur.BandwidthKbps, lm.bwKnown = 0, false
	case probed && !lm.bwKnown:
		lm.cur.BandwidthKbps, lm.bwKnown = ls.ProbeKbps, true
	case probed:
		lm.cur.BandwidthKbps = ewma(lm.cur.BandwidthKbps, ls.ProbeKbps, bwAlpha)
	case lm.bwKnown && kbps > lm.cur.BandwidthKbps:
		lm.cur.BandwidthKbps = kbps // it carried more without dropping
	}
}

// due reports whether lm's figures should be published now.
func (lm *linkMeter) due(now time.Time) bool {
	if lm.dirty || now.Sub(lm.pubAt) >= refreshEvery {
		return true
	}
	c, p := lm.cur, lm.pub
	if c.Down != p.Down {
		return true
	}
	if math.Abs(c.RTTMs-p.RTTMs) > max(rttChange*p.RTTMs, rttChangeMin) {
		return true
	}
	if math.Abs(c.JitterMs-p.JitterMs) > max(jitterChange*p.JitterMs, jitterChangeM) {
		return true
	}
	if math.Abs(c.Loss-p.Loss) > lossChange {
		return true
	}
	if (p.BandwidthKbps == 0) != (c.BandwidthKbps == 0) || math.Abs(c.BandwidthKbps-p.BandwidthKbps) > bwChange*p.BandwidthKbps {
		return true
	}
	return false
}

// publishLocked records lm's figures as published and returns them.
func (lm *linkMeter) publishLocked(now time.Time) store.Link {
	l := lm.cur
	l.RTTMs = math.Round(l.RTTMs*1000) / 1000
	l.JitterMs = math.Round(l.JitterMs*1000) / 1000
	l.Loss = math.Round(l.Loss*10000) / 10000
	l.BandwidthKbps = math.Round(l.BandwidthKbps)
	l.Updated = now.UTC()
	lm.pub, lm.pubAt, lm.dirty = l, now, false
	return l
}

// unpublish marks links as not published (their write failed, or the node
// registered again): they go out at the next sample.
func (m *meter) unpublish(peers ...string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for p, lm := range m.links {
		if len(peers) == 0 || slices.Contains(peers, p) {
			lm.dirty = true
		}
	}
}

// measurements returns the smoothed figures of every link, sorted by peer.
func (m *meter) measurements() []store.Link {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]store.Link, 0, len(m.links))
	for _, lm := range m.links {
		l := lm.cur
		l.Updated = lm.lastAt.UTC()
		out = append(out, l)
	}
	slices.SortFunc(out, func(a, b store.Link) int { return strings.Compare(a.To, b.To) })
	return out
}

// runMeasurements samples the links every interval and publishes what is
// due while the node is registered.
func (c *control) runMeasurements(every time.Duration) {
	defer c.wg.Done()
	tick := time.NewTicker(every)
	defer tick.Stop()
	var lastReg *store.Registration
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-tick.C:
		}
		reg, _ := c.registration()
		if reg != lastReg {
			c.meter.unpublish() // a new lease: every link again
			c.rates.unpublish()
			lastReg = reg
		}
		c.publishRates(reg)
		due := c.meter.sample(time.Now())
		if reg == nil {
			if len(due) > 0 {
				c.meter.unpublish()
			}
			continue
		}
		var failed []string
		for _, l := range due {
			ctx, cancel := context.WithTimeout(c.ctx, opTimeout)
			err := c.putLink(ctx, reg, l)
			cancel()
			if err != nil {
				failed = append(failed, l.To)
				c.log.Debug("publishing a link measurement failed; retrying at the next sample", "peer", l.To, "err", err)
			}
		}
		if len(failed) > 0 {
			c.meter.unpublish(failed...)
		}
	}
}

// putLink writes one measured link, leased by the node.
func (c *control) putLink(ctx context.Context, reg *store.Registration, l store.Link) error {
	return c.st.PutLink(ctx, reg, l)
}

// publishRates writes the bitrates of the streams published here that are
// due, while registered.
func (c *control) publishRates(reg *store.Registration) {
	due := c.rates.sample(time.Now())
	if reg == nil {
		if len(due) > 0 {
			c.rates.unpublish()
		}
		return
	}
	for _, r := range due {
		ctx, cancel := context.WithTimeout(c.ctx, opTimeout)
		err := c.st.SetStreamBitrate(ctx, reg, r.name, r.kbps)
		cancel()
		if err != nil {
			// Not claimed yet (etcd was away), or etcd trouble: again at
			// the next sample.
			c.log.Debug("publishing a stream's bitrate failed; retrying at the next sample", "stream", r.name, "err", err)
			c.rates.unpublish(r.name)
		}
	}
}
