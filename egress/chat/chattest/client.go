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

// Client is one chat connection. Frames arrive on C until the connection
// ends (then C is closed and Err says why).
type Client struct {
	Conn *websocket.Conn
	C    <-chan Frame

	done chan struct{}
	mu   sync.Mutex
	err  error
}

// Options of a connection; zero values are left out of the URL.
type Options struct {
	Nick     string
	Since    *uint64
	Epoch    string
	Buffered int // frames buffered on C (default 100000)
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
	ch := make(chan Frame, n)
	c := &Client{Conn: conn, C: ch, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		defer close(ch)
		for {
			// No deadline: Close ends the read by closing the connection
			// (a context that can end costs the library a timer per frame).
			_, b, err := conn.Read(context.Background())
			if err != nil {
				c.mu.Lock()
				c.err = err
				c.mu.Unlock()
				return
			}
			f, ok := decodeFast(b)
			if !ok {
				if err := json.Unmarshal(b, &f); err != nil {
					f = Frame{Type: "undecodable"}
				}
			}
			f.Received, f.Raw = time.Now(), string(b)
			select {
			case ch <- f:
			default:
				c.mu.Lock()
				c.err = fmt.Errorf("chattest: more than %d frames buffered", n)
				c.mu.Unlock()
				return
			}
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

// Next returns the next frame, or an error when none comes within d.
func (c *Client) Next(d time.Duration) (Frame, error) {
	select { // a frame waiting: no timer
	case f, ok := <-c.C:
		if !ok {
			return Frame{}, fmt.Errorf("connection ended: %v", c.Err())
		}
		return f, nil
	default:
	}
	select {
	case f, ok := <-c.C:
		if !ok {
			return Frame{}, fmt.Errorf("connection ended: %v", c.Err())
		}
		return f, nil
	case <-time.After(d):
		return Frame{}, fmt.Errorf("no frame within %v", d)
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
