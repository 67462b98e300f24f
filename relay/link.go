package relay

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
)

const (
	// ctlQueueSize bounds the control messages waiting to be written to a
	// neighbour; a neighbour that lets it fill up is dropped.
	ctlQueueSize = 4096
	// mediaQueueSize bounds the media packets waiting to be sent to a
	// neighbour; beyond it packets are dropped and counted.
	mediaQueueSize = 1024
	// initialBudget is the datagram payload quic-go accepts before path-MTU
	// discovery has run.
	initialBudget = 1200
	// subscribeTimeout bounds how long a neighbour's subscription may wait for
	// a stream further upstream.
	subscribeTimeout = 5 * time.Second
)

// LinkStats counts what crossed one link. All counters only grow.
type LinkStats struct {
	Peer            string `json:"peer"`
	PacketsSent     uint64 `json:"packets_sent"`
	DatagramsSent   uint64 `json:"datagrams_sent"`
	PacketsReceived uint64 `json:"packets_received"`
	// SendDropped counts packets dropped because the neighbour's queue was
	// full (a slow link).
	SendDropped uint64 `json:"send_dropped"`
	// HopLost counts packets missing from the hop sequence on arrival: lost
	// on the wire or in quic-go's datagram queue.
	HopLost uint64 `json:"hop_lost"`
	// Malformed counts datagrams that failed to parse.
	Malformed uint64 `json:"malformed"`
	// FragmentsGivenUp counts fragmented packets that never completed.
	FragmentsGivenUp uint64        `json:"fragments_given_up"`
	RTT              time.Duration `json:"rtt_ns"`
}

// quicLink is the connection to one neighbouring datacenter. It owns three
// goroutines: the control reader, the control writer and the media sender;
// the datagram reader is the fourth. Close (or the connection dying) stops all
// of them.
type quicLink struct {
	hub  *Hub
	conn *quic.Conn
	ctl  *quic.Stream
	peer string
	log  *slog.Logger

	ctx    context.Context
	cancel context.CancelCauseFunc
	wg     sync.WaitGroup

	ctlOut chan *controlMsg
	out    chan outItem

	nextSubID atomic.Uint32

	sent, dgramsSent, received, dropped, lost, malformed, fragLost atomic.Uint64

	mu    sync.Mutex          // guards the following fields
	ups   map[uint32]*upSub   // streams we receive from the neighbour
	downs map[uint32]*downSub // streams the neighbour receives from us
}

var _ link = (*quicLink)(nil)

type outItem struct {
	d *downSub
	b *Buffer
}

func newLink(h *Hub, conn *quic.Conn, ctl *quic.Stream, peer string) *quicLink {
	ctx, cancel := context.WithCancelCause(context.Background())
	return &quicLink{
		hub:    h,
		conn:   conn,
		ctl:    ctl,
		peer:   peer,
		log:    h.log.With("peer", peer),
		ctx:    ctx,
		cancel: cancel,
		ctlOut: make(chan *controlMsg, ctlQueueSize),
		out:    make(chan outItem, mediaQueueSize),
		ups:    make(map[uint32]*upSub),
		downs:  make(map[uint32]*downSub),
	}
}

// run serves the link until the connection ends. br reads the control stream
// past the hello.
func (l *quicLink) run(br *bufio.Reader) error {
	l.wg.Add(3)
	go l.writeControl()
	go l.sendMedia()
	go l.receiveMedia()
	l.hub.addLink(l)
	err := l.readControl(br)
	l.cancel(err)
	l.conn.CloseWithError(0, "")
	l.wg.Wait()
	l.hub.removeLink(l, err)
	l.closeSubscriptions(err)
	return err
}

func (l *quicLink) close(cause error) {
	l.cancel(cause)
	l.conn.CloseWithError(0, cause.Error())
}

// sendCtl queues a control message. A neighbour that stops reading control
// messages altogether is disconnected rather than allowed to block us.
func (l *quicLink) sendCtl(m *controlMsg) {
	select {
	case l.ctlOut <- m:
	case <-l.ctx.Done():
	default:
		l.close(errors.New("control queue to neighbour is full"))
	}
}

