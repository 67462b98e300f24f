package node

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stemflow/stemflow/egress/chat/chattest"
	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/relay"
	"github.com/stemflow/stemflow/relay/chat"
)

// chatLoad runs clients that each send perClient messages to one room
// (at most window unacked at a time, resent with the same id after a
// reconnect) and read until they have every message of every client. A
// client whose connection ends, or that hears nothing for a while,
// reconnects to the next of its bases with since and epoch.
type chatLoad struct {
	room      string
	perClient int
	window    int
	total     int

	mu     sync.Mutex
	sentAt map[string]time.Time
}

// loadClient is one client of a chatLoad and what it saw.
type loadClient struct {
	idx   int
	bases func() []string // where to connect, in order of preference, now
	got   []chattest.Frame
	epoch string
	dcs   []string // the datacenter of each connection
	errs  []string
}

func (l *chatLoad) run(ctx context.Context, c *loadClient) {
	nick := fmt.Sprintf("user %d", c.idx)
	next := 0
	var unacked []string // ids in send order
	texts := map[string]string{}
	var last uint64
	connected := false
	fail := func(format string, args ...any) { c.errs = append(c.errs, fmt.Sprintf(format, args...)) }
	for attempt := 0; ctx.Err() == nil && len(c.got) < l.total; attempt++ {
		bases := c.bases()
		base := bases[attempt%len(bases)]
		// The first connection asks for the whole history (since=0): a
		// client that connects after others sent messages still reads
		// every one.
		o := chattest.Options{Nick: nick, Since: chattest.Since(0)}
		if connected {
			o.Since, o.Epoch = chattest.Since(last), c.epoch
		}
		dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		conn, err := chattest.Dial(dctx, base, l.room, o)
		cancel()
		if err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		j, err := conn.Next(testutil.Scale(10 * time.Second))
		if err != nil || j.Type != "joined" {
			fail("connection %d to %s: first frame %s %v, want joined", attempt, base, j, err)
			conn.Close()
			return
		}
		if connected && j.Epoch != c.epoch {
			fail("reconnect to %s: epoch %s, was %s", j.DC, j.Epoch, c.epoch)
		}
		c.epoch, connected = j.Epoch, true
		c.dcs = append(c.dcs, j.DC)
		send := func(id string) bool {
			wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			return conn.Send(wctx, id, texts[id]) == nil
		}
		ok := true
		for _, id := range unacked { // retried until acked, here too
			ok = ok && send(id)
		}
		for ok && len(c.got) < l.total {
			for ok && len(unacked) < l.window && next < l.perClient {
				id := fmt.Sprintf("c%d-%d", c.idx, next)
				texts[id] = fmt.Sprintf("message %d of client %d <i>not html</i>", next, c.idx)
				l.mu.Lock()
				l.sentAt[id] = time.Now()
				l.mu.Unlock()
				unacked = append(unacked, id)
				next++
				ok = send(id)
			}
			if !ok {
				break
			}
			f, err := conn.Next(testutil.Scale(8 * time.Second))
			if err != nil {
				break // node gone or silent: reconnect elsewhere
			}
			switch f.Type {
			case "msg":
				switch {
				case f.Seq <= last:
					fail("duplicate: seq %d after %d (%s)", f.Seq, last, f.ID)
				case f.Seq != last+1:
					fail("gap: seq %d after %d", f.Seq, last)
				}
				last = f.Seq
				c.got = append(c.got, f)
			case "ack":
				if i := slices.Index(unacked, f.ID); i >= 0 {
					unacked = slices.Delete(unacked, i, i+1)
				}
			default:
				fail("unexpected frame %s", f)
			}
		}
		conn.Close()
	}
}

