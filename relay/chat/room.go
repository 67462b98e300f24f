package chat

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"sync"
	"time"

	"github.com/stemflow/stemflow/relay"
)

const (
	// roleInterval is how often a room that leads or follows checks where
	// its origin and parent are (the relay's routes move): the room follows
	// the stream's failover within it. A check asks the hub only.
	roleInterval = 50 * time.Millisecond
	// waitInterval is how often a room without a parent looks for one
	// (a check may ask etcd for the room's claim).
	waitInterval = 200 * time.Millisecond
	// retryAfter is how long a send forwarded upstream waits for its ack
	// before it is sent again on the same channel (a new channel resends at
	// once).
	retryAfter = 5 * time.Second
	// batchMax bounds the messages sequenced or applied in one store
	// transaction.
	batchMax = 1024
	// claimTimeout bounds asking the cluster for a room's claim.
	claimTimeout = 2 * time.Second
	// openTimeout bounds opening a channel to the parent and its first
	// frames.
	openTimeout = 3 * time.Second
)

// Room is one chat room at this node: the origin's sequencer or a replica
// following its parent. One goroutine (run) owns its history and decides;
// readers (clients, children) take snapshots with Read and wait on the
// channel it returns. Get rooms from Service.Acquire.
type Room struct {
	name     string
	svc      *Service
	log      *slog.Logger
	counters *roomCounters // the room's series while it is held here

	ctx     context.Context
	cancel  context.CancelFunc
	done    chan struct{}
	submits chan submission
	synced  chan struct{} // closed once the room has a history to serve
	syncOne sync.Once

	mu      sync.Mutex // guards the following fields; written only by run
	epoch   string
	hist    history       // the retained history; run appends to it past what readers' snapshots hold
	changed chan struct{} // closed (and replaced) when hist or epoch change
	role    string        // "origin", "follower", "waiting"
	parent  string

	// Owned by run.
	born     time.Time         // when the room started here
	leading  bool              // sequencing here now: commits are stored before they are seen
	ledEpoch string            // the epoch this node sequenced last
	claimed  bool              // this node led the room (since it started here)
	led      bool              // the last role taken was origin (or none yet)
	ids      map[uint64]uint64 // idHash(id) → seq of the retained messages (see sequenced)
	scratch  []byte            // Config.Encode's buffer
	batchIDs map[string]uint64 // sequence's, cleared for each batch
	fresh    []Msg             // sequence's
	acks     []Ack             // sequence's
	pending  map[string]*pendingSend
	order    []string       // pending ids in submission order (may hold resolved ones)
	carry    []*pendingSend // to send now: history carried over to a new origin (apply)
}

// submission is a message to sequence and where its ack goes.
type submission struct {
	msg  Msg // ID, Nick, Text
	acks chan<- Ack
}

// pendingSend is a message forwarded upstream and not acked yet.
type pendingSend struct {
	msg    Msg
	waiter []chan<- Ack
	sent   time.Time     // zero: not sent on the current channel
	first  [1]chan<- Ack // waiter's array while there is one waiter (most messages)
}

func newRoom(svc *Service, name string) *Room {
	ctx, cancel := context.WithCancel(svc.ctx)
	return &Room{
		name: name, svc: svc, log: svc.log.With("room", name), counters: svc.stats.room(name),
		ctx: ctx, cancel: cancel, done: make(chan struct{}),
		submits: make(chan submission, 4096),
		synced:  make(chan struct{}),
		changed: make(chan struct{}),
		ids:     make(map[uint64]uint64),
		pending: make(map[string]*pendingSend),
		led:     true,
		born:    time.Now(),
	}
}

// Name returns the room's name.
func (r *Room) Name() string { return r.name }

// Synced is closed once the room can serve its history: loaded at the
// origin, or joined to its parent.
func (r *Room) Synced() <-chan struct{} { return r.synced }

// View is a snapshot of a room's history after a point.
type View struct {
	Epoch       string
	First, Last uint64 // the retained history (First = Last+1 when none is)
	// Reset: the point asked belongs to another epoch or lies before the
	// retained history, so the messages start at First.
	Reset bool
	// Changed is closed when the history changes after this snapshot.
	Changed <-chan struct{}

	msgs history // the messages after the point asked
}

// Len returns the number of messages in the view.
func (v *View) Len() int { return v.msgs.len() }

