package rtsp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/bluenviron/gortsplib/v4"
	"github.com/bluenviron/gortsplib/v4/pkg/description"
	"github.com/pion/rtp"

	"github.com/stemflow/stemflow/relay"
)

var errNoRTSPTrack = errors.New("stream has no H264, VP8 or Opus track to serve over RTSP")

// dropLogInterval is the shortest time between two log lines about dropped
// packets.
const dropLogInterval = 10 * time.Second

// stream is one hub stream served to this node's RTSP readers. Its goroutine
// (run) owns the path from the hub queue to the ServerStream.
type stream struct {
	e    *Egress
	name string
	log  *slog.Logger

	ready chan struct{} // closed once open returned; then err, or the fields below, are set
	err   error

	sub    *relay.Subscription
	q      *relay.Queue
	ss     *gortsplib.ServerStream
	tracks []*outTrack // by relay track number
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	once   sync.Once

	// gate is held by run while it forwards a packet, and by a new reader
	// from its PLAY until the PLAY response: the reader gets the GOP cache,
	// then every live packet, with nothing lost or doubled between the two.
	gate chan struct{}
	// Packets since the last video keyframe; guarded by gate.
	gop relay.GOPCache

	// guarded by e.mu
	readers int
	idle    *time.Timer
}

// gopMaxPackets bounds the GOP cache of a stream.
const gopMaxPackets = 4096

// open subscribes to the hub and creates the ServerStream.
func (st *stream) open() error {
	cfg := &st.e.cfg
	ctx, cancel := context.WithTimeout(context.Background(), cfg.SubscribeTimeout)
	defer cancel()
	st.q = relay.NewQueue(cfg.QueueSize)
	sub, err := cfg.Hub.Subscribe(ctx, st.name, st.q)
	if err != nil {
		return err
	}
	desc, tracks := describe(sub.Description())
	if len(desc.Medias) == 0 {
		sub.Close()
		st.q.Drain()
		return errNoRTSPTrack
	}
	ss := &gortsplib.ServerStream{Server: cfg.Server, Desc: desc}
	if err := ss.Initialize(); err != nil {
		sub.Close()
		st.q.Drain()
		return fmt.Errorf("RTSP server not running: %w", err)
	}
	st.sub, st.ss, st.tracks = sub, ss, tracks
	st.gate = make(chan struct{}, 1)
	st.ctx, st.cancel = context.WithCancel(context.Background())
	st.wg.Add(1)
	go st.run()
	st.log.Info("serving stream over RTSP", "tracks", len(desc.Medias))
	return nil
}

// run forwards the hub's packets to the readers until the stream ends or the
// last reader leaves.
func (st *stream) run() {
	defer st.wg.Done()
	defer st.shutdown()
	ticker := time.NewTicker(dropLogInterval)
	defer ticker.Stop()
	var (
		pkt                rtp.Packet
		reportedDrops      uint64
		writeErrs, lastErr uint64
		err                error
	)
	for {
		select {
		case b := <-st.q.C():
			select {
			case st.gate <- struct{}{}:
			case <-st.ctx.Done():
				b.Release()
				return
			}
			if err = st.forward(&pkt, b); err != nil {
				writeErrs++
			}
			st.cache(b)
			<-st.gate
		case <-ticker.C:
			if d := st.q.Dropped(); d != reportedDrops {
				st.log.Warn("RTSP readers too slow: packets dropped", "dropped", d-reportedDrops, "dropped_total", d)
				reportedDrops = d
			}
			if writeErrs != lastErr {
				st.log.Warn("cannot forward packets to RTSP readers", "errors", writeErrs-lastErr, "last_error", err)
				lastErr = writeErrs
			}
		case <-st.sub.Done():
			st.log.Info("stream ended: disconnecting RTSP readers", "reason", st.sub.Err())
			st.e.forget(st)
			return
		case <-st.ctx.Done():
			return
		}
	}
}

// forward writes one relay packet to the readers, with the payload type of
// the RTSP description; gortsplib sets each reader's SSRC.
func (st *stream) forward(pkt *rtp.Packet, b *relay.Buffer) error {
	if int(b.Track) >= len(st.tracks) || st.tracks[b.Track] == nil {
		return nil
	}
	t := st.tracks[b.Track]
	if err := pkt.Unmarshal(b.Data()); err != nil {
		return err
	}
	pkt.PayloadType = t.pt
	return st.ss.WritePacketRTP(t.media, pkt)
}

// cache keeps b in the GOP cache, or releases it. The caller holds the gate.
func (st *stream) cache(b *relay.Buffer) {
	if int(b.Track) >= len(st.tracks) || st.tracks[b.Track] == nil {
		b.Release()
		return
	}
	st.gop.AddBuffer(b)
}

// replay writes the GOP cache to one new reader. The caller holds the gate
// and runs on the session's goroutine (in OnPlay), before the session is
// active: the packets go out right after the PLAY response.
func (st *stream) replay(ss *gortsplib.ServerSession) {
	setup := make(map[*description.Media]bool)
	for _, m := range ss.SetuppedMedias() {
		setup[m] = true
	}
	var pkt rtp.Packet
	for _, b := range st.gop.Packets() {
		t := st.tracks[b.Track]
		if !setup[t.media] || pkt.Unmarshal(b.Data()) != nil {
			continue
		}
		pkt.PayloadType = t.pt
		if err := ss.WritePacketRTP(t.media, &pkt); err != nil {
			st.log.Debug("GOP replay cut short", "error", err)
			return
		}
	}
}

// shutdown releases what open acquired. Run by run on its way out.
func (st *stream) shutdown() {
	st.sub.Close()
	st.q.Drain()
	st.ss.Close()         // disconnects the readers
	st.gate <- struct{}{} // wait out a PLAY in progress
	st.gop.Reset()
	<-st.gate
}

// close stops the stream and waits for its goroutine. It is idempotent and
// must not be called with e.mu held.
func (st *stream) close() {
	st.once.Do(func() {
		st.e.mu.Lock()
		st.stopIdleTimerLocked()
		st.e.mu.Unlock()
		if st.cancel != nil {
			st.cancel()
			st.wg.Wait()
		}
	})
}

func (st *stream) stopIdleTimerLocked() {
	if st.idle != nil {
		st.idle.Stop()
		st.idle = nil
	}
}
