package chat

import (
	"cmp"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Store keeps rooms' histories in one bbolt file, so that a node restarts
// with the history and epoch of every room it held. Layout: a top bucket per
// room (named like it) holding the key "epoch" and a bucket "msgs" of
// blocks of consecutive messages by the 8-byte big-endian sequence number
// of their first (values: appendBlock; one message each, appendStored or
// JSON, in files written before blocks). A batch of a room's changes is a
// block: bbolt's work, and its garbage, are per key.
//
// bbolt rather than etcd: every message of every room is written at every
// node that holds the room, thousands a second; etcd is the control plane's
// and is not for data of that volume.
//
// One goroutine writes (group commit): every change queued while it
// commits goes into its next transaction, whatever the room. A change
// queued with Write is in the file when Write returns (the origin's: it
// acks and serves only what is stored); one queued with WriteBehind (a
// follower's copy, which its parent holds) waits up to storeBehind (20 ms)
// for company, so followers commit a few dozen times a second rather than
// once per batch. A Store is safe for concurrent use; changes of one room
// are applied in the order queued.
//
// In the file is not yet on the disk: with a SyncInterval, a Write is
// appended to the journal (see journal: one write, to the kernel's page
// cache, which outlives the process: a node killed or crashed keeps it)
// and goes into bbolt behind, like WriteBehind; journal and bbolt are
// flushed to the disk (fsync) at most SyncInterval later, in the
// background, so that no message waits for the disk or for a bbolt
// commit. Only the machine's crash can lose what was not flushed; the
// store notices at the next open (see markOpen) and gives every room a new
// epoch, so that no client mistakes a renumbered message for one it has.
// Without a SyncInterval every Write is a bbolt commit flushed before it
// counts.
type Store struct {
	db        *bolt.DB
	behind    time.Duration
	syncEvery time.Duration
	log       *slog.Logger
	queue     chan *storeReq // closed by Close
	done      chan struct{}
	dirty     atomic.Bool   // committed since the last flush
	stopSync  chan struct{} // closed by Close
	syncDone  chan struct{}
	renewed   int // see Renewed

	mu     sync.RWMutex // guards closed; senders on queue hold it shared
	closed bool

	jdir string
	jmu  sync.Mutex // guards j; held across an append and its queueing, so that the queue is in the journal's order
	j    *journal   // nil without a SyncInterval, or after the journal failed

	removedBelow uint64 // journal files below it are gone (run's)

	// abandon makes run end without committing what is queued, as the
	// node's death does (tests).
	abandon atomic.Bool
}

// ErrStoreClosed: a write queued after Close.
var ErrStoreClosed = errors.New("chat store: closed")

// storeReq is one batch of a room's changes (see Store.write).
type storeReq struct {
	room, epoch string
	reset       bool
	msgs        []Msg // not changed after queueing
	trimBefore  uint64
	durable     chan error // Write waits on it; nil for WriteBehind
	failed      func(error)
	journaled   bool   // in the journal, in file jnum
	jnum        uint64 // see journaled
}

const (
	// storeBehind is how long a follower's changes may wait for others to
	// share their transaction.
	storeBehind = 20 * time.Millisecond
	// storeBatchMax bounds the messages of one transaction.
	storeBatchMax = 8192
	// trimChunk is how many messages retention drops from the file at
	// once: a room at its count then deletes in one transaction of a
	// thousand rather than a few in each (rewriting the file's first
	// pages every time). Loading keeps the count (Room.load).
	trimChunk = 1024
)

// storedMsg is a message's value in the store as first written (JSON);
// values are binary now (appendStored), read either way.
type storedMsg struct {
	ID   string    `json:"id"`
	Nick string    `json:"nick"`
	Text string    `json:"text"`
	TS   time.Time `json:"ts"`
}

var (
	keyEpoch = []byte("epoch")
	// keyFirst holds the first sequence number retention keeps (8 bytes
	// big-endian); messages before it may still be in the file.
	keyFirst   = []byte("first")
	bucketMsgs = []byte("msgs")
)

// StoreOptions tune a Store.
type StoreOptions struct {
	// SyncInterval bounds how long a commit waits to be flushed to the
	// disk (see Store). 0 flushes every commit before it counts.
	SyncInterval time.Duration
	// Logger hears of failed flushes and of rooms renewed at open.
	Logger *slog.Logger

	bootID string // tests: this boot's id instead of the machine's
}

// DefaultSyncInterval is the SyncInterval nodes use unless configured.
const DefaultSyncInterval = 100 * time.Millisecond

var (
	// bucketMeta holds the store's own keys; no room has its name (room
	// names are stream names).
	bucketMeta = []byte("\x00stemflow")
	// keyOpen is there while a store with a SyncInterval has the file
	// open; its value is the machine's boot id then.
	keyOpen = []byte("open")
)

// OpenStore opens (or creates) dir/chat.db. Close it when done.
func OpenStore(dir string, opts StoreOptions) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("chat store: %w", err)
	}
	path := filepath.Join(dir, "chat.db")
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second, NoSync: opts.SyncInterval > 0})
	if err != nil {
		return nil, fmt.Errorf("chat store %s: %w (is another node using this data directory?)", path, err)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	st := &Store{db: db, behind: storeBehind, syncEvery: opts.SyncInterval, log: log,
		queue: make(chan *storeReq, 1024), done: make(chan struct{}),
		stopSync: make(chan struct{}), syncDone: make(chan struct{}),
		jdir: filepath.Join(dir, "journal")}
	next, err := st.replay()
	if err == nil {
		err = st.markOpen(cmp.Or(opts.bootID, bootID()))
	}
	if err == nil && st.syncEvery > 0 {
		st.j, err = openJournal(st.jdir, next)
	}
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("chat store %s: %w", path, err)
	}
	st.removedBelow = next
	if st.renewed > 0 {
		log.Warn("chat store: the machine restarted while messages were not yet flushed to disk; the last of them may be lost, so every room starts a new epoch (clients are told and get the history)",
			"path", path, "rooms", st.renewed)
	}
	go st.run()
	if st.syncEvery > 0 {
		go st.syncLoop()
	} else {
		close(st.syncDone)
	}
	return st, nil
}