// Msg returns the view's i-th message, oldest first. Its strings and frame
// are the room's memory: they never change, and they must not be changed.
func (v *View) Msg(i int) Msg { return v.msgs.at(v.msgs.first() + uint64(i)) }

// AnyEpoch asks Read for the current epoch, whichever it is.
const AnyEpoch = ""

// Read returns at most max (0: all) messages after seq after in epoch.
func (r *Room) Read(epoch string, after uint64, max int) View {
	r.mu.Lock()
	defer r.mu.Unlock()
	h := r.hist
	v := View{Epoch: r.epoch, First: h.first(), Last: h.last, Changed: r.changed}
	if epoch != AnyEpoch && epoch != r.epoch || after+1 < h.first() {
		v.Reset = true
		after = h.first() - 1
	}
	to := h.last
	if max > 0 && to > after+uint64(max) {
		to = after + uint64(max)
	}
	v.msgs = h.slice(after+1, to)
	return v
}

// Role says whether the room is this node's sequencer ("origin"), follows a
// parent ("follower", and which), or waits for a route ("waiting").
func (r *Room) Role() (role, parent string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.role, r.parent
}

// ErrRoomClosed: the room stopped (the node is closing).
var ErrRoomClosed = errors.New("chat room closed")

// Submit hands a message (already validated) to the room; its Ack, carrying
// its sequence number, goes to acks once the origin sequenced it (a message
// whose id the room has sequenced already is acked with its first sequence
// number and not sequenced again). acks must be buffered: a full channel
// loses the ack (the client retries).
func (r *Room) Submit(ctx context.Context, id, nick, text string, acks chan<- Ack) error {
	select {
	case r.submits <- submission{msg: Msg{ID: id, Nick: nick, Text: text}, acks: acks}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-r.ctx.Done():
		return ErrRoomClosed
	}
}

func (r *Room) close() {
	r.cancel()
	<-r.done
}

func (r *Room) setRole(role, parent string) {
	r.mu.Lock()
	r.role, r.parent = role, parent
	r.mu.Unlock()
}

// run owns the room: it loads the stored history, then leads or follows as
// the tree says, until the room closes.
//
// A room whose stream is not live anywhere is sequenced where its claim
// is (roleNotLive).
func (r *Room) run() {
	defer close(r.done)
	r.load()
	backoff := 50 * time.Millisecond
	if cl := r.svc.cfg.Claims; cl != nil {
		defer func() {
			// Briefly: a claim not released goes with the node's lease.
			ctx, cancel := context.WithTimeout(context.Background(), claimTimeout/4)
			defer cancel()
			cl.Release(ctx, r.name)
		}()
	}
	for r.ctx.Err() == nil {
		parent, origin, live := r.svc.role(r.name)
		if !live {
			parent, origin = r.roleNotLive()
		}
		switch {
		case origin:
			r.led, r.claimed = true, true
			if cl := r.svc.cfg.Claims; cl != nil && live {
				// The stream is live here: the room is sequenced here
				// after the stream ends too, until this node lets it go.
				ctx, cancel := context.WithTimeout(r.ctx, claimTimeout)
				if _, err := cl.Claim(ctx, r.name, true); err != nil {
					r.log.Debug("chat: taking the room's claim failed", "err", err)
				}
				cancel()
			}
			r.lead()
		case parent != "":
			r.led = false
			start := time.Now()
			err := r.follow(parent)
			if r.ctx.Err() != nil {
				return
			}
			if time.Since(start) > 2*time.Second {
				backoff = 50 * time.Millisecond
			}
			r.log.Debug("chat: channel to parent ended", "parent", parent, "err", err, "retry_in", backoff)
			r.wait(backoff)
			backoff = min(2*backoff, time.Second)
		default:
			r.setRole("waiting", "")
			r.wait(waitInterval)
		}
	}
}

