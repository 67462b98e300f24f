package rtc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/pion/webrtc/v4"
)

// answerTimeout bounds answering an offer, ICE gathering included.
const answerTimeout = 10 * time.Second

var (
	errPCFailed = errors.New("ICE or DTLS failed")
	errPCClosed = errors.New("peer connection closed")
)

// Session is what an Endpoint keeps of one WHIP or WHEP session: its id and
// stream, its context and the state of its PeerConnection. The protocol's
// own session type embeds it. Its methods are safe for concurrent use.
type Session struct {
	id     string
	stream string
	proto  string
	log    *slog.Logger // the endpoint's
	certs  *certStore   // the endpoint's; nil: one certificate per PeerConnection

	ctx    context.Context // ends with the session; a child of the endpoint's
	cancel context.CancelCauseFunc
	done   chan struct{} // closed when the session's Runner has returned

	connected chan struct{}
	connOnce  sync.Once
}

// ID returns the session's identifier, the last element of its URL.
func (s *Session) ID() string { return s.id }

// Stream returns the name of the session's stream.
func (s *Session) Stream() string { return s.stream }

// Context returns the session's context. It ends when the session ends,
// with the reason as its cause.
func (s *Session) Context() context.Context { return s.ctx }

// Cancel ends the session with cause. It does not wait.
func (s *Session) Cancel(cause error) { s.cancel(cause) }

// Connected is closed once the session's PeerConnection has connected.
func (s *Session) Connected() <-chan struct{} { return s.connected }

// Logger returns the session's logger. It is built when needed rather than
// kept: a logger with attributes costs ~1.5 KB per session.
func (s *Session) Logger() *slog.Logger {
	return s.log.With("stream", s.stream, "session", s.id)
}

// NewPeerConnection creates the session's PeerConnection from api. Once it
// connects, Connected is closed; when it fails or closes, the session ends.
// The PeerConnection uses the endpoint's shared DTLS certificate.
func (s *Session) NewPeerConnection(api *webrtc.API) (*webrtc.PeerConnection, error) {
	var cfg webrtc.Configuration
	if s.certs != nil {
		cert, err := s.certs.get()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", s.proto, err)
		}
		cfg.Certificates = []webrtc.Certificate{cert}
	}
	pc, err := api.NewPeerConnection(cfg)
	if err != nil {
		return nil, fmt.Errorf("%s: new peer connection: %w", s.proto, err)
	}
	pc.OnConnectionStateChange(func(st webrtc.PeerConnectionState) {
		switch st {
		case webrtc.PeerConnectionStateConnected:
			s.connOnce.Do(func() { close(s.connected) })
		case webrtc.PeerConnectionStateFailed:
			s.cancel(errPCFailed)
		case webrtc.PeerConnectionStateClosed:
			s.cancel(errPCClosed)
		}
	})
	return pc, nil
}

// Answer answers offer on pc with every ICE candidate (see [Answer]),
// giving up after 10 seconds. On error it closes pc; an offer pion refuses
// is a 400 *HTTPError.
func (s *Session) Answer(ctx context.Context, pc *webrtc.PeerConnection, offer string) (string, error) {
	actx, cancel := context.WithTimeout(ctx, answerTimeout)
	defer cancel()
	answer, err := Answer(actx, pc, offer)
	if err != nil {
		_ = pc.Close()
		if errors.Is(err, ErrOfferRejected) {
			return "", Errorf(http.StatusBadRequest, "%s: the offer cannot be answered: %v", s.proto, err)
		}
		return "", fmt.Errorf("%s: answer: %w", s.proto, err)
	}
	return answer, nil
}
