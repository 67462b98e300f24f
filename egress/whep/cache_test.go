package whep

import (
	"bytes"
	"testing"
	"time"

	"github.com/stemflow/stemflow/relay"
)

func rtxPacket(seq uint16, n int) *relay.Packet {
	b := make([]byte, n)
	b[0] = 0x80
	b[2], b[3] = byte(seq>>8), byte(seq)
	for i := 12; i < n; i++ {
		b[i] = byte(int(seq) + i)
	}
	return &relay.Packet{Data: b}
}

func TestRTXCacheKeepsRecentPackets(t *testing.T) {
	c := newRTXCache()
	dst := make([]byte, relay.MaxPacketSize)
	// Fill several laps of the smallest ring quickly: it grows while a lap
	// holds less than rtxWindow.
	var seq uint16 = 65000 // wraps around
	for range 3000 {
		c.add(rtxPacket(seq, 900+int(seq%500)))
		seq++
	}
	if len(c.buf) <= rtxMinBytes {
		t.Errorf("ring of %d bytes did not grow for a fast stream", len(c.buf))
	}
	// The newest packets are held, exactly.
	for back := uint16(1); back <= 200; back++ {
		s := seq - back
		want := rtxPacket(s, 900+int(s%500)).Data
		if n := c.get(s, dst); !bytes.Equal(dst[:n], want) {
			t.Fatalf("seq %d: got %d bytes, want %d", s, n, len(want))
		}
	}
	// A sequence number never added, and one long evicted, are not.
	if n := c.get(seq, dst); n != 0 {
		t.Errorf("seq %d not added yet: got %d bytes", seq, n)
	}
	if n := c.get(seq-2500, dst); n != 0 {
		t.Errorf("seq %d evicted: got %d bytes", seq-2500, n)
	}
	c.release()
	c.add(rtxPacket(seq, 1000))
	if n := c.get(seq-1, dst); n != 0 {
		t.Errorf("released cache returned %d bytes", n)
	}
}

func TestRTXCacheLapOverwrites(t *testing.T) {
	c := newRTXCache()
	c.t0 = time.Now().Add(-2 * rtxWindow) // a slow stream: no growth
	dst := make([]byte, relay.MaxPacketSize)
	const size = 1000
	perLap := rtxMinBytes / size
	for s := range uint16(perLap + 10) {
		c.add(rtxPacket(s, size))
		c.t0 = time.Now().Add(-2 * rtxWindow)
	}
	if len(c.buf) != rtxMinBytes {
		t.Fatalf("ring grew to %d bytes for a slow stream", len(c.buf))
	}
	for s := range uint16(perLap + 10) {
		n := c.get(s, dst)
		overwritten := s < 10 // the second lap's 10 packets took their bytes
		if overwritten && n != 0 {
			t.Errorf("seq %d: overwritten by the next lap but returned", s)
		}
		if !overwritten && !bytes.Equal(dst[:n], rtxPacket(s, size).Data) {
			t.Errorf("seq %d: got %d bytes, want it held", s, n)
		}
	}
}
