package chat

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/stemflow/stemflow/egress/chat/chattest"
	"github.com/stemflow/stemflow/internal/testutil"
	rooms "github.com/stemflow/stemflow/relay/chat"
)

// node is one chat server on loopback with its own store.
type node struct {
	base  string
	svc   *rooms.Service
	store *rooms.Store
	srv   *Server
	http  *httptest.Server
}

func startNode(t *testing.T, dir string, ret rooms.Retention, rate float64, burst int) *node {
	t.Helper()
	st, err := rooms.OpenStore(dir, rooms.StoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	svc := rooms.NewService(rooms.Config{Datacenter: "a", Store: st, Retention: ret, Logger: testutil.Logger()})
	srv := New(Config{Rooms: svc, Rate: rate, Burst: burst, Logger: testutil.Logger()})
	mux := http.NewServeMux()
	mux.Handle("GET /chat/{room}", srv)
	hs := httptest.NewServer(mux)
	n := &node{base: hs.URL, svc: svc, store: st, srv: srv, http: hs}
	t.Cleanup(n.close)
	return n
}

func (n *node) close() {
	if n.http == nil {
		return
	}
	n.srv.Close()
	n.http.Close()
	n.svc.Close()
	n.store.Close()
	n.http = nil
}

func dial(t *testing.T, base, room string, o chattest.Options) *chattest.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(5*time.Second))
	defer cancel()
	c, err := chattest.Dial(ctx, base, room, o)
	if err != nil {
		t.Fatalf("dial %s: %v", room, err)
	}
	t.Cleanup(c.Close)
	return c
}

var wait = testutil.Scale(5 * time.Second)

// expect reads the next frame and checks its type (and, when set, code).
func expect(t *testing.T, c *chattest.Client, typ, code string) chattest.Frame {
	t.Helper()
	f, err := c.Next(wait)
	if err != nil {
		t.Fatalf("waiting for a %s frame: %v", typ, err)
	}
	if f.Type != typ || code != "" && f.Code != code {
		t.Fatalf("got frame %s, want type %q code %q", f, typ, code)
	}
	return f
}

func send(t *testing.T, c *chattest.Client, id, text string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := c.Send(ctx, id, text); err != nil {
		t.Fatal(err)
	}
}

// sendAcked sends a message and returns its ack and msg frames (either
// order), failing on anything else.
func sendAcked(t *testing.T, c *chattest.Client, id, text string) (ack, msg chattest.Frame) {
	t.Helper()
	send(t, c, id, text)
	for ack.Type == "" || msg.Type == "" {
		f, err := c.Next(wait)
		if err != nil {
			t.Fatalf("waiting for the ack and msg of %s: %v", id, err)
		}
		switch {
		case f.Type == "ack" && f.ID == id:
			ack = f
		case f.Type == "msg" && f.ID == id:
			msg = f
		default:
			t.Fatalf("waiting for the ack and msg of %s, got %s", id, f)
		}
	}
	if ack.Seq != msg.Seq {
		t.Fatalf("ack says seq %d, msg %d", ack.Seq, msg.Seq)
	}
	return ack, msg
}

// TestChatSession is the example session of docs/chat.md: join, send, ack
// and msg with the same seq, a second client gets the history on join and
// live messages after, and a retry with the same id is acked with the first
// seq and not delivered again.
func TestChatSession(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	n := startNode(t, t.TempDir(), rooms.Retention{}, 0, 0)
	ann := dial(t, n.base, "x", chattest.Options{Nick: "ann"})
	j := expect(t, ann, "joined", "")
	if j.Room != "x" || j.Epoch == "" || j.LastSeq != 0 || j.DC != "a" {
		t.Fatalf("joined frame %s: want room x, an epoch, last_seq 0, dc a", j)
	}
	ack, msg := sendAcked(t, ann, "m1", "hello <b>world</b>")
	if ack.Seq != 1 || msg.Nick != "ann" || msg.Text != "hello <b>world</b>" {
		t.Fatalf("ack %s msg %s: want seq 1 from ann with the text as sent", ack, msg)
	}
	if ts, err := time.Parse(time.RFC3339, msg.TS); err != nil || time.Since(ts) > time.Minute {
		t.Fatalf("msg ts %q: %v", msg.TS, err)
	}
	bob := dial(t, n.base, "x", chattest.Options{Nick: "bob"})
	if j2 := expect(t, bob, "joined", ""); j2.Epoch != j.Epoch || j2.LastSeq != 1 {
		t.Fatalf("bob joined %s: want epoch %s last_seq 1", j2, j.Epoch)
	}
	if h := expect(t, bob, "msg", ""); h.Seq != 1 || h.ID != "m1" {
		t.Fatalf("bob's history: %s, want m1 at seq 1", h)
	}
	// A retry of m1: acked with seq 1, delivered to nobody.
	send(t, ann, "m1", "hello <b>world</b>")
	if a := expect(t, ann, "ack", ""); a.ID != "m1" || a.Seq != 1 {
		t.Fatalf("retry of m1 acked %s, want seq 1", a)
	}
	ack2, _ := sendAcked(t, bob, "m2", "hi ann")
	if ack2.Seq != 2 {
		t.Fatalf("m2 got seq %d, want 2 (the retry of m1 must not take a number)", ack2.Seq)
	}
	if f := expect(t, ann, "msg", ""); f.Seq != 2 || f.ID != "m2" || f.Nick != "bob" {
		t.Fatalf("ann got %s after the retry, want m2 from bob at seq 2", f)
	}
	// An application ping is answered; so is a WebSocket ping.
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	ann.SendJSON(ctx, map[string]string{"type": "ping"})
	expect(t, ann, "pong", "")
	if err := ann.Conn.Ping(ctx); err != nil {
		t.Fatalf("websocket ping: %v", err)
	}
}