// replay applies what the journal holds to bbolt (a node that died left
// it) and removes its files. It returns the number of the next file.
func (s *Store) replay() (next uint64, err error) {
	nums, err := journalFiles(s.jdir)
	if err != nil || len(nums) == 0 {
		return 1, err
	}
	records := 0
	err = s.db.Update(func(tx *bolt.Tx) error {
		for _, n := range nums {
			path := journalPath(s.jdir, n)
			damaged, err := readJournal(path, func(req *storeReq) error {
				records++
				return applyStored(tx, req)
			})
			if err != nil {
				return fmt.Errorf("replaying %s: %w", path, err)
			}
			if damaged != nil {
				s.log.Warn("chat store: the journal ends in a damaged record (a write cut short); what follows it is ignored", "file", path, "err", damaged)
			}
		}
		return nil
	})
	if err == nil {
		err = s.db.Sync()
	}
	if err == nil {
		err = removeJournals(s.jdir, nums[len(nums)-1]+1)
	}
	if err != nil {
		return 0, err
	}
	s.log.Info("chat store: batches replayed from the journal", "records", records)
	return nums[len(nums)-1] + 1, nil
}

// Renewed returns how many rooms OpenStore gave a new epoch because the
// machine restarted with changes not flushed.
func (s *Store) Renewed() int { return s.renewed }

// markOpen decides, at open, whether the file may have lost commits: it
// did when the key "open" is there (the last store with a SyncInterval
// did not close) and holds another boot id than this one (the machine
// restarted since; a process that died left its commits in the page
// cache). Then every room gets a new epoch. With a SyncInterval the key
// is set to this boot (flushed before any commit), else removed.
func (s *Store) markOpen(boot string) error {
	err := s.db.Update(func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucketIfNotExists(bucketMeta)
		if err != nil {
			return err
		}
		if prev := meta.Get(keyOpen); prev != nil && (boot == "" || string(prev) != boot) {
			err := tx.ForEach(func(name []byte, b *bolt.Bucket) error {
				if b.Get(keyEpoch) == nil {
					return nil
				}
				s.renewed++
				return b.Put(keyEpoch, []byte(newEpoch()))
			})
			if err != nil {
				return err
			}
		}
		if s.syncEvery > 0 {
			return meta.Put(keyOpen, []byte(cmp.Or(boot, "unknown")))
		}
		return meta.Delete(keyOpen)
	})
	if err != nil {
		return err
	}
	return s.db.Sync()
}

// bootID names this boot of the machine ("" where the system does not
// say: then any store left open counts as lost).
func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// syncJournal flushes the journal's file being written, beside appends.
func (s *Store) syncJournal() error {
	s.jmu.Lock()
	var f *os.File
	if s.j != nil {
		f = s.j.file()
	}
	s.jmu.Unlock()
	if f == nil {
		return nil
	}
	if err := f.Sync(); err != nil && !errors.Is(err, os.ErrClosed) {
		return err // closed: the journal went on to its next file, flushing this one
	}
	return nil
}

