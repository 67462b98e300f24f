package chat

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

func testMsgs(from, n int) []Msg {
	var out []Msg
	for i := from; i < from+n; i++ {
		out = append(out, Msg{Seq: uint64(i), ID: fmt.Sprintf("m%d", i), Nick: "ann", Text: fmt.Sprintf("text \"%d\" <b>", i),
			TS: time.Unix(1700000000, int64(i)).UTC()})
	}
	return out
}

func checkLoaded(t *testing.T, st *Store, room, epoch string, want []Msg) {
	t.Helper()
	e, got, err := st.load(room)
	if err != nil {
		t.Fatal(err)
	}
	if e != epoch || len(got) != len(want) {
		t.Fatalf("loaded epoch %q with %d messages, want %q with %d", e, len(got), epoch, len(want))
	}
	for i := range want {
		if got[i].Seq != want[i].Seq || got[i].ID != want[i].ID || got[i].Nick != want[i].Nick || got[i].Text != want[i].Text || !got[i].TS.Equal(want[i].TS) {
			t.Fatalf("message %d: got %+v, want %+v", i, got[i], want[i])
		}
	}
}

// checkKeys checks how many messages of room the file holds, trimmed or
// not.
func checkKeys(t *testing.T, st *Store, room string, want int) {
	t.Helper()
	var n int
	st.db.View(func(tx *bolt.Tx) error {
		n = storedCount(tx.Bucket([]byte(room)).Bucket(bucketMsgs))
		return nil
	})
	if n != want {
		t.Fatalf("room %s: %d messages in the file, want %d", room, n, want)
	}
}

