// Package chat serves chat rooms to clients over WebSocket:
// GET /chat/{room}?nick=NAME&since=SEQ&epoch=EPOCH, JSON text frames, as
// docs/chat.md documents. The rooms themselves, their order and their
// history are relay/chat's.
package chat

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/coder/websocket"

	"github.com/stemflow/stemflow/relay"
	rooms "github.com/stemflow/stemflow/relay/chat"
)

// Defaults of Config.
const (
	DefaultRate  = 5.0 // messages per second per connection
	DefaultBurst = 10
	// DefaultHistory is how many messages a client joining without since
	// gets.
	DefaultHistory = 100
)

const (
	// maxFrameBytes bounds a client frame we decode: a 2 KiB text with
	// every character escaped still fits. Longer frames are read to their
	// end, discarded and answered with too_long; the connection goes on.
	maxFrameBytes = 16 << 10
	// readLimit bounds a client frame at all: beyond it the connection is
	// closed (1009, message too big).
	readLimit = 1 << 20
	// writeTimeout bounds one frame's write to a client.
	writeTimeout = 10 * time.Second
	// pingInterval is how often the server pings a client (a client that
	// does not answer within writeTimeout is dropped).
	pingInterval = 15 * time.Second
	// readBatch bounds the messages taken from the room per wakeup.
	readBatch = 256
	// ackWindow bounds a connection's sends waiting for their ack; beyond
	// it the server stops reading the connection until acks go out.
	ackWindow = 1024
)

// Config configures a Server.
type Config struct {
	Rooms *rooms.Service
	// Rate and Burst are each connection's token bucket for sends
	// (defaults 5/s and 10).
	Rate  float64
	Burst int
	// OriginPatterns lists the other origins (host patterns) whose pages
	// may open chat connections; a page served by the node itself always
	// may.
	OriginPatterns []string
	Logger         *slog.Logger
}