// TestChatRefusalsKeepConnection: every violation gets an error frame with
// its code, the connection stays usable, and the other client sees only the
// valid messages, in order.
func TestChatRefusalsKeepConnection(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	n := startNode(t, t.TempDir(), rooms.Retention{}, 5, 10)
	c := dial(t, n.base, "room-1", chattest.Options{Nick: "mallory"})
	other := dial(t, n.base, "room-1", chattest.Options{Nick: "olive"})
	expect(t, c, "joined", "")
	expect(t, other, "joined", "")
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	raw := func(s string) {
		if err := c.Conn.Write(ctx, websocket.MessageText, []byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	valid := 0
	check := func(what, code string) {
		t.Helper()
		f := expect(t, c, "error", code)
		if f.Message == "" {
			t.Fatalf("%s: error frame without a message: %s", what, f)
		}
		valid++
		sendAcked(t, c, fmt.Sprintf("ok-%d", valid), "still here") // the connection is usable
	}
	send(t, c, "long", strings.Repeat("é", 1025)) // 2050 bytes
	check("text over 2 KiB", CodeTooLong)
	raw(`{"type":"send","id":"big","text":"` + strings.Repeat("x", 40000) + `"}`)
	check("a 40 KB frame", CodeTooLong)
	raw(`not json`)
	check("not JSON", CodeBadFrame)
	raw(`{"type":"shout"}`)
	check("unknown type", CodeBadFrame)
	if err := c.Conn.Write(ctx, websocket.MessageBinary, []byte{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	check("binary frame", CodeBadFrame)
	send(t, c, "", "no id")
	check("no id", CodeBadID)
	send(t, c, "e", "   ")
	check("empty text", CodeEmptyText)
	c.SendJSON(ctx, map[string]string{"type": "nick", "nick": "<script>"})
	check("bad nick", CodeBadNick)

	// Bad nick at connect: read-only until a nick is set.
	ro := dial(t, n.base, "room-1", chattest.Options{Nick: "a\x00b"})
	f, _, err := ro.NextOf(wait, "error")
	if err != nil || f.Code != CodeBadNick {
		t.Fatalf("bad nick at connect: %s %v, want error bad_nick", f, err)
	}
	send(t, ro, "ro1", "hello")
	if f, _, err := ro.NextOf(wait, "error"); err != nil || f.Code != CodeNoNick || f.ID != "ro1" {
		t.Fatalf("send without a nick: %s %v, want error no_nick for ro1", f, err)
	}
	ro.SendJSON(ctx, map[string]string{"type": "nick", "nick": "Rosa Luxe"})
	if f, _, err := ro.NextOf(wait, "nick_ok", "error"); err != nil || f.Type != "nick_ok" {
		t.Fatalf("setting a valid nick: %s %v", f, err)
	}

	// Rate limit: a burst of 10 then refusals, each naming its id.
	time.Sleep(2200 * time.Millisecond) // refill the bucket (5/s, burst 10)
	for i := range 15 {
		send(t, c, fmt.Sprintf("r%d", i), "flood")
	}
	acked, limited := 0, 0
	for acked+limited < 15 {
		f, err := c.Next(wait)
		if err != nil {
			t.Fatalf("after %d acks and %d refusals: %v", acked, limited, err)
		}
		switch {
		case f.Type == "ack":
			acked++
		case f.Type == "error" && f.Code == CodeRateLimited && strings.HasPrefix(f.ID, "r"):
			limited++
		case f.Type == "msg":
		default:
			t.Fatalf("unexpected %s", f)
		}
	}
	if acked < 10 || acked > 11 || limited != 15-acked {
		t.Fatalf("15 sends at once: %d acked, %d rate_limited; want 10 (the burst, maybe 11) and the rest refused", acked, limited)
	}

	// The other client saw exactly the accepted messages, in order.
	var last uint64
	got := 0
	for got < valid+acked {
		f, err := other.Next(wait)
		if err != nil {
			t.Fatalf("olive got %d of %d messages: %v", got, valid+acked, err)
		}
		if f.Type != "msg" {
			t.Fatalf("olive got %s, want only messages", f)
		}
		if f.Seq != last+1 {
			t.Fatalf("olive got seq %d after %d", f.Seq, last)
		}
		last = f.Seq
		got++
	}
	st, _ := n.svc.Stats()
	if len(st) != 1 || st[0].RateLimited != uint64(limited) {
		t.Fatalf("stats %+v: want %d rate-limit hits in room-1", st, limited)
	}
}

// TestChatSinceEpochAndRetention: join without since gets the last 100;
// since resumes exactly after it; a since before the retained history gets
// history_gap, another epoch epoch_changed, and both the retained history.
func TestChatSinceEpochAndRetention(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 120*time.Second)
	n := startNode(t, t.TempDir(), rooms.Retention{Count: 120}, 1000, 1000)
	c := dial(t, n.base, "x", chattest.Options{Nick: "ann"})
	j := expect(t, c, "joined", "")
	for i := 1; i <= 150; i++ { // one at a time: a client further behind than the retention would get a gap
		sendAcked(t, c, fmt.Sprintf("m%d", i), fmt.Sprintf("text %d", i))
	}
	history := func(c *chattest.Client) (joined chattest.Frame, seqs []uint64, errs []string) {
		t.Helper()
		for {
			f, err := c.Next(testutil.Scale(500 * time.Millisecond))
			if err != nil {
				return joined, seqs, errs
			}
			switch f.Type {
			case "joined":
				joined = f
			case "msg":
				seqs = append(seqs, f.Seq)
			case "error":
				errs = append(errs, f.Code)
			}
		}
	}
	span := func(seqs []uint64) string {
		if len(seqs) == 0 {
			return "none"
		}
		for i := 1; i < len(seqs); i++ {
			if seqs[i] != seqs[i-1]+1 {
				return fmt.Sprintf("not contiguous at %d", seqs[i])
			}
		}
		return fmt.Sprintf("%d-%d", seqs[0], seqs[len(seqs)-1])
	}
	cases := []struct {
		name string
		o    chattest.Options
		span string
		errs string
	}{
		{"no since: last 100", chattest.Options{}, "51-150", ""},
		{"since 140", chattest.Options{Since: chattest.Since(140)}, "141-150", ""},
		{"since 150: nothing", chattest.Options{Since: chattest.Since(150), Epoch: j.Epoch}, "none", ""},
		{"since ahead (another node was further): nothing", chattest.Options{Since: chattest.Since(170)}, "none", ""},
		{"since 5: before the retained 31-150", chattest.Options{Since: chattest.Since(5)}, "31-150", CodeHistoryGap},
		{"other epoch", chattest.Options{Since: chattest.Since(140), Epoch: "0123456789abcdef"}, "31-150", CodeEpochChanged},
	}
	for _, tc := range cases {
		r := dial(t, n.base, "x", tc.o)
		joined, seqs, errs := history(r)
		if joined.LastSeq != 150 || joined.FirstSeq != 31 || span(seqs) != tc.span || strings.Join(errs, ",") != tc.errs {
			t.Errorf("%s: joined %s, messages %s, errors %q; want last_seq 150, first_seq 31, messages %s, errors %q",
				tc.name, joined, span(seqs), errs, tc.span, tc.errs)
		}
		r.Close()
	}
}

// TestChatRestartKeepsHistoryAndEpoch: a node restarted on the same data
// directory serves the same epoch and history and numbers on from there.
func TestChatRestartKeepsHistoryAndEpoch(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	dir := t.TempDir()
	n := startNode(t, dir, rooms.Retention{}, 100, 100)
	c := dial(t, n.base, "x", chattest.Options{Nick: "ann"})
	j := expect(t, c, "joined", "")
	for i := 1; i <= 5; i++ {
		sendAcked(t, c, fmt.Sprintf("m%d", i), "before")
	}
	c.Close()
	n.close()

	n2 := startNode(t, dir, rooms.Retention{}, 100, 100)
	c2 := dial(t, n2.base, "x", chattest.Options{Nick: "ann", Since: chattest.Since(0), Epoch: j.Epoch})
	j2 := expect(t, c2, "joined", "")
	if j2.Epoch != j.Epoch || j2.LastSeq != 5 {
		t.Fatalf("after the restart: joined %s, want epoch %s and last_seq 5", j2, j.Epoch)
	}
	for i := 1; i <= 5; i++ {
		if f := expect(t, c2, "msg", ""); f.Seq != uint64(i) || f.ID != fmt.Sprintf("m%d", i) {
			t.Fatalf("history after the restart: %s, want m%d", f, i)
		}
	}
	// A retry from before the restart is still recognised.
	send(t, c2, "m3", "before")
	if a := expect(t, c2, "ack", ""); a.Seq != 3 {
		t.Fatalf("retry of m3 after the restart acked %s, want seq 3", a)
	}
	if ack, _ := sendAcked(t, c2, "m6", "after"); ack.Seq != 6 {
		t.Fatalf("first message after the restart got seq %d, want 6", ack.Seq)
	}
}

// TestChatRetentionByAge: messages older than the retention age go, from
// memory and from the store; a since before them gets history_gap.
func TestChatRetentionByAge(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	dir := t.TempDir()
	n := startNode(t, dir, rooms.Retention{Age: 500 * time.Millisecond}, 100, 100)
	c := dial(t, n.base, "x", chattest.Options{Nick: "ann"})
	expect(t, c, "joined", "")
	sendAcked(t, c, "old", "old")
	time.Sleep(time.Second)
	sendAcked(t, c, "new", "new")
	r := dial(t, n.base, "x", chattest.Options{Since: chattest.Since(0)})
	if f := expect(t, r, "error", CodeHistoryGap); !strings.Contains(f.Message, "1") {
		t.Fatalf("gap message %q", f.Message)
	}
	if j := expect(t, r, "joined", ""); j.FirstSeq != 2 || j.LastSeq != 2 {
		t.Fatalf("joined %s: want first_seq 2 last_seq 2 (message 1 aged out)", j)
	}
	c.Close()
	r.Close()
	n.close()
	n2 := startNode(t, dir, rooms.Retention{Age: time.Hour}, 100, 100)
	r2 := dial(t, n2.base, "x", chattest.Options{Since: chattest.Since(0)})
	expect(t, r2, "error", CodeHistoryGap)
	if j := expect(t, r2, "joined", ""); j.FirstSeq != 2 {
		t.Fatalf("after a restart: %s, want first_seq 2: the store kept an aged-out message", j)
	}
}

// TestChatBadRequests: a bad room name or since is refused before the
// upgrade, with a status and a message that says what to do.
func TestChatBadRequests(t *testing.T) {
	testutil.CheckLeaks(t)
	n := startNode(t, t.TempDir(), rooms.Retention{}, 0, 0)
	for _, tc := range []struct{ path, want string }{
		{"/chat/a%20b", "room"},
		{"/chat/x?since=minus", "since"},
	} {
		resp, err := http.Get(n.base + tc.path)
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 512)
		k, _ := resp.Body.Read(b)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(b[:k]), tc.want) {
			t.Errorf("GET %s: %d %q, want 400 naming %s", tc.path, resp.StatusCode, b[:k], tc.want)
		}
	}
}

// TestChatEveryAckArrives: 2,000 sends at once on one connection (no rate
// limit) get 2,000 acks: a burst of acks is never dropped (before, the
// connection's ack channel held 256 and the rest were lost: the client
// waited forever).
func TestChatEveryAckArrives(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	n := startNode(t, t.TempDir(), rooms.Retention{}, 1e9, 1<<30)
	c := dial(t, n.base, "x", chattest.Options{Nick: "ann"})
	expect(t, c, "joined", "")
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	go func() {
		for i := range 2000 {
			if c.Send(ctx, fmt.Sprintf("m%d", i), "burst") != nil {
				return
			}
		}
	}()
	acks := map[string]bool{}
	for len(acks) < 2000 {
		f, err := c.Next(wait)
		if err != nil {
			t.Fatalf("%d acks of 2000: %v", len(acks), err)
		}
		if f.Type == "ack" {
			acks[f.ID] = true
		}
	}
}