// check verifies that every client got all messages exactly once in one
// identical order, and returns the end-to-end latencies (send at one client
// to receipt at each client).
func (l *chatLoad) check(t *testing.T, clients []*loadClient) []time.Duration {
	t.Helper()
	for _, c := range clients {
		for _, e := range c.errs {
			t.Errorf("client %d: %s", c.idx, e)
		}
	}
	ref := clients[0].got
	if len(ref) != l.total {
		t.Fatalf("client 0 got %d messages, want %d", len(ref), l.total)
	}
	ids := map[string]bool{}
	for _, f := range ref {
		if ids[f.ID] {
			t.Fatalf("id %s sequenced twice", f.ID)
		}
		ids[f.ID] = true
	}
	if len(ids) != l.total {
		t.Fatalf("%d distinct ids, want %d", len(ids), l.total)
	}
	var lat []time.Duration
	for _, c := range clients {
		if len(c.got) != l.total {
			t.Fatalf("client %d got %d messages, want %d", c.idx, len(c.got), l.total)
		}
		for k, f := range c.got {
			if f.Seq != uint64(k+1) || f.ID != ref[k].ID || f.Text != ref[k].Text || f.Nick != ref[k].Nick {
				t.Fatalf("client %d message %d is seq %d %s, client 0 has seq %d %s", c.idx, k, f.Seq, f.ID, ref[k].Seq, ref[k].ID)
			}
			lat = append(lat, f.Received.Sub(l.sentAt[f.ID]))
		}
	}
	slices.Sort(lat)
	return lat
}

func quantile(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	return d[int(q*float64(len(d)-1))]
}

// runChatLoad runs n clients, client i connecting first to home(i).
func runChatLoad(t *testing.T, l *chatLoad, n int, bases func(i int) []string, during func()) ([]*loadClient, time.Duration) {
	t.Helper()
	l.sentAt = map[string]time.Time{}
	l.total = n * l.perClient
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(120*time.Second))
	defer cancel()
	clients := make([]*loadClient, n)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range clients {
		c := &loadClient{idx: i}
		c.bases = func() []string { return bases(i) }
		clients[i] = c
		wg.Go(func() { l.run(ctx, c) })
	}
	if during != nil {
		during()
	}
	wg.Wait()
	return clients, time.Since(start)
}

// treeEdgeTo returns the edges of stream's tree in base's /api/v1/topology
// ("a→b b→c", source and route version) when one ends at dc, else "".
func treeEdgeTo(t *testing.T, base, stream, dc string) string {
	resp, err := http.Get(base + "/api/v1/topology")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	var top struct {
		Source string
		Trees  []struct {
			Stream  string
			Version int64
			Edges   []struct{ From, To string }
		}
	}
	if json.NewDecoder(resp.Body).Decode(&top) != nil {
		return ""
	}
	for _, tr := range top.Trees {
		if tr.Stream != stream {
			continue
		}
		var edges []string
		found := false
		for _, e := range tr.Edges {
			edges = append(edges, e.From+"→"+e.To)
			found = found || e.To == dc
		}
		if found {
			return fmt.Sprintf("%s (source %s, route version %d)", strings.Join(edges, " "), top.Source, tr.Version)
		}
	}
	return ""
}

// publishStill publishes a stream without packets: chat needs only its
// tree.
func publishStill(t testing.TB, n *Node, name string) {
	t.Helper()
	pub, err := n.Hub().Publish(name, relay.Description{Tracks: []relay.Track{
		{Kind: relay.KindAudio, MimeType: relay.MimeOpus, ClockRate: 48000, Channels: 2, PayloadType: 111},
	}}, relay.PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pub.Close)
}

// chatLab starts the lab's datacenters (a full mesh) with chat stores and
// a rate limit loose enough for load, and cuts the links in down: with a–c
// down, c takes a's streams through b.
func chatLab(tb testing.TB, dcs string, down ...[2]string) *Lab {
	tb.Helper()
	p, err := ParseLabProfile([]byte("datacenters: [" + dcs + "]\n"))
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(30*time.Second))
	defer cancel()
	lab, err := StartLab(ctx, DevConfig{FreePorts: true, Logger: testutil.Logger(), ChatDataDir: tb.TempDir(),
		Chat: ChatConfig{Rate: 1e9, Burst: 1 << 30}}, p, "test.yaml")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(lab.Close)
	for _, d := range down {
		if _, err := lab.SetLink(ctx, LabLink{Between: []string{d[0], d[1]}, Down: true}); err != nil {
			tb.Fatal(err)
		}
	}
	return lab
}

// waitParentIn waits until the stream reaches dc's hub from parent.
func waitParentIn(tb testing.TB, lab *Lab, dc, stream, parent string) {
	tb.Helper()
	testutil.WaitForWithin(tb, 30*time.Second, stream+" at "+dc+" from "+parent, func() bool {
		n := lab.Node(dc)
		if n == nil {
			return false
		}
		p, _, ok := n.Hub().Upstream(stream)
		return ok && p == parent
	})
}

