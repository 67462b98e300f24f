package whep

import (
	"context"
	"errors"
	"fmt"
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
// the only writer of media; one goroutine per RTP sender reads RTCP
// (keyframe requests and NACKs).
type viewer struct {
	*rtc.Session
	srv *Server
	ctx context.Context // the session's, for the forward path

	sub      *relay.Subscription
	q        *relay.Queue
	cache    *streamCache
	replayed bool // the GOP replay queued a keyframe before anything else
	tracks   [relay.MaxTracks]*outTrack
	pc       *webrtc.PeerConnection
	rtcpWG   sync.WaitGroup

	sent, resent, keyReqs atomic.Uint64
	ended                 bool // guarded by srv.mu: counted in srv's totals
}

var _ rtc.Runner = (*viewer)(nil)

func newViewer(s *Server, rs *rtc.Session, sub *relay.Subscription, q *relay.Queue, cache *streamCache, replayed bool) *viewer {
	return &viewer{
		Session:  rs,
		srv:      s,
		ctx:      rs.Context(),
		sub:      sub,
		q:        q,
		cache:    cache,
		replayed: replayed,
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

// start creates the PeerConnection, answers the offer and starts the RTCP
// readers, which Run's cleanup waits for. On error nothing is left running;
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
	for i, sender := range senders {
		if sender != nil {
			t := v.tracks[i]
			v.rtcpWG.Go(func() { v.readRTCP(t, sender) })
		}
	}
	return answer, nil
}

// Run owns the viewer: it waits for the connection, then forwards queued
// packets until the viewer or the stream ends.
func (v *viewer) Run() {
	defer v.cleanup()
	v.Logger().Debug("viewer session started", "replayed", v.replayed)

	timer := time.NewTimer(v.srv.cfg.ConnectTimeout)
	select {
	case <-v.Connected():
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

	if !v.replayed || v.q.Dropped() > 0 {
		// Nothing decodable queued (no GOP cached yet, or the queue
		// overflowed while connecting): start at the next keyframe, and ask
		// for one now.
		if v.q.Dropped() > 0 {
			v.q.Drain()
		}
		for _, t := range v.tracks {
			if t != nil && t.kind == webrtc.RTPCodecTypeVideo {
				t.waitKey = true
			}
		}
		v.sub.RequestKeyframe()
	}

	drops := time.NewTicker(5 * time.Second)
	defer drops.Stop()
	var lastDropped uint64
	c := v.q.C()
	for {
		select {
		case b := <-c:
			n := v.forward(b)
			// Drain what else is queued without going back to select.
		drain:
			for range 64 {
				select {
				case b = <-c:
					n += v.forward(b)
				default:
					break drain
				}
			}
			v.sent.Add(uint64(n))
		case <-v.ctx.Done():
			return
		case <-v.sub.Done():
			v.Cancel(errStreamEnded)
			return
		case <-drops.C:
			if d := v.q.Dropped(); d > lastDropped {
				v.Logger().Warn("viewer too slow: dropped packets", "dropped", d-lastDropped, "total", d)
				lastDropped = d
			}
		}
	}
}

// forward writes one queued packet to the viewer and releases it. It
// returns 1 when a packet was sent. It does not allocate.
func (v *viewer) forward(b *relay.Buffer) int {
	t := v.tracks[b.Track&(relay.MaxTracks-1)]
	if t == nil || t.waitKey && !b.Keyframe {
		b.Release()
		return 0
	}
	t.waitKey = false
	n, err := t.write(b.Data())
	if n == 0 && err == nil {
		// pion starts SRTP just after reporting the connection: wait for
		// it rather than lose the keyframe.
		for i := 0; i < 1000 && n == 0 && err == nil && v.ctx.Err() == nil; i++ {
			time.Sleep(2 * time.Millisecond)
			n, err = t.write(b.Data())
		}
	}
	b.Release()
	if err != nil || n == 0 {
		return 0
	}
	return 1
}

// readRTCP answers the viewer's RTCP for one sender: PLI and FIR become a
// keyframe request to the publisher, NACKs are answered from the cache.
func (v *viewer) readRTCP(t *outTrack, sender *webrtc.RTPSender) {
	buf := make([]byte, 1500)
	for {
		n, _, err := sender.Read(buf)
		if err != nil {
			return
		}
		pkts, err := rtcp.Unmarshal(buf[:n])
		if err != nil {
			continue
		}
		b := t.bound.Load()
		if b == nil {
			continue
		}
		for _, p := range pkts {
			switch p := p.(type) {
			case *rtcp.PictureLossIndication:
				if p.MediaSSRC == b.ssrc {
					v.keyReqs.Add(1)
					v.sub.RequestKeyframe()
				}
			case *rtcp.FullIntraRequest:
				if p.MediaSSRC == b.ssrc {
					v.keyReqs.Add(1)
					v.sub.RequestKeyframe()
				}
			case *rtcp.TransportLayerNack:
				if p.MediaSSRC != b.ssrc {
					continue
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
	}
}

func (v *viewer) cleanup() {
	v.sub.Close()
	v.q.Drain()
	if err := v.pc.Close(); err != nil {
		v.Logger().Debug("close peer connection", "err", err)
	}
	v.rtcpWG.Wait()
	s := v.srv
	s.releaseCache(v.cache)
	s.mu.Lock()
	v.ended = true
	s.endedSent += v.sent.Load()
	s.endedDropped += v.q.Dropped()
	s.endedResent += v.resent.Load()
	s.endedKeyReqs += v.keyReqs.Load()
	s.mu.Unlock()
	v.Logger().Debug("viewer session ended", "reason", context.Cause(v.ctx),
		"sent", v.sent.Load(), "dropped", v.q.Dropped(), "resent", v.resent.Load())
}
