// Package netem impairs UDP traffic in userspace, for the WAN lab: delay,
// jitter, random loss, a rate limit with a bounded queue (a bottleneck link)
// and a link that is down. The kernel here has no netem, and a userspace
// emulator needs no root, so the lab runs in CI.
//
// A Conn wraps the net.PacketConn a node's QUIC endpoint uses and impairs
// what it sends, per destination: each node impairs its own direction of a
// link, so a symmetric link has both ends impair their sends with the same
// Impairment, and its round-trip time is twice the Delay.
package netem

import (
	"container/heap"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Impairment describes one direction of an emulated link. The zero value is
// an unimpaired link.
type Impairment struct {
	// Delay is added to every packet (one way).
	Delay time.Duration
	// Jitter varies the delay uniformly within ±Jitter. Packets keep their
	// order, as on a real path.
	Jitter time.Duration
	// Loss is the percentage of packets dropped at random, 0 to 100.
	Loss float64
	// RateBps, when above zero, limits the link to that many bits per
	// second: packets leave one after another at that rate, and wait in a
	// queue of QueueBytes; beyond it they are dropped, as at a real
	// bottleneck.
	RateBps int64
	// QueueBytes bounds the bottleneck's queue (default: 50 ms at RateBps,
	// at least 16 KB).
	QueueBytes int
	// Down drops everything.
	Down bool
}

// Validate reports an impairment that cannot be emulated.
func (im Impairment) Validate() error {
	switch {
	case im.Delay < 0:
		return fmt.Errorf("delay %v is negative", im.Delay)
	case im.Jitter < 0:
		return fmt.Errorf("jitter %v is negative", im.Jitter)
	case im.Jitter > im.Delay:
		return fmt.Errorf("jitter %v is larger than the delay %v", im.Jitter, im.Delay)
	case im.Loss < 0 || im.Loss > 100:
		return fmt.Errorf("loss %g%% is not within 0–100", im.Loss)
	case im.RateBps < 0:
		return fmt.Errorf("rate %d bit/s is negative", im.RateBps)
	case im.QueueBytes < 0:
		return fmt.Errorf("queue of %d bytes is negative", im.QueueBytes)
	}
	return nil
}

func (im Impairment) queueBytes() int {
	if im.QueueBytes > 0 {
		return im.QueueBytes
	}
	return max(16<<10, int(im.RateBps/8/20))
}

// Stats counts what a Conn did to the packets it sent.
type Stats struct {
	Sent, Lost, QueueDropped, DownDropped uint64
	// DeadDropped counts the packets sent and received while the Conn was
	// dead (see SetDead).
	DeadDropped uint64
}

// Conn is a net.PacketConn whose sends are impaired per destination. Reads
// pass through untouched. It is safe for concurrent use.
type Conn struct {
	net.PacketConn

	wake chan struct{}
	done chan struct{}
	wg   sync.WaitGroup
	dead atomic.Bool

	mu      sync.Mutex // guards the following fields
	links   map[netip.AddrPort]*link
	pending schedule
	seq     uint64 // orders packets due at the same time
	stats   Stats
	closed  bool
	rng     *rand.Rand
}

// link is the state of one impaired direction.
type link struct {
	im          Impairment
	nextFree    time.Time // when the bottleneck finishes sending what it holds
	lastArrival time.Time // arrival of the latest packet, to keep order
}

// New wraps c. Until Set is called every destination is unimpaired.
func New(c net.PacketConn) *Conn {
	nc := &Conn{
		PacketConn: c,
		wake:       make(chan struct{}, 1),
		done:       make(chan struct{}),
		links:      make(map[netip.AddrPort]*link),
		rng:        rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())),
	}
	nc.wg.Add(1)
	go nc.run()
	return nc
}

// Set impairs what is sent to dst from now on. Packets already in flight
// keep the impairment they were sent with.
func (c *Conn) Set(dst netip.AddrPort, im Impairment) error {
	if err := im.Validate(); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if im == (Impairment{}) {
		delete(c.links, dst)
		return nil
	}
	l := c.links[dst]
	if l == nil {
		l = &link{}
		c.links[dst] = l
	}
	l.im = im
	return nil
}

// SetDead makes the Conn drop everything it is asked to send and everything
// it receives (and the packets still waiting for their time), as the network
// does to a host whose process died; false brings it back. A node killed in
// the WAN lab goes dead before it closes, so that no goodbye reaches its
// peers and they notice only by silence.
func (c *Conn) SetDead(dead bool) {
	c.dead.Store(dead)
	if dead {
		c.mu.Lock()
		c.stats.DeadDropped += uint64(len(c.pending))
		c.pending = nil
		c.mu.Unlock()
	}
}

// Dead reports whether SetDead(true) is in force.
func (c *Conn) Dead() bool { return c.dead.Load() }

// ReadFrom reads the next packet, discarding those that arrive while the
// Conn is dead.
func (c *Conn) ReadFrom(p []byte) (int, net.Addr, error) {
	for {
		n, addr, err := c.PacketConn.ReadFrom(p)
		if err != nil || !c.dead.Load() {
			return n, addr, err
		}
		c.mu.Lock()
		c.stats.DeadDropped++
		c.mu.Unlock()
	}
}

// SetReadBuffer, SetWriteBuffer and SyscallConn reach the wrapped conn, so
// that quic-go sizes its buffers and sets the don't-fragment bit (which its
// path-MTU discovery needs) as on a plain UDP socket. quic-go still sends
// through WriteTo: Conn has no WriteMsgUDP.
func (c *Conn) SetReadBuffer(bytes int) error {
	if b, ok := c.PacketConn.(interface{ SetReadBuffer(int) error }); ok {
		return b.SetReadBuffer(bytes)
	}
	return fmt.Errorf("netem: the wrapped %T has no SetReadBuffer", c.PacketConn)
}

