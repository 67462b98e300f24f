package relay

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
)

// TestChannelEchoAcrossLink: a channel opened from a to b carries bytes both
// ways in order, b's handler sees a as the peer, a kind without a handler is
// refused, and a channel to a datacenter that is not linked fails with
// ErrNoLink.
func TestChannelEchoAcrossLink(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 30*time.Second)
	ca, err := NewClusterCA()
	if err != nil {
		t.Fatal(err)
	}
	b, bo := overlayNode(t, ca, "b", "b", testutil.Logger(), map[string]string{"a": "127.0.0.1:1"})
	a, _ := overlayNode(t, ca, "a", "a", testutil.Logger(), map[string]string{"b": bo.Addr().String()})
	peers := make(chan string, 1)
	b.HandleChannels(ChannelChat, func(ch Channel) {
		peers <- ch.Peer()
		br := bufio.NewReader(ch)
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				ch.Close()
				return
			}
			if _, err := fmt.Fprintf(ch, "echo %s", line); err != nil {
				return
			}
		}
	})
	testutil.WaitFor(t, "the link a–b", func() bool { return len(a.Links()) == 1 && len(b.Links()) == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(5*time.Second))
	defer cancel()
	ch, err := a.OpenChannel(ctx, "b", ChannelChat)
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(ch)
	for i := range 100 {
		fmt.Fprintf(ch, "line %d\n", i)
	}
	for i := range 100 {
		got, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("reading echo %d: %v", i, err)
		}
		if want := fmt.Sprintf("echo line %d\n", i); got != want {
			t.Fatalf("echo %d = %q, want %q", i, got, want)
		}
	}
	if p := <-peers; p != "a" {
		t.Fatalf("b's handler saw peer %q, want a", p)
	}
	ch.Close()

	// A kind b does not serve: the stream is reset.
	if _, err := a.OpenChannel(ctx, "nowhere", ChannelChat); !errors.Is(err, ErrNoLink) {
		t.Fatalf("channel to a datacenter that is not linked: err %v, want ErrNoLink", err)
	}
	z, err := a.OpenChannel(ctx, "b", ChannelKind('z'))
	if err != nil {
		t.Fatal(err)
	}
	z.SetDeadline(time.Now().Add(testutil.Scale(5 * time.Second)))
	if _, err := io.ReadAll(z); err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("reading a channel of a kind b does not serve: err %v, want the stream reset", err)
	}
	z.Close()
}

// TestChannelsBeyondQUICDefault: a node holds one channel per chat room
// per neighbour, so a link carries more than quic-go's default 100
// concurrent streams: 300 channels open at once, all within the timeout.
func TestChannelsBeyondQUICDefault(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 60*time.Second)
	ca, err := NewClusterCA()
	if err != nil {
		t.Fatal(err)
	}
	b, bo := overlayNode(t, ca, "b", "b", testutil.Logger(), map[string]string{"a": "127.0.0.1:1"})
	a, _ := overlayNode(t, ca, "a", "a", testutil.Logger(), map[string]string{"b": bo.Addr().String()})
	b.HandleChannels(ChannelChat, func(ch Channel) {
		io.Copy(io.Discard, ch) // held open until a closes it
		ch.Close()
	})
	testutil.WaitFor(t, "the link a–b", func() bool { return len(a.Links()) == 1 && len(b.Links()) == 1 })
	var chans []Channel
	defer func() {
		for _, ch := range chans {
			ch.Close()
		}
	}()
	for i := range 300 {
		ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(2*time.Second))
		ch, err := a.OpenChannel(ctx, "b", ChannelChat)
		cancel()
		if err != nil {
			t.Fatalf("channel %d: %v", i+1, err)
		}
		if _, err := ch.Write([]byte("x")); err != nil {
			t.Fatalf("channel %d: %v", i+1, err)
		}
		chans = append(chans, ch)
	}
}
