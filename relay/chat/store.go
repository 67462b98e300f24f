package chat

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Store keeps rooms' histories in one bbolt file, so that a node restarts
// with the history and epoch of every room it held. Layout: a top bucket per
// room (named like it) holding the key "epoch" and a bucket "msgs" of
// messages by 8-byte big-endian sequence number (JSON values).
//
// bbolt rather than etcd: every message of every room is written at every
// node that holds the room, thousands a second; etcd is the control plane's
// and is not for data of that volume. A Store is safe for concurrent use;
// each room's owner writes in batches, one transaction each.
type Store struct {
	db *bolt.DB
}

// storedMsg is a message's value in the store.
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
	return &Store{db: db}, nil
}

// Close closes the file.
func (s *Store) Close() error { return s.db.Close() }

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
			var m storedMsg
			if len(k) != 8 {
				return fmt.Errorf("room %s: bad key %x", room, k)
			}
			if err := json.Unmarshal(v, &m); err != nil {
				return fmt.Errorf("room %s message %d: %w", room, binary.BigEndian.Uint64(k), err)
			}
			msgs = append(msgs, Msg{Seq: binary.BigEndian.Uint64(k), ID: m.ID, Nick: m.Nick, Text: m.Text, TS: m.TS})
			return nil
		})
	})
	if err != nil {
		return "", nil, fmt.Errorf("chat store: %w", err)
	}
	return epoch, msgs, nil
}

// write applies one batch of a room's changes in one transaction: with reset,
// every message goes and the epoch is set; then msgs are added and the
// messages before trimBefore deleted.
func (s *Store) write(room, epoch string, reset bool, msgs []Msg, trimBefore uint64) error {
	err := s.db.Update(func(tx *bolt.Tx) error {
		if reset {
			if tx.Bucket([]byte(room)) != nil {
				if err := tx.DeleteBucket([]byte(room)); err != nil {
					return err
				}
			}
		}
		rb, err := tx.CreateBucketIfNotExists([]byte(room))
		if err != nil {
			return err
		}
		if reset || rb.Get(keyEpoch) == nil {
			if err := rb.Put(keyEpoch, []byte(epoch)); err != nil {
				return err
			}
		}
		mb, err := rb.CreateBucketIfNotExists(bucketMsgs)
		if err != nil {
			return err
		}
		for _, m := range msgs {
			v, err := json.Marshal(storedMsg{ID: m.ID, Nick: m.Nick, Text: m.Text, TS: m.TS})
			if err != nil {
				return err
			}
			if err := mb.Put(seqKey(m.Seq), v); err != nil {
				return err
			}
		}
		if trimBefore > 0 {
			// Seek again after each delete: Next after a cursor's Delete
			// may skip a key.
			c := mb.Cursor()
			for k, _ := c.First(); k != nil && binary.BigEndian.Uint64(k) < trimBefore; k, _ = c.First() {
				if err := c.Delete(); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("chat store: room %s: %w", room, err)
	}
	return nil
}
