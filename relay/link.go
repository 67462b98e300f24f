package relay

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
)

const (
	// ctlQueueSize bounds the control messages waiting to be written to a
	// neighbour; a neighbour that lets it fill up is dropped.
	ctlQueueSize = 4096
	// receiveQueueSize bounds the datagrams taken from quic-go's receive
	// queue (which holds 128) and waiting to be handled.
	receiveQueueSize = 8192
	// subscribeTimeout bounds how long a neighbour's subscription may wait for
	// a stream further upstream.
	subscribeTimeout = 5 * time.Second
)

// LinkStats counts what crossed one link. All counters only grow. Every
// packet or datagram dropped on the link is counted once, by where it was
// dropped: the sender's QueueDropped and SendErrors, the receiver's
// ReceiveDropped, UnknownSubscription, Duplicates, FragmentsGivenUp and
// Malformed. HopLost is what the receiver misses: the sender's drops, plus
// what the network and quic-go's receive queue lost.
type LinkStats struct {
	Peer              string `json:"peer"`
	PacketsSent       uint64 `json:"packets_sent"`
	DatagramsSent     uint64 `json:"datagrams_sent"`
	PacketsReceived   uint64 `json:"packets_received"`
	DatagramsReceived uint64 `json:"datagrams_received"`
	// DatagramBudget is the largest datagram the link sends now, in bytes:
	// what quic-go allows, which grows after path-MTU discovery. Packets
	// that do not fit are split into fragments.
	DatagramBudget int `json:"datagram_budget"`

	// QueueDropped counts packets dropped because their subscription's
	// queue on the link was full: a link slower than the stream, or a burst
	// longer than the queue.
	QueueDropped uint64 `json:"queue_dropped"`
	// SendErrors counts packets quic-go refused to send.
	SendErrors uint64 `json:"send_errors"`
	// HopLost counts packets missing from the hop sequence on arrival:
	// dropped by the sender, lost on the wire or in quic-go's receive queue.
	HopLost uint64 `json:"hop_lost"`
	// ReceiveDropped counts datagrams dropped because this node did not
	// keep up with the link.
	ReceiveDropped uint64 `json:"receive_dropped"`
	// UnknownSubscription counts datagrams for a subscription this node
	// does not have (any more): sent before an unsubscribe arrived.
	UnknownSubscription uint64 `json:"unknown_subscription"`
	// Duplicates counts datagrams that arrived twice, or too late to tell.
	Duplicates uint64 `json:"duplicates"`
	// FragmentsGivenUp counts fragmented packets that never completed.
	FragmentsGivenUp uint64 `json:"fragments_given_up"`
	// Malformed counts datagrams that failed to parse.
	Malformed uint64 `json:"malformed"`
	// ProbeKbps is the link's bandwidth as the last probe train showed it
	// (probe.go), in kbit/s; 0 before any, or when the link is faster
	// than a train can time. ProbeEstimates counts the estimates taken
	// (0 ones too), so that a reader tells a new one from the last.
	ProbeKbps      float64 `json:"probe_kbps"`
	ProbeEstimates uint64  `json:"probe_estimates"`
	// ProbeDatagramsSent and ProbeBytesSent count the probe trains'
	// datagrams and their bytes, ProbeDatagramsLost those the neighbour
	// reported missing. Path counts them too (and quic-go counts the lost
	// ones lost): subtract them for what media met.
	ProbeDatagramsSent uint64        `json:"probe_datagrams_sent"`
	ProbeBytesSent     uint64        `json:"probe_bytes_sent"`
	ProbeDatagramsLost uint64        `json:"probe_datagrams_lost"`
	RTT                time.Duration `json:"rtt_ns"`
	// Jitter is the interarrival jitter (RFC 3550) of this end's
	// heartbeats at the neighbour, as it reports it: how much the delay of
	// what this end sends varies. -1 until the neighbour reported.
	Jitter time.Duration `json:"jitter_ns"`
	// Silent is true while the neighbour has not been heard from for
	// DeadAfter (heartbeat.go): its connection is still open, but nothing
	// is taken through it.
	Silent bool `json:"silent"`
	// Path is quic-go's view of the connection: RTT and its mean
	// deviation, packets and bytes sent and declared lost (node/measure.go
	// derives the link's jitter, loss and delivery rate from it).
	Path quic.ConnectionStats `json:"-"`
}

// quicLink is the connection to one neighbouring datacenter. It owns seven
// goroutines: the control reader, the control writer, the media sender, the
// datagram reader, the media receiver, the liveness watch and the heartbeat
// sender. Close (or the connection dying)
// stops all of them.
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
	tx     *linkSender
	rx     *linkReceiver

	nextSubID atomic.Uint32
	live      liveness      // the neighbour's signs of life (heartbeat.go)
	jitter    jitterMeter   // of the heartbeats both ways (heartbeat.go)
	beats     chan struct{} // heartbeats to send

	// Counters: see LinkStats.
	offered, sent, dgramsSent, queueDropped, sendErrors           atomic.Uint64
	received, dgramsReceived, receiveDropped, lost, unknown, dups atomic.Uint64
	malformed, fragLost                                           atomic.Uint64
	budget                                                        atomic.Int64
	probeKbps                                                     atomic.Uint64 // math.Float64bits
	probeEstimates, probeDgrams, probeBytes, probeLost            atomic.Uint64

	probeRx probeReceiver // owned by the datagram reader

	mu    sync.Mutex          // guards the following fields
	ups   map[uint32]*upSub   // streams we receive from the neighbour
	downs map[uint32]*downSub // streams the neighbour receives from us
}

