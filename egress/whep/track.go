package whep

import (
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/rtcp"
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
	pt       uint8      // the payload type chosen from the viewer's offer
	cache    *rtxCache  // nil for tracks without NACK (audio)
	rtcpOut  rtcpWriter // where sender reports go: the viewer's PeerConnection

	bound atomic.Pointer[binding]

	// Used by the viewer's writing goroutine only.
	pkt     rtp.Packet // the packet being written, parsed and rewritten
	waitKey bool       // drop video until a keyframe
	sr      senderReport

	// Used by the viewer's handleRTCP only (pion's SRTCP goroutine).
	rtxPkt rtp.Packet
}

// rtxBufs holds the buffers NACKed packets are copied into from the cache
// while they are resent: shared by all tracks rather than one kept by each.
var rtxBufs = sync.Pool{New: func() any { return new([relay.MaxPacketSize]byte) }}

// rtcpWriter is what an outTrack sends its RTCP sender reports through.
type rtcpWriter interface {
	WriteRTCP(pkts []rtcp.Packet) error
}

// binding is what Bind learned: where and as what to write.
type binding struct {
	ssrc      uint32
	pt        uint8
	clockRate uint32
	w         webrtc.TrackLocalWriter
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
	t.bound.Store(&binding{ssrc: uint32(ctx.SSRC()), pt: uint8(c.PayloadType), clockRate: c.ClockRate, w: ctx.WriteStream()})
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

// write sends one relay packet to the viewer and, once a second, an RTCP
// sender report. It returns the bytes written: 0 with a nil error means pion
// has not started SRTP yet and dropped it. It does not allocate.
func (t *outTrack) write(data []byte) (int, error) {
	b := t.bound.Load()
	n, err := writeRTP(b, &t.pkt, data)
	if n > 0 {
		t.sr.sent(b, &t.pkt, time.Now(), t.rtcpOut)
	}
	return n, err
}

// resend sends the cached packet seq again, as pion's NACK responder would
// (same SSRC and sequence number; no RTX). It reports whether the cache
// still held it.
func (t *outTrack) resend(seq uint16) bool {
	if t.cache == nil {
		return false
	}
	buf := rtxBufs.Get().(*[relay.MaxPacketSize]byte)
	defer rtxBufs.Put(buf)
	n := t.cache.get(seq, buf[:])
	if n == 0 {
		return false
	}
	_, err := writeRTP(t.bound.Load(), &t.rtxPkt, buf[:n])
	t.rtxPkt.Payload = nil // buf goes back to the pool
	return err == nil
}

func writeRTP(b *binding, p *rtp.Packet, data []byte) (int, error) {
	if b == nil {
		return 0, errNotBound
	}
	if !rewrite(p, data, b.pt, b.ssrc) {
		return 0, errMalformed
	}
	return b.w.WriteRTP(&p.Header, p.Payload)
}

// rewrite parses the RTP packet b into p (pion/rtp, reusing p's slices: no
// allocation) and gives it the viewer's payload type and SSRC. It drops
// CSRCs and header extensions (their IDs were negotiated upstream).
// Sequence number, timestamp, marker and padding are kept: viewers' NACKs
// name the relay's sequence numbers.
func rewrite(p *rtp.Packet, b []byte, pt uint8, ssrc uint32) bool {
	if p.Unmarshal(b) != nil || p.Version != 2 {
		return false
	}
	p.PayloadType = pt
	p.SSRC = ssrc
	p.CSRC = p.CSRC[:0]
	p.Extension = false
	p.ExtensionProfile = 0
	p.Extensions = p.Extensions[:0]
	return true
}

// srInterval is how often a track sends an RTCP sender report, as pion's
// report.SenderInterceptor does by default.
const srInterval = time.Second

// senderReport keeps what a track's RTCP sender reports state and sends
// them from the writing goroutine, in place of pion's
// report.SenderInterceptor, which costs every PeerConnection a goroutine,
// per-stream state behind a lock and a lock per packet. Browsers need the
// reports to play audio and video in sync.
type senderReport struct {
	packets, octets uint32
	lastTS          uint32    // the RTP timestamp of the newest frame sent
	lastAt          time.Time // when its first packet was sent
	due             time.Time // zero until the first packet
	pkt             rtcp.SenderReport
	pkts            [1]rtcp.Packet
}

// sent counts packet p, just written through b at now, and sends a report
// through w when one is due. It does not allocate (pion's WriteRTCP does,
// once a second).
func (s *senderReport) sent(b *binding, p *rtp.Packet, now time.Time, w rtcpWriter) {
	// Like pion's: the RTP time of a frame is taken at its first packet,
	// so that pushing a large frame does not skew the report.
	if s.packets == 0 || p.Timestamp != s.lastTS {
		s.lastTS = p.Timestamp
		s.lastAt = now
	}
	s.packets++
	s.octets += uint32(len(p.Payload))
	if s.due.IsZero() {
		s.due = now.Add(srInterval)
		return
	}
	if now.Before(s.due) || w == nil {
		return
	}
	s.due = now.Add(srInterval)
	s.pkt = rtcp.SenderReport{
		SSRC:        b.ssrc,
		NTPTime:     ntpTime(now),
		RTPTime:     s.lastTS + uint32(now.Sub(s.lastAt).Seconds()*float64(b.clockRate)),
		PacketCount: s.packets,
		OctetCount:  s.octets,
	}
	s.pkts[0] = &s.pkt
	_ = w.WriteRTCP(s.pkts[:])
}

// ntpTime returns t as a 64-bit NTP timestamp (seconds since 1900 in the
// high 32 bits, the fraction in the low 32).
func ntpTime(t time.Time) uint64 {
	const unixToNTP = 2208988800 // seconds from 1900 to 1970
	ns := uint64(t.UnixNano())
	sec := ns/1e9 + unixToNTP
	frac := (ns % 1e9) << 32 / 1e9
	return sec<<32 | frac
}