// Server is the WebSocket endpoint of the chat rooms. It is an http.Handler
// for GET /chat/{room}. Close ends every connection and waits for them.
type Server struct {
	cfg Config
	log *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// New returns a server.
func New(cfg Config) *Server {
	if cfg.Rate <= 0 {
		cfg.Rate = DefaultRate
	}
	if cfg.Burst <= 0 {
		cfg.Burst = DefaultBurst
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{cfg: cfg, log: cfg.Logger.With("component", "chat-ws"), ctx: ctx, cancel: cancel}
}

// Close ends every connection and waits for their goroutines.
func (s *Server) Close() {
	s.cancel()
	s.wg.Wait()
}

// The frames of the client protocol (docs/chat.md).
type (
	clientFrame struct {
		Type string `json:"type"`
		ID   string `json:"id"`
		Text string `json:"text"`
		Nick string `json:"nick"`
	}
	msgFrame struct {
		Type string `json:"type"` // msg
		Seq  uint64 `json:"seq"`
		ID   string `json:"id"`
		Nick string `json:"nick"`
		Text string `json:"text"`
		TS   string `json:"ts"`
	}
	errorFrame struct {
		Type    string `json:"type"` // error
		Code    string `json:"code"`
		Message string `json:"message"`
		ID      string `json:"id,omitempty"` // the send it refuses
	}
	joinedFrame struct {
		Type     string `json:"type"` // joined
		Room     string `json:"room"`
		Epoch    string `json:"epoch"`
		LastSeq  uint64 `json:"last_seq"`
		FirstSeq uint64 `json:"first_seq"`
		DC       string `json:"dc"`
		Nick     string `json:"nick"`
	}
	simpleFrame struct {
		Type string `json:"type"` // pong
	}
)

// The error codes (docs/chat.md).
const (
	CodeBadFrame     = "bad_frame"
	CodeTooLong      = "too_long"
	CodeEmptyText    = "empty_text"
	CodeBadText      = "bad_text"
	CodeBadID        = "bad_id"
	CodeBadNick      = "bad_nick"
	CodeNoNick       = "no_nick"
	CodeRateLimited  = "rate_limited"
	CodeHistoryGap   = "history_gap"
	CodeEpochChanged = "epoch_changed"
)

func sendErrorCode(err error) string {
	switch {
	case errors.Is(err, rooms.ErrTooLong):
		return CodeTooLong
	case errors.Is(err, rooms.ErrEmptyText):
		return CodeEmptyText
	case errors.Is(err, rooms.ErrBadText):
		return CodeBadText
	}
	return CodeBadID
}

// ServeHTTP upgrades GET /chat/{room} to a chat connection.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	room := r.PathValue("room")
	if err := relay.ValidateStreamName(room); err != nil {
		http.Error(w, "chat: room: "+err.Error()+" (a room is named like the stream it sits beside)", http.StatusBadRequest)
		return
	}
	q := r.URL.Query()
	var since uint64
	hasSince := q.Has("since")
	if hasSince {
		v, err := strconv.ParseUint(q.Get("since"), 10, 64)
		if err != nil {
			http.Error(w, fmt.Sprintf("chat: since=%q is not a sequence number: give the seq of the last message you have (0 for the whole history), or leave it out for the last %d", q.Get("since"), DefaultHistory), http.StatusBadRequest)
			return
		}
		since = v
	}
	cw := &corkingWriter{ResponseWriter: w}
	conn, err := websocket.Accept(cw, r, &websocket.AcceptOptions{OriginPatterns: s.cfg.OriginPatterns})
	if err != nil {
		s.log.Debug("chat: websocket upgrade failed", "err", err)
		return // Accept answered
	}
	conn.SetReadLimit(readLimit)
	s.wg.Add(1)
	defer s.wg.Done()
	c := &client{srv: s, conn: conn, cork: cw.conn, room: room, nick: q.Get("nick"), epoch: q.Get("epoch"), since: since, hasSince: hasSince,
		win: rooms.NewAckWindow(ackWindow), ctrl: make(chan any, 64)}
	c.acks = make(chan rooms.Ack, c.win.Size())
	c.run(r.Context())
}

// client is one chat connection: a reader goroutine decodes the client's
// frames, the writer (the handler's goroutine) sends everything the client
// gets, so that frames never interleave.
type client struct {
	srv      *Server
	conn     *websocket.Conn
	cork     *corkConn // conn's socket: the writer corks it around each batch
	room     string
	nick     string // "" until a valid nickname is set: the client reads only
	epoch    string
	since    uint64
	hasSince bool
	acks     chan rooms.Ack
	win      *rooms.AckWindow // sends waiting for their ack: the reader waits when it is full
	ctrl     chan any         // errors and pongs from the reader, in order
	counters rooms.Counters
}

func (c *client) run(reqCtx context.Context) {
	ctx, cancel := context.WithCancel(c.srv.ctx)
	defer cancel()
	stop := context.AfterFunc(reqCtx, cancel)
	defer stop()
	defer c.conn.CloseNow()

	r, release := c.srv.cfg.Rooms.Acquire(c.room, true)
	defer release()
	c.counters = r.Counters()

	if c.nick != "" {
		if err := rooms.ValidateNick(c.nick); err != nil {
			c.ctrl <- errorFrame{Type: "error", Code: CodeBadNick, Message: err.Error() + ": you can read; set a nickname with {\"type\":\"nick\",\"nick\":\"…\"} to send"}
			c.nick = ""
		}
	}
	var nickMu sync.Mutex // guards c.nick between the reader and the joined frame
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		defer cancel()
		c.read(ctx, r, &nickMu)
	}()
	defer func() { cancel(); c.conn.CloseNow(); <-readDone }() // the reader ends with the connection

	go func() { // keepalive: a client that stops answering pings is dropped
		t := time.NewTicker(pingInterval)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				pctx, pcancel := context.WithTimeout(ctx, writeTimeout)
				err := c.conn.Ping(pctx)
				pcancel()
				if err != nil {
					cancel()
					return
				}
			case <-ctx.Done():
				return
			}
		}
	}()

	select {
	case <-r.Synced():
	case <-ctx.Done():
		return
	}
	if err := c.write(ctx, r, &nickMu); err != nil && ctx.Err() == nil {
		c.srv.log.Debug("chat: connection ended", "room", c.room, "err", err)
	}
}

