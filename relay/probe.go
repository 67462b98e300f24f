package relay

import (
	"context"
	"encoding/binary"
	"errors"
	"math"
	"time"

	"github.com/quic-go/quic-go"
)

// Bandwidth probes: what an idle link could carry. Under load, node's
// link meter takes the delivery rate of a saturated link; a link that
// carries little says nothing about its capacity, so its sender measures
// it now and then with a packet train.
//
// The link's media sender (linksend.go), when no media waits, sends a train
// of padding datagrams (type 2, wire.go) back to back, each as large as a
// datagram may be. A bottleneck on the way forwards them one after another
// at its rate, so they arrive spaced by it: the receiver notes when each
// arrives and reports the train's dispersion back in a datagram: the bytes
// after the first and the time they took, by the lower envelope of arrival
// time over bytes (robust to datagrams handed over late). The
// sender turns the reports into an estimate, the median of the last three
// trains' rates: LinkStats' ProbeKbps, which the node publishes as the
// link's bandwidth when nothing better is known.
//
// Sizing. A train must outlast the bottleneck's burst and the receiver's
// timer noise (netem and quic-go deliver in batches a millisecond or more
// apart on a busy machine) to show the rate, and fit in its queue, or it
// loses its tail and costs the link congestion window: it is sized to
// probeTrainTime (40 ms) at the last estimate, 16 datagrams before the
// first, 8 to 96 datagrams (the receiver's quic-go queue holds 128), at
// most three quarters of quic-go's congestion window (beyond it the tail
// waits a round trip for acknowledgements and the dispersion measures
// that), half as long after a train that lost more than a tenth, and twice
// as long after one that arrived within probeMinSpan (10 ms), too fast to
// time. A train that could be no longer and still arrived that fast says
// the link is faster than probes tell: its estimate is 0, unknown, which
// the trees plan as unlimited. With 96 datagrams that is about 100 Mbit/s;
// less while the congestion window is small (an idle connection starts at
// 32 packets, and trains themselves open it).
//
// Cost. A train is 40 ms of the link's rate within the congestion window:
// measured in the lab, ~20 KB a train at 4 Mbit/s, 40–100 KB at 20 Mbit/s
// as the window opens, at most 96 datagrams (~130 KB). One every
// probeEvery (5 s) is at most 0.8 % of the link: 240 KB a minute at
// 4 Mbit/s, up to 1.2 MB a minute at 20 Mbit/s. A link too fast to time
// is probed every probeFastEvery (30 s): 260 KB a minute. The first five
// go a second apart, so that a new link is known within seconds. Media
// sharing the bottleneck with a train (a link under a fifth of its
// estimate) may wait behind it, up to its 40 ms.
//
// Keeping away from media. Probes go only from the media sender's goroutine
// when none of the link's queues holds a packet, stop mid-train as soon as
// one does (media waits behind at most quic-go's datagram queue, 32
// datagrams), and not at all when the link carried more than a fifth of its
// estimate since the last probe (1 Mbit/s before any estimate): a link
// loaded near its capacity is measured by its delivery rate instead. Their
// datagrams lost are counted (LinkStats.ProbeDatagramsLost) so that the
// node's loss figure leaves them out, and heartbeats that arrive within
// 10 ms of a train's datagram (they queued behind it) are no jitter sample:
// in the lab, a–b at 4 Mbit/s showed 1.5–2.9 ms of jitter with probes
// during their first seconds, 0.3–0.4 ms with this, as without probes.
//
// Limits. QUIC's congestion control paces the train: quic-go sends at most
// about twice its congestion window per round trip. A train that arrives
// at more than 0.8 × window / min RTT may show the sender's pace rather than
// the link's, and is not taken as an estimate: an idle link with a large
// bandwidth-delay product (e.g. 20 Mbit/s at 150 ms) stays unmeasured until
// load shows its rate. A train measures the hosts' own pace too: on an
// unimpaired loopback link a busy machine showed 28–140 Mbit/s (under the
// race detector and without), which passes for the link's.
const (
	probeFirstAfter     = time.Second
	probeWarmEvery      = time.Second
	probeWarmup         = 5 // estimates taken probeWarmEvery apart
	probeEvery          = 5 * time.Second
	probeFastEvery      = 30 * time.Second // once a link is too fast to time
	probeTrainTime      = 40 * time.Millisecond
	probeFirstDatagrams = 16
	probeMinDatagrams   = 8
	probeMaxDatagrams   = 96
	probeIdleShare      = 0.2
	probeIdleKbps       = 1000
	probeSenderBound    = 0.8
	probeMinSpan        = 10 * time.Millisecond
	probeFitPoints      = 128
	// probeOverhead is what quic-go adds around a datagram's payload
	// (short header, datagram frame, AEAD tag; see minDatagramPayload): a
	// bottleneck carries it too, and the link's bandwidth counts it, as
	// its delivery rate does.
	probeOverhead = 37

	probeKindTrain  = 0
	probeKindReport = 1
	probeTrainLen   = 10 // header of a train datagram
	probeReportLen  = 18
)

