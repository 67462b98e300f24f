package node

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stemflow/stemflow/egress/chat/chattest"
	"github.com/stemflow/stemflow/internal/testutil"
)

// loadgenEnv, when set, makes the test binary a chat load generator (see
// TestMain): it holds a chatLoadSpec in JSON.
const loadgenEnv = "STEMFLOW_CHAT_LOADGEN"

func TestMain(m *testing.M) {
	if spec := os.Getenv(loadgenEnv); spec != "" {
		os.Exit(runLoadgen(spec))
	}
	os.Exit(m.Run())
}

// BenchmarkChatThroughput: one room through three datacenters (chain
// a–b–c: the lab with a–c down, the stream published at a): 2 senders at c
// push b.N messages (each keeps up to 500 unacked; a sender is a client of
// the room too and reads every message), so every message crosses
// c → b → a to be sequenced and a → b → c back; one reader at each
// datacenter. Reports messages per second (until the reader at c has them
// all) and the latency from a send at c to its receipt at c and at a, end
// to end (WebSocket clients on both ends, every node storing the room).
//
// The clients run in a process of their own, as a load generator would:
// in the nodes' process their frames and buffers were garbage and heap the
// nodes' GC worked through too. They share the machine's two cores.
// cpu-µs/msg is the nodes' CPU per message; client-cpu-µs/msg the load
// generator's (5 clients read each message).
//
// paced=N offers N messages a second (the senders together) instead of as
// many as the window allows: the latency at that load, without the
// queueing of 1,000 messages in flight.
func BenchmarkChatThroughput(b *testing.B) {
	for _, rate := range []int{0, 5000, 10000} {
		b.Run(fmt.Sprintf("paced=%d", rate), func(b *testing.B) { benchChat(b, rate) })
	}
}

// chatLoadSpec is what the load generator does: senders at URLs[2]
// (window unacked each) send Total messages at Rate a second (0: as fast
// as the window allows); a reader at each URL.
type chatLoadSpec struct {
	URLs    []string
	Room    string
	Total   int
	Rate    int
	Senders int
	Window  int
}

// chatLoadResult is what it measured: latencies from send to receipt at
// each reader (nanoseconds, sorted), and how long until the reader at
// URLs[2] had every message.
type chatLoadResult struct {
	Latency [][]time.Duration
	Done    time.Duration
	Err     string
}

func benchChat(b *testing.B, rate int) {
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(10*time.Minute))
	defer cancel()
	lab := chatLab(b, "a, b, c", [2]string{"a", "c"})
	publishStill(b, lab.Node("a"), "x")
	waitParentIn(b, lab, "c", "x", "b")

	spec := chatLoadSpec{Room: "x", Total: max(b.N, 2), Rate: rate, Senders: 2, Window: 500}
	spec.Total -= spec.Total % spec.Senders
	for i := range 3 {
		spec.URLs = append(spec.URLs, lab.HTTPURL(i))
	}
	js, err := json.Marshal(spec)
	if err != nil {
		b.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	// The clients collect at Go's default, whatever GOGC the nodes run
	// with (GOGC=15 to see the node binary's).
	cmd.Env = append(os.Environ(), loadgenEnv+"="+string(js), "GOGC=100")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, os.Stderr
	b.ResetTimer()
	var ru0 syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	err = cmd.Run()
	var ru1 syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
	b.StopTimer()
	if err != nil {
		b.Fatalf("load generator: %v\n%s", err, out.Bytes())
	}
	var res chatLoadResult
	if err := json.Unmarshal(out.Bytes(), &res); err != nil {
		b.Fatalf("load generator's report: %v\n%s", err, out.Bytes())
	}
	if res.Err != "" {
		b.Fatalf("load generator: %s", res.Err)
	}
	// The nodes' CPU includes the setup of the load generator's
	// connections (joins and their history: a few ms).
	cpu := time.Duration(ru1.Utime.Nano() + ru1.Stime.Nano() - ru0.Utime.Nano() - ru0.Stime.Nano())
	child := cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	total, lat := spec.Total, res.Latency
	b.ReportMetric(float64(cpu.Microseconds())/float64(total), "cpu-µs/msg")
	b.ReportMetric(float64(child.Microseconds())/float64(total), "client-cpu-µs/msg")
	b.ReportMetric(float64(total)/res.Done.Seconds(), "msg/s")
	b.ReportMetric(float64(quantile(lat[2], .5).Microseconds())/1000, "p50-ms-at-c")
	b.ReportMetric(float64(quantile(lat[2], .99).Microseconds())/1000, "p99-ms-at-c")
	b.ReportMetric(float64(quantile(lat[0], .99).Microseconds())/1000, "p99-ms-at-a")
	rtt := time.Duration(0)
	for _, l := range lab.Node("b").Hub().Links() {
		rtt += l.RTT
	}
	b.Logf("%d messages c→b→a→b→c in %v: %.0f msg/s; latency at c p50 %v p99 %v; at a p99 %v; link RTTs at b sum %v",
		total, res.Done.Round(time.Millisecond), float64(total)/res.Done.Seconds(), quantile(lat[2], .5), quantile(lat[2], .99), quantile(lat[0], .99), rtt)
}

