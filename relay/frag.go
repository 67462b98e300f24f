package relay

// Fragmentation of RTP packets larger than one QUIC datagram.
//
// The sender splits a packet into 2 to maxFragments nearly equal parts that
// share the packet's hop sequence number; the receiver puts them back
// together in a few slots, whatever order they arrive in, ignores duplicates,
// and gives up on a packet whose slot is needed for a newer one.

// fragment calls send once for each datagram needed to carry pkt under the
// header h within budget bytes per datagram. The header's fragment fields are
// set as needed. scratch must hold at least budget bytes.
func fragment(h mediaHeader, pkt []byte, budget int, scratch []byte, send func([]byte) error) error {
	if mediaHeaderLen+len(pkt) <= budget {
		h.Flags &^= flagFragment
		return send(append(h.append(scratch[:0]), pkt...))
	}
	room := budget - mediaHeaderLen - fragHeaderLen
	count := (len(pkt) + room - 1) / room
	if count > maxFragments || room <= 0 {
		return errPacketTooLargeForBudget
	}
	chunk := (len(pkt) + count - 1) / count
	h.Flags |= flagFragment
	h.FragCount = uint8(count)
	for i := 0; i < count; i++ {
		h.FragIndex = uint8(i)
		part := pkt[i*chunk : min((i+1)*chunk, len(pkt))]
		if err := send(append(h.append(scratch[:0]), part...)); err != nil {
			return err
		}
	}
	return nil
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
	if s.done || h.FragCount != s.count {
		return nil, false // inconsistent fragment: ignore it
	}
	bit := uint8(1) << h.FragIndex
	if s.have&bit != 0 {
		return nil, false // duplicate
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
