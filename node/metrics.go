package node

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/stemflow/stemflow/egress/whep"
	"github.com/stemflow/stemflow/node/rtspserver"
	"github.com/stemflow/stemflow/relay"
)

// The node's Prometheus metrics (GET /metrics, documented in docs/api.md).
// Every figure is read at scrape time from counters the relay and the
// protocols keep anyway: a scrape costs the forward path nothing. Each node
// has its own registry, so the nodes of `stemflow dev` (one process) do not
// collide; every series carries the node's datacenter as the label dc.
//
// To export a counter, add one line to the table of its kind below.

// snapshot is everything one scrape reads, taken once per scrape.
type snapshot struct {
	streams []relay.StreamInfo
	links   []relay.LinkStats
	whep    whep.Stats
	rtsp    rtspserver.Stats
	// viewers of each stream by protocol
	viewers map[string]map[string]int
}

// protocols are the viewer protocols, the values of the label protocol.
var protocols = []string{"whep", "rtsp"}

func (n *Node) snapshot() *snapshot {
	return &snapshot{
		streams: n.hub.Streams(),
		links:   n.hub.Links(),
		whep:    n.whep.Stats(),
		rtsp:    n.rtsp.Stats(),
		viewers: map[string]map[string]int{
			"whep": n.whep.ViewersByStream(),
			"rtsp": n.rtsp.ReadersByStream(),
		},
	}
}

type metric[T any] struct {
	name, help string
	typ        prometheus.ValueType
	value      func(T) float64
}

const (
	counter = prometheus.CounterValue
	gauge   = prometheus.GaugeValue
)

// streamMetrics: one series per stream flowing at this node, label stream.
// The counters start at 0 when the stream starts flowing here
// (stemflow_stream_start_time_seconds).
var streamMetrics = []metric[*relay.StreamInfo]{
	{"stream_received_packets_total", "RTP packets that reached the stream at this node (from its publisher, or from upstream) since it started flowing here.", counter,
		func(s *relay.StreamInfo) float64 { return float64(s.Packets) }},
	{"stream_received_bytes_total", "Bytes of RTP packets that reached the stream at this node since it started flowing here.", counter,
		func(s *relay.StreamInfo) float64 { return float64(s.Bytes) }},
	{"stream_sent_packets_total", "RTP packets the stream handed to its subscribers at this node since it started flowing here: each packet once per WHEP viewer, per downstream datacenter, and once for the node's RTSP readers together; the GOP replayed to a joining subscriber included.", counter,
		func(s *relay.StreamInfo) float64 { return float64(s.SentPackets) }},
	{"stream_sent_bytes_total", "Bytes of the RTP packets the stream handed to its subscribers at this node since it started flowing here (see stemflow_stream_sent_packets_total).", counter,
		func(s *relay.StreamInfo) float64 { return float64(s.SentBytes) }},
	{"stream_subscribers", "Everything taking the stream's packets at this node: viewers of every protocol and downstream datacenters.", gauge,
		func(s *relay.StreamInfo) float64 { return float64(s.Subscribers) }},
	{"stream_start_time_seconds", "When the stream started flowing at this node, in seconds since the Unix epoch.", gauge,
		func(s *relay.StreamInfo) float64 { return float64(s.Since.UnixNano()) / 1e9 }},
	{"stream_bframes", "1 when the stream's H264 video has B-frames (browsers do not play them over WebRTC: the publisher should encode with -bf 0), else 0.", gauge,
		func(s *relay.StreamInfo) float64 { return b2f(s.BFrames) }},
	{"stream_hops", "Datacenters on the stream's path from its origin to this node, both included.", gauge,
		func(s *relay.StreamInfo) float64 { return float64(len(s.Hops)) }},
}

