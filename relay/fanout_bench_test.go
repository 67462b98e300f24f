package relay

import (
	"context"
	"fmt"
	"testing"
)

// releaser is a BufferWriter subscriber that drops what it gets at once, so
// that a benchmark measures the fan-out rather than the subscribers.
type releaser struct{}

func (releaser) WritePacket(*Packet)   {}
func (releaser) WriteBuffer(b *Buffer) { b.Release() }

// BenchmarkFanOut measures Publisher.WriteRTP to n subscribers: the GOP
// cache, the subscriber list and one shared reference per subscriber; 30
// packets a GOP.
func BenchmarkFanOut(b *testing.B) {
	for _, n := range []int{1, 10, 100} {
		b.Run(fmt.Sprintf("subscribers=%d", n), func(b *testing.B) {
			h := NewHub(Config{Datacenter: "a", Logger: quietLogger()})
			defer h.Close()
			pub, err := h.Publish("x", h264Desc, PublishOptions{})
			if err != nil {
				b.Fatal(err)
			}
			defer pub.Close()
			for range n {
				sub, err := h.Subscribe(context.Background(), "x", releaser{})
				if err != nil {
					b.Fatal(err)
				}
				defer sub.Close()
			}
			key := rtpPacket(b, 0, 0, true, 1100)
			pframe := rtpPacket(b, 1, 0, false, 1100)
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				p := pframe
				if i%30 == 0 {
					p = key
					ts := uint32(i)
					p[4], p[5], p[6], p[7] = byte(ts>>24), byte(ts>>16), byte(ts>>8), byte(ts)
				}
				pub.WriteRTP(0, p)
			}
		})
	}
}
