package relay

import (
	"context"
	"net"
	"slices"
	"sync"
	"testing"
	"time"
)

// BenchmarkForwardPath measures what a relay node does per packet on its
// own, without the network: parse an arriving datagram, check its hop
// sequence, fan the packet out to a downstream link's queue, then take it off
// the queue and encode the next hop's datagram. It must not allocate.
func BenchmarkForwardPath(b *testing.B) {
	h := NewHub(Config{Datacenter: "b", Logger: quietLogger()})
	defer h.Close()
	s := newStream(h, "x", "a")
	s.setReady(h264Desc)
	l := &quicLink{hub: h, out: make(chan outItem, 1)}
	d := &downSub{id: 1, l: l}
	s.attach(d)
	u := &upSub{id: 1, s: s}

	in := mediaHeader{SubID: 1}
	pkt := rtpPacket(b, 1, 1, false, 1100)
	dgram := append(in.append(nil), pkt...)
	scratch := make([]byte, 0, 2048)
	var sent int
	send := func(p []byte) error { sent += len(p); return nil }
	var lost = &l.lost
	var p Packet

	b.ReportAllocs()
	b.SetBytes(int64(len(pkt)))
	for i := 0; b.Loop(); i++ {
		// Arrival.
		dgram[8], dgram[9], dgram[10], dgram[11] = byte(i>>24), byte(i>>16), byte(i>>8), byte(i)
		var h mediaHeader
		payload, err := parseMediaHeader(dgram, &h)
		if err != nil || !u.fresh(h.HopSeq, false, lost) {
			b.Fatal("parse", err)
		}
		p = Packet{Track: h.Track, Data: payload}
		s.writePacket(&p)
		// Departure.
		it := <-l.out
		it.d.hopSeq++
		out := mediaHeader{Track: it.b.Track, SubID: it.d.id, HopSeq: it.d.hopSeq}
		fragment(out, it.b.Data(), initialBudget, scratch, send)
		it.b.Release()
	}
	if sent == 0 {
		b.Fatal("nothing forwarded")
	}
}

const hopPackets = 20000

// BenchmarkRelayHop pushes packets from a publisher at a through the relay
// at b to a subscriber at c over real QUIC links on loopback, and a plain UDP
// forwarder (sender → forwarder → receiver) in the same run as the baseline.
// It reports delivered packets per second of each and their ratio.
func BenchmarkRelayHop(b *testing.B) {
	for b.Loop() {
		// Three interleaved rounds, medians reported: the machine is shared
		// and a single round swings either way.
		var udp, udpLoss, relay, loss []float64
		for range 3 {
			r, l := udpForwarderRate(b, hopPackets)
			udp, udpLoss = append(udp, r), append(udpLoss, l)
			r, l = relayHopRate(b, hopPackets)
			relay, loss = append(relay, r), append(loss, l)
		}
		b.ReportMetric(median(udp), "udp-pkt/s")
		b.ReportMetric(median(udpLoss)*100, "udp-loss-%")
		b.ReportMetric(median(relay), "relay-pkt/s")
		b.ReportMetric(median(loss)*100, "relay-loss-%")
		b.ReportMetric(median(relay)/median(udp), "ratio")
	}
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// pace sends n packets in bursts of 16, yielding between bursts, and
// returns when done.
func pace(n int, send func(i int)) {
	for i := 0; i < n; i++ {
		send(i)
		if i%16 == 15 {
			time.Sleep(50 * time.Microsecond)
		}
	}
}

func udpForwarderRate(b *testing.B, n int) (rate, loss float64) {
	listen := func() *net.UDPConn {
		c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			b.Fatal(err)
		}
		c.SetReadBuffer(4 << 20)
		return c
	}
	recv, fwd, send := listen(), listen(), listen()
	defer recv.Close()
	defer fwd.Close()
	defer send.Close()
	go func() {
		buf := make([]byte, 2048)
		to := recv.LocalAddr().(*net.UDPAddr)
		for {
			k, _, err := fwd.ReadFromUDP(buf)
			if err != nil {
				return
			}
			fwd.WriteToUDP(buf[:k], to)
		}
	}()
	type result struct {
		count int
		last  time.Time
	}
	got := make(chan result)
	go func() {
		buf := make([]byte, 2048)
		count := 0
		var last time.Time
		for {
			recv.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			if _, _, err := recv.ReadFromUDP(buf); err != nil {
				break
			}
			count++
			last = time.Now()
			if count == n {
				break
			}
		}
		got <- result{count, last}
	}()
	pkt := rtpPacket(b, 1, 1, false, 1100)
	to := fwd.LocalAddr().(*net.UDPAddr)
	start := time.Now()
	pace(n, func(int) { send.WriteToUDP(pkt, to) })
	sendEnd := time.Now()
	r := <-got
	if r.count == 0 {
		return 0, 1
	}
	end := r.last
	if sendEnd.After(end) {
		end = sendEnd
	}
	return float64(r.count) / end.Sub(start).Seconds(), 1 - float64(r.count)/float64(n)
}

