package chat

import (
	"context"
	"fmt"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/relay"
)

// chain is the tree a ← b ← c on real hubs and QUIC overlays.
type chainTree struct {
	hub    *relay.Hub
	parent string // "" at the origin
	origin string
}

func (t *chainTree) Upstream(string) (string, string, bool) { return t.parent, t.origin, true }
func (t *chainTree) Want(string) func()                     { return func() {} }
func (t *chainTree) OpenChannel(ctx context.Context, peer string, kind relay.ChannelKind) (relay.Channel, error) {
	return t.hub.OpenChannel(ctx, peer, kind)
}

// startChain starts datacenters a, b, c linked a–b–c, each with a chat
// service (and a store when stores is true) following the chain to a.
func startChain(tb testing.TB, stores bool) []*Service {
	tb.Helper()
	ca, err := relay.NewClusterCA()
	if err != nil {
		tb.Fatal(err)
	}
	names := []string{"a", "b", "c"}
	parents := map[string]string{"b": "a", "c": "b"}
	hubs := map[string]*relay.Hub{}
	addrs := map[string]string{}
	var svcs []*Service
	for _, dc := range []string{"c", "b", "a"} { // later ones first: a node dials the names after its own
		h := relay.NewHub(relay.Config{Datacenter: dc, Logger: testutil.Logger()})
		nb := map[string]string{}
		for _, o := range names {
			if o != dc && (parents[o] == dc || parents[dc] == o) {
				nb[o] = addrs[o]
				if nb[o] == "" {
					nb[o] = "127.0.0.1:1"
				}
			}
		}
		id, err := ca.Issue(dc)
		if err != nil {
			tb.Fatal(err)
		}
		o, err := relay.StartOverlay(h, relay.OverlayConfig{Listen: "127.0.0.1:0", Neighbours: nb, Identity: id})
		if err != nil {
			tb.Fatal(err)
		}
		addrs[dc] = o.Addr().String()
		hubs[dc] = h
		var st *Store
		if stores {
			if st, err = OpenStore(tb.TempDir(), StoreOptions{SyncInterval: DefaultSyncInterval}); err != nil {
				tb.Fatal(err)
			}
		}
		svc := NewService(Config{Datacenter: dc, Tree: &chainTree{hub: h, parent: parents[dc], origin: "a"}, Store: st, Logger: testutil.Logger()})
		h.HandleChannels(relay.ChannelChat, svc.ServeChannel)
		svcs = append([]*Service{svc}, svcs...)
		tb.Cleanup(func() {
			svc.Close()
			o.Close()
			h.Close()
			if st != nil {
				st.Close()
			}
		})
	}
	testutil.WaitFor(tb, "the links a–b–c", func() bool { return len(hubs["b"].Links()) == 2 })
	return svcs
}

// BenchmarkRoomThroughput: messages submitted at c go c → b → a to be
// sequenced and a → b → c back, on the overlay's chat channels, each node
// storing every batch in bbolt. b.N messages with up to 2,000 unacked;
// reports messages per second and the latency from the submission at c to
// the message in c's history. This is the overlay path without the
// WebSocket edge (BenchmarkChatThroughput in node measures both).
//
// paced=10000 offers 10,000 messages a second (10 every millisecond)
// instead of as many as the window allows: the latency at that load.
func BenchmarkRoomThroughput(b *testing.B) {
	for _, tc := range []struct {
		stores bool
		paced  int // messages a second, 0: as fast as the window allows
	}{{true, 0}, {false, 0}, {true, 10000}} {
		stores := tc.stores
		b.Run(fmt.Sprintf("store=%v/paced=%d", stores, tc.paced), func(b *testing.B) {
			svcs := startChain(b, stores)
			rc, release := svcs[2].Acquire("x", true)
			defer release()
			<-rc.Synced()
			acks := make(chan Ack, 1<<16)
			const window = 2000
			sent := make([]time.Time, b.N+1)
			lat := make([]time.Duration, 0, b.N)
			ctx := context.Background()
			b.ResetTimer()
			cpu0 := cpuTime()
			start := time.Now()
			next, inflight := 0, 0
			var cursor uint64
			v := rc.Read(AnyEpoch, 0, 0)
			cursor = v.Last
			base := cursor
			for len(lat) < b.N {
				allowed := b.N
				if tc.paced > 0 {
					allowed = min(b.N, int(time.Since(start).Seconds()*float64(tc.paced))+10)
				}
				for inflight < window && next < allowed {
					sent[next] = time.Now()
					if err := rc.Submit(ctx, fmt.Sprintf("m%d", next), "bench", "benchmark message of a typical length, about sixty bytes.", acks); err != nil {
						b.Fatal(err)
					}
					next++
					inflight++
				}
				v := rc.Read(AnyEpoch, cursor, 0)
				now := time.Now()
				for i := range v.Len() {
					m := v.Msg(i)
					var k int
					fmt.Sscanf(m.ID, "m%d", &k)
					lat = append(lat, now.Sub(sent[k]))
					cursor = m.Seq
				}
			drain:
				for {
					select {
					case <-acks:
						inflight--
					default:
						break drain
					}
				}
				if v.Len() == 0 {
					var tick <-chan time.Time
					if tc.paced > 0 && next < b.N {
						tick = time.After(time.Millisecond)
					}
					select {
					case <-v.Changed:
					case <-tick:
					case <-acks:
						inflight--
					case <-time.After(testutil.Scale(10 * time.Second)):
						b.Fatalf("stuck at %d of %d (cursor %d)", len(lat), b.N, cursor-base)
					}
				}
			}
			took := time.Since(start)
			cpu := cpuTime() - cpu0
			b.StopTimer()
			// CPU time per message (all three nodes, user and system): what
			// the machine's load does not change.
			b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/msg")
			slices.Sort(lat)
			b.ReportMetric(float64(b.N)/took.Seconds(), "msg/s")
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
		})
	}
}

// cpuTime is the process's user and system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
