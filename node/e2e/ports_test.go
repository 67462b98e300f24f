package e2e

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
)

// holdDevPorts listens, for the rest of the test, on the ports a default
// `stemflow dev` takes: HTTP 8080–8082 and RTSP 8554–8556 over TCP, RTP and
// RTCP 9554–9559 over UDP. A port something else holds already (a running
// `stemflow dev`) serves as well.
func holdDevPorts(t *testing.T) {
	t.Helper()
	held := 0
	for _, p := range []int{8080, 8081, 8082, 8554, 8555, 8556} {
		if ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p)); err == nil {
			t.Cleanup(func() { ln.Close() })
			held++
		}
	}
	for p := 9554; p <= 9559; p++ {
		if c, err := net.ListenPacket("udp", "127.0.0.1:"+strconv.Itoa(p)); err == nil {
			t.Cleanup(func() { c.Close() })
			held++
		}
	}
	t.Logf("holding %d of the 12 ports of a default stemflow dev (the others were taken already)", held)
}

// TestChainsBesideRunningDev: with the ports of a default `stemflow dev`
// taken, two clusters start side by side (as two test packages running at
// once would) and carry an ffmpeg RTSP-over-UDP stream from a to a WHEP
// viewer at c. Before, the end-to-end tests passed fixed base ports to
// StartDev, and two runs at once failed with "address already in use".
func TestChainsBesideRunningDev(t *testing.T) {
	testutil.Watchdog(t, 90*time.Second)
	holdDevPorts(t)
	for i := range 2 {
		c := startChain(t)
		for j := range c.Nodes {
			for _, addr := range []string{c.Nodes[j].HTTPAddr().String(), c.Nodes[j].RTSPAddr()} {
				_, port, _ := net.SplitHostPort(addr)
				if p, _ := strconv.Atoi(port); p >= 8080 && p <= 8082 || p >= 8554 && p <= 8556 {
					t.Fatalf("cluster %d, datacenter %s listens on %s, a port a default stemflow dev takes", i, c.Datacenters()[j], addr)
				}
			}
		}
		name := fmt.Sprintf("beside%d", i)
		ffmpegPublish(t, c.RTSPURL(0, name), false) // RTP over UDP: the even/odd pair must be free too
		waitAnnounced(t, c, 2, name)
		waitFlowing(t, c, 0, name)
		ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(30*time.Second))
		v := view(t, ctx, c.HTTPURL(2)+"/whep/"+name)
		select {
		case <-v.FirstKeyframe():
		case <-time.After(testutil.Scale(5 * time.Second)):
			t.Errorf("cluster %d: no keyframe at c within 5 s", i)
		}
		cancel()
	}
}
