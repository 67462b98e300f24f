package netem

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"net/netip"
	"sort"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
)

// pair returns an impaired sender and a plain receiver on loopback, and a
// function that collects what the receiver gets: each packet's one-way
// delay (the sender stamps its send time) and sequence number.
type arrival struct {
	seq   uint64
	delay time.Duration
	at    time.Time
	size  int
}

func pair(t *testing.T, im Impairment) (*Conn, *net.UDPConn, func(stop time.Duration) []arrival) {
	t.Helper()
	send, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	recv, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	_ = recv.SetReadBuffer(8 << 20)
	c := New(send)
	c.rng = rand.New(rand.NewPCG(1, 2)) // the same losses every run
	t.Cleanup(func() { c.Close(); recv.Close() })
	if err := c.Set(recv.LocalAddr().(*net.UDPAddr).AddrPort(), im); err != nil {
		t.Fatal(err)
	}
	var (
		mu  sync.Mutex
		got []arrival
	)
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			n, err := recv.Read(buf)
			if err != nil {
				return
			}
			now := time.Now()
			sent := time.Unix(0, int64(binary.BigEndian.Uint64(buf[8:])))
			mu.Lock()
			got = append(got, arrival{seq: binary.BigEndian.Uint64(buf), delay: now.Sub(sent), at: now, size: n})
			mu.Unlock()
		}
	}()
	collect := func(quiet time.Duration) []arrival {
		time.Sleep(quiet)
		recv.Close()
		<-done
		mu.Lock()
		defer mu.Unlock()
		return got
	}
	return c, recv, collect
}

func sendPacket(t *testing.T, c *Conn, to net.Addr, seq uint64, size int) {
	t.Helper()
	b := make([]byte, size)
	binary.BigEndian.PutUint64(b, seq)
	binary.BigEndian.PutUint64(b[8:], uint64(time.Now().UnixNano()))
	if _, err := c.WriteTo(b, to); err != nil {
		t.Fatal(err)
	}
}

// within checks a measured figure against the one set.
func within(what string, got, want, tolerance float64) error {
	if math.Abs(got-want) > tolerance*want {
		return fmt.Errorf("%s: measured %.4g, set %.4g (off by more than %.0f %%)", what, got, want, tolerance*100)
	}
	return nil
}

// attempts runs a timing measurement up to three times and fails the test
// only when every attempt is off: on a busy shared machine a goroutine can
// run tens of milliseconds late, which is the machine's delay, not the
// emulator's. A broken emulator is off all three times.
func attempts(t *testing.T, measure func(t *testing.T) error) {
	t.Helper()
	var errs []error
	for i := range 3 {
		err := measure(t)
		if err == nil {
			if i > 0 {
				t.Logf("passed at attempt %d after: %v", i+1, errs)
			}
			return
		}
		errs = append(errs, err)
	}
	t.Errorf("off in all three attempts: %v", errs)
}

func TestDelayAndJitter(t *testing.T) {
	testutil.Watchdog(t, 60*time.Second)
	attempts(t, testDelayAndJitter)
}

func testDelayAndJitter(t *testing.T) error {
	const delay, jitter = 100 * time.Millisecond, 5 * time.Millisecond
	c, recv, collect := pair(t, Impairment{Delay: delay, Jitter: jitter})
	for i := range 200 {
		sendPacket(t, c, recv.LocalAddr(), uint64(i), 200)
		time.Sleep(2 * time.Millisecond)
	}
	got := collect(delay + 200*time.Millisecond)
	if len(got) != 200 {
		t.Fatalf("%d of 200 packets arrived on a lossless link", len(got))
	}
	delays := make([]time.Duration, len(got))
	for i, a := range got {
		if a.seq != uint64(i) {
			t.Fatalf("packet %d arrived in position %d: jitter reordered", a.seq, i)
		}
		delays[i] = a.delay
	}
	// The median, not the mean: on a busy machine a goroutine now and then
	// runs late, which is the machine's delay, not the emulator's.
	sort.Slice(delays, func(i, j int) bool { return delays[i] < delays[j] })
	if lo := delays[0]; lo < delay-jitter-time.Millisecond {
		t.Errorf("fastest packet took %v, below delay − jitter", lo)
	}
	if spread := delays[len(delays)*95/100] - delays[len(delays)*5/100]; spread < jitter {
		t.Errorf("5th–95th percentile spread %v: the ±%v jitter does not show", spread, jitter)
	}
	t.Logf("median delay %v, set %v", delays[len(delays)/2], delay)
	return within("median delay (ms)", float64(delays[len(delays)/2])/1e6, float64(delay)/1e6, 0.05)
}

func TestLoss(t *testing.T) {
	testutil.Watchdog(t, 30*time.Second)
	const n, loss = 10000, 20.0
	c, recv, collect := pair(t, Impairment{Loss: loss})
	for i := range n {
		sendPacket(t, c, recv.LocalAddr(), uint64(i), 100)
		if i%100 == 99 {
			time.Sleep(time.Millisecond) // stay well inside the receive buffer
		}
	}
	got := collect(200 * time.Millisecond)
	if err := within("loss (%)", 100*(1-float64(len(got))/n), loss, 0.05); err != nil {
		t.Error(err)
	}
	if s := c.Stats(); s.Lost+s.Sent != n || int(s.Sent) != len(got) {
		t.Errorf("stats %+v for %d sent and %d received", s, n, len(got))
	}
}

func TestRate(t *testing.T) {
	testutil.Watchdog(t, 60*time.Second)
	attempts(t, testRate)
}

