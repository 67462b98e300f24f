package relay

// Flags are facts about a stream that its ingest finds in the media and that
// travel with the stream through the overlay, to every datacenter that
// relays it. A stream's flags only ever gain bits during its life; a new
// publication of the same name starts with none.
type Flags uint32

const (
	// FlagBFrames: the stream's H264 video has B-frames. Browsers do not
	// decode them over WebRTC (the picture stutters at 1–2 fps); RTSP
	// readers play them. The publisher fixes it by encoding without
	// B-frames (ffmpeg -bf 0 or -tune zerolatency).
	FlagBFrames Flags = 1 << iota
)

// bFramesAdvice is what the publisher is told when its stream has B-frames.
const bFramesAdvice = "stream has H264 B-frames: browsers cannot play it over WebRTC (RTSP readers can); " +
	"encode without B-frames (ffmpeg -bf 0 or -tune zerolatency; x264 option bframes=0)"

// Flags returns the stream's flags as this node knows them now.
func (s *Stream) Flags() Flags { return Flags(s.flags.Load()) }

// watchFlags returns the stream's flags and a channel that is closed when
// they next change.
func (s *Stream) watchFlags() (Flags, <-chan struct{}) {
	s.flagsMu.Lock()
	defer s.flagsMu.Unlock()
	if s.flagsChanged == nil {
		s.flagsChanged = make(chan struct{})
	}
	return s.Flags(), s.flagsChanged
}

// setFlags adds f to the stream's flags and reports whether that changed
// them. Watchers are woken; none is called.
func (s *Stream) setFlags(f Flags) bool {
	if s.Flags()&f == f {
		return false
	}
	s.flagsMu.Lock()
	defer s.flagsMu.Unlock()
	old := s.Flags()
	if old&f == f {
		return false
	}
	s.flags.Store(uint32(old | f))
	if s.flagsChanged != nil {
		close(s.flagsChanged)
		s.flagsChanged = nil
	}
	return true
}

// inspect looks for what the stream's flags record in one packet's payload of
// a video track. Once a flag is set it stops looking for it, so a stream
// pays for the slice-header parse only until its first B slice.
func (p *Publisher) inspect(t *Track, payload []byte) {
	if t.MimeType != MimeH264 || p.s.Flags()&FlagBFrames != 0 || !h264BSlice(payload) {
		return
	}
	if p.s.setFlags(FlagBFrames) {
		p.s.hub.log.Warn(bFramesAdvice, "stream", p.s.name)
		p.s.hub.announceFlags(p.s)
	}
}