// roleNotLive decides the room's role while its stream is not live
// anywhere this node knows of. With Config.Claims, the node holding the
// room's claim sequences it and every other node follows that node (when
// linked to it; else it waits); a room new here claims it only after
// ClaimAfter (a route may be on its way). Without Claims, or when the
// cluster does not answer, the room keeps the role it had: a room new here
// (after ClaimAfter) or one this node led is sequenced here; one that
// followed waits.
func (r *Room) roleNotLive() (parent string, origin bool) {
	young := !r.claimed && time.Since(r.born) < r.svc.cfg.ClaimAfter
	if cl := r.svc.cfg.Claims; cl != nil {
		ctx, cancel := context.WithTimeout(r.ctx, claimTimeout)
		defer cancel()
		var owner string
		var err error
		if young {
			owner, err = cl.Owner(ctx, r.name)
		} else {
			owner, err = cl.Claim(ctx, r.name, false)
		}
		if err == nil {
			switch owner {
			case "":
				return "", false
			case r.svc.cfg.Datacenter:
				return "", true
			}
			return owner, false
		}
		r.log.Debug("chat: the room's claim is unknown: the room keeps its role", "err", err)
	}
	return "", r.led && !young
}

// wait waits d, taking submissions meanwhile (they stay pending).
func (r *Room) wait(d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case s := <-r.submits:
			r.addPending(s)
		case <-t.C:
			return
		case <-r.ctx.Done():
			return
		}
	}
}

func (r *Room) markSynced() { r.syncOne.Do(func() { close(r.synced) }) }

// load reads the stored history, if the node has a store.
func (r *Room) load() {
	st := r.svc.cfg.Store
	if st == nil {
		return
	}
	epoch, msgs, err := st.load(r.name)
	if err != nil {
		r.log.Error("chat: reading the stored history failed: the room starts empty", "err", err)
		return
	}
	if epoch == "" {
		return
	}
	// Keep only a contiguous tail (a damaged store could have holes).
	msgs = contiguousTail(msgs)
	h := newHistory(0)
	if len(msgs) > 0 {
		h = newHistory(msgs[0].Seq - 1)
	}
	r.add(&h, msgs)
	r.mu.Lock()
	r.epoch, r.hist = epoch, h
	r.mu.Unlock()
	r.log.Debug("chat: history loaded", "epoch", epoch, "messages", len(msgs), "last_seq", h.last)
}

// contiguousTail returns the longest suffix of msgs whose sequence numbers
// follow one another.
func contiguousTail(msgs []Msg) []Msg {
	i := len(msgs) - 1
	for i > 0 && msgs[i-1].Seq+1 == msgs[i].Seq {
		i--
	}
	if i < 0 {
		return msgs
	}
	return msgs[i:]
}

func newEpoch() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// commit makes a batch part of the history, visible to readers. With a
// store, the origin's batches are stored first; a follower's are queued to
// be stored behind (Store.WriteBehind). With reset the history is replaced:
// the epoch is set and the next message is last+1. msgs are copied.
func (r *Room) commit(msgs []Msg, reset bool, epoch string, last uint64) {
	h := r.hist
	if reset {
		h = newHistory(last)
		clear(r.ids)
	} else {
		epoch = r.epoch
	}
	r.add(&h, msgs)
	// Retention: at most Count messages, none older than Age.
	ret := r.svc.cfg.Retention
	keep := h.first()
	if ret.Count > 0 && h.len() > ret.Count {
		keep = h.last + 1 - uint64(ret.Count)
	}
	if ret.Age > 0 {
		cutoff := time.Now().Add(-ret.Age)
		for keep <= h.last && h.ts(keep).Before(cutoff) {
			keep++
		}
	}
	if !reset && len(msgs) == 0 && keep == h.first() {
		return // nothing changes: wake no reader
	}
	trimBefore := uint64(0)
	if keep > h.first() {
		trimBefore = keep
		for seq := h.first(); seq < keep; seq++ {
			if k := idHash(h.at(seq).ID); r.ids[k] == seq {
				delete(r.ids, k)
			}
		}
		h.trim(keep)
	}
	if st := r.svc.cfg.Store; st != nil {
		// What is stored: the new messages retention keeps.
		kept := h.slice(max(h.first(), h.last+1-uint64(len(msgs))), h.last)
		stored := kept.msgs()
		if r.leading {
			// The origin's order: stored before anyone sees or acks it,
			// so a restart never numbers another message the same.
			if err := st.Write(r.name, epoch, reset, stored, trimBefore); err != nil {
				r.svc.warn("chat: storing messages failed: they are kept in memory only", "room", r.name, "err", err)
			}
		} else {
			// A follower's copy, which its parent holds: served at once,
			// stored within the store's delay. After a restart it fetches
			// from its parent what it had not stored.
			st.WriteBehind(r.name, epoch, reset, stored, trimBefore, func(err error) {
				r.svc.warn("chat: storing messages failed: they are kept in memory only", "room", r.name, "err", err)
			})
		}
	}
	r.mu.Lock()
	r.epoch, r.hist = epoch, h
	close(r.changed)
	r.changed = make(chan struct{})
	r.mu.Unlock()
	r.counters.sequenced.Add(uint64(len(msgs)))
}

