package relay

import (
	"sync/atomic"
	"testing"
)

func TestHopSequenceWindow(t *testing.T) {
	var u upSub
	var lost atomic.Uint64
	steps := []struct {
		seq        uint32
		frag, want bool
	}{
		{10, false, true},
		{11, false, true},
		{11, false, false}, // duplicate
		{14, false, true},  // 12, 13 lost
		{12, false, true},  // late: no longer lost
		{12, false, false}, // duplicate of a late one
		{15, true, true},   // first fragment
		{15, true, true},   // second fragment: the reassembler decides
		{13, true, true},   // late fragmented packet
		{13, true, true},
		{200, false, true},
		{100, false, false}, // far too old
	}
	for i, s := range steps {
		if got := u.fresh(s.seq, s.frag, &lost); got != s.want {
			t.Fatalf("step %d (seq %d): fresh = %v, want %v", i, s.seq, got, s.want)
		}
	}
	if got := lost.Load(); got != 184 { // 16..199
		t.Fatalf("lost = %d, want 184", got)
	}
}
