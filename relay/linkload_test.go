package relay

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
)

// seqRecorder is a viewer that notes the RTP sequence numbers it gets, per
// track, as a user's player would see them.
type seqRecorder struct {
	mu   sync.Mutex
	seqs [MaxTracks][]uint16
}

func (r *seqRecorder) WritePacket(p *Packet) {
	r.mu.Lock()
	r.seqs[p.Track] = append(r.seqs[p.Track], RTPSequence(p.Data))
	r.mu.Unlock()
}

func (r *seqRecorder) count(track int) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.seqs[track])
}

// missing returns how many of the sequence numbers 0..n-1 of a track never
// arrived, and how many arrived out of order.
func (r *seqRecorder) missing(track, n int) (lost, reordered int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	seen := make([]bool, n)
	prev := -1
	for _, s := range r.seqs[track] {
		if int(s) < n {
			seen[s] = true
		}
		if int(s) < prev {
			reordered++
		}
		prev = int(s)
	}
	for _, ok := range seen {
		if !ok {
			lost++
		}
	}
	return lost, reordered
}

// publishFrames sends frames video frames of perFrame packets of size bytes
// each at fps frames per second, every frame written at once as an RTSP
// publisher's ingest writes it. The first packet of every fps-th frame is a
// keyframe. Sequence numbers run from 0.
func publishFrames(t testing.TB, pub *Publisher, frames, perFrame, fps, size int) {
	pkts := make([][]byte, 0, frames*perFrame)
	for f := 0; f < frames; f++ {
		for i := 0; i < perFrame; i++ {
			seq := f*perFrame + i
			pkts = append(pkts, rtpPacket(t, uint16(seq), uint32(f*90000/fps), i == 0 && f%fps == 0, size))
		}
	}
	start := time.Now()
	interval := time.Second / time.Duration(fps)
	for f := 0; f < frames; f++ {
		if d := time.Until(start.Add(time.Duration(f) * interval)); d > 0 {
			time.Sleep(d)
		}
		for _, p := range pkts[f*perFrame : (f+1)*perFrame] {
			if err := pub.WriteRTP(0, p); err != nil {
				t.Error(err)
				return
			}
		}
	}
}

// hopReport describes one hop from the sender's and the receiver's stats.
func hopReport(tx, rx LinkStats) string {
	return fmt.Sprintf("sent %d packets in %d datagrams, queue dropped %d, send errors %d; received %d, hop lost %d, receive dropped %d",
		tx.PacketsSent, tx.DatagramsSent, tx.QueueDropped, tx.SendErrors, rx.PacketsReceived, rx.HopLost, rx.ReceiveDropped)
}

// waitSettled waits until a track has n packets or has stopped growing.
func waitSettled(r *seqRecorder, track, n int) {
	deadline := time.Now().Add(testutil.Scale(2 * time.Second))
	last, still := -1, 0
	for time.Now().Before(deadline) {
		c := r.count(track)
		if c >= n {
			time.Sleep(20 * time.Millisecond) // duplicates would show
			return
		}
		if c == last {
			if still++; still == 20 {
				return
			}
		} else {
			last, still = c, 0
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func linkStats(h *Hub, peer string) LinkStats {
	for _, l := range h.Links() {
		if l.Peer == peer {
			return l
		}
	}
	return LinkStats{}
}

// TestDatagramBudget sends a 2 Mbit/s stream of the largest packets RTSP
// ingest makes across a real QUIC hop: each must take one datagram from the
// first on, and the budget must grow once path-MTU discovery allows.
func TestDatagramBudget(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 30*time.Second)
	hubs := chain(t, "a", "b")
	a, b := hubs[0], hubs[1]
	pub, err := a.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	testutil.WaitFor(t, "b learns of x", func() bool { return len(b.Streams()) == 1 })
	rec := &seqRecorder{}
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(5*time.Second))
	defer cancel()
	sub, err := b.Subscribe(ctx, "x", rec)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()

	// 2 Mbit/s of 1231-byte packets: 203 a second, for 1.5 s.
	const n = 300
	start := time.Now()
	for i := 0; i < n; i++ {
		time.Sleep(time.Until(start.Add(time.Duration(i) * time.Second / 203)))
		if err := pub.WriteRTP(0, rtpPacket(t, uint16(i), uint32(i), i == 0, OverlayPacketSize)); err != nil {
			t.Fatal(err)
		}
	}
	waitSettled(rec, 0, n)
	if lost, reordered := rec.missing(0, n); lost != 0 || reordered != 0 {
		t.Fatalf("viewer at b lost %d of %d packets, %d out of order", lost, n, reordered)
	}
	st := linkStats(a, "b")
	ratio := float64(st.DatagramsSent) / float64(st.PacketsSent)
	t.Logf("%d packets of %d bytes in %d datagrams (%.3f per packet); budget now %d bytes", st.PacketsSent, OverlayPacketSize, st.DatagramsSent, ratio, st.DatagramBudget)
	if st.PacketsSent != n || ratio > 1.01 {
		t.Fatalf("%d packets took %d datagrams (%.3f per packet), want at most 1.01", st.PacketsSent, st.DatagramsSent, ratio)
	}
	if st.DatagramBudget <= minDatagramPayload {
		t.Fatalf("datagram budget still %d bytes after %v: it does not follow path-MTU discovery", st.DatagramBudget, time.Since(start))
	}
}