// add appends msgs to h (the room's history or its next value), encoded,
// and keeps their ids.
func (r *Room) add(h *history, msgs []Msg) {
	for i := range msgs {
		r.scratch = h.append(&msgs[i], r.svc.cfg.Encode, r.scratch)
		r.ids[idHash(msgs[i].ID)] = h.last
	}
}

// lead sequences the room's messages while this node is its origin.
func (r *Room) lead() {
	r.leading = true
	defer func() { r.leading = false }()
	r.setRole("origin", "")
	if r.epoch == "" {
		r.commit(nil, true, newEpoch(), 0)
		r.log.Info("chat: new room", "epoch", r.epoch)
	}
	r.ledEpoch = r.epoch
	r.markSynced()
	// What waited for a parent is sequenced here now.
	var batch []submission
	for _, id := range r.order {
		if p := r.pending[id]; p != nil {
			for _, w := range p.waiter {
				batch = append(batch, submission{msg: p.msg, acks: w})
			}
		}
	}
	clear(r.pending)
	r.order = r.order[:0]
	r.sequence(batch)
	tick := time.NewTicker(roleInterval)
	defer tick.Stop()
	for {
		select {
		case s := <-r.submits:
			// Group commit without waiting: what was queued meanwhile
			// (while the last batch was stored) goes in this batch.
			batch = append(batch[:0], s)
		drain:
			for len(batch) < batchMax {
				select {
				case s := <-r.submits:
					batch = append(batch, s)
				default:
					break drain
				}
			}
			r.sequence(batch)
		case <-tick.C:
			if _, origin, live := r.svc.role(r.name); live && !origin {
				return
			}
			r.commit(nil, false, "", 0) // age retention
		case <-r.ctx.Done():
			return
		}
	}
}

// sequence gives each new message of a batch the next sequence number,
// stores them, and acks every submission.
func (r *Room) sequence(batch []submission) {
	if len(batch) == 0 {
		return
	}
	now := time.Now()
	if r.batchIDs == nil {
		r.batchIDs = make(map[string]uint64)
	}
	fresh, acks, batchIDs := r.fresh[:0], r.acks[:0], r.batchIDs
	for _, s := range batch {
		seq, ok := r.sequenced(s.msg.ID)
		if !ok {
			seq, ok = batchIDs[s.msg.ID]
		}
		if !ok {
			seq = r.hist.last + uint64(len(fresh)) + 1
			m := s.msg
			m.Seq, m.TS = seq, now
			fresh = append(fresh, m)
			batchIDs[m.ID] = seq
		} else {
			r.counters.dups.Add(1)
		}
		acks = append(acks, Ack{ID: s.msg.ID, Seq: seq})
	}
	r.commit(fresh, false, "", 0) // copies fresh
	for i, s := range batch {
		sendAck(s.acks, acks[i])
	}
	clear(fresh)
	clear(batchIDs)
	r.fresh, r.acks = fresh[:0], acks[:0]
}

// idSeed seeds idHash.
var idSeed = maphash.MakeSeed()

// idHash is a message id's key in Room.ids: the map holds no strings (the
// GC scans none), and a key found is checked against the history. A
// variable for the tests' collisions.
var idHash = func(id string) uint64 { return maphash.String(idSeed, id) }

// sequenced returns the sequence number of the retained message with the
// given id, if any. Two ids of one hash (one in 2^64 for a pair) keep the
// later in Room.ids: the earlier is then no longer recognised.
func (r *Room) sequenced(id string) (uint64, bool) {
	seq, ok := r.ids[idHash(id)]
	if !ok || seq < r.hist.first() || seq > r.hist.last || r.hist.at(seq).ID != id {
		return 0, false
	}
	return seq, true
}