// syncLoop flushes the file every syncEvery when something was committed.
func (s *Store) syncLoop() {
	defer close(s.syncDone)
	t := time.NewTicker(s.syncEvery)
	defer t.Stop()
	failing := false
	for {
		select {
		case <-t.C:
		case <-s.stopSync:
			return
		}
		if !s.dirty.Swap(false) {
			continue
		}
		err := errors.Join(s.syncJournal(), s.db.Sync())
		switch {
		case err != nil && !failing:
			s.log.Error("chat store: flushing to disk failed: messages are in the file but a crash of the machine could lose them", "err", err)
		case err == nil && failing:
			s.log.Info("chat store: flushing to disk works again")
		}
		failing = err != nil
		if err != nil {
			s.dirty.Store(true)
		}
	}
}

// Close writes what is queued and closes the file. Writes after Close fail
// with ErrStoreClosed.
func (s *Store) Close() error {
	if !s.stop() {
		return nil
	}
	// Everything queued is in bbolt: the journal goes.
	s.jmu.Lock()
	var err error
	if s.j != nil {
		err = s.j.close()
		s.j = nil
	}
	s.jmu.Unlock()
	err = errors.Join(err, s.db.Sync())
	if err == nil {
		err = removeJournals(s.jdir, math.MaxUint64)
	}
	err = errors.Join(err, s.db.Update(func(tx *bolt.Tx) error {
		if meta := tx.Bucket(bucketMeta); meta != nil {
			return meta.Delete(keyOpen)
		}
		return nil
	}))
	if err == nil {
		err = s.db.Sync()
	}
	return errors.Join(err, s.db.Close())
}

// stop refuses further writes and waits for the writer (which commits
// what is queued, unless abandoned) and the flusher to end. It reports
// false when the store was stopped already.
func (s *Store) stop() bool {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return false
	}
	s.closed = true
	close(s.queue)
	s.mu.Unlock()
	<-s.done
	close(s.stopSync)
	<-s.syncDone
	return true
}

// enqueue queues req, unless the store is closed.
func (s *Store) enqueue(req *storeReq) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return ErrStoreClosed
	}
	s.queue <- req // the writer drains it without the lock
	return nil
}

// Write queues a batch of a room's changes and returns once it is stored
// (in the journal, or committed): with reset, every message goes and the
// epoch is set; then msgs are added and the messages before trimBefore
// deleted. msgs must not change afterwards.
func (s *Store) Write(room, epoch string, reset bool, msgs []Msg, trimBefore uint64) error {
	req := &storeReq{room: room, epoch: epoch, reset: reset, msgs: msgs, trimBefore: trimBefore}
	if s.journal(req) {
		return nil
	}
	req.durable = make(chan error, 1)
	if err := s.enqueue(req); err != nil {
		return err
	}
	return <-req.durable
}

// journal appends req to the journal and queues it behind; false: there
// is no journal (or it failed now), or the store is closed.
func (s *Store) journal(req *storeReq) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return false
	}
	s.jmu.Lock()
	defer s.jmu.Unlock()
	if s.j == nil {
		return false
	}
	num, err := s.j.append(req)
	if err != nil {
		s.log.Error("chat store: writing the journal failed: the origin's batches wait for bbolt's commits from now on", "err", err)
		s.j = nil
		return false
	}
	req.journaled, req.jnum = true, num
	s.dirty.Store(true)
	s.queue <- req
	return true
}

// WriteBehind queues a batch like Write but does not wait: it is stored
// within the behind delay (failed, when set, hears if it was not). msgs
// must not change afterwards.
func (s *Store) WriteBehind(room, epoch string, reset bool, msgs []Msg, trimBefore uint64, failed func(error)) {
	if err := s.enqueue(&storeReq{room: room, epoch: epoch, reset: reset, msgs: msgs, trimBefore: trimBefore, failed: failed}); err != nil && failed != nil {
		failed(err)
	}
}

