// Package chattest is a chat client for tests: it dials a node's
// /chat/{room} endpoint with a real WebSocket client and hands out the
// frames it receives, decoded. It is for tests and benchmarks only.
package chattest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"
)

// Frame is any server frame, decoded; which fields are set depends on Type.
type Frame struct {
	Type     string `json:"type"`
	Seq      uint64 `json:"seq"`
	ID       string `json:"id"`
	Nick     string `json:"nick"`
	Text     string `json:"text"`
	TS       string `json:"ts"`
	Code     string `json:"code"`
	Message  string `json:"message"`
	Room     string `json:"room"`
	Epoch    string `json:"epoch"`
	LastSeq  uint64 `json:"last_seq"`
	FirstSeq uint64 `json:"first_seq"`
	DC       string `json:"dc"`

	// Received is when the client read the frame.
	Received time.Time `json:"-"`
	// Raw is the frame as it came.
	Raw string `json:"-"`
}

func (f Frame) String() string { return f.Raw }

// Client is one chat connection. Next returns its frames in order until
// the connection ends (then Err says why).
//
// Frames wait in a queue that grows as they come (a channel of Buffered
// frames would be allocated whole at Dial: 22 MB a client, which the GC
// of the nodes under test, in the same process, scans on every cycle).
type Client struct {
	Conn *websocket.Conn

	done  chan struct{}
	ready chan struct{} // holds a token when a frame was queued or the connection ended

	mu    sync.Mutex // guards the following
	err   error
	queue []Frame
	head  int // queue[head:] wait
	ended bool
}

// Options of a connection; zero values are left out of the URL.
type Options struct {
	Nick     string
	Since    *uint64
	Epoch    string
	Buffered int // at most this many frames wait for Next (default 100000); then the client ends
}

// Since returns a pointer to seq, for Options.Since.
func Since(seq uint64) *uint64 { return &seq }

// URL returns the chat URL of room at the node serving base (http://host:port).
func URL(base, room string, o Options) string {
	u := strings.Replace(base, "http", "ws", 1) + "/chat/" + url.PathEscape(room)
	q := url.Values{}
	if o.Nick != "" {
		q.Set("nick", o.Nick)
	}
	if o.Since != nil {
		q.Set("since", strconv.FormatUint(*o.Since, 10))
	}
	if o.Epoch != "" {
		q.Set("epoch", o.Epoch)
	}
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	return u
}

// Dial connects to room at base (http://host:port).
func Dial(ctx context.Context, base, room string, o Options) (*Client, error) {
	conn, _, err := websocket.Dial(ctx, URL(base, room, o), nil)
	if err != nil {
		return nil, err
	}
	conn.SetReadLimit(1 << 20)
	n := o.Buffered
	if n <= 0 {
		n = 100000
	}
	c := &Client{Conn: conn, done: make(chan struct{}), ready: make(chan struct{}, 1)}
	go func() {
		defer close(c.done)
		var buf bytes.Buffer // one frame's bytes: Raw and the fields are copies
		for {
			// No deadline: Close ends the read by closing the connection
			// (a context that can end costs the library a timer per frame).
			_, rd, err := conn.Reader(context.Background())
			if err == nil {
				buf.Reset()
				_, err = buf.ReadFrom(rd)
			}
			if err != nil {
				c.end(err)
				return
			}
			b := buf.Bytes()
			f, ok := decodeFast(b)
			if !ok {
				if err := json.Unmarshal(b, &f); err != nil {
					f = Frame{Type: "undecodable"}
				}
			}
			f.Received, f.Raw = time.Now(), string(b)
			c.mu.Lock()
			full := len(c.queue)-c.head >= n
			if !full {
				c.queue = append(c.queue, f)
			}
			c.mu.Unlock()
			if full {
				c.end(fmt.Errorf("chattest: more than %d frames buffered", n))
				return
			}
			c.wake()
		}
	}()
	return c, nil
}

// Err says why the connection ended.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// SendJSON writes v as one text frame.
func (c *Client) SendJSON(ctx context.Context, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return c.Conn.Write(ctx, websocket.MessageText, b)
}

// Send sends a message.
func (c *Client) Send(ctx context.Context, id, text string) error {
	return c.SendJSON(ctx, map[string]string{"type": "send", "id": id, "text": text})
}

func (c *Client) wake() {
	select {
	case c.ready <- struct{}{}:
	default:
	}
}

// end records why the connection ended.
func (c *Client) end(err error) {
	c.mu.Lock()
	c.err, c.ended = err, true
	c.mu.Unlock()
	c.wake()
}