func (l *quicLink) writeControl() {
	defer l.wg.Done()
	var buf []byte
	for {
		select {
		case m := <-l.ctlOut:
			buf = appendControl(buf[:0], m)
			if _, err := l.ctl.Write(buf); err != nil {
				l.cancel(fmt.Errorf("writing control stream: %w", err))
				return
			}
		case <-l.ctx.Done():
			return
		}
	}
}

func (l *quicLink) readControl(br *bufio.Reader) error {
	for {
		m, err := readControl(br, func(b []byte) error { _, err := io.ReadFull(br, b); return err })
		if err != nil {
			if l.ctx.Err() != nil {
				return context.Cause(l.ctx)
			}
			return fmt.Errorf("reading control stream: %w", err)
		}
		l.handleControl(m)
	}
}

func (l *quicLink) handleControl(m *controlMsg) {
	switch m.Type {
	case msgAnnounce:
		l.hub.handleAnnounce(l, m.Stream, m.Hops)
	case msgUnannounce:
		l.hub.handleUnannounce(l, m.Stream)
	case msgSubscribe:
		l.serveSubscribe(m.SubID, m.Stream)
	case msgUnsubscribe:
		l.mu.Lock()
		d := l.downs[m.SubID]
		delete(l.downs, m.SubID)
		l.mu.Unlock()
		if d != nil {
			d.close()
		}
	case msgKeyframeRequest:
		l.mu.Lock()
		d := l.downs[m.SubID]
		l.mu.Unlock()
		if d != nil {
			d.requestKeyframe()
		}
	case msgSubscribeOK:
		if u := l.upSub(m.SubID, false); u != nil {
			if err := m.Desc.Validate(); err != nil {
				l.hub.removeStream(u.s, fmt.Errorf("datacenter %s sent a bad description: %w", l.peer, err))
				return
			}
			u.ready.Do(func() {
				u.s.setFlags(Flags(m.Flags)) // before subscribers can see the stream
				u.s.setReady(m.Desc)
			})
		}
	case msgStreamFlags:
		if u := l.upSub(m.SubID, false); u != nil {
			u.s.setFlags(Flags(m.Flags))
		}
	case msgSubscribeError:
		if u := l.upSub(m.SubID, true); u != nil {
			err := fmt.Errorf("datacenter %s: %s", l.peer, m.Reason)
			if m.Code == codeNotFound {
				err = fmt.Errorf("%w: datacenter %s: %s", ErrStreamNotFound, l.peer, m.Reason)
			}
			l.hub.removeStream(u.s, err)
		}
	case msgStreamEnd:
		if u := l.upSub(m.SubID, true); u != nil {
			l.hub.removeStream(u.s, fmt.Errorf("upstream datacenter %s: %s", l.peer, m.Reason))
		}
	default:
		l.log.Warn("unexpected control message", "type", m.Type)
	}
}

func (l *quicLink) upSub(id uint32, remove bool) *upSub {
	l.mu.Lock()
	defer l.mu.Unlock()
	u := l.ups[id]
	if remove {
		delete(l.ups, id)
	}
	return u
}

// closeSubscriptions ends what the link carried once it is gone.
func (l *quicLink) closeSubscriptions(cause error) {
	l.mu.Lock()
	ups, downs := l.ups, l.downs
	l.ups, l.downs = map[uint32]*upSub{}, map[uint32]*downSub{}
	l.mu.Unlock()
	for _, d := range downs {
		d.close()
	}
	for _, u := range ups {
		l.hub.removeStream(u.s, fmt.Errorf("link to datacenter %s lost: %w", l.peer, cause))
	}
	for {
		select {
		case it := <-l.out:
			it.b.Release()
		default:
			return
		}
	}
}

// announce, unannounce and subscribe implement link for the hub.

func (l *quicLink) announce(name string, hops []string) {
	l.sendCtl(&controlMsg{Type: msgAnnounce, Stream: name, Hops: hops})
}

func (l *quicLink) unannounce(name string) {
	l.sendCtl(&controlMsg{Type: msgUnannounce, Stream: name})
}

