package whep

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/rtcp"
	"github.com/pion/webrtc/v4"

	"github.com/stemflow/stemflow/internal/rtc"
	"github.com/stemflow/stemflow/relay"
)

// viewer is one WHEP session. Its goroutine (run) owns the PeerConnection,
// the subscription and the queue, and is the only writer of media; one
// goroutine per RTP sender reads RTCP (keyframe requests and NACKs).
type viewer struct {
	srv    *Server
	id     string
	stream string

	ctx    context.Context
	cancel context.CancelCauseFunc
	done   chan struct{} // closed when run has cleaned up

	sub      *relay.Subscription
	q        *relay.Queue
	cache    *streamCache
	replayed bool // the GOP replay queued a keyframe before anything else
	tracks   [relay.MaxTracks]*outTrack
	pc       *webrtc.PeerConnection

	connected chan struct{}
	connOnce  sync.Once
	rtcpWG    sync.WaitGroup

	sent, resent, keyReqs atomic.Uint64
}

func newViewer(s *Server, stream string, sub *relay.Subscription, q *relay.Queue, cache *streamCache, replayed bool) *viewer {
	id := rtc.NewSessionID()
	ctx, cancel := context.WithCancelCause(s.ctx)
	return &viewer{
		srv:       s,
		id:        id,
		stream:    stream,
		ctx:       ctx,
		cancel:    cancel,
		done:      make(chan struct{}),
		sub:       sub,
		q:         q,
		cache:     cache,
		replayed:  replayed,
		connected: make(chan struct{}),
	}
}

// logger returns the viewer's logger. It is built when needed rather than
// kept: a logger with attributes costs ~1.5 KB per viewer.
func (v *viewer) logger() *slog.Logger {
	return v.srv.log.With("stream", v.stream, "session", v.id)
}

func (v *viewer) addTrack(index int, t relay.Track, c *rtc.Codec) {
	ot := &outTrack{
		kind:     rtc.CodecType(t.Kind),
		id:       t.Kind.String(),
		streamID: v.stream,
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
// viewer's goroutines. On error nothing is left running; the caller still
// owns the subscription.
func (v *viewer) start(ctx context.Context, api *webrtc.API, offer string) (string, error) {
	pc, err := api.NewPeerConnection(webrtc.Configuration{})
	if err != nil {
		return "", fmt.Errorf("whep: new peer connection: %w", err)
	}
	v.pc = pc
	pc.OnConnectionStateChange(func(st webrtc.PeerConnectionState) {
		switch st {
		case webrtc.PeerConnectionStateConnected:
			v.connOnce.Do(func() { close(v.connected) })
		case webrtc.PeerConnectionStateFailed:
			v.cancel(errors.New("ICE or DTLS failed"))
		case webrtc.PeerConnectionStateClosed:
			v.cancel(errors.New("peer connection closed"))
		}
	})
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
	actx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	answer, err := rtc.Answer(actx, pc, offer)
	if err != nil {
		_ = pc.Close()
		if errors.Is(err, rtc.ErrOfferRejected) {
			return "", rtc.Errorf(http.StatusBadRequest, "whep: the offer cannot be answered: %v", err)
		}
		return "", fmt.Errorf("whep: answer: %w", err)
	}

	s := v.srv
	s.mu.Lock()
	if s.ctx.Err() != nil {
		s.mu.Unlock()
		_ = pc.Close()
		return "", rtc.Errorf(http.StatusServiceUnavailable, "whep: the server is shutting down: watch from another node")
	}
	s.viewers[v.id] = v
	s.wg.Add(1)
	s.mu.Unlock()
	for i, sender := range senders {
		if sender != nil {
			t := v.tracks[i]
			v.rtcpWG.Go(func() { v.readRTCP(t, sender) })
		}
	}
	go v.run()
	v.logger().Debug("viewer session started", "replayed", v.replayed)
	return answer, nil
}

// run owns the viewer: it waits for the connection, then forwards queued
// packets until the viewer or the stream ends.
func (v *viewer) run() {
	defer v.srv.wg.Done()
	defer close(v.done)
	defer v.cleanup()

	timer := time.NewTimer(v.srv.cfg.ConnectTimeout)
	select {
	case <-v.connected:
		timer.Stop()
	case <-timer.C:
		v.cancel(errConnectTimeout)
		return
	case <-v.ctx.Done():
		timer.Stop()
		return
	case <-v.sub.Done():
		timer.Stop()
		v.cancel(errStreamEnded)
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
			v.cancel(errStreamEnded)
			return
		case <-drops.C:
			if d := v.q.Dropped(); d > lastDropped {
				v.logger().Warn("viewer too slow: dropped packets", "dropped", d-lastDropped, "total", d)
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
		v.logger().Debug("close peer connection", "err", err)
	}
	v.rtcpWG.Wait()
	s := v.srv
	s.releaseCache(v.cache)
	s.mu.Lock()
	delete(s.viewers, v.id)
	s.endedSent.Add(v.sent.Load())
	s.endedDropped.Add(v.q.Dropped())
	s.endedResent.Add(v.resent.Load())
	s.endedKeyReqs.Add(v.keyReqs.Load())
	s.mu.Unlock()
	v.logger().Debug("viewer session ended", "reason", context.Cause(v.ctx),
		"sent", v.sent.Load(), "dropped", v.q.Dropped(), "resent", v.resent.Load())
}