// linkMetrics: one series per overlay link, label peer (the neighbour's
// datacenter).
var linkMetrics = []metric[*relay.LinkStats]{
	{"link_sent_packets_total", "Media packets sent to the peer.", counter,
		func(l *relay.LinkStats) float64 { return float64(l.PacketsSent) }},
	{"link_sent_datagrams_total", "QUIC datagrams sent to the peer (a packet larger than the datagram budget goes as several fragments).", counter,
		func(l *relay.LinkStats) float64 { return float64(l.DatagramsSent) }},
	{"link_received_packets_total", "Media packets received from the peer (complete, not duplicates).", counter,
		func(l *relay.LinkStats) float64 { return float64(l.PacketsReceived) }},
	{"link_hop_lost_packets_total", "Packets missing from the peer's hop sequence on arrival: lost on the wire or in quic-go's datagram queue.", counter,
		func(l *relay.LinkStats) float64 { return float64(l.HopLost) }},
	{"link_malformed_datagrams_total", "Datagrams from the peer that failed to parse.", counter,
		func(l *relay.LinkStats) float64 { return float64(l.Malformed) }},
	{"link_fragments_given_up_total", "Fragmented packets from the peer that never completed.", counter,
		func(l *relay.LinkStats) float64 { return float64(l.FragmentsGivenUp) }},
	{"link_received_datagrams_total", "QUIC datagrams received from the peer.", counter,
		func(l *relay.LinkStats) float64 { return float64(l.DatagramsReceived) }},
	{"link_datagram_budget_bytes", "The largest datagram the link sends now: what quic-go allows, which grows after path-MTU discovery.", gauge,
		func(l *relay.LinkStats) float64 { return float64(l.DatagramBudget) }},
	{"link_rtt_seconds", "Smoothed round-trip time to the peer, as quic-go measures it.", gauge,
		func(l *relay.LinkStats) float64 { return l.RTT.Seconds() }},
}

// nodeMetrics: one series per node.
var nodeMetrics = []metric[*snapshot]{
	{"whep_sent_packets_total", "RTP packets written to WHEP viewers, retransmissions excluded.", counter,
		func(s *snapshot) float64 { return float64(s.whep.PacketsSent) }},
	{"whep_retransmitted_packets_total", "Packets resent to WHEP viewers from the retransmission cache on NACK.", counter,
		func(s *snapshot) float64 { return float64(s.whep.Retransmissions) }},
	{"whep_keyframe_requests_total", "PLIs and FIRs received from WHEP viewers.", counter,
		func(s *snapshot) float64 { return float64(s.whep.KeyframeRequests) }},
	{"rtsp_publisher_lost_packets_total", "RTP packets missing from RTSP publishers' streams on arrival.", counter,
		func(s *snapshot) float64 { return float64(s.rtsp.PublisherLost) }},
}

// linkDrops: stemflow_link_dropped_total{peer,reason}, and summed over the
// links into stemflow_dropped_packets_total{reason}. Sending side: packets;
// receiving side: datagrams (a packet, or one fragment of one).
var linkDrops = []struct {
	reason string
	value  func(*relay.LinkStats) uint64
}{
	{"link_queue", func(l *relay.LinkStats) uint64 { return l.QueueDropped }},
	{"link_send_error", func(l *relay.LinkStats) uint64 { return l.SendErrors }},
	{"link_receive_queue", func(l *relay.LinkStats) uint64 { return l.ReceiveDropped }},
	{"unknown_subscription", func(l *relay.LinkStats) uint64 { return l.UnknownSubscription }},
	{"duplicate", func(l *relay.LinkStats) uint64 { return l.Duplicates }},
	{"fragments_given_up", func(l *relay.LinkStats) uint64 { return l.FragmentsGivenUp }},
	{"malformed", func(l *relay.LinkStats) uint64 { return l.Malformed }},
}