var _ link = (*quicLink)(nil)

func newLink(h *Hub, conn *quic.Conn, ctl *quic.Stream, peer string) *quicLink {
	ctx, cancel := context.WithCancelCause(context.Background())
	l := &quicLink{
		hub:    h,
		conn:   conn,
		ctl:    ctl,
		peer:   peer,
		log:    h.log.With("peer", peer),
		ctx:    ctx,
		cancel: cancel,
		ctlOut: make(chan *controlMsg, ctlQueueSize),
		beats:  make(chan struct{}, 1),
		ups:    make(map[uint32]*upSub),
		downs:  make(map[uint32]*downSub),
	}
	l.tx = newLinkSender(l, conn)
	l.rx = newLinkReceiver(l)
	return l
}

// run serves the link until the connection ends. br reads the control stream
// past the hello.
func (l *quicLink) run(br *bufio.Reader) error {
	l.wg.Add(7)
	go l.acceptChannels() // channel.go
	go func() {
		defer l.wg.Done()
		l.hub.watchLiveness(l.ctx, l, &l.live, l.beat, l.rtt)
	}()
	go l.sendHeartbeats()
	go l.writeControl()
	go func() {
		defer l.wg.Done()
		l.tx.run(l.ctx)
	}()
	go l.readDatagrams()
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

// beat asks for a heartbeat datagram, without blocking.
func (l *quicLink) beat() {
	select {
	case l.beats <- struct{}{}:
	default: // one is waiting already
	}
}

// sendHeartbeats sends the heartbeats beat asks for. SendDatagram blocks
// while quic-go's datagram queue is full (a congested or dead neighbour),
// so it runs apart from the liveness watch.
func (l *quicLink) sendHeartbeats() {
	defer l.wg.Done()
	var b [heartbeatLen]byte
	for {
		select {
		case <-l.beats:
			putHeartbeat(b[:], time.Now(), l.jitter.rx.Load())
			_ = l.conn.SendDatagram(b[:]) // refused: media is a sign of life too
		case <-l.ctx.Done():
			return
		}
	}
}

func (l *quicLink) rtt() time.Duration { return l.conn.ConnectionStats().SmoothedRTT }

func (l *quicLink) close(cause error) {
	l.cancel(cause)
	l.conn.CloseWithError(0, cause.Error())
}

// sendCtl queues a control message, without blocking. A neighbour that
// stops reading control messages altogether is disconnected rather than
// allowed to block us.
func (l *quicLink) sendCtl(m *controlMsg) {
	select {
	case l.ctlOut <- m:
	case <-l.ctx.Done():
	default:
		// The hub calls this with its lock held, and closing a QUIC
		// connection waits for quic-go's connection loop: cancel now and
		// close on the side, so that no hub lock waits on the network.
		err := errors.New("control queue to neighbour is full")
		l.cancel(err)
		go l.conn.CloseWithError(0, err.Error())
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
		l.hub.handleAnnounce(l, m.Stream, m.Hops, Flags(m.Flags))
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
				u.stop()
				l.hub.upstreamEnded(u.s, u, fmt.Errorf("datacenter %s sent a bad description: %w", l.peer, err))
				return
			}
			l.hub.sourceReady(u.s, u, m.Desc, Flags(m.Flags), m.Hops)
		}
	case msgStreamFlags:
		if u := l.upSub(m.SubID, false); u != nil {
			u.s.setFlags(Flags(m.Flags))
		}
	case msgStreamPath:
		if u := l.upSub(m.SubID, false); u != nil && len(m.Hops) > 0 {
			l.hub.sourcePath(u.s, u, m.Hops)
		}
	case msgSubscribeError:
		if u := l.upSub(m.SubID, true); u != nil {
			err := fmt.Errorf("datacenter %s: %s", l.peer, m.Reason)
			if m.Code == codeNotFound {
				err = fmt.Errorf("%w: datacenter %s: %s", ErrStreamNotFound, l.peer, m.Reason)
			}
			l.hub.upstreamEnded(u.s, u, err)
		}
	case msgStreamEnd:
		if u := l.upSub(m.SubID, true); u != nil {
			err := fmt.Errorf("upstream datacenter %s: %s", l.peer, m.Reason)
			if m.Code == codePublisherGone {
				// The origin ended it: nowhere else has it either.
				err = fmt.Errorf("%w (upstream datacenter %s: %s)", ErrPublisherGone, l.peer, m.Reason)
			}
			l.hub.upstreamEnded(u.s, u, err)
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
		l.hub.upstreamEnded(u.s, u, fmt.Errorf("link to datacenter %s lost: %w", l.peer, cause))
	}
}

