package whep

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/rtcp"
	"github.com/pion/webrtc/v4"

	"github.com/stemflow/stemflow/internal/rtc"
	"github.com/stemflow/stemflow/relay"
)

// viewer is one WHEP session. Its Run, in the goroutine the rtc.Endpoint
// gives it, owns the PeerConnection, the subscription and the queue, and is
// the only writer of media; pion's SRTCP goroutine of the PeerConnection
// hands it the viewer's RTCP (keyframe requests and NACKs: handleRTCP) and
// sends the retransmissions.
type viewer struct {
	*rtc.Session
	srv *Server
	ctx context.Context // the session's, for the forward path

	sub    *relay.Subscription
	q      *viewerQueue
	cache  *streamCache
	tracks [relay.MaxTracks]*outTrack
	pc     *webrtc.PeerConnection
	waitWG sync.WaitGroup // waitSRTP

	// srtpReady is closed once pion runs SRTP: writes before it are lost.
	srtpReady chan struct{}
	srtpOnce  sync.Once

	// Used by Run only.
	replay []*relay.Buffer // the GOP replay's packets not yet sent
	pacer  relay.Pacer
	joined time.Time

	sent, resent, keyReqs, writeErrs atomic.Uint64
	ended                            bool // guarded by srv.mu: counted in srv's totals
}

var _ rtc.Runner = (*viewer)(nil)

func newViewer(s *Server, rs *rtc.Session, sub *relay.Subscription, q *viewerQueue, cache *streamCache) *viewer {
	return &viewer{
		Session:   rs,
		srv:       s,
		ctx:       rs.Context(),
		sub:       sub,
		q:         q,
		cache:     cache,
		srtpReady: make(chan struct{}),
	}
}

func (v *viewer) addTrack(index int, t relay.Track, c *rtc.Codec) {
	ot := &outTrack{
		kind:     rtc.CodecType(t.Kind),
		id:       t.Kind.String(),
		streamID: v.Stream(),
		mime:     c.MimeType,
		pt:       c.PayloadType,
	}
	if t.Kind == relay.KindVideo && v.cache != nil {
		ot.cache = v.cache.tracks[index]
	}
	v.tracks[index] = ot
}

var (
	errConnectTimeout = errors.New("viewer did not connect in time")
	errStreamEnded    = errors.New("stream ended")
)

// start creates the PeerConnection, answers the offer and starts the
// goroutine that waits for SRTP, which Run's cleanup waits for. On error nothing is left running;
// the caller still owns the subscription.
func (v *viewer) start(ctx context.Context, api *webrtc.API, offer string) (string, error) {
	pc, err := v.NewPeerConnection(api)
	if err != nil {
		return "", err
	}
	v.pc = pc
	var senders [relay.MaxTracks]*webrtc.RTPSender
	for i, t := range v.tracks {
		if t == nil {
			continue
		}
		t.rtcpOut = pc
		tr, err := pc.AddTransceiverFromTrack(t, webrtc.RTPTransceiverInit{Direction: webrtc.RTPTransceiverDirectionSendonly})
		if err != nil {
			_ = pc.Close()
			return "", fmt.Errorf("whep: add %s track: %w", t.id, err)
		}
		senders[i] = tr.Sender()
	}
	answer, err := v.Answer(ctx, pc, offer)
	if err != nil {
		return "", err
	}
	for _, sender := range senders {
		if sender != nil {
			v.waitWG.Go(func() { v.waitSRTP(sender) })
			break
		}
	}
	return answer, nil
}