// drops: the node's own drops in stemflow_dropped_packets_total{reason},
// beside the links' above.
var drops = []struct {
	reason string
	value  func(*snapshot) uint64
}{
	{"whep_viewer_queue", func(s *snapshot) uint64 { return s.whep.PacketsDropped }},
	{"whep_write_error", func(s *snapshot) uint64 { return s.whep.WriteErrors }},
	{"rtsp_reader_queue", func(s *snapshot) uint64 { return s.rtsp.ReaderWriteErrors }},
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// collector is the node's prometheus.Collector: it takes a snapshot per
// scrape and turns the tables above into metrics.
type collector struct {
	read func() *snapshot

	streams  []*prometheus.Desc // by streamMetrics index
	links    []*prometheus.Desc // by linkMetrics index
	node     []*prometheus.Desc // by nodeMetrics index
	viewers  *prometheus.Desc
	dropped  *prometheus.Desc
	linkDrop *prometheus.Desc
	linksUp  *prometheus.Desc
	streamUp *prometheus.Desc
}

var _ prometheus.Collector = (*collector)(nil)

func newCollector(dc string, read func() *snapshot) *collector {
	dcLabel := prometheus.Labels{"dc": dc}
	desc := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("stemflow_"+name, help, labels, dcLabel)
	}
	c := &collector{read: read}
	for _, m := range streamMetrics {
		c.streams = append(c.streams, desc(m.name, m.help, "stream"))
	}
	for _, m := range linkMetrics {
		c.links = append(c.links, desc(m.name, m.help, "peer"))
	}
	for _, m := range nodeMetrics {
		c.node = append(c.node, desc(m.name, m.help))
	}
	c.viewers = desc("viewers", "Viewers watching the stream at this node, by protocol (whep, rtsp).", "stream", "protocol")
	c.dropped = desc("dropped_packets_total", "Packets the node dropped, by where (docs/api.md lists the reasons): "+
		"link_queue, link_send_error, link_receive_queue, unknown_subscription, duplicate, fragments_given_up, malformed (on overlay links), "+
		"whep_viewer_queue, whep_write_error (WHEP viewers), rtsp_reader_queue (RTSP readers).", "reason")
	c.linkDrop = desc("link_dropped_total", "Packets (sending) or datagrams (receiving) dropped on the link to the peer, by where; see stemflow_dropped_packets_total.", "peer", "reason")
	c.linksUp = desc("links", "Overlay links to neighbours that are up.")
	c.streamUp = desc("streams", "Streams flowing at this node (published here or relayed here).")
	return c
}

// Describe sends every descriptor; the set is fixed.
func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.streams {
		ch <- d
	}
	for _, d := range c.links {
		ch <- d
	}
	for _, d := range c.node {
		ch <- d
	}
	ch <- c.viewers
	ch <- c.dropped
	ch <- c.linkDrop
	ch <- c.linksUp
	ch <- c.streamUp
}

// Collect reads the node's counters once and sends them.
func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.read()
	flowing := 0
	for i := range s.streams {
		st := &s.streams[i]
		if !st.Local {
			continue // known by announcement only: nothing flows here
		}
		flowing++
		for j, m := range streamMetrics {
			ch <- prometheus.MustNewConstMetric(c.streams[j], m.typ, m.value(st), st.Name)
		}
		for _, p := range protocols {
			ch <- prometheus.MustNewConstMetric(c.viewers, gauge, float64(s.viewers[p][st.Name]), st.Name, p)
		}
	}
	linkTotals := make([]uint64, len(linkDrops))
	for i := range s.links {
		l := &s.links[i]
		for j, m := range linkMetrics {
			ch <- prometheus.MustNewConstMetric(c.links[j], m.typ, m.value(l), l.Peer)
		}
		for j, d := range linkDrops {
			n := d.value(l)
			linkTotals[j] += n
			ch <- prometheus.MustNewConstMetric(c.linkDrop, counter, float64(n), l.Peer, d.reason)
		}
	}
	for j, d := range linkDrops {
		ch <- prometheus.MustNewConstMetric(c.dropped, counter, float64(linkTotals[j]), d.reason)
	}
	for j, m := range nodeMetrics {
		ch <- prometheus.MustNewConstMetric(c.node[j], m.typ, m.value(s))
	}
	for _, d := range drops {
		ch <- prometheus.MustNewConstMetric(c.dropped, counter, float64(d.value(s)), d.reason)
	}
	ch <- prometheus.MustNewConstMetric(c.linksUp, gauge, float64(len(s.links)))
	ch <- prometheus.MustNewConstMetric(c.streamUp, gauge, float64(flowing))
}

// metricsHandler serves the node's own registry: the collector above plus
// the Go runtime's and the process's standard metrics.
func (n *Node) metricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		newCollector(n.cfg.Datacenter, n.snapshot),
		newChatCollector(n.cfg.Datacenter, n.chat), // chat_metrics.go
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorHandling: promhttp.ContinueOnError,
		Timeout:       10 * time.Second,
	})
}
