package chat

import (
	"sort"
	"time"
	"unsafe"
)

// Chunk sizes: a room's first chunk is small (most rooms are quiet), each
// next one twice the last that filled up, to these.
const (
	chunkMinMsgs  = 16
	chunkMaxMsgs  = 512
	chunkMinBytes = 4 << 10
	chunkMaxBytes = 128 << 10
)

// history is a room's retained messages, first()..last (first() = last+1
// when there are none), in chunks whose memory holds no pointers: a busy room
// keeps 10,000 messages at every node, and as Msg values (four strings and
// a frame each) they were most of what the GC marked in every cycle, which
// the node runs often (it collects at 15 % heap growth) and which delays
// messages while it marks. A chunk is two arrays, of entries and of the
// bytes they point into, allocated once.
//
// A history value is a snapshot: the room's writer appends to its last
// chunk past the snapshots readers hold, and replaces the chunk list
// instead of changing it, so that readers read a value taken under the
// room's lock without it. Entries and bytes never change once written.
type history struct {
	chunks []*chunk // oldest first; chunks[0] holds first() (when any message is retained)
	before uint64   // the sequence number before the first retained (the zero history is empty)
	last   uint64
}

// chunk holds messages first, first+1, … (up to the next chunk's first, or
// the history's last).
type chunk struct {
	first uint64
	ents  []entry // fixed length; the writer fills it in order
	data  []byte  // fixed length; the writer fills it in order
	// The writer's (readers never read them).
	n, used int
}

// entry is one message: its strings and frame lie one after the other in
// the chunk's data from off.
type entry struct {
	ts                     int64 // unix nanoseconds
	off                    uint32
	id, nick, text, frameN uint32
}

func newHistory(last uint64) history { return history{before: last, last: last} }

// first returns the first retained message's sequence number.
func (h *history) first() uint64 { return h.before + 1 }

// len returns the number of messages retained.
func (h *history) len() int { return int(h.last - h.before) }

// chunkOf returns the chunk holding seq (first() <= seq <= last).
func (h *history) chunkOf(seq uint64) *chunk {
	i := sort.Search(len(h.chunks), func(i int) bool { return h.chunks[i].first > seq })
	return h.chunks[i-1]
}

// at returns message seq (first() <= seq <= last). Its strings and frame are
// the chunk's memory: they never change.
func (h *history) at(seq uint64) Msg {
	c := h.chunkOf(seq)
	e := &c.ents[seq-c.first]
	off := e.off
	m := Msg{Seq: seq, TS: time.Unix(0, e.ts)}
	m.ID, off = c.str(off, e.id), off+e.id
	m.Nick, off = c.str(off, e.nick), off+e.nick
	m.Text, off = c.str(off, e.text), off+e.text
	if e.frameN > 0 {
		m.Frame = c.data[off : off+e.frameN : off+e.frameN]
	}
	return m
}

// ts returns message seq's time, like at(seq).TS.
func (h *history) ts(seq uint64) time.Time {
	c := h.chunkOf(seq)
	return time.Unix(0, c.ents[seq-c.first].ts)
}

// str returns n bytes of the chunk's data at off as a string, without a
// copy: they never change.
func (c *chunk) str(off, n uint32) string {
	if n == 0 {
		return ""
	}
	return unsafe.String(&c.data[off], n)
}

// append adds m as message last+1 (m.Seq is ignored), with its frame when
// encode is set (scratch is its buffer, returned grown). Only the room's
// writer calls it, on its own history.
func (h *history) append(m *Msg, encode func([]byte, *Msg) []byte, scratch []byte) []byte {
	seq := h.last + 1
	frame := m.Frame
	if encode != nil {
		mm := *m
		mm.Seq = seq
		scratch = encode(scratch[:0], &mm)
		frame = scratch
	}
	need := len(m.ID) + len(m.Nick) + len(m.Text) + len(frame)
	var c *chunk
	if n := len(h.chunks); n > 0 {
		c = h.chunks[n-1]
	}
	if c == nil || c.n == len(c.ents) || c.used+need > len(c.data) {
		msgs, bytes := chunkMinMsgs, chunkMinBytes
		if c != nil {
			msgs, bytes = len(c.ents), len(c.data)
			if c.n == len(c.ents) {
				msgs = min(2*msgs, chunkMaxMsgs)
			} else {
				bytes = min(2*bytes, chunkMaxBytes)
			}
		}
		c = &chunk{first: seq, ents: make([]entry, msgs), data: make([]byte, max(bytes, need))}
		// A new list: readers hold the old one.
		h.chunks = append(h.chunks[:len(h.chunks):len(h.chunks)], c)
	}
	off := c.used
	c.used += copy(c.data[c.used:], m.ID)
	c.used += copy(c.data[c.used:], m.Nick)
	c.used += copy(c.data[c.used:], m.Text)
	c.used += copy(c.data[c.used:], frame)
	c.ents[c.n] = entry{ts: m.TS.UnixNano(), off: uint32(off),
		id: uint32(len(m.ID)), nick: uint32(len(m.Nick)), text: uint32(len(m.Text)), frameN: uint32(len(frame))}
	c.n++
	h.last = seq
	return scratch
}

// trim forgets the messages before seq (at most last+1); chunks holding
// none of the rest go.
func (h *history) trim(seq uint64) {
	if seq <= h.first() {
		return
	}
	h.before = seq - 1
	i := 0
	for i+1 < len(h.chunks) && h.chunks[i+1].first <= seq {
		i++
	}
	if seq > h.last {
		// None is retained; the last chunk stays for the writer to fill
		// (readers' snapshots never reach into what it writes next).
		i = len(h.chunks) - 1
	}
	if i > 0 {
		h.chunks = append([]*chunk(nil), h.chunks[i:]...)
	}
}

// slice returns the snapshot of messages from..to (first() <= from, to <= last;
// empty when to < from).
func (h *history) slice(from, to uint64) history {
	if to < from {
		return history{before: from - 1, last: from - 1}
	}
	return history{chunks: h.chunks, before: from - 1, last: to}
}

// msgs returns the messages as Msg values (their strings are the chunks').
func (h *history) msgs() []Msg {
	out := make([]Msg, h.len())
	for i := range out {
		out[i] = h.at(h.first() + uint64(i))
	}
	return out
}