// run commits the queue: a batch waited for (Write) goes at once with
// whatever is queued; batches behind wait up to s.behind for more.
func (s *Store) run() {
	defer close(s.done)
	var batch []*storeReq
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		req, ok := <-s.queue
		if !ok {
			return
		}
		batch = append(batch[:0], req)
		urgent, n := req.durable != nil, len(req.msgs)
		if !urgent {
			timer.Reset(s.behind)
		}
	gather:
		for n < storeBatchMax {
			if urgent {
				select {
				case req, ok := <-s.queue:
					if !ok {
						break gather
					}
					batch = append(batch, req)
					n += len(req.msgs)
				default:
					break gather
				}
				continue
			}
			select {
			case req, ok := <-s.queue:
				if !ok {
					break gather
				}
				batch = append(batch, req)
				n += len(req.msgs)
				urgent = req.durable != nil
			case <-timer.C:
				break gather
			}
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		if s.abandon.Load() {
			return
		}
		err := s.commit(batch)
		if err == nil {
			s.dirty.Store(true)
			s.dropJournal(batch)
		}
		for _, req := range batch {
			switch {
			case req.durable != nil:
				req.durable <- err
			case err != nil && req.failed != nil:
				req.failed(err)
			}
		}
		clear(batch)
	}
}

// dropJournal removes the journal's files whose batches are all in bbolt
// now: those before the file of the last journaled batch committed (the
// queue is in the journal's order). bbolt is flushed first, since the
// journal may be the only copy on the disk.
func (s *Store) dropJournal(batch []*storeReq) {
	below := s.removedBelow
	for _, req := range batch {
		if req.journaled {
			below = max(below, req.jnum)
		}
	}
	if below == s.removedBelow {
		return
	}
	err := s.db.Sync()
	if err == nil {
		err = removeJournals(s.jdir, below)
	}
	if err != nil {
		s.log.Error("chat store: removing the journal's applied files failed", "err", err)
		return
	}
	s.removedBelow = below
}