// pop takes the next frame; ended reports that none will come.
func (c *Client) pop() (f Frame, ok, ended bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.head == len(c.queue) {
		return Frame{}, false, c.ended
	}
	f = c.queue[c.head]
	c.queue[c.head] = Frame{}
	c.head++
	if c.head == len(c.queue) {
		c.queue, c.head = c.queue[:0], 0
	}
	return f, true, false
}

// Next returns the next frame, or an error when none comes within d.
func (c *Client) Next(d time.Duration) (Frame, error) {
	var timeout <-chan time.Time
	for {
		f, ok, ended := c.pop()
		if ok {
			return f, nil
		}
		if ended {
			return Frame{}, fmt.Errorf("connection ended: %v", c.Err())
		}
		if timeout == nil { // a frame waiting needs no timer
			t := time.NewTimer(d)
			defer t.Stop()
			timeout = t.C
		}
		select {
		case <-c.ready:
		case <-timeout:
			if f, ok, _ := c.pop(); ok {
				return f, nil
			}
			return Frame{}, fmt.Errorf("no frame within %v", d)
		}
	}
}

// NextOf returns the next frame of one of the types, skipping others (they
// are returned too, in skipped).
func (c *Client) NextOf(d time.Duration, types ...string) (f Frame, skipped []Frame, err error) {
	deadline := time.Now().Add(d)
	for {
		f, err := c.Next(time.Until(deadline))
		if err != nil {
			return Frame{}, skipped, err
		}
		for _, t := range types {
			if f.Type == t {
				return f, skipped, nil
			}
		}
		skipped = append(skipped, f)
	}
}

// Close closes the connection and waits for the reader.
func (c *Client) Close() {
	c.Conn.CloseNow()
	<-c.done
}

// Kill drops the connection without a close handshake (a dead node, from
// the client's side).
func (c *Client) Kill() { c.Close() }

// decodeFast decodes the two frames a busy client gets most, msg and ack,
// when they are laid out as the server writes them and hold no escapes
// (the test's clients share the machine with the nodes they measure: a
// reflective decode of every frame was a fifth of the benchmark's CPU).
// It reports false for anything else; json.Unmarshal decodes that.
func decodeFast(b []byte) (Frame, bool) {
	if bytes.IndexByte(b, '\\') >= 0 {
		return Frame{}, false
	}
	const msgPrefix, ackPrefix = `{"type":"msg","seq":`, `{"type":"ack","id":`
	p := fastParser{b: b}
	var f Frame
	switch {
	case bytes.HasPrefix(b, []byte(msgPrefix)):
		p.lit(msgPrefix)
		f.Type = "msg"
		f.Seq = p.uint()
		f.ID = p.field(`,"id":`)
		f.Nick = p.field(`,"nick":`)
		f.Text = p.field(`,"text":`)
		f.TS = p.field(`,"ts":`)
	case bytes.HasPrefix(b, []byte(ackPrefix)):
		p.lit(ackPrefix)
		f.Type = "ack"
		f.ID = p.str()
		p.lit(`,"seq":`)
		f.Seq = p.uint()
	default:
		return Frame{}, false
	}
	if !p.lit("}") || p.bad || len(p.b) != 0 {
		return Frame{}, false
	}
	return f, true
}

// fastParser reads a frame of a known layout; bad is set at the first
// mismatch.
type fastParser struct {
	b   []byte
	bad bool
}

func (p *fastParser) lit(s string) bool {
	if p.bad || !bytes.HasPrefix(p.b, []byte(s)) {
		p.bad = true
		return false
	}
	p.b = p.b[len(s):]
	return true
}

func (p *fastParser) uint() uint64 {
	i := 0
	for i < len(p.b) && p.b[i] >= '0' && p.b[i] <= '9' {
		i++
	}
	v, err := strconv.ParseUint(string(p.b[:i]), 10, 64)
	if err != nil {
		p.bad = true
		return 0
	}
	p.b = p.b[i:]
	return v
}

// str reads a JSON string without escapes.
func (p *fastParser) str() string {
	if p.bad || len(p.b) == 0 || p.b[0] != '"' {
		p.bad = true
		return ""
	}
	end := bytes.IndexByte(p.b[1:], '"')
	if end < 0 {
		p.bad = true
		return ""
	}
	s := string(p.b[1 : 1+end])
	p.b = p.b[end+2:]
	return s
}

func (p *fastParser) field(name string) string {
	p.lit(name)
	return p.str()
}
