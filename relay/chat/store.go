package chat

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Store keeps rooms' histories in one bbolt file, so that a node restarts
// with the history and epoch of every room it held. Layout: a top bucket per
// room (named like it) holding the key "epoch" and a bucket "msgs" of
// messages by 8-byte big-endian sequence number (values: appendStored).
//
// bbolt rather than etcd: every message of every room is written at every
// node that holds the room, thousands a second; etcd is the control plane's
// and is not for data of that volume.
//
// One goroutine writes (group commit): every change queued while it
// commits goes into its next transaction, whatever the room. A change
// queued with Write is durable when Write returns (the origin's: it acks
// and serves only what is stored); one queued with WriteBehind (a
// follower's copy, which its parent holds) waits up to storeBehind (20 ms)
// for company, so followers commit a few dozen times a second rather than
// once per batch. A Store is safe for concurrent use; changes of one room
// are applied in the order queued.
type Store struct {
	db     *bolt.DB
	behind time.Duration
	queue  chan *storeReq // closed by Close
	done   chan struct{}

	mu     sync.RWMutex // guards closed; senders on queue hold it shared
	closed bool
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
}

const (
	// storeBehind is how long a follower's changes may wait for others to
	// share their transaction.
	storeBehind = 20 * time.Millisecond
	// storeBatchMax bounds the messages of one transaction.
	storeBatchMax = 8192
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
	keyEpoch   = []byte("epoch")
	bucketMsgs = []byte("msgs")
)

// OpenStore opens (or creates) dir/chat.db. Close it when done.
func OpenStore(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("chat store: %w", err)
	}
	path := filepath.Join(dir, "chat.db")
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("chat store %s: %w (is another node using this data directory?)", path, err)
	}
	st := &Store{db: db, behind: storeBehind, queue: make(chan *storeReq, 1024), done: make(chan struct{})}
	go st.run()
	return st, nil
}

// Close writes what is queued and closes the file. Writes after Close fail
// with ErrStoreClosed.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	close(s.queue)
	s.mu.Unlock()
	<-s.done
	return s.db.Close()
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

// Write queues a batch of a room's changes and returns once it is stored:
// with reset, every message goes and the epoch is set; then msgs are added
// and the messages before trimBefore deleted.
func (s *Store) Write(room, epoch string, reset bool, msgs []Msg, trimBefore uint64) error {
	req := &storeReq{room: room, epoch: epoch, reset: reset, msgs: msgs, trimBefore: trimBefore, durable: make(chan error, 1)}
	if err := s.enqueue(req); err != nil {
		return err
	}
	return <-req.durable
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
		err := s.commit(batch)
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

// load returns a room's epoch ("" when the store does not hold the room) and
// its messages in order.
func (s *Store) load(room string) (epoch string, msgs []Msg, err error) {
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
		return mb.ForEach(func(k, v []byte) error {
			if len(k) != 8 {
				return fmt.Errorf("room %s: bad key %x", room, k)
			}
			m, err := parseStored(v)
			if err != nil {
				return fmt.Errorf("room %s message %d: %w", room, binary.BigEndian.Uint64(k), err)
			}
			m.Seq = binary.BigEndian.Uint64(k)
			msgs = append(msgs, m)
			return nil
		})
	})
	if err != nil {
		return "", nil, fmt.Errorf("chat store: %w", err)
	}
	return epoch, msgs, nil
}

// applyStored applies one batch of a room's changes.
func applyStored(tx *bolt.Tx, req *storeReq) error {
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
	for _, m := range req.msgs {
		if err := mb.Put(seqKey(m.Seq), appendStored(nil, &m)); err != nil {
			return err
		}
	}
	if req.trimBefore > 0 {
		// Seek again after each delete: Next after a cursor's Delete
		// may skip a key.
		c := mb.Cursor()
		for k, _ := c.First(); k != nil && binary.BigEndian.Uint64(k) < req.trimBefore; k, _ = c.First() {
			if err := c.Delete(); err != nil {
				return err
			}
		}
	}
	return nil
}

// storedBinary marks a value in the binary layout: uvarint ts (unix nanos),
// then id, nick and text, each uvarint-prefixed. Values written before it
// are JSON (storedMsg) and start with '{'.
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
