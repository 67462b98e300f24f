package relay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
)

// Channels are reliable, ordered byte streams between neighbouring
// datacenters, opened on the same QUIC connection as the media (one QUIC
// stream each). An application above the relay (chat) registers a handler
// for its kind of channel and opens channels to neighbours; the relay only
// carries the bytes and says which kind a stream is.

// ChannelKind says what a channel carries: the first byte of every stream a
// neighbour opens after the control stream.
type ChannelKind byte

// The kinds of channel.
const (
	// ChannelChat carries one chat room's messages between a node and its
	// parent in the room's tree (relay/chat).
	ChannelChat ChannelKind = 'c'
)

// maxChannels bounds the channels a neighbour may have open to us at once
// (quic-go's MaxIncomingStreams, the control stream included).
const maxChannels = 10000

// ErrNoLink: there is no link to that neighbour now.
var ErrNoLink = errors.New("no link to that datacenter")

// Channel is one reliable stream to a neighbour. Read and Write may be used
// from two goroutines at once. Close ends our side of the stream (the peer
// reads io.EOF once it has read everything written) and stops reading; a
// channel also ends when its link does.
type Channel interface {
	io.ReadWriteCloser
	// Peer is the neighbour's datacenter.
	Peer() string
	// SetDeadline bounds the current and future reads and writes.
	SetDeadline(t time.Time) error
}

// ChannelHandler serves one incoming channel; it runs on its own goroutine
// and should return when the channel fails (as it does when the link goes).
type ChannelHandler func(Channel)

// channelTable holds the hub's handlers of incoming channels.
type channelTable struct {
	mu       sync.Mutex // guards handlers
	handlers map[ChannelKind]ChannelHandler
}

// HandleChannels registers the handler of the neighbours' channels of a
// kind; a later call replaces it. Channels of a kind without a handler are
// refused.
func (h *Hub) HandleChannels(kind ChannelKind, fn ChannelHandler) {
	h.chans.mu.Lock()
	defer h.chans.mu.Unlock()
	if h.chans.handlers == nil {
		h.chans.handlers = make(map[ChannelKind]ChannelHandler)
	}
	h.chans.handlers[kind] = fn
}

func (h *Hub) channelHandler(kind ChannelKind) ChannelHandler {
	h.chans.mu.Lock()
	defer h.chans.mu.Unlock()
	return h.chans.handlers[kind]
}

// channelOpener is a link that carries channels (the QUIC link does).
type channelOpener interface {
	openChannel(ctx context.Context, kind ChannelKind) (Channel, error)
}

// OpenChannel opens a channel of a kind to a neighbour. It fails with
// ErrNoLink when the neighbour is not linked now.
func (h *Hub) OpenChannel(ctx context.Context, peer string, kind ChannelKind) (Channel, error) {
	h.mu.Lock()
	l := h.links[peer]
	h.mu.Unlock()
	co, ok := l.(channelOpener)
	if !ok {
		return nil, fmt.Errorf("%w %s", ErrNoLink, peer)
	}
	return co.openChannel(ctx, kind)
}

// quicChannel is a Channel on one QUIC stream.
type quicChannel struct {
	*quic.Stream
	peer string
}

func (c *quicChannel) Peer() string { return c.peer }

// Close ends our side and stops reading: the peer's reads end.
func (c *quicChannel) Close() error {
	c.CancelRead(0)
	return c.Stream.Close()
}

func (l *quicLink) openChannel(ctx context.Context, kind ChannelKind) (Channel, error) {
	st, err := l.conn.OpenStreamSync(ctx)
	if err != nil {
		return nil, fmt.Errorf("opening a channel to datacenter %s: %w", l.peer, err)
	}
	if _, err := st.Write([]byte{byte(kind)}); err != nil {
		st.CancelRead(0)
		st.CancelWrite(0)
		return nil, fmt.Errorf("opening a channel to datacenter %s: %w", l.peer, err)
	}
	return &quicChannel{Stream: st, peer: l.peer}, nil
}

// channelKindTimeout bounds how long a neighbour takes to say which kind of
// channel it opened.
const channelKindTimeout = 5 * time.Second

// acceptChannels serves the streams the neighbour opens, each on its own
// goroutine, until the link ends.
func (l *quicLink) acceptChannels() {
	defer l.wg.Done()
	for {
		st, err := l.conn.AcceptStream(l.ctx)
		if err != nil {
			return
		}
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			var kind [1]byte
			st.SetReadDeadline(time.Now().Add(channelKindTimeout))
			if _, err := io.ReadFull(st, kind[:]); err != nil {
				st.CancelRead(0)
				st.CancelWrite(0)
				return
			}
			st.SetReadDeadline(time.Time{})
			fn := l.hub.channelHandler(ChannelKind(kind[0]))
			if fn == nil {
				l.log.Debug("refused a channel of a kind this node does not serve", "kind", kind[0])
				st.CancelRead(1)
				st.CancelWrite(1)
				return
			}
			ch := &quicChannel{Stream: st, peer: l.peer}
			stop := context.AfterFunc(l.ctx, func() { st.CancelRead(0); st.CancelWrite(0) })
			defer stop()
			fn(ch)
		}()
	}
}
