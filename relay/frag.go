package relay

// Fragmentation of RTP packets larger than one QUIC datagram.
//
// The sender splits a packet into 2 to maxFragments nearly equal parts that
// share the packet's hop sequence number; the receiver puts them back
// together in a few slots, whatever order they arrive in, ignores duplicates,
// and gives up on a packet whose slot is needed for a newer one.

// fragments returns how many datagrams of at most budget bytes carry a
// packet of n bytes, and how many of its bytes go in each.
func fragments(n, budget int) (count, chunk int, err error) {
	if mediaHeaderLen+n <= budget {
		return 1, n, nil
	}
	room := budget - mediaHeaderLen - fragHeaderLen
	if room <= 0 {
		return 0, 0, errPacketTooLargeForBudget
	}
	count = (n + room - 1) / room
	if count > maxFragments {
		return 0, 0, errPacketTooLargeForBudget
	}
	return count, (n + count - 1) / count, nil
}

// appendDatagram appends datagram i of the count that carry pkt (see
// fragments) under the header h to b. The header's fragment fields are set
// as needed.
func appendDatagram(b []byte, h mediaHeader, pkt []byte, i, count, chunk int) []byte {
	if count == 1 {
		h.Flags &^= flagFragment
		return append(h.append(b), pkt...)
	}
	h.Flags |= flagFragment
	h.FragIndex, h.FragCount = uint8(i), uint8(count)
	return append(h.append(b), pkt[i*chunk:min((i+1)*chunk, len(pkt))]...)
}

// fragment calls send once for each datagram needed to carry pkt under the
// header h within budget bytes per datagram. scratch must hold at least
// budget bytes.
func fragment(h mediaHeader, pkt []byte, budget int, scratch []byte, send func([]byte) error) error {
	count, chunk, err := fragments(len(pkt), budget)
	for i := 0; err == nil && i < count; i++ {
		err = send(appendDatagram(scratch[:0], h, pkt, i, count, chunk))
	}
	return err
}

var errPacketTooLargeForBudget = errorString("packet needs more than 8 datagrams")

type errorString string

func (e errorString) Error() string { return string(e) }

const reassemblySlots = 8

// reassembler rebuilds fragmented packets. It is used by one goroutine.
type reassembler struct {
	slots   [reassemblySlots]fragSlot
	clock   uint64
	out     [MaxPacketSize]byte
	evicted uint64 // incomplete packets given up on
	dups    uint64 // fragments that arrived twice, or after their packet
}

type fragSlot struct {
	used  bool
	done  bool // complete and delivered: later duplicates are ignored
	subID uint32
	seq   uint32
	count uint8
	have  uint8 // bitmap of received fragments
	age   uint64
	lens  [maxFragments]uint16
	parts [maxFragments][MaxPacketSize]byte
}

// add records one fragment and returns the whole packet once every fragment
// has arrived. The returned slice is valid until the next call.
func (r *reassembler) add(h *mediaHeader, part []byte) ([]byte, bool) {
	if len(part) > MaxPacketSize {
		return nil, false
	}
	r.clock++
	s := r.slot(h)
	if s == nil {
		s = r.victim()
		if s.used && !s.done {
			r.evicted++
		}
		s.used, s.done, s.subID, s.seq, s.count, s.have, s.age = true, false, h.SubID, h.HopSeq, h.FragCount, 0, r.clock
	}
	if s.done {
		r.dups++
		return nil, false
	}
	if h.FragCount != s.count {
		return nil, false // inconsistent fragment: ignore it
	}
	bit := uint8(1) << h.FragIndex
	if s.have&bit != 0 {
		r.dups++
		return nil, false
	}
	s.have |= bit
	s.lens[h.FragIndex] = uint16(copy(s.parts[h.FragIndex][:], part))
	if uint16(s.have) != uint16(1)<<s.count-1 {
		return nil, false
	}
	n := 0
	for i := 0; i < int(s.count); i++ {
		l := int(s.lens[i])
		if n+l > len(r.out) {
			s.done = true
			return nil, false
		}
		n += copy(r.out[n:], s.parts[i][:l])
	}
	s.done = true
	return r.out[:n], true
}

func (r *reassembler) slot(h *mediaHeader) *fragSlot {
	for i := range r.slots {
		if s := &r.slots[i]; s.used && s.subID == h.SubID && s.seq == h.HopSeq {
			return s
		}
	}
	return nil
}

// victim returns a free slot, or else the oldest one, preferring completed
// ones.
func (r *reassembler) victim() *fragSlot {
	v := &r.slots[0]
	for i := range r.slots {
		s := &r.slots[i]
		if !s.used {
			return s
		}
		if s.done && !v.done || s.done == v.done && s.age < v.age {
			v = s
		}
	}
	return v
}
