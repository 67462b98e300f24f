package chat

import (
	"bufio"
	"errors"
	"net"
	"net/http"
	"sync"
	"time"
)

// corkMax bounds what a corked connection holds before it writes through:
// a full read batch of messages fits.
const corkMax = 256 << 10

// corkConn is a client's TCP connection under the WebSocket library, which
// flushes every frame it writes. While corked, writes gather in memory;
// Uncork sends them in one write. The client's writer corks around each
// batch (messages, acks, replies), so a batch of frames costs one syscall
// instead of one per frame; control frames the library writes meanwhile
// (pings, pongs, close) join the batch, and go out at once when not corked.
//
// Every write to the socket has a deadline of writeTimeout: a client that
// does not read fails the write, and the library closes the connection.
type corkConn struct {
	net.Conn

	// mu serialises writers on the socket (the library's writer, its
	// control frames, Uncork) and guards the following fields. It is held
	// across the socket write on purpose: it is the socket's write lock,
	// bounded by the write deadline.
	mu     sync.Mutex
	corked bool
	buf    []byte
	err    error // the first write error: later writes fail with it
}

func (c *corkConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return 0, c.err
	}
	if c.corked && len(c.buf)+len(p) <= corkMax {
		c.buf = append(c.buf, p...)
		return len(p), nil
	}
	if err := c.flushLocked(); err != nil {
		return 0, err
	}
	if c.corked && len(p) <= corkMax {
		c.buf = append(c.buf, p...)
		return len(p), nil
	}
	return c.writeLocked(p)
}

// Cork starts gathering writes.
func (c *corkConn) Cork() {
	c.mu.Lock()
	c.corked = true
	c.mu.Unlock()
}

// Uncork writes what was gathered, in one write, and stops gathering.
func (c *corkConn) Uncork() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.corked = false
	return c.flushLocked()
}

func (c *corkConn) flushLocked() error {
	if c.err != nil {
		return c.err
	}
	if len(c.buf) == 0 {
		return nil
	}
	_, err := c.writeLocked(c.buf)
	if cap(c.buf) > 2*corkMax {
		c.buf = nil
	} else {
		c.buf = c.buf[:0]
	}
	return err
}

func (c *corkConn) writeLocked(p []byte) (int, error) {
	c.Conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	n, err := c.Conn.Write(p)
	if err != nil {
		c.err = err
	}
	return n, err
}

// corkingWriter hands the WebSocket library a corkConn when it hijacks the
// request's connection.
type corkingWriter struct {
	http.ResponseWriter
	conn *corkConn // set by Hijack
}

var errNoHijack = errors.New("chat: the HTTP server cannot hand over the connection (no http.Hijacker)")

func (w *corkingWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	hj, ok := w.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, errNoHijack
	}
	nc, brw, err := hj.Hijack()
	if err != nil {
		return nil, nil, err
	}
	if err := brw.Writer.Flush(); err != nil {
		nc.Close()
		return nil, nil, err
	}
	w.conn = &corkConn{Conn: nc}
	return w.conn, bufio.NewReadWriter(brw.Reader, bufio.NewWriterSize(w.conn, 4<<10)), nil
}
