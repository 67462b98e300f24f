package rtc

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/pion/sdp/v3"
	"github.com/pion/webrtc/v4"

	"github.com/stemflow/stemflow/relay"
)

// Offer is the part of an SDP offer the WebRTC servers decide on: its media
// sections and the codecs each offers, in the offerer's order of preference.
type Offer struct {
	SDP   string
	Media []Media
}

// Media is one m= section of an offer.
type Media struct {
	Kind      relay.Kind // 0 for sections that are neither audio nor video
	MID       string
	Direction string // sendrecv, sendonly, recvonly or inactive
	Codecs    []Codec
}

// Codec is one payload format offered in a media section.
type Codec struct {
	PayloadType uint8
	MimeType    string // e.g. "video/H264", spelled as relay spells it when supported
	ClockRate   uint32
	Channels    uint16
	Fmtp        string
	Feedback    []webrtc.RTCPFeedback
}

// ErrNoMedia is returned by ParseOffer for an offer without audio or video.
var ErrNoMedia = errors.New("offer has no audio or video section")

// ParseOffer parses an SDP offer. Its errors say what is malformed.
func ParseOffer(s string) (*Offer, error) {
	var sd sdp.SessionDescription
	if err := sd.UnmarshalString(s); err != nil {
		return nil, fmt.Errorf("offer is not valid SDP: %w", err)
	}
	o := &Offer{SDP: s}
	media := 0
	for _, md := range sd.MediaDescriptions {
		m := Media{Direction: "sendrecv"}
		switch md.MediaName.Media {
		case "video":
			m.Kind = relay.KindVideo
		case "audio":
			m.Kind = relay.KindAudio
		}
		if m.Kind != 0 {
			media++
		}
		byPT := map[uint8]int{}
		for _, f := range md.MediaName.Formats {
			pt, err := strconv.ParseUint(f, 10, 7)
			if err != nil {
				if m.Kind != 0 {
					return nil, fmt.Errorf("offer is not valid SDP: %s section has payload type %q", md.MediaName.Media, f)
				}
				continue
			}
			byPT[uint8(pt)] = len(m.Codecs)
			m.Codecs = append(m.Codecs, Codec{PayloadType: uint8(pt)})
		}
		for _, a := range md.Attributes {
			switch a.Key {
			case "mid":
				m.MID = a.Value
			case "sendrecv", "sendonly", "recvonly", "inactive":
				m.Direction = a.Key
			case "rtpmap", "fmtp", "rtcp-fb":
				pt, rest, ok := strings.Cut(a.Value, " ")
				if !ok {
					continue
				}
				n, err := strconv.ParseUint(pt, 10, 7)
				if err != nil {
					continue
				}
				i, ok := byPT[uint8(n)]
				if !ok {
					continue
				}
				c := &m.Codecs[i]
				rest = strings.TrimSpace(rest)
				switch a.Key {
				case "rtpmap":
					parseRtpmap(c, m.Kind, rest)
				case "fmtp":
					c.Fmtp = rest
				case "rtcp-fb":
					typ, param, _ := strings.Cut(rest, " ")
					c.Feedback = append(c.Feedback, webrtc.RTCPFeedback{Type: typ, Parameter: param})
				}
			}
		}
		o.Media = append(o.Media, m)
	}
	if media == 0 {
		return nil, ErrNoMedia
	}
	return o, nil
}

func parseRtpmap(c *Codec, kind relay.Kind, s string) {
	parts := strings.Split(s, "/")
	name := parts[0]
	if len(parts) > 1 {
		if n, err := strconv.ParseUint(parts[1], 10, 32); err == nil {
			c.ClockRate = uint32(n)
		}
	}
	if len(parts) > 2 {
		if n, err := strconv.ParseUint(parts[2], 10, 16); err == nil {
			c.Channels = uint16(n)
		}
	}
	c.MimeType = kind.String() + "/" + name
	for _, m := range []string{relay.MimeH264, relay.MimeVP8, relay.MimeOpus} {
		if strings.EqualFold(c.MimeType, m) {
			c.MimeType = m
		}
	}
}

// FmtpParam returns the value of one key of an SDP fmtp line such as
// "packetization-mode=1;profile-level-id=42e01f".
func FmtpParam(fmtp, key string) (string, bool) {
	for p := range strings.SplitSeq(fmtp, ";") {
		k, v, _ := strings.Cut(strings.TrimSpace(p), "=")
		if strings.EqualFold(k, key) {
			return v, true
		}
	}
	return "", false
}

// Supported reports whether the relay can carry the codec: H264 with
// packetization-mode=1, VP8 at 90 kHz or Opus at 48 kHz.
func (c *Codec) Supported() bool {
	switch c.MimeType {
	case relay.MimeH264:
		pm, _ := FmtpParam(c.Fmtp, "packetization-mode")
		return c.ClockRate == 90000 && pm == "1"
	case relay.MimeVP8:
		return c.ClockRate == 90000
	case relay.MimeOpus:
		return c.ClockRate == 48000
	}
	return false
}

