package node

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stemflow/stemflow/egress/chat/chattest"
	"github.com/stemflow/stemflow/internal/testutil"
)

// BenchmarkChatThroughput: one room through three datacenters (chain
// a–b–c: the lab with a–c down, the stream published at a): 2 senders at c push b.N messages
// (each keeps up to 500 unacked; a sender is a client of the room too and
// reads every message), so every message crosses c → b → a to be
// sequenced and a → b → c back; one reader at each datacenter. Reports
// messages per second (until the reader at c has them all) and the latency
// from a send at c to its receipt at c and at a, end to end (WebSocket
// clients on both ends, every node storing the room).
//
// paced=N offers N messages a second (the senders together) instead of as
// many as the window allows: the latency at that load, without the
// queueing of 1,000 messages in flight.
func BenchmarkChatThroughput(b *testing.B) {
	for _, rate := range []int{0, 5000, 10000} {
		b.Run(fmt.Sprintf("paced=%d", rate), func(b *testing.B) { benchChat(b, rate) })
	}
}

func benchChat(b *testing.B, rate int) {
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(10*time.Minute))
	defer cancel()
	lab := chatLab(b, "a, b, c", [2]string{"a", "c"})
	publishStill(b, lab.Node("a"), "x")
	waitParentIn(b, lab, "c", "x", "b")

	const senders, window = 2, 500
	total := max(b.N, senders)
	perSender := total / senders
	total = perSender * senders

	readers := make([]*chattest.Client, 3)
	for i := range readers {
		r, err := chattest.Dial(ctx, lab.HTTPURL(i), "x", chattest.Options{Buffered: total + 1000})
		if err != nil {
			b.Fatal(err)
		}
		defer r.Close()
		if f, err := r.Next(testutil.Scale(10 * time.Second)); err != nil || f.Type != "joined" {
			b.Fatalf("reader %d: %s %v", i, f, err)
		}
		readers[i] = r
	}
	var mu sync.Mutex
	sentAt := make(map[string]time.Time, total)
	b.ResetTimer()
	var ru0 syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	start := time.Now()
	var wg sync.WaitGroup
	for s := range senders {
		c, err := chattest.Dial(ctx, lab.HTTPURL(2), "x", chattest.Options{Nick: fmt.Sprintf("sender %d", s), Buffered: 4 * total})
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		c.Next(testutil.Scale(10 * time.Second))
		wg.Go(func() {
			inflight, next := 0, 0
			for next < perSender || inflight > 0 {
				allowed := perSender
				if rate > 0 {
					allowed = min(perSender, int(time.Since(start).Seconds()*float64(rate/senders))+1)
				}
				for inflight < window && next < allowed {
					id := fmt.Sprintf("s%d-%d", s, next)
					mu.Lock()
					sentAt[id] = time.Now()
					mu.Unlock()
					if err := c.Send(ctx, id, "benchmark message of a typical length, about sixty bytes."); err != nil {
						b.Error(err)
						return
					}
					inflight++
					next++
				}
				wait := testutil.Scale(30 * time.Second)
				if rate > 0 && next < perSender {
					wait = time.Millisecond // the next message is due
				}
				f, err := c.Next(wait)
				if err != nil && wait == time.Millisecond {
					continue
				}
				if err != nil {
					b.Errorf("sender %d: %v", s, err)
					return
				}
				switch f.Type {
				case "ack":
					inflight--
				case "error":
					b.Errorf("sender %d: %s", s, f)
					return
				}
			}
		})
	}
	// Each reader is read as its frames come, so that what the test holds
	// stays small (frames buffered in the client are heap the node's GC
	// marks too: 60,000 of them made the GC's cycles last 50 ms here).
	lat := make([][]time.Duration, 3)
	var done time.Duration
	var rg sync.WaitGroup
	for i, r := range readers {
		lat[i] = make([]time.Duration, 0, total)
		rg.Go(func() {
			for n := 0; n < total; {
				f, err := r.Next(testutil.Scale(60 * time.Second))
				if err != nil {
					b.Errorf("reader at %s after %d of %d: %v", lab.Datacenters()[i], n, total, err)
					return
				}
				if f.Type != "msg" {
					continue
				}
				n++
				mu.Lock()
				lat[i] = append(lat[i], f.Received.Sub(sentAt[f.ID]))
				mu.Unlock()
				if i == 2 && n == total {
					done = f.Received.Sub(start)
				}
			}
		})
	}
	rg.Wait()
	if b.Failed() {
		b.FailNow()
	}
	wg.Wait()
	var ru1 syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
	cpu := time.Duration(ru1.Utime.Nano() + ru1.Stime.Nano() - ru0.Utime.Nano() - ru0.Stime.Nano())
	b.StopTimer()
	// CPU per message, the test's own clients included (5 clients read each
	// message: 3 readers and the 2 senders).
	b.ReportMetric(float64(cpu.Microseconds())/float64(total), "cpu-µs/msg")
	for i := range lat {
		slices.Sort(lat[i])
	}
	b.ReportMetric(float64(total)/done.Seconds(), "msg/s")
	b.ReportMetric(float64(quantile(lat[2], .5).Microseconds())/1000, "p50-ms-at-c")
	b.ReportMetric(float64(quantile(lat[2], .99).Microseconds())/1000, "p99-ms-at-c")
	b.ReportMetric(float64(quantile(lat[0], .99).Microseconds())/1000, "p99-ms-at-a")
	rtt := time.Duration(0)
	for _, l := range lab.Node("b").Hub().Links() {
		rtt += l.RTT
	}
	b.Logf("%d messages c→b→a→b→c in %v: %.0f msg/s; latency at c p50 %v p99 %v; at a p99 %v; link RTTs at b sum %v",
		total, done.Round(time.Millisecond), float64(total)/done.Seconds(), quantile(lat[2], .5), quantile(lat[2], .99), quantile(lat[0], .99), rtt)
}
