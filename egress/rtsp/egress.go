// Package rtsp serves the hub's streams to RTSP readers (DESCRIBE, SETUP,
// PLAY over UDP or TCP): ffplay, ffmpeg, VLC, recorders.
//
// All RTSP readers of one stream on a node share one hub subscription: the
// first reader subscribes, the last one leaving unsubscribes. Between the hub
// and the readers sits a bounded queue and the stream's own goroutine, which
// queues each packet to every reader; each reader has its own bounded queue,
// goroutine and gortsplib.ServerStream, so a slow reader never holds back the
// publisher or the other readers.
//
// Each stream keeps the packets since the last video keyframe and sends them
// to every new reader right after its PLAY response, before live packets, so
// that ffplay or a recorder starts with a picture at once instead of waiting
// for the publisher's next keyframe. The replay is paced by relay.Pacer, as
// for WHEP viewers: the keyframe first, the rest at 4× the stream's own rate,
// then live packets, none lost or reordered, so that a UDP reader with the
// kernel's default receive buffer, or a TCP reader behind gortsplib's
// 256-packet write queue, loses nothing to the burst.
//
// The package serves no RTSP port itself: [Egress] plugs into the
// gortsplib.Server that node/rtspserver shares with the RTSP ingest.
package rtsp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/bluenviron/gortsplib/v4"
	"github.com/bluenviron/gortsplib/v4/pkg/base"

	"github.com/stemflow/stemflow/relay"
)

// Config configures an Egress.
type Config struct {
	// Hub provides the streams. Required.
	Hub *relay.Hub
	// Server is the RTSP server the streams are served from; it must be
	// started before the first request. Required.
	Server *gortsplib.Server
	Logger *slog.Logger
	// SubscribeTimeout bounds how long DESCRIBE waits for a stream that lives
	// in another datacenter to start flowing here (default 5s).
	SubscribeTimeout time.Duration
	// QueueSize is the number of packets buffered between the hub and a
	// stream's readers, and for each reader (the live packets waiting
	// behind its paced GOP replay, and its lag); more are dropped and
	// counted (default 2048).
	QueueSize int
	// IdleTimeout is how long a stream stays subscribed after a DESCRIBE
	// that no SETUP followed (default 10s).
	IdleTimeout time.Duration
}

// Egress serves the hub's streams to RTSP readers. The server's handler calls
// the On* methods; they are safe for concurrent use.
type Egress struct {
	cfg Config
	log *slog.Logger

	mu      sync.Mutex // guards the following fields
	streams map[string]*stream
	readers map[*gortsplib.ServerSession]*reader
	pending map[*gortsplib.ServerConn]*reader // from PLAY to its response
	closed  bool
}

