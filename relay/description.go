package relay

import (
	"errors"
	"fmt"
	"strings"
)

// Kind is the media kind of a track.
type Kind uint8

// Media kinds.
const (
	KindVideo Kind = iota + 1
	KindAudio
)

func (k Kind) String() string {
	switch k {
	case KindVideo:
		return "video"
	case KindAudio:
		return "audio"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Codec MIME types carried by the relay, spelled as pion/webrtc spells them.
const (
	MimeH264 = "video/H264"
	MimeVP8  = "video/VP8"
	MimeOpus = "audio/opus"
)

// Track describes one RTP track of a stream.
type Track struct {
	Kind      Kind
	MimeType  string // MimeH264, MimeVP8 or MimeOpus
	ClockRate uint32
	Channels  uint16 // audio only
	// Fmtp holds the SDP format parameters, e.g.
	// "packetization-mode=1;profile-level-id=640028;sprop-parameter-sets=Z2QAKKw=,aO48gA==".
	Fmtp string
	// PayloadType is the RTP payload type of the packets as they travel
	// through the relay. Egress protocols rewrite it to what they negotiated.
	PayloadType uint8
}

// Description is what a subscriber needs to know about a stream before the
// first packet: its tracks. The index of a track in Tracks is the track number
// carried by every [Packet].
type Description struct {
	Tracks []Track
}

// MaxTracks is the largest number of tracks a stream may have.
const MaxTracks = 8

// Validate reports what is wrong with a description, if anything.
func (d *Description) Validate() error {
	if len(d.Tracks) == 0 {
		return errors.New("stream has no tracks")
	}
	if len(d.Tracks) > MaxTracks {
		return fmt.Errorf("stream has %d tracks, at most %d are allowed", len(d.Tracks), MaxTracks)
	}
	for i, t := range d.Tracks {
		if t.Kind != KindVideo && t.Kind != KindAudio {
			return fmt.Errorf("track %d: unknown kind %d", i, t.Kind)
		}
		if t.MimeType == "" {
			return fmt.Errorf("track %d: no codec", i)
		}
		if t.ClockRate == 0 {
			return fmt.Errorf("track %d: no clock rate", i)
		}
		if t.PayloadType > 127 {
			return fmt.Errorf("track %d: payload type %d out of range", i, t.PayloadType)
		}
	}
	return nil
}

// Clone returns a deep copy of d.
func (d Description) Clone() Description {
	return Description{Tracks: append([]Track(nil), d.Tracks...)}
}

// TrackOf returns the index of the first track of the given kind, or -1.
func (d *Description) TrackOf(k Kind) int {
	for i, t := range d.Tracks {
		if t.Kind == k {
			return i
		}
	}
	return -1
}

// ValidateStreamName reports whether name may be used as a stream name:
// 1 to 128 characters out of letters, digits and "-_.~".
func ValidateStreamName(name string) error {
	if name == "" {
		return errors.New("stream name is empty")
	}
	if len(name) > 128 {
		return fmt.Errorf("stream name is %d characters long, at most 128 are allowed", len(name))
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("-_.~", c)) {
			return fmt.Errorf("stream name %q has the character %q: use letters, digits and -_.~", name, c)
		}
	}
	return nil
}