// ProfileLevelID returns an H264 codec's profile-level-id in lower case, or
// "" when it has none.
func (c *Codec) ProfileLevelID() string {
	v, _ := FmtpParam(c.Fmtp, "profile-level-id")
	return strings.ToLower(v)
}

// Track returns the relay track of packets in this codec.
func (c *Codec) Track() relay.Track {
	t := relay.Track{
		MimeType:    c.MimeType,
		ClockRate:   c.ClockRate,
		Channels:    c.Channels,
		Fmtp:        c.Fmtp,
		PayloadType: c.PayloadType,
	}
	if strings.HasPrefix(c.MimeType, "audio/") {
		t.Kind = relay.KindAudio
	} else {
		t.Kind = relay.KindVideo
	}
	return t
}

// Parameters returns the pion codec parameters to register for this codec,
// with its payload type and fmtp, keeping only the RTCP feedback types in
// feedback that the offer also lists. The fmtp is a copy: pion keeps it for
// the PeerConnection's lifetime, and the offer's text need not stay with it.
func (c *Codec) Parameters(feedback ...webrtc.RTCPFeedback) webrtc.RTPCodecParameters {
	var fb []webrtc.RTCPFeedback
	for _, f := range feedback {
		for _, o := range c.Feedback {
			if f == o {
				fb = append(fb, f)
				break
			}
		}
	}
	return webrtc.RTPCodecParameters{
		PayloadType: webrtc.PayloadType(c.PayloadType),
		RTPCodecCapability: webrtc.RTPCodecCapability{
			MimeType:     c.MimeType,
			ClockRate:    c.ClockRate,
			Channels:     c.Channels,
			SDPFmtpLine:  strings.Clone(c.Fmtp),
			RTCPFeedback: fb,
		},
	}
}

// CodecType returns pion's codec type for a relay kind.
func CodecType(k relay.Kind) webrtc.RTPCodecType {
	if k == relay.KindAudio {
		return webrtc.RTPCodecTypeAudio
	}
	return webrtc.RTPCodecTypeVideo
}

// RTCP feedback types the servers negotiate.
var (
	FeedbackNACK     = webrtc.RTCPFeedback{Type: webrtc.TypeRTCPFBNACK}
	FeedbackPLI      = webrtc.RTCPFeedback{Type: webrtc.TypeRTCPFBNACK, Parameter: "pli"}
	FeedbackFIR      = webrtc.RTCPFeedback{Type: webrtc.TypeRTCPFBCCM, Parameter: "fir"}
	FeedbackTWCC     = webrtc.RTCPFeedback{Type: webrtc.TypeRTCPFBTransportCC}
	FeedbackGoogREMB = webrtc.RTCPFeedback{Type: webrtc.TypeRTCPFBGoogREMB}
)

// SupportedCodecs is the wording user-facing errors use for what the relay
// carries.
const SupportedCodecs = "H264 (packetization-mode=1), VP8 or Opus"

// TrimOffer returns offer with only the payload type keep[i] left in its
// i-th media section (0-based, in order): the other formats leave the m=
// line with their rtpmap, fmtp and rtcp-fb lines. Sections without an
// entry in keep, and every other line, are left as they are. An answer to
// the trimmed offer is an answer to offer; pion keeps the remote
// description of every PeerConnection, text and parsed, for its lifetime:
// a browser's offer lists a dozen video formats with their RTX and
// feedback (~5 KB of SDP) where a server that sends one codec per kind
// needs one.
func TrimOffer(offer string, keep map[int]uint8) string {
	var b strings.Builder
	b.Grow(len(offer))
	section := -1
	pt, trim := uint8(0), false
	for line := range strings.Lines(offer) {
		text := strings.TrimRight(line, "\r\n")
		if rest, ok := strings.CutPrefix(text, "m="); ok {
			section++
			pt, trim = keep[section]
			if trim {
				if f := strings.Fields(rest); len(f) > 3 && slices.Contains(f[3:], strconv.Itoa(int(pt))) {
					b.WriteString("m=" + strings.Join(f[:3], " ") + " " + strconv.Itoa(int(pt)))
					b.WriteString(line[len(text):])
					continue
				}
				trim = false // pt is not offered here: leave the section alone
			}
		} else if trim && !keepFormatLine(text, pt) {
			continue
		}
		b.WriteString(line)
	}
	return b.String()
}

// keepFormatLine reports whether an SDP line of a trimmed section stays:
// every line but an rtpmap, fmtp or rtcp-fb of a payload type other than
// pt (rtcp-fb:* stays).
func keepFormatLine(line string, pt uint8) bool {
	for _, attr := range []string{"a=rtpmap:", "a=fmtp:", "a=rtcp-fb:"} {
		if rest, ok := strings.CutPrefix(line, attr); ok {
			f, _, _ := strings.Cut(rest, " ")
			return f == "*" || f == strconv.Itoa(int(pt))
		}
	}
	return true
}