// announce, unannounce and subscribe implement link for the hub.

func (l *quicLink) announce(name string, hops []string, flags Flags) {
	l.sendCtl(&controlMsg{Type: msgAnnounce, Stream: name, Hops: hops, Flags: uint32(flags)})
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
	id uint32
	s  *Stream
	l  *quicLink

	// Owned by the datagram reader.
	lastSeq uint32
	window  uint64 // bit i: lastSeq-i was seen
	seen    bool
}

func (u *upSub) requestKeyframe() {
	u.l.sendCtl(&controlMsg{Type: msgKeyframeRequest, SubID: u.id})
}

func (u *upSub) peer() string { return u.l.peer }

func (u *upSub) stop() {
	if u.l.upSub(u.id, true) != nil {
		u.l.sendCtl(&controlMsg{Type: msgUnsubscribe, SubID: u.id})
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
		hops, pathChanged := l.hub.watchPath(sub.Stream())
		l.sendCtl(&controlMsg{Type: msgSubscribeOK, SubID: id, Desc: sub.Description(), Flags: uint32(flags), Hops: hops})
		for {
			select {
			case <-flagsChanged:
				flags, flagsChanged = sub.Stream().watchFlags()
				l.sendCtl(&controlMsg{Type: msgStreamFlags, SubID: id, Flags: uint32(flags)})
				continue
			case <-pathChanged:
				hops, pathChanged = l.hub.watchPath(sub.Stream())
				l.sendCtl(&controlMsg{Type: msgStreamPath, SubID: id, Hops: hops})
				continue
			case <-sub.Done():
				l.mu.Lock()
				delete(l.downs, id)
				l.mu.Unlock()
				reason, code := "stream ended", uint64(0)
				if err := sub.Err(); err != nil {
					reason = err.Error()
				}
				if errors.Is(sub.Err(), ErrPublisherGone) {
					code = codePublisherGone
				}
				l.sendCtl(&controlMsg{Type: msgStreamEnd, SubID: id, Code: code, Reason: reason})
			case <-d.closed:
			case <-l.ctx.Done():
			}
			break
		}
		sub.Close()
		d.close()
	}()
}

// downSub is a stream the neighbour receives from this node. It is the
// hub's Subscriber: packets go to its own bounded queue on the link, which
// the link's sender serves.
type downSub struct {
	id        uint32
	l         *quicLink
	closed    chan struct{}
	closeOnce sync.Once
	sub       atomic.Pointer[Subscription] // set once subscribed

	q       subQueue
	deficit int // owned by the sender
}

var _ downstreamSubscriber = (*downSub)(nil)

func (d *downSub) downstreamPeer() string { return d.l.peer }

func (d *downSub) WritePacket(p *Packet) { d.WriteBuffer(NewBuffer(p)) }

var _ BufferWriter = (*downSub)(nil)

// WriteBuffer queues a reference to b for the link's sender, or drops it
// when the subscription's queue is full.
func (d *downSub) WriteBuffer(b *Buffer) {
	d.l.offered.Add(1)
	switch d.q.push(b) {
	case pushQueued:
		d.l.tx.backlog.Add(1)
	case pushScheduled:
		d.l.tx.backlog.Add(1)
		d.l.tx.schedule(d)
	case pushFull:
		d.l.queueDropped.Add(1)
	}
}

// close ends the subscription's queue (once the hub no longer writes to
// it, nothing is left in it).
func (d *downSub) close() {
	d.closeOnce.Do(func() { close(d.closed) })
	d.l.tx.backlog.Add(-int64(d.q.close()))
}

func (d *downSub) requestKeyframe() {
	if sub := d.sub.Load(); sub != nil {
		sub.RequestKeyframe()
	}
}

func (l *quicLink) stats() LinkStats {
	st := LinkStats{
		Peer:                l.peer,
		PacketsSent:         l.sent.Load(),
		DatagramsSent:       l.dgramsSent.Load(),
		PacketsReceived:     l.received.Load(),
		DatagramsReceived:   l.dgramsReceived.Load(),
		DatagramBudget:      int(l.budget.Load()),
		QueueDropped:        l.queueDropped.Load(),
		SendErrors:          l.sendErrors.Load(),
		HopLost:             l.lost.Load(),
		ReceiveDropped:      l.receiveDropped.Load(),
		UnknownSubscription: l.unknown.Load(),
		Duplicates:          l.dups.Load(),
		FragmentsGivenUp:    l.fragLost.Load(),
		Malformed:           l.malformed.Load(),
		Jitter:              l.jitter.sent(),
		ProbeKbps:           math.Float64frombits(l.probeKbps.Load()),
		ProbeEstimates:      l.probeEstimates.Load(),
		ProbeDatagramsSent:  l.probeDgrams.Load(),
		ProbeBytesSent:      l.probeBytes.Load(),
		ProbeDatagramsLost:  l.probeLost.Load(),
	}
	if l.conn != nil { // nil in tests of the link without the network
		st.Path = l.conn.ConnectionStats()
		st.RTT = st.Path.SmoothedRTT
	}
	return st
}