// probeHeader is the header of a train datagram.
type probeHeader struct {
	Train        uint32
	Index, Count uint16
}

// probeReport is the receiver's account of one train.
type probeReport struct {
	Train     uint32
	Got, Sent uint16
	Bytes     uint32        // received after the first datagram, payload
	Span      time.Duration // first to last arrival, in microseconds on the wire
}

func isProbe(b []byte) bool { return len(b) >= 2 && b[0] == wireVersion<<4|dgramProbe }

// appendProbeTrain appends one train datagram of size bytes (at least the
// header) to b.
func appendProbeTrain(b []byte, h probeHeader, size int) []byte {
	b = append(b, wireVersion<<4|dgramProbe, probeKindTrain)
	b = binary.BigEndian.AppendUint32(b, h.Train)
	b = binary.BigEndian.AppendUint16(b, h.Index)
	b = binary.BigEndian.AppendUint16(b, h.Count)
	return append(b, make([]byte, max(0, size-probeTrainLen))...)
}

func appendProbeReport(b []byte, r probeReport) []byte {
	b = append(b, wireVersion<<4|dgramProbe, probeKindReport)
	b = binary.BigEndian.AppendUint32(b, r.Train)
	b = binary.BigEndian.AppendUint16(b, r.Got)
	b = binary.BigEndian.AppendUint16(b, r.Sent)
	b = binary.BigEndian.AppendUint32(b, r.Bytes)
	us := min(r.Span.Microseconds(), math.MaxUint32)
	return binary.BigEndian.AppendUint32(b, uint32(us))
}

var errBadProbe = errors.New("malformed probe datagram")

// parseProbe decodes a probe datagram: a train datagram (report is false)
// or a report.
func parseProbe(b []byte) (h probeHeader, r probeReport, report bool, err error) {
	if !isProbe(b) {
		return h, r, false, errBadProbe
	}
	switch b[1] {
	case probeKindTrain:
		if len(b) < probeTrainLen {
			return h, r, false, errBadProbe
		}
		h = probeHeader{Train: binary.BigEndian.Uint32(b[2:]), Index: binary.BigEndian.Uint16(b[6:]), Count: binary.BigEndian.Uint16(b[8:])}
		if h.Count == 0 || h.Index >= h.Count {
			return h, r, false, errBadProbe
		}
		return h, r, false, nil
	case probeKindReport:
		if len(b) != probeReportLen {
			return h, r, true, errBadProbe
		}
		r = probeReport{Train: binary.BigEndian.Uint32(b[2:]), Got: binary.BigEndian.Uint16(b[6:]), Sent: binary.BigEndian.Uint16(b[8:]),
			Bytes: binary.BigEndian.Uint32(b[10:]), Span: time.Duration(binary.BigEndian.Uint32(b[14:])) * time.Microsecond}
		if r.Got > r.Sent {
			return h, r, true, errBadProbe
		}
		return h, r, true, nil
	}
	return h, r, false, errBadProbe
}