func testRate(t *testing.T) error {
	const rate = 4_000_000 // bit/s
	c, recv, collect := pair(t, Impairment{RateBps: rate, QueueBytes: 100_000})
	// Offer twice the rate for 2 s: the bottleneck passes its rate and
	// drops what overflows its queue (200 ms deep, so that a sender that
	// runs late on a busy machine does not leave the link idle). The sender catches up with its
	// schedule after each sleep, so a busy machine does not lower the
	// offered rate.
	start := time.Now()
	seq := uint64(0)
	for time.Since(start) < 2*time.Second {
		for due := uint64(time.Since(start).Seconds() * 2 * rate / 8 / 1200); seq < due; seq++ {
			sendPacket(t, c, recv.LocalAddr(), seq, 1200)
		}
		time.Sleep(2 * time.Millisecond)
	}
	got := collect(200 * time.Millisecond)
	if len(got) < 100 {
		t.Fatalf("only %d packets arrived", len(got))
	}
	// Throughput between the first and the last arrival.
	bytes := 0
	for _, a := range got[1:] {
		bytes += a.size
	}
	span := got[len(got)-1].at.Sub(got[0].at).Seconds()
	if s := c.Stats(); s.QueueDropped == 0 {
		t.Errorf("twice the rate offered, but the queue dropped nothing: %+v", s)
	}
	for i, a := range got {
		if i > 0 && a.seq <= got[i-1].seq {
			t.Fatalf("reordered at %d", i)
		}
	}
	t.Logf("rate %.3f Mbit/s, set %.3f", float64(bytes*8)/span/1e6, rate/1e6)
	return within("rate (Mbit/s)", float64(bytes*8)/span/1e6, rate/1e6, 0.05)
}

func TestDownAndReset(t *testing.T) {
	c, recv, collect := pair(t, Impairment{Down: true})
	sendPacket(t, c, recv.LocalAddr(), 0, 100)
	dst := recv.LocalAddr().(*net.UDPAddr).AddrPort()
	if err := c.Set(dst, Impairment{}); err != nil {
		t.Fatal(err)
	}
	sendPacket(t, c, recv.LocalAddr(), 1, 100)
	got := collect(100 * time.Millisecond)
	if len(got) != 1 || got[0].seq != 1 {
		t.Fatalf("got %v, want only the packet sent after the link came back", got)
	}
	if s := c.Stats(); s.DownDropped != 1 {
		t.Errorf("stats %+v, want one packet dropped while down", s)
	}
}

func TestValidate(t *testing.T) {
	for _, im := range []Impairment{{Delay: -1}, {Delay: 1, Jitter: 2}, {Loss: 101}, {Loss: -1}, {RateBps: -1}} {
		if err := (&Conn{links: map[netip.AddrPort]*link{}}).Set(netip.MustParseAddrPort("127.0.0.1:1"), im); err == nil {
			t.Errorf("Set(%+v) accepted", im)
		}
	}
}

// TestDead checks that a dead Conn sends nothing, not even packets delayed
// before it died, receives nothing, and works again once revived.
func TestDead(t *testing.T) {
	c, recv, collect := pair(t, Impairment{Delay: 200 * time.Millisecond})
	to := recv.LocalAddr()
	reads := make(chan string, 10)
	go func() { // reads all along, as quic-go does
		defer close(reads)
		buf := make([]byte, 64)
		for {
			n, _, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			reads <- string(buf[:n])
		}
	}()
	sendPacket(t, c, to, 1, 100) // in flight when the Conn dies
	c.SetDead(true)
	sendPacket(t, c, to, 2, 100)
	// An unimpaired destination is dropped too.
	other, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if _, err := c.WriteTo([]byte("hello"), other.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	// What arrives while dead is dropped as well: the reader sees only what
	// comes after the revival.
	if _, err := other.WriteTo([]byte("dead"), c.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(testutil.Scale(300 * time.Millisecond))
	c.SetDead(false)
	if _, err := other.WriteTo([]byte("alive"), c.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	select {
	case got := <-reads:
		if got != "alive" {
			t.Errorf("first read: %q, want \"alive\" (\"dead\" arrived while dead)", got)
		}
	case <-time.After(testutil.Scale(5 * time.Second)):
		t.Error("nothing read after the revival")
	}
	buf := make([]byte, 64)
	sendPacket(t, c, to, 3, 100)
	other.SetReadDeadline(time.Now().Add(testutil.Scale(200 * time.Millisecond)))
	if n, _, err := other.ReadFrom(buf); err == nil {
		t.Errorf("the unimpaired destination got %q sent while dead", buf[:n])
	}
	var seqs []uint64
	for _, a := range collect(testutil.Scale(time.Second)) {
		seqs = append(seqs, a.seq)
	}
	if fmt.Sprint(seqs) != "[3]" {
		t.Errorf("receiver got packets %v, want only [3], sent after the revival", seqs)
	}
	if st := c.Stats(); st.DeadDropped != 4 {
		t.Errorf("DeadDropped %d, want 4 (one in flight, two sent, one received while dead)", st.DeadDropped)
	}
}

// TestQUICSeesASocket checks that quic-go can size the buffers of and set
// don't-fragment on a Conn, as on a plain UDP socket.
func TestQUICSeesASocket(t *testing.T) {
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	c := New(udp)
	defer c.Close()
	if err := c.SetReadBuffer(1 << 20); err != nil {
		t.Error(err)
	}
	if err := c.SetWriteBuffer(1 << 20); err != nil {
		t.Error(err)
	}
	if _, err := c.SyscallConn(); err != nil {
		t.Error(err)
	}
	var _ syscall.Conn = c
}
