package rtctest

import (
	"github.com/pion/rtp"
	"github.com/pion/rtp/codecs"
)

// H264Source makes real-looking H264 RTP packets: every GOP frames an IDR
// picture preceded by SPS and PPS (sent as a STAP-A), the other frames
// P-slices, packetized with FU-A like a browser or ffmpeg does.
type H264Source struct {
	PayloadType uint8  // default 96
	SSRC        uint32 // default 0x11223344
	GOP         int    // frames per GOP, default 60 (2 s at 30 fps)
	FPS         int    // default 30
	FrameBytes  int    // bytes of a P frame, default 8300 (2 Mbit/s at 30 fps)
	KeyBytes    int    // bytes of an IDR frame, default 3 × FrameBytes
	MTU         int    // RTP payload size limit, default 1100

	payloader codecs.H264Payloader
	seq       uint16
	ts        uint32
	frame     int
	forced    bool
}

// ForceKeyframe makes the next frame a keyframe, as a PLI does to an encoder.
// The GOP restarts there.
func (s *H264Source) ForceKeyframe() { s.forced = true }

// SPS and PPS of a 1280x720 constrained-baseline stream.
var (
	SPS = []byte{0x67, 0x42, 0xc0, 0x1f, 0xda, 0x01, 0x40, 0x16, 0xec, 0x04, 0x40, 0x00, 0x00, 0x03, 0x00, 0x40, 0x00, 0x00, 0x0f, 0x23, 0xc6, 0x0c, 0xa8}
	PPS = []byte{0x68, 0xce, 0x3c, 0x80}
)

func (s *H264Source) defaults() {
	if s.PayloadType == 0 {
		s.PayloadType = 96
	}
	if s.SSRC == 0 {
		s.SSRC = 0x11223344
	}
	if s.GOP == 0 {
		s.GOP = 60
	}
	if s.FPS == 0 {
		s.FPS = 30
	}
	if s.FrameBytes == 0 {
		s.FrameBytes = 8300
	}
	if s.KeyBytes == 0 {
		s.KeyBytes = 3 * s.FrameBytes
	}
	if s.MTU == 0 {
		s.MTU = 1100
	}
}

// NextFrame returns the RTP packets of the next frame and whether it is a
// keyframe.
func (s *H264Source) NextFrame() (pkts [][]byte, key bool) {
	s.defaults()
	key = s.forced || s.frame%s.GOP == 0
	if key {
		s.frame, s.forced = 0, false
	}
	s.frame++
	var nalus [][]byte
	if key {
		nalus = append(nalus, SPS, PPS, slice(0x65, s.KeyBytes, s.frame))
	} else {
		nalus = append(nalus, slice(0x41, s.FrameBytes, s.frame))
	}
	var annexB []byte
	for _, n := range nalus {
		annexB = append(annexB, 0, 0, 0, 1)
		annexB = append(annexB, n...)
	}
	payloads := s.payloader.Payload(uint16(s.MTU), annexB)
	for i, p := range payloads {
		pkt := rtp.Packet{Header: rtp.Header{
			Version:        2,
			Marker:         i == len(payloads)-1,
			PayloadType:    s.PayloadType,
			SequenceNumber: s.seq,
			Timestamp:      s.ts,
			SSRC:           s.SSRC,
		}, Payload: p}
		s.seq++
		b, err := pkt.Marshal()
		if err != nil {
			panic(err)
		}
		pkts = append(pkts, b)
	}
	s.ts += uint32(90000 / s.FPS)
	return pkts, key
}

// slice returns a NAL unit of the given header byte and size whose body does
// not contain start codes.
func slice(header byte, size, seed int) []byte {
	b := make([]byte, size)
	b[0] = header
	x := uint32(seed*2654435761 + 1)
	for i := 1; i < size; i++ {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x) | 0x01 // never 0: no start code emulation
	}
	return b
}

// OpusSource makes Opus RTP packets of 20 ms.
type OpusSource struct {
	PayloadType uint8  // default 111
	SSRC        uint32 // default 0x55667788
	seq         uint16
	ts          uint32
}

// Next returns the next Opus RTP packet.
func (s *OpusSource) Next() []byte {
	if s.PayloadType == 0 {
		s.PayloadType = 111
	}
	if s.SSRC == 0 {
		s.SSRC = 0x55667788
	}
	payload := make([]byte, 120)
	payload[0] = 0xfc // TOC: CELT FB 20 ms, one frame
	pkt := rtp.Packet{Header: rtp.Header{
		Version: 2, PayloadType: s.PayloadType, SequenceNumber: s.seq, Timestamp: s.ts, SSRC: s.SSRC,
	}, Payload: payload}
	s.seq++
	s.ts += 960
	b, err := pkt.Marshal()
	if err != nil {
		panic(err)
	}
	return b
}