// probeReceiver times the trains arriving on a link. It is owned by the
// link's datagram reader, which takes the arrival times as close to the
// wire as the node gets.
type probeReceiver struct {
	active   bool
	cur      probeReport // the train arriving
	first    time.Time
	done     uint32 // the last train reported
	reported bool   // done is set
	// The arrivals: bytes on the wire before each datagram, and its time
	// after the first, in seconds (the first probeFitPoints).
	xs, ts [probeFitPoints]float64
	n      int
	x      float64
	hull   [probeFitPoints]int // scratch for finish
	// quietUntil: heartbeats arriving before it queued behind a train.
	quietUntil time.Time
}

// probeQueueAfter is how long after a train's datagram a heartbeat may
// still arrive late for having queued behind the train.
const probeQueueAfter = 10 * time.Millisecond

// delays reports whether a datagram arriving now may have waited behind a
// probe train (at the bottleneck, or in the sender's quic-go queue): the
// heartbeats' jitter meter leaves it out.
func (pr *probeReceiver) delays(now time.Time) bool { return now.Before(pr.quietUntil) }

// add records one train datagram of size bytes arriving at now. It returns
// a report when a train is complete: its last datagram arrived, or one of a
// later train (the earlier one lost its tail, or was cut short).
func (pr *probeReceiver) add(h probeHeader, size int, now time.Time) (rep probeReport, ok bool) {
	if pr.reported && int32(h.Train-pr.done) <= 0 {
		return rep, false // a train already reported
	}
	if pr.active && h.Train != pr.cur.Train {
		rep, ok = pr.finish()
	}
	if !pr.active {
		pr.active = true
		pr.cur = probeReport{Train: h.Train, Sent: h.Count, Got: 1}
		pr.first, pr.n, pr.x = now, 0, 0
	} else {
		pr.cur.Got++
		pr.cur.Bytes += uint32(size)
	}
	if pr.n < len(pr.xs) {
		pr.xs[pr.n], pr.ts[pr.n] = pr.x, now.Sub(pr.first).Seconds()
		pr.n++
	}
	pr.x += float64(size + probeOverhead)
	pr.quietUntil = now.Add(probeQueueAfter)
	if h.Index == h.Count-1 {
		rep, ok = pr.finish()
	}
	return rep, ok
}

// finish reports the train. Its span is the time the bytes after the first
// datagram took by the lower envelope of arrival time over bytes: a
// datagram can arrive late (timers fire late on a busy machine and hand
// over a batch at once, a reader is not scheduled) but never early, so the
// datagrams that came on time lie on the lower convex hull of the
// arrivals, and the hull's edge over the train's middle (the line below
// every arrival that is highest there) has the bottleneck's pace as its
// slope. A least-squares fit, or the first-to-last time, takes the
// lateness of the first datagrams for a faster link.
func (pr *probeReceiver) finish() (probeReport, bool) {
	rep := pr.cur
	pr.active, pr.done, pr.reported = false, rep.Train, true
	n := pr.n
	if n < 2 {
		return rep, true
	}
	hull := pr.hull[:0]
	var mx float64
	for i := range n {
		mx += pr.xs[i]
		for len(hull) >= 2 {
			o, a := hull[len(hull)-2], hull[len(hull)-1]
			cross := (pr.xs[a]-pr.xs[o])*(pr.ts[i]-pr.ts[o]) - (pr.ts[a]-pr.ts[o])*(pr.xs[i]-pr.xs[o])
			if cross > 0 {
				break
			}
			hull = hull[:len(hull)-1]
		}
		hull = append(hull, i)
	}
	mx /= float64(n)
	for k := 0; k+1 < len(hull); k++ {
		i, j := hull[k], hull[k+1]
		if pr.xs[j] < mx && k+2 < len(hull) {
			continue
		}
		if slope := (pr.ts[j] - pr.ts[i]) / (pr.xs[j] - pr.xs[i]); slope > 0 {
			after := float64(rep.Bytes) + float64(rep.Got-1)*probeOverhead
			rep.Span = time.Duration(slope * after * float64(time.Second))
		}
		break
	}
	return rep, true
}