// commit applies batches in one transaction.
func (s *Store) commit(batch []*storeReq) error {
	err := s.db.Update(func(tx *bolt.Tx) error {
		for _, req := range batch {
			if err := applyStored(tx, req); err != nil {
				return fmt.Errorf("room %s: %w", req.room, err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("chat store: %w", err)
	}
	return nil
}

func seqKey(seq uint64) []byte { return binary.BigEndian.AppendUint64(nil, seq) }

// flush returns once what was queued before is committed.
func (s *Store) flush() {
	req := &storeReq{durable: make(chan error, 1)}
	if s.enqueue(req) == nil {
		<-req.durable
	}
}

// load returns a room's epoch ("" when the store does not hold the room) and
// its messages in order.
func (s *Store) load(room string) (epoch string, msgs []Msg, err error) {
	s.flush()
	err = s.db.View(func(tx *bolt.Tx) error {
		rb := tx.Bucket([]byte(room))
		if rb == nil {
			return nil
		}
		epoch = string(rb.Get(keyEpoch))
		mb := rb.Bucket(bucketMsgs)
		if mb == nil {
			return nil
		}
		var first uint64
		if v := rb.Get(keyFirst); len(v) == 8 {
			first = binary.BigEndian.Uint64(v)
		}
		return mb.ForEach(func(k, v []byte) error {
			if len(k) != 8 {
				return fmt.Errorf("room %s: bad key %x", room, k)
			}
			if storedLast(k, v) < first {
				return nil // trimmed, not yet deleted
			}
			return parseValue(binary.BigEndian.Uint64(k), v, func(m Msg) error {
				if m.Seq >= first && (len(msgs) == 0 || m.Seq > msgs[len(msgs)-1].Seq) {
					msgs = append(msgs, m)
				}
				return nil
			})
		})
	})
	if err != nil {
		return "", nil, fmt.Errorf("chat store: %w", err)
	}
	return epoch, msgs, nil
}

// applyStored applies one batch of a room's changes.
func applyStored(tx *bolt.Tx, req *storeReq) error {
	if req.room == "" {
		return nil // Store.flush's
	}
	room := []byte(req.room)
	if req.reset {
		if tx.Bucket(room) != nil {
			if err := tx.DeleteBucket(room); err != nil {
				return err
			}
		}
	}
	rb, err := tx.CreateBucketIfNotExists(room)
	if err != nil {
		return err
	}
	if req.reset || rb.Get(keyEpoch) == nil {
		if err := rb.Put(keyEpoch, []byte(req.epoch)); err != nil {
			return err
		}
	}
	mb, err := rb.CreateBucketIfNotExists(bucketMsgs)
	if err != nil {
		return err
	}
	for msgs := req.msgs; len(msgs) > 0; {
		n := 1
		for n < len(msgs) && n < blockMax && msgs[n].Seq == msgs[n-1].Seq+1 {
			n++
		}
		if err := mb.Put(seqKey(msgs[0].Seq), appendBlock(nil, msgs[:n])); err != nil {
			return err
		}
		msgs = msgs[n:]
	}
	if req.trimBefore > 0 {
		// What is before "first" is gone for readers at once; it leaves
		// the file in chunks.
		if err := rb.Put(keyFirst, seqKey(req.trimBefore)); err != nil {
			return err
		}
		// Seek again after each delete: Next after a cursor's Delete
		// may skip a key.
		c := mb.Cursor()
		if k, _ := c.First(); k == nil || binary.BigEndian.Uint64(k)+trimChunk > req.trimBefore {
			return nil // the next trims take these along
		}
		for k, v := c.First(); k != nil && storedLast(k, v) < req.trimBefore; k, v = c.First() {
			if err := c.Delete(); err != nil {
				return err
			}
		}
	}
	return nil
}

// storedBlock marks a block value: uvarint count, then per message (from
// the key's sequence number on) uvarint ts (unix nanos), then id, nick and
// text, each uvarint-prefixed.
const storedBlock = 2

// blockMax bounds the messages of a block (what a trim leaves behind in
// the file until the block's last message goes).
const blockMax = 256

// appendBlock appends msgs (consecutive) as a block value.
func appendBlock(b []byte, msgs []Msg) []byte {
	if b == nil {
		n := 8
		for i := range msgs {
			n += 16 + len(msgs[i].ID) + len(msgs[i].Nick) + len(msgs[i].Text)
		}
		b = make([]byte, 0, n)
	}
	b = append(b, storedBlock)
	b = binary.AppendUvarint(b, uint64(len(msgs)))
	for i := range msgs {
		m := &msgs[i]
		b = binary.AppendUvarint(b, uint64(m.TS.UnixNano()))
		b = appendString(b, m.ID)
		b = appendString(b, m.Nick)
		b = appendString(b, m.Text)
	}
	return b
}

// storedLast returns the sequence number of the last message a value at
// key holds.
func storedLast(key, v []byte) uint64 {
	seq := binary.BigEndian.Uint64(key)
	if len(v) > 0 && v[0] == storedBlock {
		if n, k := binary.Uvarint(v[1:]); k > 0 && n > 0 {
			return seq + n - 1
		}
	}
	return seq
}

// parseValue calls fn with each message of a value at sequence number seq.
func parseValue(seq uint64, v []byte, fn func(Msg) error) error {
	if len(v) == 0 || v[0] != storedBlock {
		m, err := parseStored(v)
		if err != nil {
			return fmt.Errorf("message %d: %w", seq, err)
		}
		m.Seq = seq
		return fn(m)
	}
	d := decoder{b: v[1:]}
	n := d.uint()
	for i := range n {
		ts := d.uint()
		m := Msg{Seq: seq + i, ID: d.str(), Nick: d.str(), Text: d.str(), TS: time.Unix(0, int64(ts))}
		if d.bad {
			return fmt.Errorf("block %d: message %d: malformed", seq, seq+i)
		}
		if err := fn(m); err != nil {
			return err
		}
	}
	if d.bad || len(d.b) != 0 {
		return fmt.Errorf("block %d: malformed", seq)
	}
	return nil
}

// storedBinary marks a one-message value (files from before blocks, and
// the journal's records): uvarint ts (unix nanos), then id, nick and text,
// each uvarint-prefixed. Values written before it are JSON (storedMsg) and
// start with '{'.
const storedBinary = 1

func appendStored(b []byte, m *Msg) []byte {
	b = append(b, storedBinary)
	b = binary.AppendUvarint(b, uint64(m.TS.UnixNano()))
	b = appendString(b, m.ID)
	b = appendString(b, m.Nick)
	return appendString(b, m.Text)
}

func parseStored(v []byte) (Msg, error) {
	if len(v) > 0 && v[0] == storedBinary {
		d := decoder{b: v[1:]}
		ts := d.uint()
		m := Msg{ID: d.str(), Nick: d.str(), Text: d.str(), TS: time.Unix(0, int64(ts))}
		if d.bad || len(d.b) != 0 {
			return Msg{}, errors.New("malformed value")
		}
		return m, nil
	}
	var m storedMsg
	if err := json.Unmarshal(v, &m); err != nil {
		return Msg{}, err
	}
	return Msg{ID: m.ID, Nick: m.Nick, Text: m.Text, TS: m.TS}, nil
}