// Run owns the viewer: it waits until SRTP runs, then sends the GOP replay
// paced (see relay.Pacer) and the live packets after it, until the viewer
// or the stream ends.
func (v *viewer) Run() {
	defer v.cleanup()
	timer := time.NewTimer(v.srv.cfg.ConnectTimeout)
	select {
	case <-v.srtpReady:
		timer.Stop()
	case <-timer.C:
		v.Cancel(errConnectTimeout)
		return
	case <-v.ctx.Done():
		timer.Stop()
		return
	case <-v.sub.Done():
		timer.Stop()
		v.Cancel(errStreamEnded)
		return
	}

	v.replay = v.sub.Start(v.replay[:0])
	v.joined = time.Now()
	v.Logger().Info("WHEP viewer joined", "remote", v.remote(), "replay_packets", len(v.replay))
	if len(v.replay) == 0 {
		// No GOP cached yet: start at the next keyframe, and ask for one.
		for _, t := range v.tracks {
			if t != nil && t.kind == webrtc.RTPCodecTypeVideo {
				t.waitKey = true
			}
		}
		v.sub.RequestKeyframe()
	} else {
		v.pacer.Start(v.replay[0])
	}

	dl := dropLog{t: time.NewTicker(5 * time.Second)}
	defer dl.t.Stop()
	pace := time.NewTimer(0)
	<-pace.C
	for {
		var b *relay.Buffer
		if len(v.replay) > 0 {
			b, v.replay[0], v.replay = v.replay[0], nil, v.replay[1:]
			if len(v.replay) == 0 {
				v.replay = nil // let the replay's array go
			}
		} else if b = v.next(&dl); b == nil {
			return
		}
		if w := v.pacer.Wait(b); w > 0 && !v.sleep(pace, w) {
			b.Release()
			return
		}
		n := v.forward(b)
		if v.pacer.Live() {
			// Drain what else is queued without going back to select.
			for range 64 {
				b, ok := v.q.Pop()
				if !ok {
					break
				}
				n += v.forward(b)
			}
		}
		v.sent.Add(uint64(n))
	}
}

// dropLog sums a viewer's queue drops into one log line per tick.
type dropLog struct {
	t    *time.Ticker
	last uint64
}

func (v *viewer) logDrops(dl *dropLog) {
	if d := v.q.Dropped(); d > dl.last {
		v.Logger().Warn("viewer too slow: dropped packets", "dropped", d-dl.last, "total", d)
		dl.last = d
	}
}

// next returns the next live packet from the queue, waiting for one, or
// nil when the viewer or the stream has ended.
func (v *viewer) next(dl *dropLog) *relay.Buffer {
	for {
		b, ok := v.q.Pop()
		// The viewer's end is checked with every packet too: a queue
		// that never empties must not keep an ended viewer going.
		select {
		case <-v.ctx.Done():
		case <-v.sub.Done():
			v.Cancel(errStreamEnded)
		case <-dl.t.C:
			v.logDrops(dl)
			if ok {
				return b
			}
			continue
		default:
			if ok {
				return b
			}
			select {
			case <-v.q.Ready():
				continue
			case <-v.ctx.Done():
			case <-v.sub.Done():
				v.Cancel(errStreamEnded)
			case <-dl.t.C:
				v.logDrops(dl)
				continue
			}
		}
		if ok {
			b.Release()
		}
		return nil
	}
}

// sleep waits d on t, or until the viewer or the stream ends: then it
// reports false.
func (v *viewer) sleep(t *time.Timer, d time.Duration) bool {
	t.Reset(d)
	select {
	case <-t.C:
		return true
	case <-v.ctx.Done():
	case <-v.sub.Done():
		v.Cancel(errStreamEnded)
	}
	t.Stop()
	return false
}

// remote returns the viewer's address as ICE selected it.
func (v *viewer) remote() string {
	pair, err := v.pc.SCTP().Transport().ICETransport().GetSelectedCandidatePair()
	if err != nil || pair == nil || pair.Remote == nil {
		return ""
	}
	return net.JoinHostPort(pair.Remote.Address, strconv.Itoa(int(pair.Remote.Port)))
}

// forward writes one queued packet to the viewer and releases it. It
// returns 1 when a packet was sent, and counts a failed write. It does not
// allocate.
func (v *viewer) forward(b *relay.Buffer) int {
	t := v.tracks[b.Track&(relay.MaxTracks-1)]
	if t == nil || t.waitKey && !b.Keyframe {
		b.Release()
		return 0
	}
	t.waitKey = false
	// n == 0 with no error: pion has no SRTP session (Run waits for it).
	n, err := t.write(b.Data())
	b.Release()
	if err != nil || n == 0 {
		v.writeErrs.Add(1)
		return 0
	}
	return 1
}