// TestStoreWriteIsDurable: what Write stored is in the file when it
// returns; WriteBehind batches are in it after Close; the trim and the
// reset apply in the order queued. What a trim drops is gone for readers at
// once and leaves the file once trimChunk messages wait.
func TestStoreWriteIsDurable(t *testing.T) {
	dir := t.TempDir()
	st, err := OpenStore(dir, StoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Write("x", "e1", true, testMsgs(1, 10), 0); err != nil {
		t.Fatal(err)
	}
	checkLoaded(t, st, "x", "e1", testMsgs(1, 10))
	if err := st.Write("x", "e1", false, testMsgs(11, 5), 4); err != nil {
		t.Fatal(err)
	}
	checkLoaded(t, st, "x", "e1", testMsgs(4, 12))
	checkKeys(t, st, "x", 15) // 3 to delete: not yet
	if err := st.Write("x", "e1", false, testMsgs(16, trimChunk), trimChunk+1); err != nil {
		t.Fatal(err)
	}
	checkLoaded(t, st, "x", "e1", testMsgs(trimChunk+1, 15))
	// 1..trimChunk deleted, but for those in the block that holds the
	// first kept (a block of blockMax from 16: 784..1039).
	checkKeys(t, st, "x", 15+trimChunk-784+1)
	failed := func(err error) { t.Errorf("write behind: %v", err) }
	st.WriteBehind("x", "e1", false, testMsgs(trimChunk+16, 5), trimChunk+4, failed) // keeps trimChunk+4..
	st.WriteBehind("y", "f1", true, testMsgs(1, 3), 0, failed)
	st.WriteBehind("y", "f2", true, testMsgs(7, 2), 0, failed) // y's history replaced
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	st, err = OpenStore(dir, StoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	checkLoaded(t, st, "x", "e1", testMsgs(trimChunk+4, 17))
	checkKeys(t, st, "x", 15+trimChunk-784+1+5) // that trim waits for trimChunk more
	checkLoaded(t, st, "y", "f2", testMsgs(7, 2))
}

// TestStoreWriteBehindWaits: a follower's batches share one transaction
// (the store's delay), and a Write queued after them takes them along at
// once.
func TestStoreWriteBehindWaits(t *testing.T) {
	st, err := OpenStore(t.TempDir(), StoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.behind = time.Hour
	for i := range 20 {
		st.WriteBehind("x", "e", i == 0, testMsgs(i+1, 1), 0, nil)
	}
	time.Sleep(50 * time.Millisecond)
	if got := boltKeys(t, st, "x"); got != 0 {
		t.Fatalf("%d messages stored while the store's delay (an hour) runs, want none yet", got)
	}
	if err := st.Write("z", "e", true, testMsgs(1, 1), 0); err != nil {
		t.Fatal(err)
	}
	checkLoaded(t, st, "x", "e", testMsgs(1, 20))
}

// TestStoreReadsOldValues: messages stored one per value, as JSON (the
// first layout) or binary (before blocks), still load, and trims take them
// along.
func TestStoreReadsOldValues(t *testing.T) {
	dir := t.TempDir()
	st, err := OpenStore(dir, StoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want := testMsgs(1, 6)
	err = st.db.Update(func(tx *bolt.Tx) error {
		rb, _ := tx.CreateBucket([]byte("x"))
		rb.Put(keyEpoch, []byte("old"))
		mb, _ := rb.CreateBucket(bucketMsgs)
		for _, m := range want[:2] {
			v, _ := json.Marshal(storedMsg{ID: m.ID, Nick: m.Nick, Text: m.Text, TS: m.TS})
			mb.Put(seqKey(m.Seq), v)
		}
		for _, m := range want[2:4] {
			mb.Put(seqKey(m.Seq), appendStored(nil, &m))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Write("x", "old", false, want[4:], 0); err != nil {
		t.Fatal(err)
	}
	checkLoaded(t, st, "x", "old", want)
	more := testMsgs(7, trimChunk)
	if err := st.Write("x", "old", false, more, 1+trimChunk); err != nil {
		t.Fatal(err)
	}
	checkLoaded(t, st, "x", "old", testMsgs(1+trimChunk, 6))
	// The old values and the blocks before the one holding 1+trimChunk
	// (blocks of blockMax from 7: 775..1030) are gone.
	checkKeys(t, st, "x", 7+trimChunk-775)
	st.Close()
}

// TestStoreClosedRefuses: writes after Close fail, they do not panic.
func TestStoreClosedRefuses(t *testing.T) {
	st, err := OpenStore(t.TempDir(), StoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	st.Close()
	if err := st.Write("x", "e", true, testMsgs(1, 1), 0); err != ErrStoreClosed {
		t.Errorf("Write after Close: %v, want ErrStoreClosed", err)
	}
	var got error
	st.WriteBehind("x", "e", false, testMsgs(2, 1), 0, func(err error) { got = err })
	if got != ErrStoreClosed {
		t.Errorf("WriteBehind after Close reported %v, want ErrStoreClosed", got)
	}
}

// die leaves the files as a node killed mid-run does: what was committed
// or journaled is in them, what was queued only is lost, the store did not
// close.
func (s *Store) die(t *testing.T) {
	t.Helper()
	s.abandon.Store(true)
	s.stop()
	if s.j != nil {
		s.j.close()
	}
	if err := s.db.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestStoreUnflushedCrash: a store that flushes in the background keeps
// every room's epoch when its node died but the machine did not (the
// commits were in the page cache), and when it closed before the machine
// restarted; a machine that restarted under an open store may have lost
// the last commits, and every room starts a new epoch, its messages kept.
// A store that flushed every commit loses nothing to a restart.
func TestStoreUnflushedCrash(t *testing.T) {
	open := func(t *testing.T, dir, boot string, every time.Duration) *Store {
		t.Helper()
		st, err := OpenStore(dir, StoreOptions{SyncInterval: every, bootID: boot})
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	write := func(t *testing.T, st *Store) {
		t.Helper()
		if err := st.Write("x", "ex", true, testMsgs(1, 5), 0); err != nil {
			t.Fatal(err)
		}
		if err := st.Write("y", "ey", true, testMsgs(1, 2), 0); err != nil {
			t.Fatal(err)
		}
	}
	epochs := func(t *testing.T, st *Store) (x, y string) {
		t.Helper()
		x, msgs, err := st.load("x")
		if err != nil || len(msgs) != 5 {
			t.Fatalf("room x: %d messages, %v; want 5", len(msgs), err)
		}
		y, msgs, err = st.load("y")
		if err != nil || len(msgs) != 2 {
			t.Fatalf("room y: %d messages, %v; want 2", len(msgs), err)
		}
		return x, y
	}
	cases := []struct {
		name      string
		every     time.Duration
		closed    bool
		nextBoot  string
		wantRenew bool
	}{
		{"node died", time.Hour, false, "boot1", false},
		{"machine restarted", time.Hour, false, "boot2", true},
		{"closed, then machine restarted", time.Hour, true, "boot2", false},
		{"every commit flushed", 0, false, "boot2", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			st := open(t, dir, "boot1", c.every)
			write(t, st)
			if c.closed {
				if err := st.Close(); err != nil {
					t.Fatal(err)
				}
			} else {
				st.die(t)
			}
			st = open(t, dir, c.nextBoot, time.Hour)
			x, y := epochs(t, st)
			renewed := x != "ex" && y != "ey"
			if renewed != c.wantRenew || (!renewed && (x != "ex" || y != "ey")) {
				t.Fatalf("epochs after reopening: x %q y %q, want renewed %v (before: ex, ey)", x, y, c.wantRenew)
			}
			if want := map[bool]int{true: 2}[c.wantRenew]; st.Renewed() != want {
				t.Errorf("Renewed() = %d, want %d", st.Renewed(), want)
			}
			// Reopened cleanly, nothing more changes.
			if err := st.Close(); err != nil {
				t.Fatal(err)
			}
			st = open(t, dir, "boot3", time.Hour)
			defer st.Close()
			if x2, y2 := epochs(t, st); x2 != x || y2 != y {
				t.Fatalf("epochs after a clean close: x %q y %q, want %q %q", x2, y2, x, y)
			}
		})
	}
}

// TestStoreJournal: with a SyncInterval, Write appends to the journal and
// bbolt follows behind; the journal's files go once bbolt has their
// batches; a node that died before bbolt had them finds them again at
// open (replayed, even when the last record was cut short), and the
// journal is empty after a clean close.
func TestStoreJournal(t *testing.T) {
	dir := t.TempDir()
	open := func() *Store {
		t.Helper()
		st, err := OpenStore(dir, StoreOptions{SyncInterval: time.Hour, bootID: "b1"})
		if err != nil {
			t.Fatal(err)
		}
		st.behind = time.Hour // bbolt commits only when storeBatchMax messages wait
		return st
	}
	files := func() []uint64 {
		t.Helper()
		nums, err := journalFiles(filepath.Join(dir, "journal"))
		if err != nil {
			t.Fatal(err)
		}
		return nums
	}
	// Messages of 200 bytes: 30,000 are ~7 MB of journal.
	msgs := func(from, n int) []Msg {
		m := testMsgs(from, n)
		for i := range m {
			m[i].Text += strings.Repeat("x", 200)
		}
		return m
	}
	st := open()
	const batches, per = 300, 100
	var bolted int
	for i := range batches {
		if err := st.Write("x", "e1", i == 0, msgs(i*per+1, per), 0); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			bolted = boltKeys(t, st, "x")
		}
	}
	if bolted != 0 {
		t.Fatalf("bbolt had %d messages right after the first Write, want 0 (it follows behind)", bolted)
	}
	// ~7 MB: the journal rotated once at least; bbolt commits every
	// storeBatchMax messages, and the files it has all of go (the first,
	// once its third commit is in: how far it is varies).
	if n := files(); len(n) == 0 || len(n) > 3 || n[len(n)-1] < 2 {
		t.Fatalf("journal files %v: want the one being written, after one past %d bytes, and at most two before it", n, journalFileMax)
	}
	st.die(t)

	st = open()
	checkLoaded(t, st, "x", "e1", msgs(1, batches*per))
	if n := files(); len(n) != 1 {
		t.Fatalf("journal files after the replay: %v, want only the new one", n)
	}
	if err := st.Write("x", "e1", false, msgs(batches*per+1, 10), 0); err != nil {
		t.Fatal(err)
	}
	if err := st.Write("x", "e1", false, msgs(batches*per+11, 10), 0); err != nil {
		t.Fatal(err)
	}
	st.die(t)
	// The second record cut short: the first is replayed.
	path := journalPath(filepath.Join(dir, "journal"), files()[0])
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b[:len(b)-7], 0o600); err != nil {
		t.Fatal(err)
	}
	st = open()
	checkLoaded(t, st, "x", "e1", msgs(1, batches*per+10))
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if n := files(); len(n) != 0 {
		t.Fatalf("journal files after Close: %v, want none", n)
	}
}

// boltKeys counts room's messages in bbolt, without waiting for the queue.
func boltKeys(t *testing.T, st *Store, room string) int {
	t.Helper()
	var n int
	st.db.View(func(tx *bolt.Tx) error {
		if rb := tx.Bucket([]byte(room)); rb != nil {
			if mb := rb.Bucket(bucketMsgs); mb != nil {
				n = storedCount(mb)
			}
		}
		return nil
	})
	return n
}

// storedCount returns how many messages a room's msgs bucket holds.
func storedCount(mb *bolt.Bucket) int {
	n := 0
	mb.ForEach(func(k, v []byte) error {
		n += int(storedLast(k, v) - binary.BigEndian.Uint64(k) + 1)
		return nil
	})
	return n
}
