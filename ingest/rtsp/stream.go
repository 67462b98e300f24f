package rtsp

import (
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bluenviron/gortsplib/v4/pkg/description"
	"github.com/bluenviron/gortsplib/v4/pkg/format"
	"github.com/pion/rtp"

	"github.com/stemflow/stemflow/relay"
)

// ingestTrack is one relay track fed by one RTSP media format.
type ingestTrack struct {
	index  int
	media  *description.Media
	format format.Format

	stream *ingestStream
	// emitFunc is t.emit, bound once: a closure made per packet would be a
	// heap allocation per packet.
	emitFunc func([]byte)

	mu      sync.Mutex // guards the following fields
	proc    processor
	planned string           // fmtp from the RTSP description
	known   bool             // proc.fmtp was complete at the last packet
	pub     *relay.Publisher // where emit writes, during handle; nil before publishing
}

// ingestStream converts the tracks of one RTSP publication (pushed or pulled)
// and writes them into a relay publisher. The publisher is created as soon as
// every track's parameters are known: at once when the RTSP description
// carries them, else when the first in-band SPS/PPS arrive. Packets before
// that are dropped.
//
// handle may be called from one goroutine per track.
type ingestStream struct {
	hub  *relay.Hub
	name string
	log  *slog.Logger
	// onFail is called (once, without locks held) when a deferred publication
	// fails, so that the RTSP session is ended.
	onFail func(error)

	tracks []*ingestTrack
	pub    atomic.Pointer[relay.Publisher]

	packetsIn  atomic.Uint64
	errorsIn   atomic.Uint64
	lastErrLog atomic.Int64 // unix nanoseconds of the last error log line

	mu         sync.Mutex // guards the following fields
	desc       relay.Description
	publishing bool // Publish was started (it may be in progress)
	closed     bool
}

func newIngestStream(hub *relay.Hub, name string, planned []plannedTrack, log *slog.Logger, onFail func(error)) (*ingestStream, error) {
	s := &ingestStream{hub: hub, name: name, log: log, onFail: onFail}
	ssrc := rand.Uint32()
	for i, p := range planned {
		proc, err := p.newProc(ssrc + uint32(i))
		if err != nil {
			return nil, fmt.Errorf("track %d (%s): %w", i, p.format.Codec(), err)
		}
		t := &ingestTrack{index: i, media: p.media, format: p.format, stream: s, proc: proc, planned: p.track.Fmtp}
		t.emitFunc = t.emit
		s.tracks = append(s.tracks, t)
		s.desc.Tracks = append(s.desc.Tracks, p.track)
	}
	return s, nil
}

// start publishes the stream when every track's parameters are known now. If
// some are not, it checks that the name is free and publishes later.
func (s *ingestStream) start() error {
	ready := true
	for i, t := range s.tracks {
		fmtp, ok := t.proc.fmtp(t.planned)
		s.desc.Tracks[i].Fmtp = fmtp
		t.known = ok
		ready = ready && ok
	}
	if ready {
		s.mu.Lock()
		s.publishing = true
		desc := s.desc.Clone()
		s.mu.Unlock()
		return s.publish(desc)
	}
	if err := relay.ValidateStreamName(s.name); err != nil {
		return err
	}
	for _, info := range s.hub.Streams() {
		if info.Name == s.name {
			return fmt.Errorf("%w: %q is live at datacenter %s", relay.ErrStreamExists, s.name, info.Origin)
		}
	}
	s.log.Info("H264 parameters (SPS/PPS) are not in the RTSP description: publishing once they arrive in-band")
	return nil
}

func (s *ingestStream) publish(desc relay.Description) error {
	for _, t := range s.tracks {
		var what string
		t.mu.Lock()
		if h, ok := t.proc.(*h264Proc); ok {
			what = h264Unplayable(h.sps)
		}
		t.mu.Unlock()
		if what != "" {
			s.log.Warn("H264 " + what + ": browsers cannot decode it; encode 4:2:0 8-bit (ffmpeg -pix_fmt yuv420p)")
		}
	}
	pub, err := s.hub.Publish(s.name, desc, relay.PublishOptions{OnKeyframeRequest: s.keyframeRequested})
	if err != nil {
		return err
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		pub.Close()
		return nil
	}
	s.pub.Store(pub)
	s.mu.Unlock()
	return nil
}

// keyframeRequested is the relay's keyframe request: RTSP has no way to ask a
// publisher for one, so viewers wait for the next IDR frame (the relay's GOP
// cache gives new viewers the last one).
func (s *ingestStream) keyframeRequested() {
	s.log.Debug("keyframe requested: RTSP publishers cannot be asked for one; waiting for the next")
}

// handle converts one incoming packet of track t and writes the result. It
// does not allocate (TestIngestAllocations).
func (s *ingestStream) handle(t *ingestTrack, pkt *rtp.Packet) {
	s.packetsIn.Add(1)
	t.mu.Lock()
	t.pub = s.pub.Load()
	err := t.proc.process(pkt, t.emitFunc)
	t.pub = nil
	becameKnown := false
	var fmtp string
	if !t.known {
		fmtp, t.known = t.proc.fmtp(t.planned)
		becameKnown = t.known
	}
	t.mu.Unlock()
	if err != nil {
		s.packetError(fmt.Errorf("track %d (%s): %w", t.index, t.format.Codec(), err))
	}
	if becameKnown {
		s.trackKnown(t.index, fmtp)
	}
}

// emit writes one converted packet into the relay. t.mu is held.
func (t *ingestTrack) emit(b []byte) {
	if t.pub == nil {
		return
	}
	if err := t.pub.WriteRTP(t.index, b); err != nil {
		t.stream.packetError(fmt.Errorf("relay: %w", err))
	}
}

// trackKnown records a track's parameters and publishes the stream once
// every track's are known.
func (s *ingestStream) trackKnown(i int, fmtp string) {
	s.mu.Lock()
	s.desc.Tracks[i].Fmtp = fmtp
	if s.publishing || s.closed {
		s.mu.Unlock()
		return
	}
	for _, t := range s.tracks {
		if t.index != i && !s.trackKnownLocked(t) {
			s.mu.Unlock()
			return
		}
	}
	s.publishing = true
	desc := s.desc.Clone()
	s.mu.Unlock()
	if err := s.publish(desc); err != nil {
		s.onFail(err)
		return
	}
	s.log.Info("stream published after in-band parameters arrived")
}

// trackKnownLocked reports whether t's parameters are known. s.mu is held;
// t.mu is taken after it, never the other way round.
func (s *ingestStream) trackKnownLocked(t *ingestTrack) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.known
}

// packetError counts a conversion or relay error and logs at most one line
// per ten seconds, with the count.
func (s *ingestStream) packetError(err error) {
	n := s.errorsIn.Add(1)
	now := time.Now().UnixNano()
	last := s.lastErrLog.Load()
	if now-last < int64(10*time.Second) || !s.lastErrLog.CompareAndSwap(last, now) {
		return
	}
	s.log.Warn("dropping media", "error", err, "errors_total", n)
}

// close ends the publication. It is idempotent.
func (s *ingestStream) close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	s.mu.Unlock()
	if pub := s.pub.Swap(nil); pub != nil {
		pub.Close()
	}
}
