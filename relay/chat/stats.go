package chat

import (
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// RoomStats counts what happened in one room at this node while it holds
// the room. The counters only grow; they go (and start again from zero)
// when the room goes away here (no client or child for Config.Linger).
type RoomStats struct {
	Room string
	// In: messages this node's clients sent (accepted: valid and within
	// the rate limit; retries included).
	In uint64
	// Out: messages written to this node's clients.
	Out uint64
	// Sequenced: messages added to the room's history here (by the origin
	// sequencing them, or by a replica taking them from its parent).
	Sequenced uint64
	// Duplicates: sends the origin acked with an earlier sequence number
	// (the same id again).
	Duplicates uint64
	// Retries: sends forwarded upstream again (a new channel, or no ack in
	// time).
	Retries uint64
	// Gaps: channels to the parent ended because a message was missing.
	Gaps uint64
	// Resumes: clients that joined with since.
	Resumes uint64
	// RateLimited, TooLong, BadFrames: sends refused, by reason.
	RateLimited, Refused uint64
}

// roomCounters are one room's counters.
type roomCounters struct {
	in, out, sequenced, dups, retries, gaps, resumes, rateLimited, refused atomic.Uint64
}

// LatencyBuckets are the upper bounds (seconds) of the fan-out latency
// histogram: from the origin sequencing a message to this node writing it
// to a client.
var LatencyBuckets = []float64{0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5}

// Histogram is a snapshot of the fan-out latency histogram.
type Histogram struct {
	Count   uint64
	Sum     float64  // seconds
	Buckets []uint64 // cumulative counts by LatencyBuckets
}

type statsTable struct {
	mu    sync.Mutex // guards rooms
	rooms map[string]*roomCounters

	latSumNs atomic.Uint64
	latBkt   [16]atomic.Uint64 // per bucket (not cumulative), the last is +Inf
}

func (t *statsTable) room(name string) *roomCounters {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.rooms == nil {
		t.rooms = make(map[string]*roomCounters)
	}
	c := t.rooms[name]
	if c == nil {
		c = new(roomCounters)
		t.rooms[name] = c
	}
	return c
}

// drop forgets a room's counters (the room went away here).
func (t *statsTable) drop(name string) {
	t.mu.Lock()
	delete(t.rooms, name)
	t.mu.Unlock()
}

// Counters of a room for the client protocol (egress/chat), which counts
// what it sees.
type Counters struct{ c *roomCounters }

// Counters returns the room's counters.
func (r *Room) Counters() Counters { return Counters{r.counters} }

func (c Counters) In()          { c.c.in.Add(1) }
func (c Counters) Out(n int)    { c.c.out.Add(uint64(n)) }
func (c Counters) Resume()      { c.c.resumes.Add(1) }
func (c Counters) RateLimited() { c.c.rateLimited.Add(1) }
func (c Counters) Refused()     { c.c.refused.Add(1) }

// ObserveLatency records one message's fan-out latency.
func (s *Service) ObserveLatency(d time.Duration) {
	t := &s.stats
	sec := d.Seconds()
	i := 0
	for i < len(LatencyBuckets) && sec > LatencyBuckets[i] {
		i++
	}
	t.latBkt[i].Add(1)
	if d > 0 {
		t.latSumNs.Add(uint64(d))
	}
}

// Stats returns every room's counters, sorted by room, and the latency
// histogram.
func (s *Service) Stats() ([]RoomStats, Histogram) {
	t := &s.stats
	t.mu.Lock()
	out := make([]RoomStats, 0, len(t.rooms))
	for name, c := range t.rooms {
		out = append(out, RoomStats{Room: name, In: c.in.Load(), Out: c.out.Load(), Sequenced: c.sequenced.Load(),
			Duplicates: c.dups.Load(), Retries: c.retries.Load(), Gaps: c.gaps.Load(), Resumes: c.resumes.Load(),
			RateLimited: c.rateLimited.Load(), Refused: c.refused.Load()})
	}
	t.mu.Unlock()
	slices.SortFunc(out, func(a, b RoomStats) int { return strings.Compare(a.Room, b.Room) })
	h := Histogram{Sum: float64(t.latSumNs.Load()) / 1e9, Buckets: make([]uint64, len(LatencyBuckets))}
	var cum uint64
	for i := range LatencyBuckets {
		cum += t.latBkt[i].Load()
		h.Buckets[i] = cum
	}
	h.Count = cum + t.latBkt[len(LatencyBuckets)].Load() // consistent with the buckets
	return out, h
}
