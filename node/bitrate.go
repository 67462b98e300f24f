package node

import (
	"math"
	"slices"
	"sync"
	"time"

	"github.com/stemflow/stemflow/relay"
)

// Stream bitrates. The origin node measures the rate of each stream
// published here (RTP bytes per second, smoothed) and writes it to the
// stream's key (store.SetStreamBitrate) for the manager's capacity
// planning, only when it moved by bitrateChange, or every refreshEvery.
const (
	bitrateAlpha  = 0.3
	bitrateChange = 0.20
)

// rates keeps the smoothed bitrate of every stream published here.
type rates struct {
	dc      string
	streams func() []relay.StreamInfo

	mu sync.Mutex // guards byName
	// byName holds each published stream's meter; a stream published
	// again (a new Since) starts afresh.
	byName map[string]*rateMeter
}

type rateMeter struct {
	since     time.Time
	lastBytes uint64
	lastAt    time.Time
	kbps      float64
	known     bool
	pub       float64
	pubAt     time.Time
}

// streamRate is a bitrate due for publication.
type streamRate struct {
	name string
	kbps float64
}

func newRates(dc string, streams func() []relay.StreamInfo) *rates {
	return &rates{dc: dc, streams: streams, byName: map[string]*rateMeter{}}
}

// sample updates every published stream's rate and returns those due.
func (r *rates) sample(now time.Time) []streamRate {
	infos := r.streams()
	r.mu.Lock()
	defer r.mu.Unlock()
	seen := map[string]bool{}
	var due []streamRate
	for _, s := range infos {
		if !s.Local || s.Origin != r.dc {
			continue
		}
		seen[s.Name] = true
		m := r.byName[s.Name]
		if m == nil || !m.since.Equal(s.Since) {
			m = &rateMeter{since: s.Since, lastBytes: s.Bytes, lastAt: now}
			r.byName[s.Name] = m
			continue
		}
		dt := now.Sub(m.lastAt).Seconds()
		if dt <= 0 || s.Bytes < m.lastBytes {
			continue
		}
		kbps := float64(s.Bytes-m.lastBytes) * 8 / 1000 / dt
		m.lastBytes, m.lastAt = s.Bytes, now
		if !m.known {
			m.kbps, m.known = kbps, true
		} else {
			m.kbps = ewma(m.kbps, kbps, bitrateAlpha)
		}
		if m.pubAt.IsZero() || now.Sub(m.pubAt) >= refreshEvery || math.Abs(m.kbps-m.pub) > bitrateChange*m.pub {
			m.pub, m.pubAt = math.Round(m.kbps), now
			due = append(due, streamRate{s.Name, m.pub})
		}
	}
	for name := range r.byName {
		if !seen[name] {
			delete(r.byName, name)
		}
	}
	return due
}

// unpublish makes every rate due again (a write failed, or a new lease).
func (r *rates) unpublish(names ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for name, m := range r.byName {
		if len(names) == 0 || slices.Contains(names, name) {
			m.pubAt = time.Time{}
		}
	}
}
