package whip

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/rtcp"
	"github.com/pion/rtp"
	"github.com/pion/webrtc/v4"

	"github.com/stemflow/stemflow/internal/rtc"
	"github.com/stemflow/stemflow/relay"
)

// session is one publisher: its PeerConnection and its stream in the hub. Its
// Run, in the goroutine the rtc.Endpoint gives it, owns both and ends them
// together.
type session struct {
	*rtc.Session
	srv *Server
	log *slog.Logger

	pc        *webrtc.PeerConnection
	pub       *relay.Publisher
	trackOf   [3]int         // relay track index by relay.Kind, -1 if none
	claimed   [3]atomic.Bool // a remote track of that kind is being read
	videoSSRC atomic.Uint32
	keyReq    chan struct{} // capacity 1: a PLI is wanted

	readersMu sync.Mutex // guards the following fields
	closing   bool
	readers   sync.WaitGroup
}

var _ rtc.Runner = (*session)(nil)

func newSession(srv *Server, rs *rtc.Session) *session {
	return &session{
		Session: rs,
		srv:     srv,
		log:     rs.Logger(),
		trackOf: [3]int{-1, -1, -1},
		keyReq:  make(chan struct{}, 1),
	}
}

// requestKeyframe is the hub's OnKeyframeRequest: it must not block.
func (s *session) requestKeyframe() {
	select {
	case s.keyReq <- struct{}{}:
	default:
	}
}

var errConnectTimeout = errors.New("publisher did not connect in time")

// start creates the PeerConnection and answers offer. On error the
// PeerConnection is closed.
func (s *session) start(ctx context.Context, api *webrtc.API, offer string) (string, error) {
	pc, err := s.NewPeerConnection(api)
	if err != nil {
		return "", err
	}
	s.pc = pc
	pc.OnTrack(func(tr *webrtc.TrackRemote, _ *webrtc.RTPReceiver) {
		if !s.addReader() {
			return
		}
		defer s.readers.Done()
		s.readTrack(tr)
	})
	return s.Answer(ctx, pc, offer)
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

// Run owns the session until it ends.
func (s *session) Run() {
	s.log.Info("publisher session started")
	ctx := s.Context()
	timer := time.NewTimer(s.srv.cfg.ConnectTimeout)
	defer timer.Stop()
	connected := s.Connected()
	for {
		select {
		case <-ctx.Done():
			s.cleanup()
			return
		case <-connected:
			connected = nil
			timer.Stop()
			s.log.Info("publisher connected")
		case <-timer.C:
			s.Cancel(errConnectTimeout)
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
	s.log.Info("publisher session ended", "reason", context.Cause(s.Context()))
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
	var (
		bad uint64
		hdr rtp.Header
	)
	for {
		n, _, err := tr.Read(buf)
		if err != nil {
			if bad > 0 {
				s.log.Warn("dropped malformed packets", "kind", kind, "count", bad)
			}
			return
		}
		pkt, err := stripExtension(&hdr, buf[:n])
		if err == nil {
			err = s.pub.WriteRTP(idx, pkt)
		}
		if err != nil {
			bad++
		}
	}
}

// stripExtension removes the RTP header extension of the packet in b, in
// place: its IDs were negotiated with this publisher only and mean nothing
// downstream. hdr is the caller's, reused from packet to packet so that
// parsing allocates nothing once its slices have grown.
func stripExtension(hdr *rtp.Header, b []byte) ([]byte, error) {
	n, err := hdr.Unmarshal(b)
	if err != nil {
		return nil, err
	}
	if !hdr.Extension {
		return b, nil
	}
	hdr.Extension = false
	m, err := hdr.MarshalTo(b) // shorter than the header it replaces
	if err != nil {
		return nil, err
	}
	return b[:m+copy(b[m:], b[n:])], nil
}