// write sends the joined frame, the history the client lacks, then live
// messages, acks and the reader's frames, until the connection ends. Each
// round's frames are gathered (the connection is corked) and go out in one
// write.
func (c *client) write(ctx context.Context, r *rooms.Room, nickMu *sync.Mutex) error {
	epoch, cursor := c.epoch, c.since
	v := r.Read(rooms.AnyEpoch, 0, 1) // where the history is now
	if !c.hasSince {
		epoch = v.Epoch
		cursor = v.First - 1
		if v.Last > DefaultHistory && v.Last-DefaultHistory > cursor {
			cursor = v.Last - DefaultHistory
		}
	} else {
		c.counters.Resume()
	}
	if epoch == "" {
		epoch = rooms.AnyEpoch
	}
	liveFrom := v.Last // messages after it are live: their latency counts
	nickMu.Lock()
	nick := c.nick
	nickMu.Unlock()
	joined := true
	var woke any // an ack or reply taken while waiting: it goes out first
	var scratch []byte
	for {
		v := r.Read(epoch, cursor, readBatch)
		c.cork.Cork()
		if woke != nil {
			if err := c.sendLocked(woke, &scratch); err != nil {
				return err
			}
			woke = nil
		}
		if v.Reset {
			code, msg := CodeHistoryGap, fmt.Sprintf("messages %d to %d are no longer kept: you get the history from %d", cursor+1, v.First-1, v.First)
			if epoch != rooms.AnyEpoch && epoch != v.Epoch {
				code, msg = CodeEpochChanged, fmt.Sprintf("the room's history was lost and started again (epoch %s, was %s): drop what you have; you get the retained history", v.Epoch, epoch)
			}
			if v.First > cursor+1 || code == CodeEpochChanged {
				if err := c.sendLocked(errorFrame{Type: "error", Code: code, Message: msg}, &scratch); err != nil {
					return err
				}
			}
			joined = true
			cursor = v.First - 1
		}
		if joined {
			if err := c.sendLocked(joinedFrame{Type: "joined", Room: c.room, Epoch: v.Epoch, LastSeq: v.Last, FirstSeq: v.First,
				DC: c.srv.cfg.Rooms.Datacenter(), Nick: nick}, &scratch); err != nil {
				return err
			}
			joined = false
		}
		epoch = v.Epoch
		for i := range v.Len() {
			m := v.Msg(i)
			b := m.Frame
			if b == nil {
				b = EncodeMsg(m)
			}
			if err := c.put(b); err != nil {
				return err
			}
			cursor = m.Seq
		}
		if err := c.drain(&scratch); err != nil {
			return err
		}
		if err := c.cork.Uncork(); err != nil {
			return err
		}
		if n := v.Len(); n > 0 {
			now := time.Now()
			for i := range n {
				if m := v.Msg(i); m.Seq > liveFrom {
					c.srv.cfg.Rooms.ObserveLatency(now.Sub(m.TS))
				}
			}
			c.counters.Out(n)
		}
		if v.Len() == readBatch {
			continue
		}
		select {
		case <-v.Changed:
		case a := <-c.acks:
			woke = a
		case f := <-c.ctrl:
			woke = f
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// put writes one text frame. The connection is corked: the frame goes to
// memory (or, past corkMax, to the socket with its deadline), so the write
// needs no context of its own (one with a deadline costs a timer per frame).
func (c *client) put(b []byte) error {
	return c.conn.Write(context.Background(), websocket.MessageText, b)
}

// drain sends the acks and reader frames waiting now.
func (c *client) drain(scratch *[]byte) error {
	for {
		select {
		case a := <-c.acks:
			if err := c.sendLocked(a, scratch); err != nil {
				return err
			}
		case f := <-c.ctrl:
			if err := c.sendLocked(f, scratch); err != nil {
				return err
			}
		default:
			return nil
		}
	}
}

// sendLocked writes an ack (giving back its place in the window) or a
// frame of the reader, while the connection is corked.
func (c *client) sendLocked(v any, scratch *[]byte) error {
	if a, ok := v.(rooms.Ack); ok {
		c.win.Release(a.ID)
		*scratch = appendAck((*scratch)[:0], a)
		return c.put(*scratch)
	}
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return c.put(b)
}

// appendAck appends a's ack frame: {"type":"ack","id":"…","seq":N}.
func appendAck(b []byte, a rooms.Ack) []byte {
	b = append(b, `{"type":"ack","id":`...)
	b = appendJSONString(b, a.ID)
	b = append(b, `,"seq":`...)
	b = strconv.AppendUint(b, a.Seq, 10)
	return append(b, '}')
}

// appendJSONString appends s as a JSON string.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			q, _ := json.Marshal(s)
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}

// EncodeMsg encodes a message as the client protocol's msg frame. It
// writes what json.Marshal of a msgFrame writes, without reflection (every
// node encodes every message once).
func EncodeMsg(m rooms.Msg) []byte {
	return AppendMsg(make([]byte, 0, 96+len(m.ID)+len(m.Nick)+len(m.Text)), &m)
}

// AppendMsg appends EncodeMsg's frame to b (relay/chat's Config.Encode).
func AppendMsg(b []byte, m *rooms.Msg) []byte {
	b = append(b, `{"type":"msg","seq":`...)
	b = strconv.AppendUint(b, m.Seq, 10)
	b = append(b, `,"id":`...)
	b = appendJSONString(b, m.ID)
	b = append(b, `,"nick":`...)
	b = appendJSONString(b, m.Nick)
	b = append(b, `,"text":`...)
	b = appendJSONString(b, m.Text)
	b = append(b, `,"ts":"`...)
	b = m.TS.UTC().AppendFormat(b, time.RFC3339Nano)
	return append(b, `"}`...)
}

// reply queues a frame for the writer; the reader waits when the writer is
// behind (only this client slows down).
func (c *client) reply(ctx context.Context, v any) bool {
	select {
	case c.ctrl <- v:
		return true
	case <-ctx.Done():
		return false
	}
}

// read decodes the client's frames until the connection ends. Every bad
// frame is answered with an error frame; the connection goes on.
func (c *client) read(ctx context.Context, r *rooms.Room, nickMu *sync.Mutex) {
	bucket := tokenBucket{rate: c.srv.cfg.Rate, burst: float64(c.srv.cfg.Burst)}
	var buf bytes.Buffer // one frame's bytes; what is parsed from them is copied
	for {
		// Not ctx: run closes the connection to end the read (a context
		// that can end costs the library a timer per frame).
		typ, rd, err := c.conn.Reader(context.Background())
		if err != nil {
			return
		}
		buf.Reset()
		if _, err := buf.ReadFrom(io.LimitReader(rd, maxFrameBytes+1)); err != nil {
			return
		}
		data := buf.Bytes()
		if len(data) > maxFrameBytes {
			if _, err := io.Copy(io.Discard, rd); err != nil {
				return
			}
			c.counters.Refused()
			if !c.reply(ctx, errorFrame{Type: "error", Code: CodeTooLong, Message: fmt.Sprintf("frame is longer than %d bytes: a message's text may have %d bytes", maxFrameBytes, rooms.MaxTextBytes)}) {
				return
			}
			continue
		}
		f, bad := parseClientFrame(typ, data)
		if bad != nil {
			c.counters.Refused()
			if !c.reply(ctx, *bad) {
				return
			}
			continue
		}
		var out any
		switch f.Type {
		case "ping":
			out = simpleFrame{Type: "pong"}
		case "nick":
			if err := rooms.ValidateNick(f.Nick); err != nil {
				out = errorFrame{Type: "error", Code: CodeBadNick, Message: err.Error()}
				break
			}
			nickMu.Lock()
			c.nick = f.Nick
			nickMu.Unlock()
			out = simpleFrame{Type: "nick_ok"}
		case "send":
			out = c.handleSend(ctx, r, &f, &bucket, nickMu)
		}
		if out != nil && !c.reply(ctx, out) {
			return
		}
	}
}

// parseClientFrame decodes one client frame, or returns the error frame
// that answers a frame outside the protocol.
func parseClientFrame(typ websocket.MessageType, data []byte) (clientFrame, *errorFrame) {
	var f clientFrame
	if typ != websocket.MessageText {
		return f, &errorFrame{Type: "error", Code: CodeBadFrame, Message: "binary frame: send JSON text frames"}
	}
	if err := json.Unmarshal(data, &f); err != nil {
		return f, &errorFrame{Type: "error", Code: CodeBadFrame, Message: "frame is not a JSON object of the chat protocol: " + err.Error()}
	}
	switch f.Type {
	case "send", "nick", "ping":
		return f, nil
	}
	return f, &errorFrame{Type: "error", Code: CodeBadFrame, Message: fmt.Sprintf("unknown frame type %q: send \"send\", \"nick\" or \"ping\"", f.Type)}
}

// handleSend checks one send and hands it to the room; it returns the error
// frame to answer with, or nil (the ack follows from the room).
func (c *client) handleSend(ctx context.Context, r *rooms.Room, f *clientFrame, bucket *tokenBucket, nickMu *sync.Mutex) any {
	nickMu.Lock()
	nick := c.nick
	nickMu.Unlock()
	if nick == "" {
		c.counters.Refused()
		return errorFrame{Type: "error", Code: CodeNoNick, ID: f.ID, Message: "set a nickname first: {\"type\":\"nick\",\"nick\":\"…\"} or ?nick= on the URL"}
	}
	if err := rooms.ValidateSend(f.ID, f.Text); err != nil {
		c.counters.Refused()
		return errorFrame{Type: "error", Code: sendErrorCode(err), ID: f.ID, Message: err.Error()}
	}
	if !bucket.allow(time.Now()) {
		c.counters.RateLimited()
		return errorFrame{Type: "error", Code: CodeRateLimited, ID: f.ID,
			Message: fmt.Sprintf("more than %g messages a second (bursts of %d): this one was not sent, send it again (same id) in a moment", bucket.rate, int(bucket.burst))}
	}
	c.counters.In()
	if fresh, err := c.win.Acquire(ctx, f.ID); err != nil || !fresh {
		return nil // the connection is ending, or the id is in flight here already (its ack will come)
	}
	if err := r.Submit(ctx, f.ID, nick, f.Text, c.acks); err != nil {
		return nil // the connection is ending
	}
	return nil
}

// tokenBucket is a connection's send limit.
type tokenBucket struct {
	rate, burst float64
	tokens      float64
	last        time.Time
}

func (b *tokenBucket) allow(now time.Time) bool {
	if b.last.IsZero() {
		b.tokens = b.burst
	} else {
		b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	}
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}