func waitParent(t *testing.T, n *Node, stream, parent string) {
	t.Helper()
	testutil.WaitFor(t, stream+" at "+n.cfg.Datacenter+" from "+parent, func() bool {
		p, _, ok := n.Hub().Upstream(stream)
		return ok && p == parent
	})
}

// TestChatThreeDatacenters: 60 clients, 20 at each of a, b, c (the lab,
// a–c down: the stream x published at a reaches c through b, and c's
// messages cross b both ways), each
// sending 100 messages at once: every client receives all 6,000 exactly
// once, in one identical order. Reports end-to-end latency.
func TestChatThreeDatacenters(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 240*time.Second)
	lab := chatLab(t, "a, b, c", [2]string{"a", "c"})
	publishStill(t, lab.Node("a"), "x")
	waitParentIn(t, lab, "c", "x", "b")
	nodes := []*Node{lab.Node("a"), lab.Node("b"), lab.Node("c")}
	l := &chatLoad{room: "x", perClient: 100, window: 5}
	// c wants x while its clients are in the room (it has no viewers), and
	// x's tree in /api/v1/topology reaches c.
	wanted, inTree := false, ""
	clients, took := runChatLoad(t, l, 60, func(i int) []string { return []string{lab.HTTPURL(i % 3)} }, func() {
		for range 1000 {
			if in, _ := nodes[2].Hub().Interest(); slices.Contains(in.Wanted, "x") {
				wanted = true
			}
			if inTree == "" {
				inTree = treeEdgeTo(t, lab.HTTPURL(2), "x", "c")
			}
			if wanted && inTree != "" {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
	lat := l.check(t, clients)
	t.Logf("6,000 messages to 60 clients over a, b and c (c through b) in %v: end-to-end latency p50 %v p99 %v max %v (%d deliveries)",
		took.Round(time.Millisecond), quantile(lat, .5), quantile(lat, .99), lat[len(lat)-1], len(lat))
	// The room's tree: a sequences, b follows a, c follows b.
	for i, want := range []string{"origin ", "follower a", "follower b"} {
		rooms := nodes[i].Chat().Rooms()
		if len(rooms) != 1 || rooms[0].Role+" "+rooms[0].Parent != want {
			t.Errorf("datacenter %s holds rooms %+v, want x as %q", lab.Datacenters()[i], rooms, want)
		}
	}
	if !wanted {
		t.Error("c's interest did not list x while its chat clients were in the room")
	}
	if inTree == "" {
		t.Error("x's tree in c's /api/v1/topology never reached c while its chat clients were in the room")
	} else {
		t.Logf("x's tree in /api/v1/topology while only chat clients were at c: %s", inTree)
	}
	if in, _ := nodes[2].Hub().Interest(); slices.Contains(in.Wanted, "x") {
		t.Errorf("c's interest %+v still wants x after its chat clients left", in)
	}
}

// TestChatSurvivesRelayKill: the lab's five datacenters a–e (a full mesh)
// with a–c and a–d down, so c and d take x (published at a) through b. 60
// clients, 12 at each, send 100 messages each; b is killed mid-run. Still
// every client gets all 6,000 exactly once in one order; b's clients
// reconnect elsewhere with since and miss nothing; c's and d's rooms move
// to e.
func TestChatSurvivesRelayKill(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 300*time.Second)
	lab := chatLab(t, "a, b, c, d, e", [2]string{"a", "c"}, [2]string{"a", "d"})
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(30*time.Second))
	defer cancel()
	publishStill(t, lab.Node("a"), "x")
	waitParentWithin := func(dc, parent string) {
		testutil.WaitForWithin(t, 30*time.Second, "x at "+dc+" from "+parent, func() bool {
			n := lab.Node(dc)
			if n == nil {
				return false
			}
			p, _, ok := n.Hub().Upstream("x")
			return ok && p == parent
		})
	}
	waitParentWithin("c", "b")
	waitParentWithin("d", "b")
	var killed sync.WaitGroup
	killed.Add(1)
	var bDead bool
	var deadMu sync.Mutex
	bases := func(i int) []string {
		dcs := []int{i % 5, (i + 1) % 5, (i + 2) % 5, (i + 3) % 5, (i + 4) % 5}
		deadMu.Lock()
		defer deadMu.Unlock()
		var out []string
		for _, d := range dcs {
			if d == 1 && bDead {
				continue
			}
			out = append(out, lab.HTTPURL(d))
		}
		return out
	}
	l := &chatLoad{room: "x", perClient: 100, window: 5}
	var seqAtKill uint64
	rerouted := map[string][2]time.Duration{} // dc → after the kill: stream from e, room following e
	clients, took := runChatLoad(t, l, 60, bases, func() {
		// Kill b once a third of the messages went through.
		testutil.WaitForWithin(t, 60*time.Second, "2,000 messages sequenced", func() bool {
			rooms := lab.Node("a").Chat().Rooms()
			return len(rooms) == 1 && rooms[0].LastSeq >= 2000
		})
		deadMu.Lock()
		bDead = true
		deadMu.Unlock()
		seqAtKill = lab.Node("a").Chat().Rooms()[0].LastSeq
		killedAt := time.Now()
		if err := lab.Kill(ctx, "b"); err != nil {
			t.Error(err)
		}
		t.Logf("lab.Kill(b) returned after %v", time.Since(killedAt).Round(time.Millisecond))
		// How long c's and d's rooms take to follow e, and their streams.
		for _, dc := range []string{"c", "d"} {
			var room, media time.Duration
			testutil.WaitForWithin(t, 30*time.Second, dc+"'s room following e", func() bool {
				if p, _, ok := lab.Node(dc).Hub().Upstream("x"); ok && p == "e" && media == 0 {
					media = time.Since(killedAt)
				}
				if r := lab.Node(dc).Chat().Rooms(); len(r) == 1 && r[0].Parent == "e" && room == 0 {
					room = time.Since(killedAt)
				}
				return room > 0 && media > 0
			})
			rerouted[dc] = [2]time.Duration{media, room}
		}
	})
	lat := l.check(t, clients)
	moved := 0
	for _, c := range clients {
		if c.idx%5 == 1 {
			if len(c.dcs) < 2 || c.dcs[0] != "b" || c.dcs[len(c.dcs)-1] == "b" {
				t.Errorf("client %d of b connected to %v: want b, then elsewhere", c.idx, c.dcs)
			}
			moved++
		}
	}
	// Later the tree may move again (c and d are linked too, and the
	// links' delays are alike): the rooms follow it, never b.
	for _, dc := range []string{"c", "d"} {
		var r []chat.RoomInfo
		var p string
		testutil.WaitFor(t, dc+"'s room following its stream's parent", func() bool {
			p, _, _ = lab.Node(dc).Hub().Upstream("x")
			r = lab.Node(dc).Chat().Rooms()
			return len(r) == 1 && r[0].Parent == p
		})
		if p == "b" || p == "" {
			t.Errorf("%s's room after b died: %+v, following the stream from %q", dc, r, p)
		}
	}
	var retries uint64
	for _, dc := range []string{"c", "d", "e"} {
		st, _ := lab.Node(dc).Chat().Stats()
		for _, r := range st {
			retries += r.Retries
		}
	}
	t.Logf("b killed at seq %d; %d clients of b moved; 6,000 messages in %v; latency p50 %v p99 %v max %v; %d sends forwarded again at c, d and e",
		seqAtKill, moved, took.Round(time.Millisecond), quantile(lat, .5), quantile(lat, .99), lat[len(lat)-1], retries)
	for _, dc := range []string{"c", "d"} {
		t.Logf("after b's kill, %s took x from e in %v, its room followed e in %v", dc,
			rerouted[dc][0].Round(time.Millisecond), rerouted[dc][1].Round(time.Millisecond))
	}
}

// TestChatOriginRestart: the origin a restarts (killed and started on the
// same data directory, the stream published again): its history and epoch
// are what they were, and clients at a and c resume without a gap.
func TestChatOriginRestart(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 180*time.Second)
	p, err := ParseLabProfile([]byte("datacenters: [a, b, c]\n"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(60*time.Second))
	defer cancel()
	lab, err := StartLab(ctx, DevConfig{FreePorts: true, Logger: testutil.Logger(), ChatDataDir: t.TempDir(),
		Chat: ChatConfig{Rate: 1000, Burst: 1000}}, p, "test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(lab.Close)
	pub, err := lab.Node("a").Hub().Publish("x", relay.Description{Tracks: []relay.Track{
		{Kind: relay.KindAudio, MimeType: relay.MimeOpus, ClockRate: 48000, Channels: 2, PayloadType: 111}}}, relay.PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, "x at c from a", func() bool { p, _, ok := lab.Node("c").Hub().Upstream("x"); return ok && p == "a" })
	cl, err := chattest.Dial(ctx, lab.HTTPURL(2), "x", chattest.Options{Nick: "cee"})
	if err != nil {
		t.Fatal(err)
	}
	j, _ := cl.Next(testutil.Scale(10 * time.Second))
	for i := 1; i <= 20; i++ {
		cl.Send(ctx, fmt.Sprintf("m%d", i), fmt.Sprintf("before %d", i))
	}
	var seqs []uint64
	for len(seqs) < 20 {
		f, err := cl.Next(testutil.Scale(10 * time.Second))
		if err != nil {
			t.Fatalf("after %d messages: %v", len(seqs), err)
		}
		if f.Type == "msg" {
			seqs = append(seqs, f.Seq)
		}
	}
	cl.Close()
	pub.Close()
	if err := lab.Kill(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if err := lab.Start(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := lab.Node("a").Hub().Publish("x", relay.Description{Tracks: []relay.Track{
		{Kind: relay.KindAudio, MimeType: relay.MimeOpus, ClockRate: 48000, Channels: 2, PayloadType: 111}}}, relay.PublishOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, dc := range []int{0, 2} {
		r, err := chattest.Dial(ctx, lab.HTTPURL(dc), "x", chattest.Options{Nick: "back", Since: chattest.Since(0), Epoch: j.Epoch})
		if err != nil {
			t.Fatal(err)
		}
		// At c the message a got after the restart (21) may be there already.
		j2, err := r.Next(testutil.Scale(10 * time.Second))
		if err != nil || j2.Type != "joined" || j2.Epoch != j.Epoch || j2.LastSeq < 20 || j2.LastSeq > uint64(20+dc/2) {
			t.Fatalf("at %s after the restart: %s %v, want joined with epoch %s and last_seq 20 (21 at c)", lab.Datacenters()[dc], j2, err, j.Epoch)
		}
		var got []string
		for len(got) < 20 {
			f, err := r.Next(testutil.Scale(10 * time.Second))
			if err != nil || f.Type != "msg" {
				t.Fatalf("history at %s after the restart, message %d: %s %v", lab.Datacenters()[dc], len(got)+1, f, err)
			}
			got = append(got, f.ID)
		}
		if strings.Join(got, ",") != "m1,m2,m3,m4,m5,m6,m7,m8,m9,m10,m11,m12,m13,m14,m15,m16,m17,m18,m19,m20" {
			t.Fatalf("history at %s: %v", lab.Datacenters()[dc], got)
		}
		// A new message numbers on from 20, seen at both.
		r.Send(ctx, fmt.Sprintf("after-%d", dc), "after")
		for {
			f, err := r.Next(testutil.Scale(20 * time.Second))
			if err != nil {
				t.Fatalf("message after the restart at %s: %v", lab.Datacenters()[dc], err)
			}
			if f.Type == "ack" {
				if f.Seq != uint64(21+dc/2) {
					t.Fatalf("after the restart at %s: ack %s, want seq %d", lab.Datacenters()[dc], f, 21+dc/2)
				}
				break
			}
		}
		r.Close()
	}
}

// TestChatMetrics: the chat series on /metrics pass promtool and count what
// clients at b did in the room x published at a: messages in and out,
// sequenced at both, rate-limit hits, a resume, the fan-out histogram.
func TestChatMetrics(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 90*time.Second)
	a, b := startPair(t)
	publishStill(t, a, "x")
	waitParent(t, b, "x", "a")
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(20*time.Second))
	defer cancel()
	base := "http://" + b.HTTPAddr().String()
	c, err := chattest.Dial(ctx, base, "x", chattest.Options{Nick: "bea"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Next(testutil.Scale(5 * time.Second)) // joined
	for i := range 12 {                     // default limit: bursts of 10
		c.Send(ctx, fmt.Sprintf("m%d", i), "hi")
	}
	msgs, limited := 0, 0
	for msgs+limited < 12 {
		f, _, err := c.NextOf(testutil.Scale(5*time.Second), "msg", "error")
		if err != nil {
			t.Fatalf("after %d messages and %d refusals: %v", msgs, limited, err)
		}
		if f.Type == "msg" {
			msgs++
		} else if f.Code == "rate_limited" {
			limited++
		}
	}
	r, err := chattest.Dial(ctx, base, "x", chattest.Options{Since: chattest.Since(5)})
	if err != nil {
		t.Fatal(err)
	}
	r.Next(testutil.Scale(5 * time.Second))
	r.Close()
	want := []struct {
		n      *Node
		metric string
		value  float64
	}{
		{b, "stemflow_chat_messages_in_total", float64(msgs)},
		{b, "stemflow_chat_messages_out_total", float64(msgs + msgs - 5)},
		{b, "stemflow_chat_sequenced_total", float64(msgs)},
		{a, "stemflow_chat_sequenced_total", float64(msgs)},
		{b, "stemflow_chat_rate_limited_total", float64(limited)},
		{b, "stemflow_chat_resumes_total", 1},
		{a, "stemflow_chat_messages_in_total", 0},
	}
	testutil.WaitFor(t, "the chat metrics", func() bool {
		fa, fb := scrape(t, a), scrape(t, b)
		for _, w := range want {
			fams := fa
			if w.n == b {
				fams = fb
			}
			if v, _ := value(fams, w.metric, "room", "x"); v != w.value {
				return false
			}
		}
		h := fb["stemflow_chat_fanout_latency_seconds"]
		return h != nil && h.Metric[0].GetHistogram().GetSampleCount() == uint64(msgs)
	})
	if limited == 0 || msgs != 10 && msgs != 11 {
		t.Errorf("%d messages and %d rate_limited of 12 sent at once: want the burst of 10 (11 with a refill) and the rest refused", msgs, limited)
	}
}

// TestChatOriginMovesWhenStreamStarts: a room whose stream is not live is
// sequenced where its first client joined (c); when the stream starts at a,
// a becomes the room's origin and c's messages move there, in order (new
// numbers in a's epoch: c's client is told epoch_changed and gets them
// again), so nothing said before the stream is lost.
func TestChatOriginMovesWhenStreamStarts(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 90*time.Second)
	lab := chatLab(t, "a, b, c", [2]string{"a", "c"})
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(30*time.Second))
	defer cancel()
	cl, err := chattest.Dial(ctx, lab.HTTPURL(2), "y", chattest.Options{Nick: "early"})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	j, _ := cl.Next(testutil.Scale(5 * time.Second))
	for i := 1; i <= 3; i++ {
		cl.Send(ctx, fmt.Sprintf("e%d", i), fmt.Sprintf("before the stream %d", i))
	}
	for acked := 0; acked < 3; {
		f, err := cl.Next(testutil.Scale(5 * time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if f.Type == "ack" {
			acked++
		}
	}
	if r := lab.Node("c").Chat().Rooms(); len(r) != 1 || r[0].Role != "origin" {
		t.Fatalf("c's rooms before the stream: %+v, want y sequenced at c", r)
	}
	publishStill(t, lab.Node("a"), "y")
	f, skipped, err := cl.NextOf(testutil.Scale(20*time.Second), "error")
	if err != nil || f.Code != "epoch_changed" {
		t.Fatalf("c's client after the stream started at a: %s %v (skipped %v), want epoch_changed", f, err, skipped)
	}
	j2, _, err := cl.NextOf(testutil.Scale(5*time.Second), "joined")
	if err != nil || j2.Epoch == j.Epoch {
		t.Fatalf("joined %s %v, want a new epoch", j2, err)
	}
	var got []string
	for len(got) < 3 {
		f, err := cl.Next(testutil.Scale(10 * time.Second))
		if err != nil {
			t.Fatalf("history at c after the move: %v (got %v)", err, got)
		}
		if f.Type == "msg" {
			got = append(got, fmt.Sprintf("%d:%s", f.Seq, f.ID))
		}
	}
	if strings.Join(got, " ") != "1:e1 2:e2 3:e3" {
		t.Fatalf("c's history after the move: %v, want e1 e2 e3 as 1 2 3", got)
	}
	at, err := chattest.Dial(ctx, lab.HTTPURL(0), "y", chattest.Options{Since: chattest.Since(0)})
	if err != nil {
		t.Fatal(err)
	}
	defer at.Close()
	if ja, _ := at.Next(testutil.Scale(5 * time.Second)); ja.Epoch != j2.Epoch || ja.LastSeq != 3 {
		t.Fatalf("a's room: %s, want epoch %s with 3 messages", ja, j2.Epoch)
	}
	if r := lab.Node("a").Chat().Rooms(); len(r) != 1 || r[0].Role != "origin" {
		t.Fatalf("a's rooms: %+v, want y's origin", r)
	}
}

// TestChatTwoNodesBeforeStream: clients join the room z at b and at c
// before its stream is live anywhere (the lab, a–c down), and send: one
// node sequences the room for both (its claim is in etcd), so both clients
// read the same 10 messages in one order (without the claim each node
// sequenced its own: b's client read only b's 5). When the stream starts
// at a, a becomes the room's origin and every message said before is in its
// history exactly once.
func TestChatTwoNodesBeforeStream(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 120*time.Second)
	lab := chatLab(t, "a, b, c", [2]string{"a", "c"})
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(60*time.Second))
	defer cancel()
	var clients []*chattest.Client
	for _, dc := range []int{1, 2} {
		cl, err := chattest.Dial(ctx, lab.HTTPURL(dc), "z", chattest.Options{Nick: "early " + lab.Datacenters()[dc]})
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		if j, err := cl.Next(testutil.Scale(10 * time.Second)); err != nil || j.Type != "joined" {
			t.Fatalf("at %s: %s %v, want joined", lab.Datacenters()[dc], j, err)
		}
		clients = append(clients, cl)
	}
	for i := 1; i <= 5; i++ {
		for k, cl := range clients {
			if err := cl.Send(ctx, fmt.Sprintf("%c%d", 'b'+k, i), "before the stream"); err != nil {
				t.Fatal(err)
			}
		}
	}
	// read returns the ids of the next n messages cl reads (acks skipped).
	read := func(cl *chattest.Client, n int, what string) []string {
		var got []string
		for len(got) < n {
			f, _, err := cl.NextOf(testutil.Scale(20*time.Second), "msg")
			if err != nil {
				t.Fatalf("%s: after %v: %v", what, got, err)
			}
			got = append(got, fmt.Sprintf("%d:%s", f.Seq, f.ID))
		}
		return got
	}
	atB, atC := read(clients[0], 10, "client at b"), read(clients[1], 10, "client at c")
	if strings.Join(atB, " ") != strings.Join(atC, " ") {
		t.Fatalf("before the stream, b's client read %v and c's %v: want one order", atB, atC)
	}
	var roles []string
	for _, dc := range []string{"b", "c"} {
		for _, r := range lab.Node(dc).Chat().Rooms() {
			roles = append(roles, dc+":"+r.Role+" "+r.Parent)
		}
	}
	t.Logf("before the stream: %v; rooms %v", atB, roles)

	publishStill(t, lab.Node("a"), "z")
	testutil.WaitForWithin(t, 30*time.Second, "a sequencing z with 10 messages", func() bool {
		r := lab.Node("a").Chat().Rooms()
		return len(r) == 1 && r[0].Role == "origin" && r[0].LastSeq >= 10
	})
	at, err := chattest.Dial(ctx, lab.HTTPURL(0), "z", chattest.Options{Since: chattest.Since(0)})
	if err != nil {
		t.Fatal(err)
	}
	defer at.Close()
	ids := map[string]int{}
	for _, s := range read(at, 10, "a's history") {
		ids[s[strings.Index(s, ":")+1:]]++
	}
	for k := range 2 {
		for i := 1; i <= 5; i++ {
			if id := fmt.Sprintf("%c%d", 'b'+k, i); ids[id] != 1 {
				t.Errorf("message %s is %d times in a's history %v, want once", id, ids[id], ids)
			}
		}
	}
	if r := lab.Node("a").Chat().Rooms(); r[0].LastSeq != 10 {
		t.Errorf("a's room holds %d messages, want the 10 said before the stream", r[0].LastSeq)
	}
}
