package relay

// The media receiver of a link. quic-go keeps at most 128 received datagrams
// and drops the rest silently. A relay that parses and fans out each
// datagram before taking the next loses a burst whenever its goroutine is
// not scheduled for the time 128 datagrams take to arrive (a few
// milliseconds at 10,000 packets/s on a busy machine). So one goroutine does
// nothing but move datagrams from quic-go's queue to a much larger one of
// our own, where a drop is counted, and a second one handles them.

import "time"

// linkReceiver handles the media datagrams of a link.
type linkReceiver struct {
	l  *quicLink
	in chan []byte // datagrams taken from quic-go, waiting to be handled

	// Owned by the media receiver.
	h   mediaHeader
	ra  reassembler
	pkt Packet // reused: it escapes to the subscribers' interface calls
}

func newLinkReceiver(l *quicLink) *linkReceiver {
	return &linkReceiver{l: l, in: make(chan []byte, receiveQueueSize)}
}

// readDatagrams drains quic-go's datagram queue into the receiver's.
func (l *quicLink) readDatagrams() {
	defer l.wg.Done()
	for {
		b, err := l.conn.ReceiveDatagram(l.ctx)
		if err != nil {
			return
		}
		l.live.heardFrom()
		if isHeartbeat(b) {
			// One that queued behind a probe train is no jitter sample.
			if now := time.Now(); !l.probeRx.delays(now) {
				l.jitter.received(b, now)
			}
			continue
		}
		if isProbe(b) {
			l.handleProbe(b) // probe.go
			continue
		}
		select {
		case l.rx.in <- b:
		default:
			l.receiveDropped.Add(1)
		}
	}
}

// receiveMedia handles the datagrams readDatagrams took.
func (l *quicLink) receiveMedia() {
	defer l.wg.Done()
	for {
		select {
		case b := <-l.rx.in:
			l.rx.handle(b)
		case <-l.ctx.Done():
			return
		}
	}
}

// handle parses one datagram, checks its hop sequence, reassembles
// fragments and hands complete packets to the stream. Every datagram that
// goes no further is counted.
func (r *linkReceiver) handle(b []byte) {
	l := r.l
	l.dgramsReceived.Add(1)
	payload, err := parseMediaHeader(b, &r.h)
	if err != nil {
		l.malformed.Add(1)
		return
	}
	l.mu.Lock()
	u := l.ups[r.h.SubID]
	l.mu.Unlock()
	if u == nil {
		l.unknown.Add(1) // unsubscribed, or not yet known
		return
	}
	frag := r.h.Flags&flagFragment != 0
	if !u.fresh(r.h.HopSeq, frag, &l.lost) {
		l.dups.Add(1)
		return
	}
	if frag {
		var ok bool
		dups := r.ra.dups
		payload, ok = r.ra.add(&r.h, payload)
		if r.ra.dups != dups {
			l.dups.Add(1)
		}
		if !ok {
			l.fragLost.Store(r.ra.evicted)
			return
		}
	}
	l.received.Add(1)
	r.pkt = Packet{Track: r.h.Track, Keyframe: r.h.Flags&flagKeyframe != 0, Data: payload}
	u.s.receive(u, &r.pkt)
}
