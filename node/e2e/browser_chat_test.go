package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
)

// chatLine is one line of the chat panel as the page shows it.
type chatLine struct {
	Nick, Text string
	Pending    bool
	Elements   int // child elements of the text span: must be 0 (text only)
}

type chatPanel struct {
	State string
	Lines []chatLine
	XSS   any // set by the payload if it ever ran
}

const readChat = `(() => ({
	state: document.getElementById('chat-state').textContent,
	lines: [...document.querySelectorAll('#chat-log li:not(.sys):not(.unread-mark)')].map(li => ({
		nick: li.querySelector('.nick').textContent,
		text: li.querySelector('.text').textContent,
		pending: li.classList.contains('pending'),
		elements: li.querySelector('.text').children.length,
	})),
	xss: window.__xss === undefined ? null : window.__xss,
}))()`

// chatAs sets the nickname in the panel's form, as a user does.
func chatAs(tb *tab, nick string) {
	tb.b.t.Helper()
	expr := fmt.Sprintf(`(() => { document.getElementById('chat-nick').value = %q;
		document.getElementById('chat-nick-form').requestSubmit(); return true; })()`, nick)
	if err := tb.eval(expr, new(bool)); err != nil {
		tb.fatalf("cannot set the chat nickname: %v", err)
	}
}

// chatSay types a message and presses Send.
func chatSay(tb *tab, text string) {
	tb.b.t.Helper()
	expr := fmt.Sprintf(`(() => { document.getElementById('chat-text').value = %q;
		document.getElementById('chat-send-form').requestSubmit(); return true; })()`, text)
	if err := tb.eval(expr, new(bool)); err != nil {
		tb.fatalf("cannot send a chat message: %v", err)
	}
}

// TestBrowserChat: the publisher page at a (publishing the fake camera) and a
// viewer page at c (a → b → c) exchange chat messages in headless Chromium,
// inside a network namespace with only loopback. Both panels show the same
// lines in the same order, nothing left pending; an XSS payload shows as
// its text and never runs. The viewer's node restarts its chat connection
// (the page reconnects with since) and misses nothing. Screenshots go to the
// artifacts.
func TestBrowserChat(t *testing.T) {
	if !inNetns() {
		requireChromium(t)
		runInNetns(t, testutil.Scale(100*time.Second))
		return
	}
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 90*time.Second)
	requireLoopbackOnly(t)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(85*time.Second))
	t.Cleanup(cancel)

	urls := startCluster(t, ctx)
	a, c := urls[0], urls[2]
	br := startBrowser(t, ctx)

	pub := br.newTab("publish-a")
	pub.navigate(a + "/publish/x?autostart=1")
	waitFor(pub, "the publish page reports it is live", `window.stemflowPublish || null`, 20*time.Second,
		func(p publishState) bool {
			if p.State == "error" {
				pub.fatalf("publishing failed: %s", p.Error)
			}
			return p.State == "live"
		})
	watch := br.newTab("watch-c")
	watch.navigate(c + "/watch/x")

	chatAs(pub, "streamer")
	chatAs(watch, "viewer at c")
	for _, tb := range []*tab{pub, watch} {
		waitFor(tb, "the chat panel connects", readChat, 15*time.Second,
			func(p chatPanel) bool { return p.State == "connected" })
	}

	const xss = `<img src=x onerror="window.__xss=1"><script>window.__xss=2</script><b>bold?</b>`
	chatSay(watch, "hello from c")
	waitFor(pub, "the streamer sees the viewer's message", readChat, 15*time.Second,
		func(p chatPanel) bool { return len(p.Lines) == 1 })
	chatSay(pub, "welcome! "+xss)
	chatSay(pub, "second line")
	want := []chatLine{
		{Nick: "viewer at c", Text: "hello from c"},
		{Nick: "streamer", Text: "welcome! " + xss},
		{Nick: "streamer", Text: "second line"},
	}
	same := func(p chatPanel) bool {
		if len(p.Lines) != len(want) || p.State != "connected" {
			return false
		}
		for i, l := range p.Lines {
			if l != want[i] {
				return false
			}
		}
		return true
	}
	for _, tb := range []*tab{pub, watch} {
		got := waitFor(tb, "the panel shows the three messages in order, as text, none pending", readChat, 15*time.Second, same)
		if got.XSS != nil {
			tb.fatalf("the XSS payload ran: window.__xss = %v", got.XSS)
		}
	}
	var imgs int
	if err := watch.eval(`document.querySelectorAll('#chat-log img, #chat-log script, #chat-log b').length`, &imgs); err != nil || imgs != 0 {
		watch.fatalf("the chat log holds %d elements from a message (err %v): text only, never HTML", imgs, err)
	}
	watch.screenshot("chat-watch-c.png")
	pub.screenshot("chat-publish-a.png")

	// The viewer's connection drops (as when its node goes away): the page
	// reconnects with since and shows what was said meanwhile exactly once.
	var before chatState
	if err := watch.eval(`window.stemflowChat.drop()`, &before); err != nil {
		watch.fatalf("cannot drop the chat connection: %v", err)
	}
	chatSay(pub, "while you were away")
	want = append(want, chatLine{Nick: "streamer", Text: "while you were away"})
	waitFor(watch, "the viewer's panel reconnects and shows the new message once", readChat, 20*time.Second, same)
	after := waitFor(watch, "the viewer's panel resumed after the drop", `window.stemflowChat.state()`, 10*time.Second,
		func(s chatState) bool { return s.Connects > before.Connects })
	t.Logf("chat at c: resumed from seq %d (epoch %s) after the drop; %d connections", before.LastSeq, after.Epoch, after.Connects)
	watch.screenshot("chat-watch-c-resumed.png")
}

// chatState is window.stemflowChat.state() of chat.js.
type chatState struct {
	Epoch    string
	LastSeq  uint64
	Pending  int
	Connects int
}
