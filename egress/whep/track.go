package whep

import (
	"errors"
	"strings"
	"sync/atomic"

	"github.com/pion/rtp"
	"github.com/pion/webrtc/v4"

	"github.com/stemflow/stemflow/relay"
)

// outTrack is one viewer's copy of one stream track: a webrtc.TrackLocal
// that writes the relay's packets through the binding's TrackLocalWriter with
// the viewer's payload type and SSRC. Unlike TrackLocalStaticRTP it fans out
// to nobody: each viewer has its own, written by the viewer's goroutine.
type outTrack struct {
	kind     webrtc.RTPCodecType
	id       string
	streamID string
	mime     string
	pt       uint8     // the payload type chosen from the viewer's offer
	cache    *rtxCache // nil for tracks without NACK (audio)

	bound atomic.Pointer[binding]

	// Used by the viewer's writing goroutine only.
	hdr     rtp.Header
	waitKey bool // drop video until a keyframe

	// Used by the track's RTCP goroutine only.
	rtxHdr rtp.Header
	rtxBuf *[relay.MaxPacketSize]byte // allocated at the first NACK
}

// binding is what Bind learned: where and as what to write.
type binding struct {
	ssrc uint32
	pt   uint8
	w    webrtc.TrackLocalWriter
}

var _ webrtc.TrackLocal = (*outTrack)(nil)

// Bind picks the payload type chosen from the offer among the negotiated
// codecs.
func (t *outTrack) Bind(ctx webrtc.TrackLocalContext) (webrtc.RTPCodecParameters, error) {
	codecs := ctx.CodecParameters()
	pick := -1
	for i, c := range codecs {
		if uint8(c.PayloadType) == t.pt {
			pick = i
			break
		}
	}
	if pick < 0 {
		for i, c := range codecs {
			if strings.EqualFold(c.MimeType, t.mime) {
				pick = i
				break
			}
		}
	}
	if pick < 0 {
		return webrtc.RTPCodecParameters{}, webrtc.ErrUnsupportedCodec
	}
	c := codecs[pick]
	t.bound.Store(&binding{ssrc: uint32(ctx.SSRC()), pt: uint8(c.PayloadType), w: ctx.WriteStream()})
	return c, nil
}

// Unbind stops writes.
func (t *outTrack) Unbind(webrtc.TrackLocalContext) error {
	t.bound.Store(nil)
	return nil
}

func (t *outTrack) ID() string                { return t.id }
func (t *outTrack) RID() string               { return "" }
func (t *outTrack) StreamID() string          { return t.streamID }
func (t *outTrack) Kind() webrtc.RTPCodecType { return t.kind }

var (
	errNotBound  = errors.New("track not bound")
	errMalformed = errors.New("malformed RTP packet")
)

// write sends one relay packet to the viewer. It returns the bytes written:
// 0 with a nil error means pion has not started SRTP yet and dropped it.
// It does not allocate.
func (t *outTrack) write(data []byte) (int, error) {
	return writeRTP(t.bound.Load(), &t.hdr, data)
}

// resend sends the cached packet seq again, as pion's NACK responder would
// (same SSRC and sequence number; no RTX). It reports whether the cache
// still held it.
func (t *outTrack) resend(seq uint16) bool {
	if t.cache == nil {
		return false
	}
	if t.rtxBuf == nil {
		t.rtxBuf = new([relay.MaxPacketSize]byte)
	}
	n := t.cache.get(seq, t.rtxBuf[:])
	if n == 0 {
		return false
	}
	_, err := writeRTP(t.bound.Load(), &t.rtxHdr, t.rtxBuf[:n])
	return err == nil
}

func writeRTP(b *binding, h *rtp.Header, data []byte) (int, error) {
	if b == nil {
		return 0, errNotBound
	}
	payload, ok := rewriteHeader(h, data, b.pt, b.ssrc)
	if !ok {
		return 0, errMalformed
	}
	return b.w.WriteRTP(h, payload)
}

// rewriteHeader fills h from the RTP packet b with the viewer's payload type
// and SSRC, drops CSRCs and header extensions (their IDs were negotiated
// upstream) and returns the payload. Sequence number, timestamp and marker
// are kept: viewers' NACKs name the relay's sequence numbers.
func rewriteHeader(h *rtp.Header, b []byte, pt uint8, ssrc uint32) ([]byte, bool) {
	if len(b) < 12 || b[0]>>6 != 2 {
		return nil, false
	}
	n := 12 + 4*int(b[0]&0x0f)
	if b[0]&0x10 != 0 {
		if len(b) < n+4 {
			return nil, false
		}
		n += 4 + 4*(int(b[n+2])<<8|int(b[n+3]))
	}
	end := len(b)
	var pad byte
	if b[0]&0x20 != 0 {
		pad = b[end-1]
		if pad == 0 || int(pad) > end-n {
			return nil, false
		}
		end -= int(pad)
	}
	if n > end {
		return nil, false
	}
	h.Version = 2
	h.Padding = pad != 0
	h.PaddingSize = pad
	h.Marker = b[1]&0x80 != 0
	h.PayloadType = pt
	h.SequenceNumber = uint16(b[2])<<8 | uint16(b[3])
	h.Timestamp = uint32(b[4])<<24 | uint32(b[5])<<16 | uint32(b[6])<<8 | uint32(b[7])
	h.SSRC = ssrc
	h.CSRC = h.CSRC[:0]
	h.Extension = false
	h.ExtensionProfile = 0
	h.Extensions = h.Extensions[:0]
	return b[n:end], true
}
