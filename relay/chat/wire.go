package chat

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"
)

// The overlay chat protocol, on one relay.ChannelChat channel per room
// between a node (the child) and its parent in the room's tree. Every frame
// is a uvarint length, a type byte and a body of uvarints and
// uvarint-prefixed strings:
//
//	child → parent  SUB    room, epoch, since        first frame: "I hold epoch's messages up to since"
//	child → parent  SEND   id, nick, text            a message to sequence (forwarded to the origin)
//	parent → child  JOINED epoch, first, last, reset the parent's history; reset: drop yours, take mine from first
//	parent → child  MSG    seq, ts, id, nick, text   in sequence order, without gaps
//	parent → child  ACK    id, seq                   the origin sequenced the child's SEND
//	parent → child  ERROR  code, message             the parent refuses; the channel ends
//
// After JOINED the parent sends every message after since (or, with reset,
// from first), then live ones. A child that sees a gap resubscribes with
// its last sequence number.
const (
	frameSub    = 1
	frameSend   = 2
	frameJoined = 3
	frameMsg    = 4
	frameAck    = 5
	frameError  = 6

	// maxFrame bounds a frame's length: a message's strings with room to spare.
	maxFrame = 16 << 10
)

// frame is one overlay chat frame; which fields count depends on Type.
type frame struct {
	Type         byte
	Room, Epoch  string
	Since        uint64 // SUB
	First, Last  uint64 // JOINED
	Reset        bool   // JOINED
	Msg          Msg    // MSG (all), SEND (ID, Nick, Text)
	Seq          uint64 // ACK
	Code, Reason string // ERROR
}

var errFrame = errors.New("malformed chat frame")

// appendFrame appends f's encoding to b.
func appendFrame(b []byte, f *frame) []byte {
	var body [maxFrame + 64]byte
	p := body[:0]
	p = append(p, f.Type)
	switch f.Type {
	case frameSub:
		p = appendString(p, f.Room)
		p = appendString(p, f.Epoch)
		p = binary.AppendUvarint(p, f.Since)
	case frameSend:
		p = appendString(p, f.Msg.ID)
		p = appendString(p, f.Msg.Nick)
		p = appendString(p, f.Msg.Text)
	case frameJoined:
		p = appendString(p, f.Epoch)
		p = binary.AppendUvarint(p, f.First)
		p = binary.AppendUvarint(p, f.Last)
		if f.Reset {
			p = append(p, 1)
		} else {
			p = append(p, 0)
		}
	case frameMsg:
		p = binary.AppendUvarint(p, f.Msg.Seq)
		p = binary.AppendUvarint(p, uint64(f.Msg.TS.UnixNano()))
		p = appendString(p, f.Msg.ID)
		p = appendString(p, f.Msg.Nick)
		p = appendString(p, f.Msg.Text)
	case frameAck:
		p = appendString(p, f.Msg.ID)
		p = binary.AppendUvarint(p, f.Seq)
	case frameError:
		p = appendString(p, f.Code)
		p = appendString(p, f.Reason)
	}
	b = binary.AppendUvarint(b, uint64(len(p)))
	return append(b, p...)
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// readFrame reads one frame. buf is scratch space, returned grown.
func readFrame(br *bufio.Reader, buf []byte) (frame, []byte, error) {
	n, err := binary.ReadUvarint(br)
	if err != nil {
		return frame{}, buf, err
	}
	if n == 0 || n > maxFrame {
		return frame{}, buf, fmt.Errorf("%w: length %d", errFrame, n)
	}
	if cap(buf) < int(n) {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(br, buf); err != nil {
		return frame{}, buf, err
	}
	f, err := parseFrame(buf)
	return f, buf, err
}

// parseFrame decodes a frame's type and body (without the length).
func parseFrame(b []byte) (frame, error) {
	if len(b) == 0 {
		return frame{}, errFrame
	}
	d := decoder{b: b[1:]}
	f := frame{Type: b[0]}
	switch f.Type {
	case frameSub:
		f.Room, f.Epoch, f.Since = d.str(), d.str(), d.uint()
	case frameSend:
		d.strs(&f.Msg.ID, &f.Msg.Nick, &f.Msg.Text)
	case frameJoined:
		f.Epoch, f.First, f.Last = d.str(), d.uint(), d.uint()
		f.Reset = d.byte() == 1
		if !d.bad && f.First > f.Last+1 {
			return frame{}, fmt.Errorf("%w: joined with first %d after last %d", errFrame, f.First, f.Last)
		}
	case frameMsg:
		f.Msg.Seq = d.uint()
		f.Msg.TS = time.Unix(0, int64(d.uint()))
		d.strs(&f.Msg.ID, &f.Msg.Nick, &f.Msg.Text)
		if !d.bad && f.Msg.Seq == 0 {
			return frame{}, fmt.Errorf("%w: message with sequence number 0", errFrame)
		}
	case frameAck:
		f.Msg.ID, f.Seq = d.str(), d.uint()
	case frameError:
		f.Code, f.Reason = d.str(), d.str()
	default:
		return frame{}, fmt.Errorf("%w: unknown type %d", errFrame, f.Type)
	}
	if d.bad || len(d.b) != 0 {
		return frame{}, fmt.Errorf("%w: type %d", errFrame, f.Type)
	}
	return f, nil
}

type decoder struct {
	b   []byte
	bad bool
}

func (d *decoder) uint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.bad = true
		d.b = nil
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) byte() byte {
	if len(d.b) == 0 {
		d.bad = true
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}

// bytes returns a uvarint-prefixed run of bytes (not copied).
func (d *decoder) bytes() []byte {
	n := d.uint()
	if d.bad || n > uint64(len(d.b)) {
		d.bad = true
		d.b = nil
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

// strs decodes uvarint-prefixed strings into out, copied in one
// allocation (a message's id, nick and text live and go together).
func (d *decoder) strs(out ...*string) {
	rest := d.b
	var all string // from the first string to the end of what is left: the prefixes between them are a few bytes
	start := -1
	for _, o := range out {
		v := d.bytes()
		if d.bad {
			return
		}
		if start < 0 {
			start = len(rest) - len(d.b) - len(v)
			all = string(rest[start:])
		}
		off := len(rest) - len(d.b) - len(v) - start
		*o = all[off : off+len(v)]
	}
}

func (d *decoder) str() string {
	n := d.uint()
	if d.bad || n > uint64(len(d.b)) {
		d.bad = true
		d.b = nil
		return ""
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}
