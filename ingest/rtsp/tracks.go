package rtsp

import (
	"errors"
	"fmt"
	"strings"

	"github.com/bluenviron/gortsplib/v4/pkg/description"
	"github.com/bluenviron/gortsplib/v4/pkg/format"
	"github.com/pion/rtp"

	"github.com/stemflow/stemflow/relay"
)

// MaxPacketSize is the largest RTP packet (header included) that the ingest
// writes into the relay: one overlay datagram on every link, and small enough
// for WebRTC viewers.
const MaxPacketSize = relay.OverlayPacketSize

// ErrNoSupportedTrack is returned (wrapped) when an RTSP stream has no track
// the relay can carry.
var ErrNoSupportedTrack = errors.New("no supported track")

// supportedCodecs is what users are told to publish instead.
const supportedCodecs = "H264, VP8 or Opus (e.g. ffmpeg -c:v libx264 -c:a libopus)"

// plannedTrack is one RTSP media format that becomes one relay track.
type plannedTrack struct {
	media   *description.Media
	format  format.Format
	newProc func(ssrc uint32) (processor, error)
	track   relay.Track // Fmtp may be incomplete until the processor knows it
}

// plan maps the formats of an RTSP description to relay tracks. It takes the
// first supported format of each media and returns a description of the
// skipped ones (for a log line), or ErrNoSupportedTrack when nothing is usable.
func plan(desc *description.Session) (tracks []plannedTrack, skipped string, err error) {
	var unsupported []string
	for _, m := range desc.Medias {
		if m.IsBackChannel {
			continue
		}
		var chosen *plannedTrack
		for _, f := range m.Formats {
			if pt, ok := planFormat(m, f); ok {
				chosen = &pt
				break
			}
			unsupported = append(unsupported, fmt.Sprintf("%s (%s, payload type %d)", f.Codec(), m.Type, f.PayloadType()))
		}
		if chosen != nil && len(tracks) < relay.MaxTracks {
			tracks = append(tracks, *chosen)
		}
	}
	skipped = strings.Join(unsupported, ", ")
	if len(tracks) == 0 {
		if skipped == "" {
			skipped = "nothing"
		}
		return nil, skipped, fmt.Errorf("%w: the stream has %s; publish %s", ErrNoSupportedTrack, skipped, supportedCodecs)
	}
	return tracks, skipped, nil
}

func planFormat(m *description.Media, f format.Format) (plannedTrack, bool) {
	pt := plannedTrack{media: m, format: f}
	switch f := f.(type) {
	case *format.H264:
		if f.PacketizationMode > 1 {
			return pt, false
		}
		sps, pps := f.SafeParams()
		pt.track = relay.Track{Kind: relay.KindVideo, MimeType: relay.MimeH264, ClockRate: 90000,
			PayloadType: f.PayloadType(), Fmtp: h264Fmtp(sps, pps)}
		pt.newProc = func(ssrc uint32) (processor, error) { return newH264Proc(f, ssrc) }
	case *format.VP8:
		pt.track = relay.Track{Kind: relay.KindVideo, MimeType: relay.MimeVP8, ClockRate: 90000,
			PayloadType: f.PayloadType()}
		pt.newProc = func(ssrc uint32) (processor, error) { return newVP8Proc(f, ssrc) }
	case *format.Opus:
		fmtp := "minptime=10;useinbandfec=1"
		if f.ChannelCount == 2 { // gortsplib sets it from sprop-stereo too
			fmtp += ";sprop-stereo=1"
		}
		pt.track = relay.Track{Kind: relay.KindAudio, MimeType: relay.MimeOpus, ClockRate: 48000, Channels: 2,
			PayloadType: f.PayloadType(), Fmtp: fmtp}
		pt.newProc = func(uint32) (processor, error) { return &passthroughProc{}, nil }
	default:
		return pt, false
	}
	return pt, true
}

// processor turns the RTP packets of one RTSP track into relay packets. Its
// methods are called by one goroutine at a time.
type processor interface {
	// process handles one incoming packet and calls emit with each outgoing
	// marshalled RTP packet (valid only during the call).
	process(pkt *rtp.Packet, emit func([]byte)) error
	// fmtp returns the track's current SDP format parameters, given the
	// ones planned from the RTSP description, and whether they are complete
	// (H264 needs SPS and PPS).
	fmtp(planned string) (string, bool)
}

// passthroughProc forwards packets unchanged (Opus).
type passthroughProc struct {
	buf [relay.MaxPacketSize]byte
}

func (p *passthroughProc) process(pkt *rtp.Packet, emit func([]byte)) error {
	n, err := pkt.MarshalTo(p.buf[:])
	if err != nil {
		return fmt.Errorf("RTP packet of %d bytes does not fit in %d", pkt.MarshalSize(), len(p.buf))
	}
	emit(p.buf[:n])
	return nil
}

func (p *passthroughProc) fmtp(planned string) (string, bool) { return planned, true }