func relayHopRate(b *testing.B, n int) (rate, loss float64) {
	hubs := benchChain(b)
	a, c := hubs[0], hubs[2]
	pub, err := a.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer pub.Close()
	deadline := time.Now().Add(5 * time.Second)
	for len(c.Streams()) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	got := make(chan int, 1)
	first := make(chan struct{})
	count := 0
	var last time.Time
	var mu sync.Mutex
	sub, err := c.Subscribe(context.Background(), "x", SubscriberFunc(func(p *Packet) {
		mu.Lock()
		defer mu.Unlock()
		count++
		last = time.Now()
		if count == n {
			got <- count
		}
	}))
	if err != nil {
		b.Fatal(err)
	}
	defer sub.Close()
	close(first)
	pkt := rtpPacket(b, 1, 1, false, 1100)
	// Warm up: let QUIC's congestion window open, as on a link that has
	// carried streams for a while.
	for i := 0; i < 3000; i++ {
		pub.WriteRTP(0, pkt)
		if i%8 == 7 {
			time.Sleep(200 * time.Microsecond)
		}
	}
	time.Sleep(100 * time.Millisecond)
	mu.Lock()
	count = 0
	mu.Unlock()
	start := time.Now()
	pace(n, func(i int) { pub.WriteRTP(0, pkt) })
	sendEnd := time.Now()
	select {
	case <-got:
	case <-time.After(2 * time.Second):
	}
	sub.Close()
	mu.Lock()
	defer mu.Unlock()
	for _, h := range hubs {
		for _, l := range h.Links() {
			if testing.Verbose() && l.SendDropped+l.HopLost > 0 {
				b.Logf("%s→%s: sent %d, send queue dropped %d; %s received %d, hop lost %d", h.Datacenter(), l.Peer, l.PacketsSent, l.SendDropped, h.Datacenter(), l.PacketsReceived, l.HopLost)
			}
		}
	}
	if count == 0 {
		return 0, 1
	}
	if testing.Verbose() {
		b.Logf("relay: %d delivered, last after %v, sending took %v", count, last.Sub(start), sendEnd.Sub(start))
	}
	end := last
	if sendEnd.After(end) {
		end = sendEnd
	}
	return float64(count) / end.Sub(start).Seconds(), 1 - float64(count)/float64(n)
}

func benchChain(b *testing.B) []*Hub {
	ca, err := NewClusterCA()
	if err != nil {
		b.Fatal(err)
	}
	names := []string{"a", "b", "c"}
	hubs := make([]*Hub, 3)
	addrs := make([]string, 3)
	for i := 2; i >= 0; i-- {
		h := NewHub(Config{Datacenter: names[i], Logger: quietLogger()})
		id, _ := ca.Issue(names[i])
		nb := map[string]string{}
		if i < 2 {
			nb[names[i+1]] = addrs[i+1]
		}
		o, err := StartOverlay(h, OverlayConfig{Listen: "127.0.0.1:0", Neighbours: nb, Identity: id, Logger: quietLogger()})
		if err != nil {
			b.Fatal(err)
		}
		addrs[i] = o.Addr().String()
		hubs[i] = h
		b.Cleanup(func() { o.Close(); h.Close() })
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(hubs[1].Links()) < 2 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	return hubs
}
