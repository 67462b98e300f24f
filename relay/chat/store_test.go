package chat

import (
	"encoding/json"
	"fmt"
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

// TestStoreWriteIsDurable: what Write stored is in the file when it
// returns; WriteBehind batches are in it after Close; the trim and the
// reset apply in the order queued.
func TestStoreWriteIsDurable(t *testing.T) {
	dir := t.TempDir()
	st, err := OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Write("x", "e1", true, testMsgs(1, 10), 0); err != nil {
		t.Fatal(err)
	}
	checkLoaded(t, st, "x", "e1", testMsgs(1, 10))
	failed := func(err error) { t.Errorf("write behind: %v", err) }
	st.WriteBehind("x", "e1", false, testMsgs(11, 5), 4, failed) // keeps 4..15
	st.WriteBehind("y", "f1", true, testMsgs(1, 3), 0, failed)
	st.WriteBehind("y", "f2", true, testMsgs(7, 2), 0, failed) // y's history replaced
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	st, err = OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	checkLoaded(t, st, "x", "e1", testMsgs(4, 12))
	checkLoaded(t, st, "y", "f2", testMsgs(7, 2))
}

// TestStoreWriteBehindWaits: a follower's batches share one transaction
// (the store's delay), and a Write queued after them takes them along at
// once.
func TestStoreWriteBehindWaits(t *testing.T) {
	st, err := OpenStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.behind = time.Hour
	for i := range 20 {
		st.WriteBehind("x", "e", i == 0, testMsgs(i+1, 1), 0, nil)
	}
	time.Sleep(50 * time.Millisecond)
	if _, got, _ := st.load("x"); len(got) != 0 {
		t.Fatalf("%d messages stored while the store's delay (an hour) runs, want none yet", len(got))
	}
	if err := st.Write("z", "e", true, testMsgs(1, 1), 0); err != nil {
		t.Fatal(err)
	}
	checkLoaded(t, st, "x", "e", testMsgs(1, 20))
}

// TestStoreReadsJSONValues: messages stored as JSON (before the binary
// layout) still load.
func TestStoreReadsJSONValues(t *testing.T) {
	dir := t.TempDir()
	st, err := OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := testMsgs(1, 3)
	err = st.db.Update(func(tx *bolt.Tx) error {
		rb, _ := tx.CreateBucket([]byte("x"))
		rb.Put(keyEpoch, []byte("old"))
		mb, _ := rb.CreateBucket(bucketMsgs)
		for _, m := range want[:2] {
			v, _ := json.Marshal(storedMsg{ID: m.ID, Nick: m.Nick, Text: m.Text, TS: m.TS})
			mb.Put(seqKey(m.Seq), v)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Write("x", "old", false, want[2:], 0); err != nil {
		t.Fatal(err)
	}
	checkLoaded(t, st, "x", "old", want)
	st.Close()
}

// TestStoreClosedRefuses: writes after Close fail, they do not panic.
func TestStoreClosedRefuses(t *testing.T) {
	st, err := OpenStore(t.TempDir())
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