// SetWriteBuffer sets the wrapped conn's send buffer.
func (c *Conn) SetWriteBuffer(bytes int) error {
	if b, ok := c.PacketConn.(interface{ SetWriteBuffer(int) error }); ok {
		return b.SetWriteBuffer(bytes)
	}
	return fmt.Errorf("netem: the wrapped %T has no SetWriteBuffer", c.PacketConn)
}

// SyscallConn returns the wrapped conn's raw socket; it fails when the
// wrapped conn is not a socket (quic-go then refuses the Conn: wrap a
// *net.UDPConn).
func (c *Conn) SyscallConn() (syscall.RawConn, error) {
	if s, ok := c.PacketConn.(syscall.Conn); ok {
		return s.SyscallConn()
	}
	return nil, fmt.Errorf("netem: the wrapped %T is not a socket", c.PacketConn)
}

// Stats returns the counters of every destination together.
func (c *Conn) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stats
}

// WriteTo impairs p on its way to addr. It never blocks on the emulated
// link: a packet that must wait is copied and sent later by the Conn's own
// goroutine, and a dropped packet is reported as written, as the network
// would.
func (c *Conn) WriteTo(p []byte, addr net.Addr) (int, error) {
	dst, ok := addrPort(addr)
	if !ok {
		if c.dead.Load() {
			return len(p), nil
		}
		return c.PacketConn.WriteTo(p, addr)
	}
	now := time.Now()
	c.mu.Lock()
	if c.dead.Load() {
		c.stats.DeadDropped++
		c.mu.Unlock()
		return len(p), nil
	}
	l := c.links[dst]
	if c.closed || l == nil {
		c.mu.Unlock()
		return c.PacketConn.WriteTo(p, addr)
	}
	im := l.im
	switch {
	case im.Down:
		c.stats.DownDropped++
		c.mu.Unlock()
		return len(p), nil
	case im.Loss > 0 && c.rng.Float64()*100 < im.Loss:
		c.stats.Lost++
		c.mu.Unlock()
		return len(p), nil
	}
	depart := now
	if im.RateBps > 0 {
		if l.nextFree.Before(now) {
			l.nextFree = now
		}
		queued := int(l.nextFree.Sub(now).Seconds() * float64(im.RateBps) / 8)
		if queued+len(p) > im.queueBytes() {
			c.stats.QueueDropped++
			c.mu.Unlock()
			return len(p), nil
		}
		l.nextFree = l.nextFree.Add(time.Duration(float64(len(p)*8) / float64(im.RateBps) * float64(time.Second)))
		depart = l.nextFree
	}
	arrive := depart.Add(im.Delay)
	if im.Jitter > 0 {
		arrive = arrive.Add(time.Duration((c.rng.Float64()*2 - 1) * float64(im.Jitter)))
	}
	if arrive.Before(l.lastArrival) {
		arrive = l.lastArrival
	}
	l.lastArrival = arrive
	c.stats.Sent++
	if !arrive.After(now) {
		c.mu.Unlock()
		return c.PacketConn.WriteTo(p, addr)
	}
	c.seq++
	heap.Push(&c.pending, &packet{at: arrive, seq: c.seq, data: append([]byte(nil), p...), addr: addr})
	first := c.pending[0].at.Equal(arrive)
	c.mu.Unlock()
	if first {
		select {
		case c.wake <- struct{}{}:
		default:
		}
	}
	return len(p), nil
}

// run sends delayed packets when their time comes.
func (c *Conn) run() {
	defer c.wg.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		c.mu.Lock()
		var due []*packet
		now := time.Now()
		for len(c.pending) > 0 && !c.pending[0].at.After(now) {
			due = append(due, heap.Pop(&c.pending).(*packet))
		}
		wait := time.Hour
		if len(c.pending) > 0 {
			wait = c.pending[0].at.Sub(now)
		}
		c.mu.Unlock()
		for _, p := range due {
			if c.dead.Load() {
				continue
			}
			_, _ = c.PacketConn.WriteTo(p.data, p.addr) // lost on the wire if it fails
		}
		timer.Reset(wait)
		select {
		case <-timer.C:
		case <-c.wake:
		case <-c.done:
			return
		}
	}
}

// Close drops what is still in flight and closes the underlying conn.
func (c *Conn) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	c.pending = nil
	c.mu.Unlock()
	close(c.done)
	c.wg.Wait()
	return c.PacketConn.Close()
}

func addrPort(a net.Addr) (netip.AddrPort, bool) {
	if u, ok := a.(*net.UDPAddr); ok {
		ap := u.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), true
	}
	return netip.AddrPort{}, false
}

// packet is a send waiting for its time.
type packet struct {
	at   time.Time
	seq  uint64
	data []byte
	addr net.Addr
}

// schedule is a min-heap of packets by send time, then by the order they
// were written.
type schedule []*packet

func (s schedule) Len() int { return len(s) }
func (s schedule) Less(i, j int) bool {
	return s[i].at.Before(s[j].at) || s[i].at.Equal(s[j].at) && s[i].seq < s[j].seq
}
func (s schedule) Swap(i, j int) { s[i], s[j] = s[j], s[i] }
func (s *schedule) Push(x any)   { *s = append(*s, x.(*packet)) }
func (s *schedule) Pop() any {
	old := *s
	p := old[len(old)-1]
	old[len(old)-1] = nil
	*s = old[:len(old)-1]
	return p
}
