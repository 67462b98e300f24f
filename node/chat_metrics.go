package node

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/stemflow/stemflow/relay/chat"
)

// chatMetrics: one series per room this node has held, label room
// (docs/chat.md). Read from the chat service's counters at scrape time.
var chatMetrics = []metric[*chat.RoomStats]{
	{"chat_messages_in_total", "Chat messages this node's clients sent that were accepted (valid, within the rate limit; retries included).", counter,
		func(s *chat.RoomStats) float64 { return float64(s.In) }},
	{"chat_messages_out_total", "Chat messages written to this node's clients.", counter,
		func(s *chat.RoomStats) float64 { return float64(s.Out) }},
	{"chat_sequenced_total", "Chat messages added to the room's history at this node (sequenced here at the origin, or taken from the parent).", counter,
		func(s *chat.RoomStats) float64 { return float64(s.Sequenced) }},
	{"chat_duplicates_total", "Sends the origin acked with an earlier sequence number (the same id again).", counter,
		func(s *chat.RoomStats) float64 { return float64(s.Duplicates) }},
	{"chat_retries_total", "Sends this node forwarded upstream again (a new channel to the parent, or no ack in time).", counter,
		func(s *chat.RoomStats) float64 { return float64(s.Retries) }},
	{"chat_gaps_total", "Channels to the parent dropped because a message was missing (resubscribed from the last one).", counter,
		func(s *chat.RoomStats) float64 { return float64(s.Gaps) }},
	{"chat_resumes_total", "Chat clients that joined with since.", counter,
		func(s *chat.RoomStats) float64 { return float64(s.Resumes) }},
	{"chat_rate_limited_total", "Sends refused with rate_limited.", counter,
		func(s *chat.RoomStats) float64 { return float64(s.RateLimited) }},
	{"chat_refused_total", "Client frames refused for another reason (too_long, bad_frame, bad_id, no_nick, ...).", counter,
		func(s *chat.RoomStats) float64 { return float64(s.Refused) }},
}

// chatCollector exports the chat service's counters and fan-out histogram.
type chatCollector struct {
	svc     *chat.Service
	rooms   []*prometheus.Desc // by chatMetrics index
	latency *prometheus.Desc
}

var _ prometheus.Collector = (*chatCollector)(nil)

func newChatCollector(dc string, svc *chat.Service) *chatCollector {
	dcLabel := prometheus.Labels{"dc": dc}
	c := &chatCollector{svc: svc}
	for _, m := range chatMetrics {
		c.rooms = append(c.rooms, prometheus.NewDesc("stemflow_"+m.name, m.help, []string{"room"}, dcLabel))
	}
	c.latency = prometheus.NewDesc("stemflow_chat_fanout_latency_seconds",
		"Time from the room's origin sequencing a chat message to this node writing it to a client (live messages, not history).", nil, dcLabel)
	return c
}

func (c *chatCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.rooms {
		ch <- d
	}
	ch <- c.latency
}

func (c *chatCollector) Collect(ch chan<- prometheus.Metric) {
	rooms, h := c.svc.Stats()
	for i := range rooms {
		for j, m := range chatMetrics {
			ch <- prometheus.MustNewConstMetric(c.rooms[j], m.typ, m.value(&rooms[i]), rooms[i].Room)
		}
	}
	buckets := make(map[float64]uint64, len(chat.LatencyBuckets))
	for i, le := range chat.LatencyBuckets {
		buckets[le] = h.Buckets[i]
	}
	ch <- prometheus.MustNewConstHistogram(c.latency, h.Count, h.Sum, buckets)
}
