package chat

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// testMsg is message seq of the history tests: lengths vary, some texts
// are as long as a client may send, so that chunks fill up by bytes as well
// as by count.
func testMsg(seq uint64) Msg {
	text := fmt.Sprintf("text %d", seq)
	if seq%97 == 0 {
		text = strings.Repeat("x", MaxTextBytes)
	}
	return Msg{ID: fmt.Sprintf("id-%d", seq), Nick: fmt.Sprintf("nick%d", seq%7), Text: text,
		TS: time.Unix(1700000000, int64(seq))}
}

func testEncode(b []byte, m *Msg) []byte {
	return fmt.Appendf(b, "frame %d %s", m.Seq, m.ID)
}

func checkMsg(t *testing.T, h *history, seq uint64) {
	t.Helper()
	got, want := h.at(seq), testMsg(seq)
	if got.Seq != seq || got.ID != want.ID || got.Nick != want.Nick || got.Text != want.Text || !got.TS.Equal(want.TS) ||
		string(got.Frame) != fmt.Sprintf("frame %d %s", seq, want.ID) {
		t.Fatalf("message %d: got %d %q %q %.20q %v %q", seq, got.Seq, got.ID, got.Nick, got.Text, got.TS, got.Frame)
	}
}

func TestHistoryKeepsWhatWasAppended(t *testing.T) {
	h := newHistory(41) // the first message is 42, as after a carried-over history
	var scratch []byte
	for seq := uint64(42); seq < 42+5000; seq++ {
		m := testMsg(seq)
		scratch = h.append(&m, testEncode, scratch)
	}
	if h.first() != 42 || h.last != 42+4999 || h.len() != 5000 {
		t.Fatalf("first %d last %d len %d, want 42, 5041, 5000", h.first(), h.last, h.len())
	}
	for seq := h.first(); seq <= h.last; seq++ {
		checkMsg(t, &h, seq)
	}
	// Chunks grew from the smallest to the largest and never past them.
	if n := len(h.chunks[0].ents); n != chunkMinMsgs {
		t.Errorf("first chunk holds %d messages, want %d", n, chunkMinMsgs)
	}
	for i, c := range h.chunks {
		if len(c.ents) > chunkMaxMsgs || len(c.data) > chunkMaxBytes {
			t.Errorf("chunk %d: %d messages, %d bytes: above the bounds", i, len(c.ents), len(c.data))
		}
		if i > 0 && c.first != h.chunks[i-1].first+uint64(h.chunks[i-1].n) {
			t.Errorf("chunk %d starts at %d after a chunk of %d from %d", i, c.first, h.chunks[i-1].n, h.chunks[i-1].first)
		}
	}
}

// A snapshot reads the same messages whatever the writer does after it:
// appends into the same chunk, new chunks, trims, a reset.
func TestHistorySnapshotsDoNotChange(t *testing.T) {
	h := newHistory(0)
	var scratch []byte
	add := func(n int) {
		for range n {
			m := testMsg(h.last + 1)
			scratch = h.append(&m, testEncode, scratch)
		}
	}
	add(10) // within the first chunk
	snap := h.slice(3, 10)
	add(3000)
	h.trim(2500)
	if h.first() != 2500 || h.at(2500).ID != "id-2500" {
		t.Fatalf("after trim: first %d, message %q", h.first(), h.at(h.first()).ID)
	}
	if h.chunks[0].first > 2500 || (len(h.chunks) > 1 && h.chunks[1].first <= 2500) {
		t.Errorf("after trim to 2500 the first chunk starts at %d (next %d)", h.chunks[0].first, h.chunks[1].first)
	}
	mid := h.slice(2600, 2700)
	h = newHistory(0) // a reset
	add(50)
	for seq := snap.first(); seq <= snap.last; seq++ {
		checkMsg(t, &snap, seq)
	}
	for seq := mid.first(); seq <= mid.last; seq++ {
		checkMsg(t, &mid, seq)
	}
	if got := len(h.msgs()); got != 50 {
		t.Errorf("after the reset the history holds %d, want 50", got)
	}
}

// Trimming everything leaves the writer's chunk; what follows still reads
// right, and the chunks stay bounded by what is retained.
func TestHistoryTrimBoundsChunks(t *testing.T) {
	h := newHistory(0)
	var scratch []byte
	for seq := uint64(1); seq <= 100000; seq++ {
		m := testMsg(seq)
		scratch = h.append(&m, testEncode, scratch)
		if seq%100 == 0 && seq > 1000 {
			h.trim(seq + 1 - 1000) // keep 1,000 (retention by count)
		}
		if seq == 50000 {
			h.trim(seq + 1) // keep none (retention by age)
			if h.len() != 0 {
				t.Fatalf("after trimming all: %d retained", h.len())
			}
		}
	}
	if h.first() != 99001 || h.last != 100000 {
		t.Fatalf("first %d last %d, want 99001 100000", h.first(), h.last)
	}
	for seq := h.first(); seq <= h.last; seq++ {
		checkMsg(t, &h, seq)
	}
	// 1,100 messages at most in chunks of at least 512 once grown, and
	// the bytes of the long texts.
	if len(h.chunks) > 8 {
		t.Errorf("%d chunks hold %d messages", len(h.chunks), h.len())
	}
}

// Readers take snapshots under the room's lock while the writer appends:
// run with -race.
func TestHistoryConcurrentReaders(t *testing.T) {
	r := &Room{svc: &Service{cfg: Config{Encode: testEncode}}, ids: map[uint64]uint64{}, changed: make(chan struct{}),
		counters: new(roomCounters)}
	// r.hist is the zero history: empty, the first message is 1.
	done := make(chan struct{})
	errs := make(chan error, 1)
	go func() {
		defer close(done)
		var cursor uint64
		for cursor < 20000 {
			v := r.Read(AnyEpoch, cursor, 100)
			for i := range v.Len() {
				m := v.Msg(i)
				if want := testMsg(m.Seq); m.Seq != cursor+1 || m.ID != want.ID || m.Text != want.Text {
					errs <- fmt.Errorf("after %d read %d %q", cursor, m.Seq, m.ID)
					return
				}
				cursor = m.Seq
			}
			if v.Len() == 0 {
				<-v.Changed
			}
		}
	}()
	for seq := uint64(1); seq <= 20000; seq += 10 {
		batch := make([]Msg, 10)
		for i := range batch {
			batch[i] = testMsg(seq + uint64(i))
		}
		r.commit(batch, false, "", 0)
	}
	<-done
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
}