func (l *quicLink) subscribe(s *Stream) source {
	u := &upSub{id: l.nextSubID.Add(1), s: s, l: l}
	l.mu.Lock()
	l.ups[u.id] = u
	l.mu.Unlock()
	l.sendCtl(&controlMsg{Type: msgSubscribe, SubID: u.id, Stream: s.name})
	return u
}

// upSub is a stream this node receives from the neighbour.
type upSub struct {
	id    uint32
	s     *Stream
	l     *quicLink
	ready sync.Once

	// Owned by the datagram reader.
	lastSeq uint32
	window  uint64 // bit i: lastSeq-i was seen
	seen    bool
}

func (u *upSub) requestKeyframe() {
	u.l.sendCtl(&controlMsg{Type: msgKeyframeRequest, SubID: u.id})
}

func (u *upSub) stop() {
	if u.l.upSub(u.id, true) != nil {
		u.l.sendCtl(&controlMsg{Type: msgUnsubscribe, SubID: u.id})
	}
}

// receiveMedia drains quic-go's datagram queue, which holds only 128 and
// drops silently when full, so it does nothing but parse and fan out.
func (l *quicLink) receiveMedia() {
	defer l.wg.Done()
	var (
		h   mediaHeader
		ra  reassembler
		pkt Packet // reused: it escapes to the subscribers' interface calls
	)
	for {
		b, err := l.conn.ReceiveDatagram(l.ctx)
		if err != nil {
			return
		}
		payload, err := parseMediaHeader(b, &h)
		if err != nil {
			l.malformed.Add(1)
			continue
		}
		l.mu.Lock()
		u := l.ups[h.SubID]
		l.mu.Unlock()
		if u == nil {
			continue // unsubscribed, or not yet known
		}
		if !u.fresh(h.HopSeq, h.Flags&flagFragment != 0, &l.lost) {
			continue // duplicate
		}
		if h.Flags&flagFragment != 0 {
			var ok bool
			if payload, ok = ra.add(&h, payload); !ok {
				l.fragLost.Store(ra.evicted)
				continue
			}
		}
		l.received.Add(1)
		pkt = Packet{Track: h.Track, Keyframe: h.Flags&flagKeyframe != 0, Data: payload}
		u.s.writePacket(&pkt)
	}
}

// fresh reports whether a datagram with hop sequence seq may carry a packet
// not delivered yet, and counts gaps in the sequence as losses. A 64-entry
// window of recent sequence numbers catches duplicate packets. Every fragment
// of a packet shares its sequence number, so fragments pass and the
// reassembler drops those of packets already complete.
func (u *upSub) fresh(seq uint32, frag bool, lost *atomic.Uint64) bool {
	if !u.seen {
		u.seen, u.lastSeq, u.window = true, seq, 1
		return true
	}
	d := int32(seq - u.lastSeq)
	switch {
	case d > 0:
		if d > 1 {
			lost.Add(uint64(d - 1))
		}
		if d >= 64 {
			u.window = 0
		} else {
			u.window <<= uint(d)
		}
		u.window |= 1
		u.lastSeq = seq
		return true
	case d == 0:
		return frag
	case d > -64:
		bit := uint64(1) << uint(-d)
		if u.window&bit != 0 {
			return frag
		}
		u.window |= bit
		lost.Add(^uint64(0)) // it was counted lost when the gap appeared
		return true
	}
	return false // too old
}

