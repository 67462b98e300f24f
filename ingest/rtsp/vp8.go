package rtsp

import (
	"errors"
	"fmt"

	"github.com/bluenviron/gortsplib/v4/pkg/format"
	"github.com/bluenviron/gortsplib/v4/pkg/format/rtpvp8"
	"github.com/pion/rtp"

	"github.com/stemflow/stemflow/relay"
)

// vp8Proc re-packetizes VP8 frames into packets of at most MaxPacketSize
// bytes, keeping timestamps.
type vp8Proc struct {
	dec *rtpvp8.Decoder
	enc *rtpvp8.Encoder
	buf [relay.MaxPacketSize]byte
}

func newVP8Proc(f *format.VP8, ssrc uint32) (*vp8Proc, error) {
	dec, err := f.CreateDecoder()
	if err != nil {
		return nil, err
	}
	enc := &rtpvp8.Encoder{PayloadType: f.PayloadType(), SSRC: &ssrc, PayloadMaxSize: MaxPacketSize - rtpHeaderSize}
	if err := enc.Init(); err != nil {
		return nil, err
	}
	return &vp8Proc{dec: dec, enc: enc}, nil
}

func (v *vp8Proc) process(pkt *rtp.Packet, emit func([]byte)) error {
	frame, err := v.dec.Decode(pkt)
	if err != nil {
		if errors.Is(err, rtpvp8.ErrMorePacketsNeeded) || errors.Is(err, rtpvp8.ErrNonStartingPacketAndNoPrevious) {
			return nil
		}
		return err
	}
	pkts, err := v.enc.Encode(frame)
	if err != nil {
		return err
	}
	for _, p := range pkts {
		p.Timestamp = pkt.Timestamp
		n, err := p.MarshalTo(v.buf[:])
		if err != nil {
			return fmt.Errorf("VP8 packet: %w", err)
		}
		emit(v.buf[:n])
	}
	return nil
}

func (v *vp8Proc) fmtp(planned string) (string, bool) { return planned, true }
