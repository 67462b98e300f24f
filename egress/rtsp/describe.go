package rtsp

import (
	"encoding/base64"
	"strconv"
	"strings"

	"github.com/bluenviron/gortsplib/v4/pkg/description"
	"github.com/bluenviron/gortsplib/v4/pkg/format"

	"github.com/stemflow/stemflow/relay"
)

// outTrack is how one relay track is served over RTSP.
type outTrack struct {
	media *description.Media
	pt    uint8
}

// describe builds the RTSP description of a relay stream: one media per
// track RTSP can carry (H264, VP8, Opus), payload types from 96 up. tracks
// is indexed by relay track number; unsupported tracks are nil.
func describe(d relay.Description) (*description.Session, []*outTrack) {
	desc := &description.Session{}
	tracks := make([]*outTrack, len(d.Tracks))
	for i, t := range d.Tracks {
		pt := uint8(96 + i)
		var f format.Format
		var typ description.MediaType
		switch t.MimeType {
		case relay.MimeH264:
			params := fmtpParams(t.Fmtp)
			h := &format.H264{PayloadTyp: pt, PacketizationMode: 1}
			if m, err := strconv.Atoi(params["packetization-mode"]); err == nil && params["packetization-mode"] != "" {
				h.PacketizationMode = m
			}
			if sets := strings.Split(params["sprop-parameter-sets"], ","); len(sets) >= 2 {
				sps, err1 := base64.StdEncoding.DecodeString(sets[0])
				pps, err2 := base64.StdEncoding.DecodeString(sets[1])
				if err1 == nil && err2 == nil && len(sps) > 0 && len(pps) > 0 {
					h.SPS, h.PPS = sps, pps
				}
			}
			f, typ = h, description.MediaTypeVideo
		case relay.MimeVP8:
			f, typ = &format.VP8{PayloadTyp: pt}, description.MediaTypeVideo
		case relay.MimeOpus:
			ch := int(t.Channels)
			if ch == 0 {
				ch = 2
			}
			f, typ = &format.Opus{PayloadTyp: pt, ChannelCount: ch}, description.MediaTypeAudio
		default:
			continue
		}
		m := &description.Media{Type: typ, Formats: []format.Format{f}}
		desc.Medias = append(desc.Medias, m)
		tracks[i] = &outTrack{media: m, pt: pt}
	}
	return desc, tracks
}

// fmtpParams parses "a=1;b=2" SDP format parameters.
func fmtpParams(fmtp string) map[string]string {
	out := make(map[string]string)
	for _, kv := range strings.Split(fmtp, ";") {
		k, v, _ := strings.Cut(strings.TrimSpace(kv), "=")
		if k != "" {
			out[strings.ToLower(k)] = strings.TrimSpace(v)
		}
	}
	return out
}