func sendAck(c chan<- Ack, a Ack) {
	if c == nil {
		return
	}
	select {
	case c <- a:
	default:
	}
}

// addPending keeps a submission until its ack comes from upstream. It
// reports whether it is new (and must be sent).
func (r *Room) addPending(s submission) *pendingSend {
	if seq, ok := r.sequenced(s.msg.ID); ok {
		// Sequenced already (a retry after the ack was lost).
		sendAck(s.acks, Ack{ID: s.msg.ID, Seq: seq})
		return nil
	}
	if p := r.pending[s.msg.ID]; p != nil {
		for _, w := range p.waiter {
			if w == s.acks {
				return nil
			}
		}
		p.waiter = append(p.waiter, s.acks)
		return nil
	}
	p := &pendingSend{msg: s.msg, first: [1]chan<- Ack{s.acks}}
	p.waiter = p.first[:]
	r.pending[s.msg.ID] = p
	r.order = append(r.order, s.msg.ID)
	return p
}

func (r *Room) resolve(a Ack) {
	p := r.pending[a.ID]
	if p == nil {
		return
	}
	delete(r.pending, a.ID)
	for _, w := range p.waiter {
		sendAck(w, a)
	}
	if len(r.pending) == 0 {
		r.order = r.order[:0]
	}
}

// errGap ends a channel on which a message arrived out of sequence.
var errGap = errors.New("gap in the sequence from the parent")

// follow subscribes to the parent and applies what it sends, forwarding
// this node's sends, until the channel ends or the room's parent changes.
func (r *Room) follow(parent string) error {
	r.setRole("follower", parent)
	ctx, cancel := context.WithCancel(r.ctx)
	defer cancel()
	octx, ocancel := context.WithTimeout(ctx, openTimeout)
	ch, err := r.svc.cfg.Tree.OpenChannel(octx, parent, relay.ChannelChat)
	ocancel()
	if err != nil {
		return err
	}
	defer ch.Close()
	stop := context.AfterFunc(ctx, func() { ch.Close() })
	defer stop()
	bw := bufio.NewWriterSize(ch, 32<<10)
	var buf []byte
	write := func(f *frame) error {
		buf = appendFrame(buf[:0], f)
		_, err := bw.Write(buf)
		return err
	}
	if err := write(&frame{Type: frameSub, Room: r.name, Epoch: r.epoch, Since: r.hist.last}); err != nil {
		return err
	}
	resend := func(all bool) error {
		now := time.Now()
		live := r.order[:0]
		for _, id := range r.order {
			p := r.pending[id]
			if p == nil {
				continue
			}
			live = append(live, id)
			if !all && now.Sub(p.sent) < retryAfter {
				continue
			}
			if !p.sent.IsZero() || all {
				r.counters.retries.Add(1)
			}
			p.sent = now
			if err := write(&frame{Type: frameSend, Msg: p.msg}); err != nil {
				return err
			}
		}
		r.order = live
		return nil
	}
	for _, id := range r.order { // sent before on another channel, or never
		if p := r.pending[id]; p != nil && !p.sent.IsZero() {
			r.counters.retries.Add(1)
		}
		if p := r.pending[id]; p != nil {
			p.sent = time.Now()
			if err := write(&frame{Type: frameSend, Msg: p.msg}); err != nil {
				return err
			}
		}
	}
	if err := bw.Flush(); err != nil {
		return err
	}

	in := make(chan frame, 1024)
	readErr := make(chan error, 1)
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		br := bufio.NewReaderSize(ch, 32<<10)
		var scratch []byte
		for {
			f, b, err := readFrame(br, scratch)
			scratch = b
			if err != nil {
				readErr <- err
				return
			}
			select {
			case in <- f:
			case <-ctx.Done():
				readErr <- ctx.Err()
				return
			}
		}
	}()
	defer func() {
		cancel()
		ch.Close()
		<-readDone
	}()

	joined := false
	tick := time.NewTicker(roleInterval)
	defer tick.Stop()
	var msgs []Msg
	var acks []Ack
	for {
		select {
		case f := <-in:
			msgs, acks = msgs[:0], acks[:0]
			if err := r.apply(f, &joined, &msgs, &acks); err != nil {
				return err
			}
		drain:
			for len(msgs) < batchMax {
				select {
				case f := <-in:
					if err := r.apply(f, &joined, &msgs, &acks); err != nil {
						r.flushApplied(msgs, acks)
						return err
					}
				default:
					break drain
				}
			}
			r.flushApplied(msgs, acks)
			if len(r.carry) > 0 {
				for _, p := range r.carry {
					p.sent = time.Now()
					if err := write(&frame{Type: frameSend, Msg: p.msg}); err != nil {
						return err
					}
				}
				r.carry = r.carry[:0]
				if err := bw.Flush(); err != nil {
					return err
				}
			}
		case s := <-r.submits:
			if p := r.addPending(s); p != nil {
				p.sent = time.Now()
				if err := write(&frame{Type: frameSend, Msg: p.msg}); err != nil {
					return err
				}
			}
		more:
			for {
				select {
				case s := <-r.submits:
					if p := r.addPending(s); p != nil {
						p.sent = time.Now()
						if err := write(&frame{Type: frameSend, Msg: p.msg}); err != nil {
							return err
						}
					}
				default:
					break more
				}
			}
			if err := bw.Flush(); err != nil {
				return err
			}
		case <-tick.C:
			if p, origin, live := r.svc.role(r.name); live && (origin || p != parent) {
				return fmt.Errorf("the room's parent is now %q (origin here: %v)", p, origin)
			}
			r.commit(nil, false, "", 0) // age retention
			if err := resend(false); err != nil {
				return err
			}
			if err := bw.Flush(); err != nil {
				return err
			}
		case err := <-readErr:
			return err
		case <-r.ctx.Done():
			return r.ctx.Err()
		}
	}
}

