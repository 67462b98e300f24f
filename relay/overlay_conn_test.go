package relay

import (
	"net"
	"sync/atomic"
	"testing"

	"github.com/stemflow/stemflow/internal/testutil"
)

// countingConn counts what the overlay sends through it.
type countingConn struct {
	net.PacketConn
	writes atomic.Uint64
}

func (c *countingConn) WriteTo(p []byte, addr net.Addr) (int, error) {
	c.writes.Add(1)
	return c.PacketConn.WriteTo(p, addr)
}

// TestOverlayOnGivenConn runs a link whose dialing end sends through a
// PacketConn handed to StartOverlay, as the WAN lab does with netem.Conn,
// and checks that Close leaves that conn to its owner but frees the socket
// it bound itself for Listen.
func TestOverlayOnGivenConn(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 30e9)
	ca, err := NewClusterCA()
	if err != nil {
		t.Fatal(err)
	}
	idA, _ := ca.Issue("a")
	idB, _ := ca.Issue("b")
	hb := NewHub(Config{Datacenter: "b", Logger: quietLogger()})
	defer hb.Close()
	ob, err := StartOverlay(hb, OverlayConfig{Listen: "127.0.0.1:0", Neighbours: map[string]string{"a": "127.0.0.1:0"}, Identity: idB, Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	cc := &countingConn{PacketConn: udp}
	ha := NewHub(Config{Datacenter: "a", Logger: quietLogger()})
	defer ha.Close()
	oa, err := StartOverlay(ha, OverlayConfig{Listen: "ignored:1", Conn: cc, Neighbours: map[string]string{"b": ob.Addr().String()}, Identity: idA, Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if oa.Addr().String() != udp.LocalAddr().String() {
		t.Errorf("overlay address %s, want the given conn's %s", oa.Addr(), udp.LocalAddr())
	}
	testutil.WaitFor(t, "the link a–b over the given conn", func() bool { return len(ha.Links()) == 1 && len(hb.Links()) == 1 })
	if cc.writes.Load() == 0 {
		t.Error("the overlay sent nothing through the conn it was given")
	}
	oa.Close()
	if _, err := udp.WriteTo([]byte("x"), ob.Addr()); err != nil {
		t.Errorf("Close closed the conn its caller owns: %v", err)
	}
	bAddr := ob.Addr().(*net.UDPAddr)
	ob.Close()
	again, err := net.ListenUDP("udp", bAddr)
	if err != nil {
		t.Fatalf("rebinding %s after Close: %v (Close must free the socket it bound)", bAddr, err)
	}
	again.Close()
}