// probeRate is the rate a report shows, in kbit/s counting QUIC's overhead
// per datagram, or 0 when it shows none (fewer than 4 datagrams, or no
// time between them).
func probeRate(r probeReport) float64 {
	if r.Got < 4 || r.Span <= 0 {
		return 0
	}
	bytes := float64(r.Bytes) + float64(r.Got-1)*probeOverhead
	return bytes * 8 / 1000 / r.Span.Seconds()
}

// prober is the sending side: when a link is due a train, how long it is,
// and what the reports make of them. It is owned by the link's media
// sender goroutine.
type prober struct {
	stats func() quic.ConnectionStats // nil: no probes (a link without a connection)
	timer *time.Timer

	train     uint32 // id of the last train sent
	sent      uint16 // its datagrams sent
	answered  bool   // its report arrived
	senderMax float64
	scale     float64 // shortens trains after lossy ones
	boost     float64 // lengthens them after ones too short to time
	capped    bool    // the last train was as long as a train may be
	estimate  float64 // kbit/s, the median of the last three trains'; 0 before any
	recent    []float64
	estimates int
	fast      int // trains in a row too fast to time at their longest

	lastAt             time.Time
	lastBytes, ownLast uint64 // the connection's bytes sent, and the probes', at lastAt
	ownBytes           uint64 // bytes of probe datagrams sent, in all
}

func (p *prober) init(stats func() quic.ConnectionStats) {
	p.stats, p.scale, p.boost = stats, 1, 1
	if stats != nil {
		p.timer = time.NewTimer(probeFirstAfter)
	}
}

// due is the channel on which the next probe's time comes; nil without
// probes.
func (p *prober) due() <-chan time.Time {
	if p.timer == nil {
		return nil
	}
	return p.timer.C
}

func (p *prober) stop() {
	if p.timer != nil {
		p.timer.Stop()
	}
}

func (p *prober) rearm() {
	every := probeEvery
	switch {
	case p.estimates < probeWarmup:
		every = probeWarmEvery
	case p.fast >= 3:
		every = probeFastEvery
	}
	p.timer.Reset(every)
}

// plan decides whether a train goes now and how many datagrams of size
// bytes it has (0: none). The caller sends it and calls sent.
func (p *prober) plan(now time.Time, size int) int {
	st := p.stats()
	busy := false
	if !p.lastAt.IsZero() {
		if dt := now.Sub(p.lastAt).Seconds(); dt > 0 {
			other := float64(st.BytesSent-p.lastBytes) - float64(p.ownBytes-p.ownLast)
			limit := float64(probeIdleKbps)
			if p.estimate > 0 {
				limit = probeIdleShare * p.estimate
			}
			busy = other*8/1000/dt > limit
		}
	}
	p.lastAt, p.lastBytes, p.ownLast = now, st.BytesSent, p.ownBytes
	if busy {
		return 0
	}
	wire := float64(size + probeOverhead)
	n := float64(probeFirstDatagrams)
	if p.estimate > 0 {
		n = p.estimate * 1000 / 8 * probeTrainTime.Seconds() / wire
	}
	n *= p.scale * p.boost
	limit := float64(probeMaxDatagrams)
	if st.CongestionWindow > 0 {
		limit = min(limit, float64(st.CongestionWindow)*3/4/wire)
	}
	p.capped = n >= limit
	count := int(max(min(n, limit), probeMinDatagrams))
	// What quic-go may send at: a train faster than this shows its pace.
	p.senderMax = 0
	if st.MinRTT > 0 && st.CongestionWindow > 0 {
		p.senderMax = float64(st.CongestionWindow) * 8 / 1000 / st.MinRTT.Seconds()
	}
	p.train++
	p.sent, p.answered = 0, false
	return count
}

// sentTrain records the datagrams of the train that went.
func (p *prober) sentTrain(datagrams uint16, bytes uint64) {
	p.sent = datagrams
	p.ownBytes += bytes
}