// runLoadgen runs the load a spec (JSON) says and writes a chatLoadResult
// to stdout; it returns the exit status.
func runLoadgen(js string) int {
	var spec chatLoadSpec
	res := chatLoadResult{}
	if err := json.Unmarshal([]byte(js), &spec); err != nil {
		res.Err = fmt.Sprintf("bad spec: %v", err)
	} else if err := runChatLoadgen(spec, &res); err != nil {
		res.Err = err.Error()
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		return 1
	}
	return 0
}

// runChatLoadgen dials the readers and senders, sends, and measures.
func runChatLoadgen(spec chatLoadSpec, res *chatLoadResult) error {
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(10*time.Minute))
	defer cancel()
	total, perSender := spec.Total, spec.Total/spec.Senders
	dial := func(url string, o chattest.Options) (*chattest.Client, error) {
		o.Buffered = 4*total + 1000
		c, err := chattest.Dial(ctx, url, spec.Room, o)
		if err != nil {
			return nil, err
		}
		if f, err := c.Next(testutil.Scale(10 * time.Second)); err != nil || f.Type != "joined" {
			c.Close()
			return nil, fmt.Errorf("%s: joining: %s %v", url, f, err)
		}
		return c, nil
	}
	readers := make([]*chattest.Client, len(spec.URLs))
	for i, u := range spec.URLs {
		r, err := dial(u, chattest.Options{})
		if err != nil {
			return err
		}
		defer r.Close()
		readers[i] = r
	}
	senders := make([]*chattest.Client, spec.Senders)
	for s := range senders {
		c, err := dial(spec.URLs[2], chattest.Options{Nick: fmt.Sprintf("sender %d", s)})
		if err != nil {
			return err
		}
		defer c.Close()
		senders[s] = c
	}

	var mu sync.Mutex
	sentAt := make(map[string]time.Time, total)
	var errs []error
	fail := func(err error) {
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	}
	start := time.Now()
	var wg sync.WaitGroup
	for s, c := range senders {
		wg.Go(func() {
			inflight, next := 0, 0
			for next < perSender || inflight > 0 {
				allowed := perSender
				if spec.Rate > 0 {
					allowed = min(perSender, int(time.Since(start).Seconds()*float64(spec.Rate/spec.Senders))+1)
				}
				for inflight < spec.Window && next < allowed {
					id := fmt.Sprintf("s%d-%d", s, next)
					mu.Lock()
					sentAt[id] = time.Now()
					mu.Unlock()
					if err := c.Send(ctx, id, "benchmark message of a typical length, about sixty bytes."); err != nil {
						fail(err)
						return
					}
					inflight++
					next++
				}
				wait := testutil.Scale(30 * time.Second)
				if spec.Rate > 0 && next < perSender {
					wait = time.Millisecond // the next message is due
				}
				f, err := c.Next(wait)
				if err != nil && wait == time.Millisecond {
					continue
				}
				if err != nil {
					fail(fmt.Errorf("sender %d: %v", s, err))
					return
				}
				switch f.Type {
				case "ack":
					inflight--
				case "error":
					fail(fmt.Errorf("sender %d: %s", s, f))
					return
				}
			}
		})
	}
	// Each reader is read as its frames come, so that what the clients
	// hold stays small.
	res.Latency = make([][]time.Duration, len(readers))
	for i, r := range readers {
		res.Latency[i] = make([]time.Duration, 0, total)
		wg.Go(func() {
			for n := 0; n < total; {
				f, err := r.Next(testutil.Scale(60 * time.Second))
				if err != nil {
					fail(fmt.Errorf("reader at %s after %d of %d: %v", spec.URLs[i], n, total, err))
					return
				}
				if f.Type != "msg" {
					continue
				}
				n++
				mu.Lock()
				res.Latency[i] = append(res.Latency[i], f.Received.Sub(sentAt[f.ID]))
				mu.Unlock()
				if i == 2 && n == total {
					res.Done = f.Received.Sub(start)
				}
			}
		})
	}
	wg.Wait()
	for i := range res.Latency {
		slices.Sort(res.Latency[i])
	}
	return errors.Join(errs...)
}
