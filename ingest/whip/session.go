package whip

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

// session is one publisher: its PeerConnection and its stream in the hub. Its
// goroutine (run) owns both and ends them together.
type session struct {
	srv    *Server
	id     string
	stream string
	log    *slog.Logger

	ctx    context.Context
	cancel context.CancelCauseFunc
	done   chan struct{} // closed when run has cleaned up

	pc        *webrtc.PeerConnection
	pub       *relay.Publisher
	trackOf   [3]int         // relay track index by relay.Kind, -1 if none
	claimed   [3]atomic.Bool // a remote track of that kind is being read
	videoSSRC atomic.Uint32
	keyReq    chan struct{} // capacity 1: a PLI is wanted
	connected chan struct{}
	connOnce  sync.Once

	readersMu sync.Mutex // guards the following fields
	closing   bool
	readers   sync.WaitGroup
}

func newSession(srv *Server, stream string) *session {
	id := rtc.NewSessionID()
	ctx, cancel := context.WithCancelCause(srv.ctx)
	return &session{
		srv:       srv,
		id:        id,
		stream:    stream,
		log:       srv.log.With("stream", stream, "session", id),
		ctx:       ctx,
		cancel:    cancel,
		done:      make(chan struct{}),
		trackOf:   [3]int{-1, -1, -1},
		keyReq:    make(chan struct{}, 1),
		connected: make(chan struct{}),
	}
}

// requestKeyframe is the hub's OnKeyframeRequest: it must not block.
func (s *session) requestKeyframe() {
	select {
	case s.keyReq <- struct{}{}:
	default:
	}
}

var (
	errConnectTimeout = errors.New("publisher did not connect in time")
	errPCClosed       = errors.New("peer connection closed")
)

// start creates the PeerConnection, answers offer and starts the session's
// goroutine. On error nothing is left running.
func (s *session) start(ctx context.Context, api *webrtc.API, offer string) (string, error) {
	pc, err := api.NewPeerConnection(webrtc.Configuration{})
	if err != nil {
		return "", fmt.Errorf("whip: new peer connection: %w", err)
	}
	s.pc = pc
	pc.OnConnectionStateChange(func(st webrtc.PeerConnectionState) {
		switch st {
		case webrtc.PeerConnectionStateConnected:
			s.connOnce.Do(func() { close(s.connected) })
		case webrtc.PeerConnectionStateFailed:
			s.cancel(errors.New("ICE or DTLS failed"))
		case webrtc.PeerConnectionStateClosed:
			s.cancel(errPCClosed)
		}
	})
	pc.OnTrack(func(tr *webrtc.TrackRemote, _ *webrtc.RTPReceiver) {
		if !s.addReader() {
			return
		}
		defer s.readers.Done()
		s.readTrack(tr)
	})

	actx, cancel := context.WithTimeout(ctx, answerTimeout)
	defer cancel()
	answer, err := rtc.Answer(actx, pc, offer)
	if err != nil {
		_ = pc.Close()
		if errors.Is(err, rtc.ErrOfferRejected) {
			return "", rtc.Errorf(http.StatusBadRequest, "whip: the offer cannot be answered: %v", err)
		}
		return "", fmt.Errorf("whip: answer: %w", err)
	}

	srv := s.srv
	srv.mu.Lock()
	if srv.ctx.Err() != nil {
		srv.mu.Unlock()
		_ = pc.Close()
		return "", rtc.Errorf(http.StatusServiceUnavailable, "whip: the server is shutting down: publish to another node")
	}
	srv.sessions[s.id] = s
	srv.wg.Add(1)
	srv.mu.Unlock()
	go s.run()
	s.log.Info("publisher session started")
	return answer, nil
}

func (s *session) addReader() bool {
	s.readersMu.Lock()
	defer s.readersMu.Unlock()
	if s.closing {
		return false
	}
	s.readers.Add(1)
	return true
}

// run owns the session until it ends.
func (s *session) run() {
	defer s.srv.wg.Done()
	defer close(s.done)
	timer := time.NewTimer(s.srv.cfg.ConnectTimeout)
	defer timer.Stop()
	connected := s.connected
	for {
		select {
		case <-s.ctx.Done():
			s.cleanup()
			return
		case <-connected:
			connected = nil
			timer.Stop()
			s.log.Info("publisher connected")
		case <-timer.C:
			s.cancel(errConnectTimeout)
		case <-s.keyReq:
			if ssrc := s.videoSSRC.Load(); ssrc != 0 {
				if err := s.pc.WriteRTCP([]rtcp.Packet{&rtcp.PictureLossIndication{MediaSSRC: ssrc}}); err != nil {
					s.log.Debug("send PLI", "err", err)
				}
			}
		}
	}
}

func (s *session) cleanup() {
	s.pub.Close()
	s.readersMu.Lock()
	s.closing = true
	s.readersMu.Unlock()
	if err := s.pc.Close(); err != nil {
		s.log.Debug("close peer connection", "err", err)
	}
	s.readers.Wait()
	s.srv.mu.Lock()
	delete(s.srv.sessions, s.id)
	s.srv.mu.Unlock()
	s.log.Info("publisher session ended", "reason", context.Cause(s.ctx))
}

// readTrack writes every RTP packet of a remote track into the stream.
func (s *session) readTrack(tr *webrtc.TrackRemote) {
	kind := relay.KindAudio
	if tr.Kind() == webrtc.RTPCodecTypeVideo {
		kind = relay.KindVideo
	}
	idx := s.trackOf[kind]
	buf := make([]byte, relay.MaxPacketSize)
	if idx < 0 || s.claimed[kind].Swap(true) {
		// A second track of a kind, or one we did not negotiate: drain it.
		s.log.Debug("ignoring extra track", "kind", kind, "ssrc", tr.SSRC())
		for {
			if _, _, err := tr.Read(buf); err != nil {
				return
			}
		}
	}
	if kind == relay.KindVideo {
		s.videoSSRC.Store(uint32(tr.SSRC()))
	}
	var bad uint64
	for {
		n, _, err := tr.Read(buf)
		if err != nil {
			if bad > 0 {
				s.log.Warn("dropped malformed packets", "kind", kind, "count", bad)
			}
			return
		}
		if err := s.pub.WriteRTP(idx, stripExtension(buf[:n])); err != nil {
			bad++
		}
	}
}

// stripExtension removes the RTP header extension in place: its IDs were
// negotiated with this publisher only and mean nothing downstream.
func stripExtension(b []byte) []byte {
	if len(b) < 12 || b[0]&0x10 == 0 {
		return b
	}
	n := 12 + 4*int(b[0]&0x0f)
	if len(b) < n+4 {
		return b
	}
	ext := 4 + 4*(int(b[n+2])<<8|int(b[n+3]))
	if len(b) < n+ext {
		return b
	}
	copy(b[n:], b[n+ext:])
	b[0] &^= 0x10
	return b[:len(b)-ext]
}