// report folds the receiver's report on a train into the estimate. It
// returns the estimate when the report gives one (0: the link is faster
// than a train can time), and how many of the train's datagrams were lost.
func (p *prober) report(r probeReport) (kbps float64, lost uint64, ok bool) {
	if r.Train != p.train || p.answered || p.sent == 0 {
		return 0, 0, false // an old train's, or twice
	}
	p.answered = true
	if r.Got < p.sent {
		lost = uint64(p.sent - r.Got)
	}
	if lost*10 > uint64(p.sent) {
		p.scale = max(0.25, p.scale/2)
	} else {
		p.scale = min(1, p.scale*2)
	}
	if r.Got >= 4 && r.Span < probeMinSpan {
		// Too fast to time: a longer train next, or, when it could be no
		// longer, the link is faster than probes tell (unknown, 0).
		if !p.capped {
			p.boost = min(8, p.boost*2)
			return 0, lost, false
		}
		// Three in a row: one may be a batch of late timers.
		if p.fast++; p.fast < 3 {
			return 0, lost, false
		}
		p.estimate, p.recent = 0, p.recent[:0]
		p.estimates++
		return 0, lost, true
	}
	p.fast = 0
	kbps = probeRate(r)
	if kbps <= 0 || p.senderMax > 0 && kbps >= probeSenderBound*p.senderMax {
		return 0, lost, false // no rate, or maybe quic-go's pace
	}
	// The median of the last three: one train timed badly does not move
	// the estimate.
	if len(p.recent) == 3 {
		p.recent = append(p.recent[:0], p.recent[1:]...)
	}
	p.recent = append(p.recent, kbps)
	p.estimate, p.boost = median3(p.recent), 1
	p.estimates++
	return p.estimate, lost, true
}

// median3 is the median of one to three values (of two, their mean).
func median3(v []float64) float64 {
	switch len(v) {
	case 1:
		return v[0]
	case 2:
		return (v[0] + v[1]) / 2
	}
	return max(min(v[0], v[1]), min(max(v[0], v[1]), v[2]))
}

// handleProbe handles a probe datagram on the datagram reader: a train's
// datagram is timed, a report goes to the media sender. Neither waits.
func (l *quicLink) handleProbe(b []byte) {
	h, r, report, err := parseProbe(b)
	if err != nil {
		l.malformed.Add(1)
		return
	}
	if report {
		select {
		case l.tx.probeIn <- r:
		default:
		}
		return
	}
	if rep, ok := l.probeRx.add(h, len(b), time.Now()); ok {
		select {
		case l.tx.probeOut <- rep:
		default:
		}
	}
}

// probeMessages handles the probe reports waiting, without blocking: a
// busy link still answers its neighbour's trains.
func (s *linkSender) probeMessages() {
	for {
		select {
		case r := <-s.probeIn:
			s.probeReported(r)
		case r := <-s.probeOut:
			s.sendProbeReport(r)
		default:
			return
		}
	}
}

// sendProbe sends a train when the link is idle enough, and stops it as
// soon as media waits.
func (s *linkSender) sendProbe(ctx context.Context) {
	s.maybeRefreshBudget()
	size := s.budget
	n := s.probe.plan(time.Now(), size)
	if n == 0 {
		return
	}
	var sent uint16
	for i := range n {
		if s.backlog.Load() > 0 || ctx.Err() != nil {
			break // media first
		}
		h := probeHeader{Train: s.probe.train, Index: uint16(i), Count: uint16(n)}
		if err := s.conn.SendDatagram(appendProbeTrain(s.scratch[:0], h, size)); err != nil {
			break
		}
		sent++
	}
	bytes := uint64(sent) * uint64(size)
	s.probe.sentTrain(sent, bytes)
	s.l.probeDgrams.Add(uint64(sent))
	s.l.probeBytes.Add(bytes)
}

func (s *linkSender) sendProbeReport(r probeReport) {
	_ = s.conn.SendDatagram(appendProbeReport(s.scratch[:0], r)) // lost: that train tells nothing
}

// probeReported takes the neighbour's report on our last train; an
// estimate of 0 (too fast to tell) is published as such.
func (s *linkSender) probeReported(r probeReport) {
	kbps, lost, ok := s.probe.report(r)
	s.l.probeLost.Add(lost)
	if ok {
		s.l.probeKbps.Store(math.Float64bits(kbps))
		s.l.probeEstimates.Add(1)
	}
}
