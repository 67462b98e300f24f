package node

import (
	"testing"
	"time"

	"github.com/stemflow/stemflow/relay"
)

// TestRates: the origin's bitrate of a stream published here is the RTP
// bytes per second, published first, then only past ±20 %; relayed streams
// and streams of other origins are not measured; a stream published again
// starts afresh.
func TestRates(t *testing.T) {
	since := time.Unix(1_800_000_000, 0)
	var bytes uint64
	infos := func() []relay.StreamInfo {
		return []relay.StreamInfo{
			{Name: "x", Origin: "a", Local: true, Since: since, Bytes: bytes},
			{Name: "y", Origin: "b", Local: true, Since: since, Bytes: bytes},
		}
	}
	r := newRates("a", infos)
	now := since
	step := func(perSec uint64) []streamRate {
		now = now.Add(time.Second)
		bytes += perSec
		return r.sample(now)
	}
	if due := step(0); len(due) != 0 {
		t.Fatalf("first sample (no rate yet): %+v", due)
	}
	due := step(250_000) // 2000 kbit/s
	if len(due) != 1 || due[0].name != "x" || due[0].kbps != 2000 {
		t.Fatalf("2 Mbit/s: due %+v, want x at 2000 kbit/s only", due)
	}
	for i := range 10 {
		if due := step(uint64(250_000 + (i%2)*25_000)); len(due) != 0 { // ±10 %
			t.Fatalf("noise within 20 %%: due %+v", due)
		}
	}
	var got []streamRate
	for range 5 {
		got = append(got, step(500_000)...) // 4000 kbit/s
	}
	if len(got) == 0 || got[len(got)-1].kbps < 2400 {
		t.Fatalf("4 Mbit/s: due %+v", got)
	}
	since = since.Add(time.Hour) // published again: counters from 0
	bytes = 0
	if due := step(0); len(due) != 0 {
		t.Fatalf("a stream published again starts afresh: due %+v", due)
	}
}
