package rtsp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/bluenviron/gortsplib/v4"

	"github.com/stemflow/stemflow/relay"
)

var errNoRTSPTrack = errors.New("stream has no H264, VP8 or Opus track to serve over RTSP")

// dropLogInterval is the shortest time between two log lines about dropped
// packets.
const dropLogInterval = 10 * time.Second

// stream is one hub stream served to this node's RTSP readers. Its goroutine
// (run) owns the path from the hub queue to the readers' queues.
type stream struct {
	e    *Egress
	name string
	log  *slog.Logger

	ready chan struct{} // closed once open returned; then err, or the fields below, are set
	err   error

	sub    *relay.Subscription
	q      *relay.Queue
	ss     *gortsplib.ServerStream // describes the stream; readers have their own
	tracks []*outTrack             // by relay track number
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	once   sync.Once

	mu sync.Mutex // guards the following fields
	// Packets since the last video keyframe, replayed to each new reader.
	gop relay.GOPCache
	// The readers from their PLAY on: run queues them every packet.
	playing []*reader
	// Every reader set up, playing or not, to disconnect when the stream
	// ends.
	all    map[*reader]struct{}
	closed bool // shut down: no more readers

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
	st.all = make(map[*reader]struct{})
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
	var reportedDrops uint64
	for {
		select {
		case b := <-st.q.C():
			st.fanOut(b)
		case <-ticker.C:
			if d := st.q.Dropped(); d != reportedDrops {
				st.log.Warn("RTSP readers' stream too slow: packets dropped", "dropped", d-reportedDrops, "dropped_total", d)
				reportedDrops = d
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

// fanOut queues b to every playing reader and keeps it in the GOP cache, in
// one step with respect to a new reader's PLAY (see addPlaying). The
// readers' queues never block.
func (st *stream) fanOut(b *relay.Buffer) {
	if int(b.Track) >= len(st.tracks) || st.tracks[b.Track] == nil {
		b.Release()
		return
	}
	st.mu.Lock()
	for _, r := range st.playing {
		b.Retain()
		r.q.WriteBuffer(b)
	}
	st.gop.AddBuffer(b)
	st.mu.Unlock()
}

// addReader makes a reader for a new session; nil when the stream is shut
// down.
func (st *stream) addReader(log *slog.Logger) (*reader, error) {
	r, err := newReader(st, log, st.e.cfg.QueueSize)
	if err != nil {
		return nil, err
	}
	st.mu.Lock()
	if st.closed {
		st.mu.Unlock()
		r.close()
		return nil, nil
	}
	st.all[r] = struct{}{}
	st.mu.Unlock()
	return r, nil
}

// addPlaying starts r: it gets the GOP cache, then every packet after it.
// It reports false when the stream has shut down.
func (st *stream) addPlaying(r *reader) bool {
	st.mu.Lock()
	if st.closed {
		st.mu.Unlock()
		return false
	}
	gop := make([]*relay.Buffer, 0, len(st.gop.Packets()))
	for _, b := range st.gop.Packets() {
		b.Retain()
		gop = append(gop, b)
	}
	st.playing = append(st.playing, r)
	st.mu.Unlock()
	r.play(gop)
	return true
}

// removeReader stops r and forgets it.
func (st *stream) removeReader(r *reader) {
	st.mu.Lock()
	delete(st.all, r)
	for i, x := range st.playing {
		if x == r {
			st.playing = append(st.playing[:i:i], st.playing[i+1:]...)
			break
		}
	}
	st.mu.Unlock()
	r.close()
}

// shutdown releases what open acquired and disconnects the readers. Run by
// run on its way out.
func (st *stream) shutdown() {
	st.sub.Close()
	st.q.Drain()
	st.mu.Lock()
	st.closed = true
	st.gop.Reset()
	st.playing = nil
	readers := make([]*reader, 0, len(st.all))
	for r := range st.all {
		readers = append(readers, r)
	}
	st.all = nil
	st.mu.Unlock()
	for _, r := range readers {
		r.close() // disconnects its session
	}
	st.ss.Close()
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