// waitSRTP closes srtpReady once pion runs SRTP, which it starts just after
// it reports the connection: the sender's SetReadDeadline blocks until
// then (pion's srtpWriterFuture), and returns an error if the sender stops
// first.
func (v *viewer) waitSRTP(sender *webrtc.RTPSender) {
	if err := sender.SetReadDeadline(time.Time{}); err != nil {
		return
	}
	v.srtpOnce.Do(func() { close(v.srtpReady) })
}

// handleRTCP answers one RTCP packet the viewer addressed to ssrc (see
// rtc.RTCPHandler): PLI and FIR become a keyframe request to the
// publisher, NACKs are answered from the cache. It runs on pion's SRTCP
// goroutine of the viewer's PeerConnection, which makes it the only user
// of its tracks' rtxPkt. Reports and other packets are skipped unparsed.
func (v *viewer) handleRTCP(ssrc uint32, pkt []byte) {
	if len(pkt) < 12 { // header, sender SSRC, media SSRC
		return
	}
	typ, format := rtcp.PacketType(pkt[1]), pkt[0]&0x1f
	switch {
	case typ == rtcp.TypePayloadSpecificFeedback && (format == rtcp.FormatPLI || format == rtcp.FormatFIR):
	case typ == rtcp.TypeTransportSpecificFeedback && format == rtcp.FormatTLN:
	default:
		return
	}
	var t *outTrack
	var b *binding
	for _, tr := range v.tracks {
		if tr == nil {
			continue
		}
		if tb := tr.bound.Load(); tb != nil && tb.ssrc == ssrc {
			t, b = tr, tb
			break
		}
	}
	if t == nil {
		return
	}
	switch typ {
	case rtcp.TypePayloadSpecificFeedback:
		if format == rtcp.FormatPLI {
			var p rtcp.PictureLossIndication
			if p.Unmarshal(pkt) != nil || p.MediaSSRC != b.ssrc {
				return
			}
		} else {
			// RFC 5104 names the stream in the FCI entries; the
			// header's media SSRC is 0.
			var p rtcp.FullIntraRequest
			if p.Unmarshal(pkt) != nil ||
				p.MediaSSRC != b.ssrc && !slices.ContainsFunc(p.FIR, func(e rtcp.FIREntry) bool { return e.SSRC == b.ssrc }) {
				return
			}
		}
		v.keyReqs.Add(1)
		v.sub.RequestKeyframe()
	case rtcp.TypeTransportSpecificFeedback:
		var p rtcp.TransportLayerNack
		if p.Unmarshal(pkt) != nil || p.MediaSSRC != b.ssrc {
			return
		}
		var resent uint64
		for _, pair := range p.Nacks {
			pair.Range(func(seq uint16) bool {
				if t.resend(seq) {
					resent++
				}
				return true
			})
		}
		v.resent.Add(resent)
	}
}

func (v *viewer) cleanup() {
	v.sub.Close()
	v.q.Drain()
	for _, b := range v.replay {
		b.Release()
	}
	v.replay = nil
	if err := v.pc.Close(); err != nil {
		v.Logger().Debug("close peer connection", "err", err)
	}
	v.waitWG.Wait()
	s := v.srv
	s.releaseCache(v.cache)
	s.mu.Lock()
	v.ended = true
	s.endedSent += v.sent.Load()
	s.endedDropped += v.q.Dropped()
	s.endedResent += v.resent.Load()
	s.endedKeyReqs += v.keyReqs.Load()
	s.endedWriteErrs += v.writeErrs.Load()
	s.mu.Unlock()
	reason := context.Cause(v.ctx)
	if v.joined.IsZero() {
		v.Logger().Info("WHEP viewer never started", "reason", reason)
		return
	}
	v.Logger().Info("WHEP viewer left", "reason", reason, "watched", time.Since(v.joined).Round(time.Millisecond),
		"sent", v.sent.Load(), "dropped", v.q.Dropped(), "write_errors", v.writeErrs.Load(), "resent", v.resent.Load())
}