// serveSubscribe subscribes the neighbour to a stream of ours.
func (l *quicLink) serveSubscribe(id uint32, name string) {
	d := &downSub{id: id, l: l, closed: make(chan struct{})}
	l.mu.Lock()
	if _, dup := l.downs[id]; dup {
		l.mu.Unlock()
		l.log.Warn("duplicate subscription id from neighbour", "id", id)
		return
	}
	l.downs[id] = d
	l.mu.Unlock()

	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		ctx, cancel := context.WithTimeout(l.ctx, subscribeTimeout)
		sub, err := l.hub.Subscribe(ctx, name, d)
		cancel()
		if err != nil {
			l.mu.Lock()
			delete(l.downs, id)
			l.mu.Unlock()
			code := uint64(codeInternal)
			if errors.Is(err, ErrStreamNotFound) {
				code = codeNotFound
			}
			l.sendCtl(&controlMsg{Type: msgSubscribeError, SubID: id, Code: code, Reason: err.Error()})
			return
		}
		d.sub.Store(sub)
		flags, flagsChanged := sub.Stream().watchFlags()
		l.sendCtl(&controlMsg{Type: msgSubscribeOK, SubID: id, Desc: sub.Description(), Flags: uint32(flags)})
		for {
			select {
			case <-flagsChanged:
				flags, flagsChanged = sub.Stream().watchFlags()
				l.sendCtl(&controlMsg{Type: msgStreamFlags, SubID: id, Flags: uint32(flags)})
				continue
			case <-sub.Done():
				l.mu.Lock()
				delete(l.downs, id)
				l.mu.Unlock()
				reason := "stream ended"
				if err := sub.Err(); err != nil {
					reason = err.Error()
				}
				l.sendCtl(&controlMsg{Type: msgStreamEnd, SubID: id, Reason: reason})
			case <-d.closed:
			case <-l.ctx.Done():
			}
			break
		}
		sub.Close()
	}()
}

// downSub is a stream the neighbour receives from this node. It is the
// hub's Subscriber: packets go to the link's bounded media queue.
type downSub struct {
	id        uint32
	l         *quicLink
	closed    chan struct{}
	closeOnce sync.Once
	sub       atomic.Pointer[Subscription] // set once subscribed

	hopSeq uint32 // owned by the media sender
}

var _ Subscriber = (*downSub)(nil)

func (d *downSub) WritePacket(p *Packet) { d.WriteBuffer(NewBuffer(p)) }

var _ BufferWriter = (*downSub)(nil)

// WriteBuffer queues a reference to b for the media sender.
func (d *downSub) WriteBuffer(b *Buffer) {
	select {
	case d.l.out <- outItem{d: d, b: b}:
	default:
		b.Release()
		d.l.dropped.Add(1)
	}
}

func (d *downSub) close() { d.closeOnce.Do(func() { close(d.closed) }) }

func (d *downSub) requestKeyframe() {
	if sub := d.sub.Load(); sub != nil {
		sub.RequestKeyframe()
	}
}

// sendMedia is the one goroutine that writes datagrams to the neighbour.
// SendDatagram blocks once quic-go has 32 queued; the bounded queue in front
// of it drops instead, so the hub's fan-out never waits on a slow link.
func (l *quicLink) sendMedia() {
	defer l.wg.Done()
	budget := initialBudget
	scratch := make([]byte, 0, 2048)
	send := func(b []byte) error {
		l.dgramsSent.Add(1)
		return l.conn.SendDatagram(b)
	}
	for {
		select {
		case it := <-l.out:
			it.d.hopSeq++
			h := mediaHeader{Track: it.b.Track, SubID: it.d.id, HopSeq: it.d.hopSeq}
			if it.b.Keyframe {
				h.Flags |= flagKeyframe
			}
			err := fragment(h, it.b.Data(), budget, scratch, send)
			var tooLarge *quic.DatagramTooLargeError
			if errors.As(err, &tooLarge) && int(tooLarge.MaxDatagramPayloadSize) < budget {
				budget = int(tooLarge.MaxDatagramPayloadSize)
				err = fragment(h, it.b.Data(), budget, scratch, send)
			}
			it.b.Release()
			if err != nil {
				if l.ctx.Err() != nil {
					return
				}
				l.dropped.Add(1)
				continue
			}
			l.sent.Add(1)
		case <-l.ctx.Done():
			return
		}
	}
}

func (l *quicLink) stats() LinkStats {
	return LinkStats{
		Peer:             l.peer,
		PacketsSent:      l.sent.Load(),
		DatagramsSent:    l.dgramsSent.Load(),
		PacketsReceived:  l.received.Load(),
		SendDropped:      l.dropped.Load(),
		HopLost:          l.lost.Load(),
		Malformed:        l.malformed.Load(),
		FragmentsGivenUp: l.fragLost.Load(),
		RTT:              l.conn.ConnectionStats().SmoothedRTT,
	}
}