// apply takes one frame from the parent: messages are gathered in msgs (to
// commit as one batch), acks in acks.
func (r *Room) apply(f frame, joined *bool, msgs *[]Msg, acks *[]Ack) error {
	switch f.Type {
	case frameJoined:
		r.flushApplied(*msgs, *acks)
		*msgs, *acks = (*msgs)[:0], (*acks)[:0]
		if f.Reset || f.Epoch != r.epoch {
			var carry []Msg
			if r.epoch != "" && f.Epoch != r.epoch {
				r.log.Info("chat: the room's history was replaced upstream", "epoch", f.Epoch, "old_epoch", r.epoch)
				if f.First > f.Last || r.epoch == r.ledEpoch {
					// The origin's room is new and empty, or this node
					// sequenced the history it holds (before the room's
					// stream went live: its first clients were here). Its
					// messages move to the origin, in order, renumbered,
					// instead of being lost; the origin takes each id
					// once, so what a follower of this node carried there
					// first is not repeated.
					carry = r.hist.msgs()
				}
			}
			r.commit(nil, true, f.Epoch, f.First-1)
			for _, m := range carry {
				if p := r.addPending(submission{msg: Msg{ID: m.ID, Nick: m.Nick, Text: m.Text}}); p != nil {
					r.carry = append(r.carry, p)
				}
			}
			if len(carry) > 0 {
				r.log.Info("chat: history carried over to the room's origin", "messages", len(carry))
			}
		}
		*joined = true
		r.markSynced()
	case frameMsg:
		if !*joined {
			return fmt.Errorf("parent sent a message before joining")
		}
		want := r.hist.last + uint64(len(*msgs)) + 1
		if f.Msg.Seq < want {
			return nil // had it (a parent that is behind us replays less than it could)
		}
		if f.Msg.Seq > want {
			r.counters.gaps.Add(1)
			return fmt.Errorf("%w: message %d after %d", errGap, f.Msg.Seq, want-1)
		}
		*msgs = append(*msgs, f.Msg)
	case frameAck:
		*acks = append(*acks, Ack{ID: f.Msg.ID, Seq: f.Seq})
	case frameError:
		return fmt.Errorf("parent refused: %s: %s", f.Code, f.Reason)
	default:
		return fmt.Errorf("unexpected frame type %d from the parent", f.Type)
	}
	return nil
}

// flushApplied commits the messages gathered and settles what they ack.
func (r *Room) flushApplied(msgs []Msg, acks []Ack) {
	if len(msgs) > 0 {
		r.commit(msgs, false, "", 0)
		for _, m := range msgs {
			r.resolve(Ack{ID: m.ID, Seq: m.Seq})
		}
	}
	for _, a := range acks {
		r.resolve(a)
	}
}
