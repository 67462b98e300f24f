package rtsp

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bluenviron/gortsplib/v4"
	"github.com/pion/rtp"

	"github.com/stemflow/stemflow/relay"
)

// reader is one RTSP session reading a stream. It has its own
// gortsplib.ServerStream, so that its packets go to it alone, and its own
// queue and goroutine (run): from PLAY on, its stream's goroutine queues it
// every packet; run sends the GOP replay taken at PLAY, paced by
// relay.Pacer, then the queued live packets, none lost or reordered between
// the two. A slow reader drops its own packets and holds back nobody.
type reader struct {
	st     *stream
	log    *slog.Logger
	ss     *gortsplib.ServerStream
	tracks []*outTrack // by relay track number
	q      *relay.Queue

	// start is closed once the PLAY response is out: gortsplib sends a
	// session nothing written before.
	start     chan struct{}
	startOnce sync.Once
	timer     *time.Timer     // starts it if no PLAY response is seen; armed by OnPlay
	gop       []*relay.Buffer // the replay not yet sent; run's after PLAY
	pacer     relay.Pacer
	playing   bool // guarded by Egress.mu: PLAY seen

	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	closeOnce sync.Once

	sent, writeErrs atomic.Uint64
}

func newReader(st *stream, log *slog.Logger, queueSize int) (*reader, error) {
	desc, tracks := describe(st.sub.Description())
	ss := &gortsplib.ServerStream{Server: st.e.cfg.Server, Desc: desc}
	if err := ss.Initialize(); err != nil {
		return nil, err
	}
	r := &reader{st: st, log: log, ss: ss, tracks: tracks, q: relay.NewQueue(queueSize), start: make(chan struct{})}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	r.timer = time.AfterFunc(time.Hour, r.started)
	r.timer.Stop() // OnPlay arms it
	return r, nil
}

// play starts the reader's goroutine with the GOP replay gop.
func (r *reader) play(gop []*relay.Buffer) {
	r.gop = gop
	r.wg.Add(1)
	go r.run()
}

// started lets the reader's goroutine send: its PLAY response is out.
func (r *reader) started() { r.startOnce.Do(func() { close(r.start) }) }

func (r *reader) run() {
	defer r.wg.Done()
	select {
	case <-r.start:
	case <-r.ctx.Done():
		return
	}
	if len(r.gop) > 0 {
		r.pacer.Start(r.gop[0])
	}
	pace := time.NewTimer(0)
	<-pace.C
	ticker := time.NewTicker(dropLogInterval)
	defer ticker.Stop()
	var (
		pkt                        rtp.Packet
		reportedDrops, reportedErr uint64
		lastErr                    error
	)
	for {
		var b *relay.Buffer
		if len(r.gop) > 0 {
			b, r.gop[0], r.gop = r.gop[0], nil, r.gop[1:]
			if len(r.gop) == 0 {
				r.gop = nil // let the replay's array go
			}
		} else {
			select {
			case b = <-r.q.C():
			case <-ticker.C:
				if d := r.q.Dropped(); d != reportedDrops {
					r.log.Warn("RTSP reader too slow: packets dropped", "dropped", d-reportedDrops, "dropped_total", d)
					reportedDrops = d
				}
				if e := r.writeErrs.Load(); e != reportedErr {
					r.log.Warn("cannot write packets to an RTSP reader", "errors", e-reportedErr, "last_error", lastErr)
					reportedErr = e
				}
				continue
			case <-r.ctx.Done():
				return
			}
		}
		if w := r.pacer.Wait(b); w > 0 {
			pace.Reset(w)
			select {
			case <-pace.C:
			case <-r.ctx.Done():
				pace.Stop()
				b.Release()
				return
			}
		}
		if err := r.forward(&pkt, b); err != nil {
			r.writeErrs.Add(1)
			lastErr = err
		} else {
			r.sent.Add(1)
		}
		b.Release()
	}
}

// forward writes one relay packet to the reader, with the payload type of
// the RTSP description; gortsplib sets the SSRC.
func (r *reader) forward(pkt *rtp.Packet, b *relay.Buffer) error {
	if int(b.Track) >= len(r.tracks) || r.tracks[b.Track] == nil {
		return nil
	}
	t := r.tracks[b.Track]
	if err := pkt.Unmarshal(b.Data()); err != nil {
		return err
	}
	pkt.PayloadType = t.pt
	return r.ss.WritePacketRTP(t.media, pkt)
}

// close stops the reader's goroutine, releases its packets and disconnects
// its session (if it is still there). It is idempotent.
func (r *reader) close() {
	r.closeOnce.Do(func() {
		r.timer.Stop()
		r.cancel()
		r.wg.Wait()
		r.q.Drain()
		for _, b := range r.gop {
			b.Release()
		}
		r.gop = nil
		r.ss.Close()
	})
}
