package relay

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// deferredQueue is a Queue that starts when told.
type deferredQueue struct{ *Queue }

func (deferredQueue) DeferStart() {}

func TestDeferredSubscriberStartsWithGOPThenLive(t *testing.T) {
	h := NewHub(Config{Datacenter: "a", Logger: quietLogger()})
	defer h.Close()
	pub, err := h.Publish("x", h264Desc, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	write := func(seq int, key bool) {
		t.Helper()
		if err := pub.WriteRTP(0, rtpPacket(t, uint16(seq), uint32(seq*3000), key, 200)); err != nil {
			t.Fatal(err)
		}
	}
	write(0, false)
	write(1, true)
	write(2, false)
	q := NewQueue(16)
	sub, err := h.Subscribe(context.Background(), "x", deferredQueue{q})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	write(3, false) // while the subscriber connects: kept in the GOP, not queued
	if q.Len() != 0 {
		t.Fatalf("a deferred subscriber got %d packets before Start", q.Len())
	}
	var seqs []uint16
	gop := sub.Start(nil)
	for _, b := range gop {
		seqs = append(seqs, RTPSequence(b.Data()))
		b.Release()
	}
	if again := sub.Start(nil); len(again) != 0 {
		t.Errorf("a second Start returned %d packets, want none", len(again))
	}
	write(4, false)
	for q.Len() > 0 {
		b := <-q.C()
		seqs = append(seqs, RTPSequence(b.Data()))
		b.Release()
	}
	if fmt.Sprint(seqs) != "[1 2 3 4]" {
		t.Fatalf("got sequence numbers %v, want the GOP [1 2 3] from Start, then live [4] queued", seqs)
	}
}

// pacedSend runs a sender over packets that arrive at the given times (ms
// since the GOP's keyframe), the replay starting at startMs, and returns
// when each was sent (ms). stallAt, when > 0, makes the sender lose 100 ms
// just before that packet.
func pacedSend(arrivals []int, startMs, stallAt int) []float64 {
	var now time.Duration
	p := Pacer{now: func() time.Duration { return now }}
	bufs := make([]*Buffer, len(arrivals))
	for i, a := range arrivals {
		bufs[i] = &Buffer{arrival: time.Duration(a) * time.Millisecond}
	}
	now = time.Duration(startMs) * time.Millisecond
	p.Start(bufs[0])
	sent := make([]float64, len(bufs))
	for i, b := range bufs {
		now = max(now, b.arrival) // a live packet is there once it arrived
		if stallAt > 0 && i == stallAt {
			now += 100 * time.Millisecond
		}
		now += p.Wait(b)
		sent[i] = float64(now) / float64(time.Millisecond)
	}
	return sent
}

func TestPacerSpreadsReplayAndCatchesUp(t *testing.T) {
	// A keyframe of 20 packets at 0 ms, then a frame of 4 packets every
	// 33 ms and an audio packet every 20 ms, for 4 s; a viewer joins 2 s in.
	var arrivals []int
	for range 20 {
		arrivals = append(arrivals, 0)
	}
	audio := 20
	for f := 33; f < 4000; f += 33 {
		for ; audio <= f; audio += 20 {
			arrivals = append(arrivals, audio)
		}
		for range 4 {
			arrivals = append(arrivals, f)
		}
	}
	sent := pacedSend(arrivals, 2000, 0)
	for i := range 20 {
		if sent[i] != 2000 {
			t.Fatalf("keyframe packet %d sent at %.1f ms, want at once (2000)", i, sent[i])
		}
	}
	caughtUp := -1
	for i, a := range arrivals {
		if i > 0 && sent[i] < sent[i-1] {
			t.Fatalf("packet %d sent before packet %d", i, i-1)
		}
		want := 2000 + float64(a)/ReplaySpeedup
		if want <= float64(a) { // caught up: sent on arrival
			want = float64(a)
			if caughtUp < 0 {
				caughtUp = a
			}
		}
		if d := sent[i] - want; d < -0.01 || d > 0.01 {
			t.Fatalf("packet %d (arrived at %d ms) sent at %.2f ms, want %.2f", i, a, sent[i], want)
		}
	}
	// 4/3 of the 2 s: caught up 2.67 s in, two thirds of a second after the
	// join, sending 4× the stream's rate meanwhile.
	if caughtUp < 2640 || caughtUp > 2700 {
		t.Errorf("caught up with packets arriving at %d ms, want ~2667", caughtUp)
	}

	// A sender that stalls does not burst what it missed.
	sent = pacedSend(arrivals, 2000, 200)
	burst := 0
	for i := 201; i < len(sent) && sent[i] == sent[200]; i++ {
		burst++
	}
	if burst > 40 { // 10 ms of schedule at 4×: 40 ms of the stream, ~8 packets
		t.Errorf("%d packets sent at once after a stall, want the schedule moved instead", burst)
	}
}

func TestZeroPacerSendsAtOnce(t *testing.T) {
	var p Pacer
	if w := p.Wait(&Buffer{arrival: time.Hour}); w != 0 || !p.Live() {
		t.Errorf("zero Pacer: wait %v, live %v; want 0, true", w, p.Live())
	}
}