// New returns an Egress serving cfg.Hub's streams.
func New(cfg Config) *Egress {
	if cfg.SubscribeTimeout <= 0 {
		cfg.SubscribeTimeout = 5 * time.Second
	}
	if cfg.QueueSize <= 0 {
		cfg.QueueSize = 2048
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 10 * time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Egress{
		cfg:     cfg,
		log:     log.With("component", "egress/rtsp"),
		streams: make(map[string]*stream),
		readers: make(map[*gortsplib.ServerSession]*reader),
		pending: make(map[*gortsplib.ServerConn]*reader),
	}
}

// OnDescribe subscribes to the stream (waiting up to SubscribeTimeout for one
// from another datacenter) and describes it. Unknown streams get 404 with a
// reason phrase saying so.
func (e *Egress) OnDescribe(ctx *gortsplib.ServerHandlerOnDescribeCtx) (*base.Response, *gortsplib.ServerStream, error) {
	st, res := e.stream(ctx.Path)
	if res != nil {
		return res, nil, nil
	}
	return &base.Response{StatusCode: base.StatusOK}, st.ss, nil
}

// OnSetup adds the session to the readers of the stream.
func (e *Egress) OnSetup(ctx *gortsplib.ServerHandlerOnSetupCtx) (*base.Response, *gortsplib.ServerStream, error) {
	e.mu.Lock()
	r := e.readers[ctx.Session]
	e.mu.Unlock()
	if r != nil { // a further track of the same session
		if r.st.name != streamName(ctx.Path) {
			return refusal(base.StatusBadRequest, "rtsp: one RTSP session can read one stream only"), nil, nil
		}
		return &base.Response{StatusCode: base.StatusOK}, r.ss, nil
	}
	st, res := e.stream(ctx.Path)
	if res != nil {
		return res, nil, nil
	}
	remote := ctx.Conn.NetConn().RemoteAddr().String()
	r, err := st.addReader(st.log.With("remote", remote))
	if err != nil {
		return refusal(base.StatusServiceUnavailable, "rtsp: server is shutting down: retry on another node"), nil, nil
	}
	ended := refusal(base.StatusNotFound, fmt.Sprintf("rtsp: stream %q just ended", st.name))
	if r == nil {
		return ended, nil, nil
	}
	e.mu.Lock()
	if e.streams[st.name] != st { // ended meanwhile
		e.mu.Unlock()
		st.removeReader(r)
		return ended, nil, nil
	}
	e.readers[ctx.Session] = r
	st.readers++
	st.stopIdleTimerLocked()
	e.mu.Unlock()
	r.log.Info("RTSP reader joined", "transport", ctx.Transport.String())
	return &base.Response{StatusCode: base.StatusOK}, r.ss, nil
}

// OnPlay starts a reader with the stream's last group of pictures, so that
// it shows a picture at once, then live packets. Its goroutine starts sending
// once the PLAY response is out (OnResponse), at most playGateTimeout later.
func (e *Egress) OnPlay(ctx *gortsplib.ServerHandlerOnPlayCtx) (*base.Response, error) {
	e.mu.Lock()
	r := e.readers[ctx.Session]
	playing := r != nil && r.playing
	if r != nil {
		r.playing = true
	}
	e.mu.Unlock()
	if r == nil {
		return refusal(base.StatusBadRequest, "rtsp: PLAY without SETUP"), nil
	}
	if playing { // a repeated PLAY
		return &base.Response{StatusCode: base.StatusOK}, nil
	}
	if !r.st.addPlaying(r) {
		return refusal(base.StatusNotFound, fmt.Sprintf("rtsp: stream %q just ended", r.st.name)), nil
	}
	r.timer.Reset(playGateTimeout)
	e.mu.Lock()
	e.pending[ctx.Conn] = r
	e.mu.Unlock()
	return &base.Response{StatusCode: base.StatusOK}, nil
}

// playGateTimeout bounds how long a reader waits for its PLAY response.
const playGateTimeout = time.Second

// OnResponse lets a reader's packets flow once its PLAY response is sent:
// gortsplib sends a session nothing written before.
func (e *Egress) OnResponse(sc *gortsplib.ServerConn, _ *base.Response) {
	e.mu.Lock()
	r := e.pending[sc]
	delete(e.pending, sc)
	e.mu.Unlock()
	if r != nil {
		r.started()
	}
}

// OnSessionClose removes a reader; the last reader of a stream leaving
// unsubscribes from the hub.
func (e *Egress) OnSessionClose(ctx *gortsplib.ServerHandlerOnSessionCloseCtx) {
	e.mu.Lock()
	r := e.readers[ctx.Session]
	if r == nil {
		e.mu.Unlock()
		return
	}
	delete(e.readers, ctx.Session)
	for sc, x := range e.pending {
		if x == r {
			delete(e.pending, sc)
		}
	}
	st := r.st
	st.readers--
	last := st.readers == 0 && e.streams[st.name] == st
	if last {
		delete(e.streams, st.name)
	}
	e.mu.Unlock()
	st.removeReader(r)
	r.log.Info("RTSP reader left", "reason", ctx.Error, "sent", r.sent.Load(), "dropped", r.q.Dropped(),
		"write_errors", r.writeErrs.Load())
	if last {
		st.close()
	}
}

// Close ends every stream, disconnecting its readers, and waits for their
// goroutines.
func (e *Egress) Close() {
	e.mu.Lock()
	e.closed = true
	streams := make([]*stream, 0, len(e.streams))
	for name, st := range e.streams {
		streams = append(streams, st)
		delete(e.streams, name)
	}
	e.mu.Unlock()
	for _, st := range streams {
		st.close()
	}
}

func streamName(path string) string { return strings.TrimSuffix(strings.TrimPrefix(path, "/"), "/") }

// stream returns the named stream, subscribing to the hub when no reader here
// has yet. On failure it returns the response to send instead.
func (e *Egress) stream(path string) (*stream, *base.Response) {
	name := streamName(path)
	if err := relay.ValidateStreamName(name); err != nil {
		// Not 400: ffmpeg prints the reason phrase only for codes above 400.
		return nil, refusal(base.StatusNotFound, "rtsp: "+err.Error()+" (URL is rtsp://host:port/<stream>)")
	}
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil, refusal(base.StatusServiceUnavailable, "rtsp: server is shutting down: retry on another node")
	}
	st := e.streams[name]
	create := st == nil
	if create {
		st = &stream{e: e, name: name, ready: make(chan struct{}), log: e.log.With("stream", name), gop: relay.GOPCache{Max: gopMaxPackets}}
		e.streams[name] = st
	}
	e.mu.Unlock()

	if create {
		st.err = st.open()
		e.mu.Lock()
		if st.err != nil {
			if e.streams[name] == st {
				delete(e.streams, name)
			}
		} else if st.readers == 0 {
			st.idle = time.AfterFunc(e.cfg.IdleTimeout, func() { e.closeIfIdle(st) })
		}
		e.mu.Unlock()
		close(st.ready)
	}
	<-st.ready
	if st.err != nil {
		switch {
		case errors.Is(st.err, relay.ErrStreamNotFound):
			return nil, refusal(base.StatusNotFound, fmt.Sprintf("rtsp: stream %q is not live in any datacenter: publish it first", name))
		case errors.Is(st.err, context.DeadlineExceeded):
			return nil, refusal(base.StatusNotFound, fmt.Sprintf("rtsp: stream %q did not start flowing within %s: try again", name, e.cfg.SubscribeTimeout))
		case errors.Is(st.err, errNoRTSPTrack):
			return nil, refusal(base.StatusUnsupportedMediaType, "rtsp: "+st.err.Error())
		case errors.Is(st.err, relay.ErrClosed):
			return nil, refusal(base.StatusServiceUnavailable, "rtsp: server is shutting down: retry on another node")
		}
		return nil, refusal(base.StatusNotFound, fmt.Sprintf("rtsp: stream %q: %v", name, st.err))
	}
	return st, nil
}

// closeIfIdle closes a stream that was described but never set up.
func (e *Egress) closeIfIdle(st *stream) {
	e.mu.Lock()
	idle := st.readers == 0 && e.streams[st.name] == st
	if idle {
		delete(e.streams, st.name)
	}
	e.mu.Unlock()
	if idle {
		st.log.Debug("no RTSP reader set the stream up: unsubscribing")
		st.close()
	}
}

// forget removes st from the streams it is listed under, when it ended.
func (e *Egress) forget(st *stream) {
	e.mu.Lock()
	if e.streams[st.name] == st {
		delete(e.streams, st.name)
	}
	e.mu.Unlock()
}

// refusal returns an RTSP error response whose reason phrase is msg, so that
// clients show it (ffmpeg prints "method DESCRIBE failed: 404 <msg>"). The
// phrase is kept on one line and under 250 bytes.
func refusal(code base.StatusCode, msg string) *base.Response {
	msg = strings.NewReplacer("\r", " ", "\n", " ").Replace(msg)
	if len(msg) > 250 {
		msg = msg[:247] + "..."
	}
	return &base.Response{StatusCode: code, StatusMessage: msg}
}
