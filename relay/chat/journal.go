package chat

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
)

// journal is the write-ahead log in front of a Store's bbolt file: an
// origin's batch is appended to it (one write) and is in the file when
// Write returns; the bbolt transaction that takes it follows behind, with
// others, and the journal's files go once everything in them is in bbolt.
// A bbolt commit rewrites the last pages of every room it touches (tens of
// microseconds and kilobytes of garbage each); an append is one write.
//
// The journal is files DIR/journal/NUMBER (hex, growing), each a run of
// records: a 4-byte big-endian length, a 4-byte CRC-32C of the payload,
// the payload (appendJournalRecord). A file past journalFileMax is closed
// and the next begun. At open every file is replayed into bbolt in order
// up to its first damaged record (a write the crash cut short), then
// removed.
//
// Writes are serialised by the Store (Store.jmu); sync may run beside them.
type journal struct {
	dir  string
	f    *os.File
	num  uint64 // f's number
	size int64
	buf  []byte
}

// journalFileMax is the size after which the journal begins a new file.
const journalFileMax = 4 << 20

var crc32c = crc32.MakeTable(crc32.Castagnoli)

// journalFiles returns the numbers of dir's journal files, in order.
func journalFiles(dir string) ([]uint64, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var nums []uint64
	for _, e := range ents {
		n, err := strconv.ParseUint(e.Name(), 16, 64)
		if err != nil || e.IsDir() || len(e.Name()) != 16 {
			continue // not ours
		}
		nums = append(nums, n)
	}
	slices.Sort(nums)
	return nums, nil
}

func journalPath(dir string, num uint64) string {
	return filepath.Join(dir, fmt.Sprintf("%016x", num))
}

// readJournal calls apply with every record of the file in order. It
// stops at the first damaged record and says so in damaged (the bytes
// after it are ignored).
func readJournal(path string, apply func(*storeReq) error) (damaged error, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	for off := 0; off < len(b); {
		if len(b)-off < 8 {
			return fmt.Errorf("%d bytes left at offset %d, a record's header is 8", len(b)-off, off), nil
		}
		n := int(binary.BigEndian.Uint32(b[off:]))
		sum := binary.BigEndian.Uint32(b[off+4:])
		if n > len(b)-off-8 {
			return fmt.Errorf("record at offset %d: length %d, %d bytes left", off, n, len(b)-off-8), nil
		}
		payload := b[off+8 : off+8+n]
		if crc32.Checksum(payload, crc32c) != sum {
			return fmt.Errorf("record at offset %d: checksum mismatch", off), nil
		}
		req, err := parseJournalRecord(payload)
		if err != nil {
			return fmt.Errorf("record at offset %d: %v", off, err), nil
		}
		if err := apply(req); err != nil {
			return nil, err
		}
		off += 8 + n
	}
	return nil, nil
}

// openJournal begins file num in dir.
func openJournal(dir string, num uint64) (*journal, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	j := &journal{dir: dir, num: num}
	if err := j.begin(); err != nil {
		return nil, err
	}
	return j, nil
}

func (j *journal) begin() error {
	f, err := os.OpenFile(journalPath(j.dir, j.num), os.O_WRONLY|os.O_CREATE|os.O_EXCL|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	j.f, j.size = f, 0
	return nil
}

// append writes req as one record and returns the number of the file it
// is in. Past journalFileMax, the file is flushed and closed and the next
// one begun first.
func (j *journal) append(req *storeReq) (uint64, error) {
	if j.f == nil {
		return 0, errors.New("journal: closed after a failed write")
	}
	if j.size >= journalFileMax {
		if err := errors.Join(j.f.Sync(), j.f.Close()); err != nil {
			j.f = nil
			return 0, err
		}
		j.num++
		if err := j.begin(); err != nil {
			j.f = nil
			return 0, err
		}
	}
	j.buf = append(j.buf[:0], make([]byte, 8)...)
	j.buf = appendJournalRecord(j.buf, req)
	payload := j.buf[8:]
	binary.BigEndian.PutUint32(j.buf, uint32(len(payload)))
	binary.BigEndian.PutUint32(j.buf[4:], crc32.Checksum(payload, crc32c))
	n, err := j.f.Write(j.buf)
	j.size += int64(n)
	if err != nil {
		// A record cut short ends replay there: what follows would be
		// lost, so nothing more is written to this journal.
		j.f.Close()
		j.f = nil
		return 0, err
	}
	return j.num, nil
}

// file returns the file being written (to flush it beside writes).
func (j *journal) file() *os.File { return j.f }

// close closes the file being written.
func (j *journal) close() error {
	if j.f == nil {
		return nil
	}
	err := j.f.Close()
	j.f = nil
	return err
}

// removeJournals deletes the journal files in dir whose number is less than below.
func removeJournals(dir string, below uint64) error {
	nums, err := journalFiles(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range nums {
		if n < below {
			if err := os.Remove(journalPath(dir, n)); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// Journal record payload: uvarint flags (1: reset), room, epoch, uvarint
// trimBefore, uvarint count, then per message uvarint seq and its stored
// value (appendStored) with a uvarint length.
func appendJournalRecord(b []byte, req *storeReq) []byte {
	flags := uint64(0)
	if req.reset {
		flags |= 1
	}
	b = binary.AppendUvarint(b, flags)
	b = appendString(b, req.room)
	b = appendString(b, req.epoch)
	b = binary.AppendUvarint(b, req.trimBefore)
	b = binary.AppendUvarint(b, uint64(len(req.msgs)))
	var v []byte
	for i := range req.msgs {
		m := &req.msgs[i]
		b = binary.AppendUvarint(b, m.Seq)
		v = appendStored(v[:0], m)
		b = binary.AppendUvarint(b, uint64(len(v)))
		b = append(b, v...)
	}
	return b
}

func parseJournalRecord(b []byte) (*storeReq, error) {
	d := decoder{b: b}
	flags := d.uint()
	req := &storeReq{reset: flags&1 != 0, room: d.str(), epoch: d.str(), trimBefore: d.uint()}
	n := d.uint()
	if d.bad || n > uint64(len(b)) {
		return nil, io.ErrUnexpectedEOF
	}
	req.msgs = make([]Msg, 0, n)
	for range n {
		seq := d.uint()
		v := d.bytes()
		if d.bad {
			return nil, io.ErrUnexpectedEOF
		}
		m, err := parseStored(v)
		if err != nil {
			return nil, fmt.Errorf("message %d: %w", seq, err)
		}
		m.Seq = seq
		req.msgs = append(req.msgs, m)
	}
	if len(d.b) != 0 || req.room == "" {
		return nil, errors.New("malformed record")
	}
	return req, nil
}
