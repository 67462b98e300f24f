package relay

import (
	"testing"

	"github.com/pion/rtp"
)

// BenchmarkWriteRTPInspect measures the publisher's per-packet path for P
// slices (the detector reads every slice header: no B slice yet) against the
// same path once the stream is flagged (the detector is skipped).
func BenchmarkWriteRTPInspect(b *testing.B) {
	pkt := func(payload []byte) []byte {
		d, _ := (&rtp.Packet{Header: rtp.Header{Version: 2, PayloadType: 96, SequenceNumber: 1, Timestamp: 3000}, Payload: payload}).Marshal()
		return d
	}
	payload := make([]byte, 1100)
	copy(payload, []byte{0x41, 0x9a, 0x42, 0x17})
	p := pkt(payload)
	for _, flagged := range []bool{false, true} {
		name := "inspecting"
		if flagged {
			name = "flagged"
		}
		b.Run(name, func(b *testing.B) {
			h := NewHub(Config{Datacenter: "a", Logger: quietLogger()})
			defer h.Close()
			pub, err := h.Publish("x", h264Desc, PublishOptions{})
			if err != nil {
				b.Fatal(err)
			}
			defer pub.Close()
			if flagged {
				pub.Stream().setFlags(FlagBFrames)
			}
			b.ReportAllocs()
			for b.Loop() {
				pub.WriteRTP(0, p)
			}
		})
	}
}

func BenchmarkH264BSlice(b *testing.B) {
	p := []byte{0x1c, 0x81, 0x9a, 0x42, 0x17, 0x00, 0x00, 0x03, 0x01}
	b.ReportAllocs()
	for b.Loop() {
		h264BSlice(p)
	}
}
