package relay

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// The overlay wire format, version 1.
//
// Media travels in QUIC datagrams, one RTP packet (or a fragment of one) each,
// behind a fixed 12-byte header:
//
//	 0                   1                   2                   3
//	 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//	+-------+-------+---------------+---------------+---------------+
//	|version| type  |     flags     |    path id    |     track     |
//	+-------+-------+---------------+---------------+---------------+
//	|                  subscription id (link-local)                 |
//	+---------------------------------------------------------------+
//	|                    hop sequence number                        |
//	+---------------------------------------------------------------+
//	| frag index    | frag count    |   (only when flags has F)
//	+---------------+---------------+
//
// The subscription id is chosen by the downstream node in its SUBSCRIBE and
// names the stream on this link. The hop sequence number counts the packets of
// one subscription on one link (every fragment of a packet carries the same
// one): the receiver finds losses on the hop from its gaps, independently of
// the RTP sequence numbers, which may interleave several tracks. The path id
// leaves room for splitting a stream over several overlay paths.
//
// A heartbeat datagram is one byte: the version and type nibbles, type 1.
//
// A probe datagram (type 2, probe.go) measures an idle link's bandwidth:
// after the version/type byte, a kind byte, 0 for one datagram of a train
// and 1 for the receiver's report on a train. A train datagram carries the
// train id (32 bits), its index and the train's count (16 bits each), then
// zero padding to the datagram size; a report the train id, the datagrams
// received and sent (16 bits each), the bytes received after the first
// datagram and the microseconds they took to arrive (32 bits each; the
// lower envelope of the arrival times). A node that predates type 2
// counts probe datagrams as malformed and sends no reports.
//
// Control messages travel on one reliable bidirectional QUIC stream per link,
// each framed as a uvarint length, a type byte and a body of uvarints and
// uvarint-prefixed strings. An announce ends with the stream's flags only
// when they are not 0, so that it reads as it did before flags were added.

const (
	wireVersion = 1

	dgramMedia     = 0 // datagram type: media
	dgramHeartbeat = 1 // datagram type: heartbeat, one byte (heartbeat.go)
	dgramProbe     = 2 // datagram type: bandwidth probe train or report (probe.go)

	flagKeyframe   = 0x01
	flagFragment   = 0x02
	flagRetransmit = 0x04

	mediaHeaderLen = 12
	fragHeaderLen  = 2

	// maxFragments bounds how many datagrams one RTP packet may take.
	maxFragments = 8
)

// mediaHeader is the header of a media datagram.
type mediaHeader struct {
	Flags     uint8
	PathID    uint8
	Track     uint8
	SubID     uint32
	HopSeq    uint32
	FragIndex uint8 // valid when Flags&flagFragment
	FragCount uint8
}

// append appends the encoded header to b.
func (h *mediaHeader) append(b []byte) []byte {
	b = append(b, wireVersion<<4|dgramMedia, h.Flags, h.PathID, h.Track)
	b = binary.BigEndian.AppendUint32(b, h.SubID)
	b = binary.BigEndian.AppendUint32(b, h.HopSeq)
	if h.Flags&flagFragment != 0 {
		b = append(b, h.FragIndex, h.FragCount)
	}
	return b
}

var (
	errShortDatagram = errors.New("datagram shorter than its header")
	errBadFragment   = errors.New("fragment index out of range")
)

// parseMediaHeader decodes the header of a media datagram and returns the
// payload that follows it.
func parseMediaHeader(b []byte, h *mediaHeader) ([]byte, error) {
	if len(b) < mediaHeaderLen {
		return nil, errShortDatagram
	}
	if v := b[0] >> 4; v != wireVersion {
		return nil, fmt.Errorf("datagram of wire version %d, this node speaks %d", v, wireVersion)
	}
	if t := b[0] & 0x0f; t != dgramMedia {
		return nil, fmt.Errorf("unknown datagram type %d", t)
	}
	h.Flags, h.PathID, h.Track = b[1], b[2], b[3]
	h.SubID = binary.BigEndian.Uint32(b[4:])
	h.HopSeq = binary.BigEndian.Uint32(b[8:])
	b = b[mediaHeaderLen:]
	h.FragIndex, h.FragCount = 0, 0
	if h.Flags&flagFragment != 0 {
		if len(b) < fragHeaderLen {
			return nil, errShortDatagram
		}
		h.FragIndex, h.FragCount = b[0], b[1]
		if h.FragCount < 2 || h.FragCount > maxFragments || h.FragIndex >= h.FragCount {
			return nil, errBadFragment
		}
		b = b[fragHeaderLen:]
	}
	if h.Track >= MaxTracks {
		return nil, fmt.Errorf("track %d out of range", h.Track)
	}
	return b, nil
}

// Control message types.
const (
	msgHello           = 1
	msgAnnounce        = 2
	msgUnannounce      = 3
	msgSubscribe       = 4
	msgSubscribeOK     = 5
	msgSubscribeError  = 6
	msgUnsubscribe     = 7
	msgStreamEnd       = 8
	msgKeyframeRequest = 9
	// msgStreamFlags carries a subscribed stream's flags when they change
	// after the subscribe-ok (which carries them too).
	msgStreamFlags = 10
	// msgStreamPath carries a subscribed stream's path from its origin to
	// the sender when it changes after the subscribe-ok (the sender moved
	// to another parent).
	msgStreamPath = 11
)

// maxControlMessage bounds one control message on the wire.
const maxControlMessage = 64 << 10

// Subscribe error and stream end codes.
const (
	codeNotFound = 1
	codeInternal = 2
	// codePublisherGone ends a stream because its publisher left the
	// origin: no other datacenter has it either, so downstream nodes end it
	// rather than look for another parent.
	codePublisherGone = 3
)

// controlMsg is one control message. Which fields are meaningful depends on
// Type; unused ones are zero.
type controlMsg struct {
	Type uint8

	Version    uint64   // hello
	Datacenter string   // hello
	Stream     string   // announce, unannounce, subscribe
	Hops       []string // announce, subscribe ok: datacenters from the origin to the sender
	SubID      uint32   // subscribe…keyframe request
	Code       uint64   // subscribe error, stream end
	Reason     string   // subscribe error, stream end
	Desc       Description
	Flags      uint32 // announce, subscribe ok, stream flags: the stream's Flags
}

func appendHops(b []byte, hops []string) []byte {
	b = binary.AppendUvarint(b, uint64(len(hops)))
	for _, h := range hops {
		b = appendString(b, h)
	}
	return b
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// appendControl appends the framed encoding of m to b.
func appendControl(b []byte, m *controlMsg) []byte {
	body := []byte{m.Type}
	switch m.Type {
	case msgHello:
		body = binary.AppendUvarint(body, m.Version)
		body = appendString(body, m.Datacenter)
	case msgAnnounce:
		body = appendString(body, m.Stream)
		body = appendHops(body, m.Hops)
		if m.Flags != 0 {
			// Optional: an announce without flags is what nodes that
			// predate them send and accept.
			body = binary.AppendUvarint(body, uint64(m.Flags))
		}
	case msgUnannounce:
		body = appendString(body, m.Stream)
	case msgSubscribe:
		body = binary.AppendUvarint(body, uint64(m.SubID))
		body = appendString(body, m.Stream)
	case msgSubscribeOK:
		body = binary.AppendUvarint(body, uint64(m.SubID))
		body = binary.AppendUvarint(body, uint64(len(m.Desc.Tracks)))
		for _, t := range m.Desc.Tracks {
			body = append(body, byte(t.Kind), t.PayloadType)
			body = appendString(body, t.MimeType)
			body = binary.AppendUvarint(body, uint64(t.ClockRate))
			body = binary.AppendUvarint(body, uint64(t.Channels))
			body = appendString(body, t.Fmtp)
		}
		body = binary.AppendUvarint(body, uint64(m.Flags))
		if len(m.Hops) > 0 {
			// Optional: the path the stream takes to the sender now.
			body = appendHops(body, m.Hops)
		}
	case msgStreamFlags:
		body = binary.AppendUvarint(body, uint64(m.SubID))
		body = binary.AppendUvarint(body, uint64(m.Flags))
	case msgStreamPath:
		body = binary.AppendUvarint(body, uint64(m.SubID))
		body = appendHops(body, m.Hops)
	case msgSubscribeError:
		body = binary.AppendUvarint(body, uint64(m.SubID))
		body = binary.AppendUvarint(body, m.Code)
		body = appendString(body, m.Reason)
	case msgUnsubscribe, msgKeyframeRequest:
		body = binary.AppendUvarint(body, uint64(m.SubID))
	case msgStreamEnd:
		body = binary.AppendUvarint(body, uint64(m.SubID))
		body = appendString(body, m.Reason)
		if m.Code != 0 {
			// Optional: why it ended (codePublisherGone).
			body = binary.AppendUvarint(body, m.Code)
		}
	}
	b = binary.AppendUvarint(b, uint64(len(body)))
	return append(b, body...)
}

// decoder reads the fields of one control message body, remembering the
// first error.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.err = errors.New("truncated or overlong varint")
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) uint32() uint32 {
	v := d.uvarint()
	if v > 1<<32-1 {
		d.err = fmt.Errorf("value %d does not fit 32 bits", v)
	}
	return uint32(v)
}

func (d *decoder) byte() byte {
	if d.err != nil {
		return 0
	}
	if len(d.b) == 0 {
		d.err = errors.New("truncated message")
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}

func (d *decoder) string(max int) string {
	n := d.uvarint()
	if d.err != nil {
		return ""
	}
	if n > uint64(len(d.b)) || n > uint64(max) {
		d.err = fmt.Errorf("string of %d bytes is too long or truncated", n)
		return ""
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}

// maxHops bounds the path an announcement may carry.
const maxHops = 64

// hops reads a path of datacenters.
func (d *decoder) hops() []string {
	n := d.uvarint()
	if n > maxHops {
		if d.err == nil {
			d.err = fmt.Errorf("path of %d hops, at most %d", n, maxHops)
		}
		return nil
	}
	var hops []string
	for i := uint64(0); i < n && d.err == nil; i++ {
		hops = append(hops, d.string(128))
	}
	return hops
}

// parseControl decodes one control message body (type byte included; the
// length prefix already removed).
func parseControl(body []byte) (*controlMsg, error) {
	d := &decoder{b: body}
	m := &controlMsg{Type: d.byte()}
	switch m.Type {
	case msgHello:
		m.Version = d.uvarint()
		m.Datacenter = d.string(128)
	case msgAnnounce:
		m.Stream = d.string(128)
		m.Hops = d.hops()
		if d.err == nil && len(d.b) > 0 {
			m.Flags = d.uint32()
		}
	case msgUnannounce:
		m.Stream = d.string(128)
	case msgSubscribe:
		m.SubID = d.uint32()
		m.Stream = d.string(128)
	case msgSubscribeOK:
		m.SubID = d.uint32()
		n := d.uvarint()
		if n > MaxTracks {
			return nil, fmt.Errorf("description with %d tracks, at most %d", n, MaxTracks)
		}
		for i := uint64(0); i < n && d.err == nil; i++ {
			var t Track
			t.Kind = Kind(d.byte())
			t.PayloadType = d.byte()
			t.MimeType = d.string(64)
			t.ClockRate = d.uint32()
			ch := d.uvarint()
			if ch > 255 {
				return nil, fmt.Errorf("track with %d channels", ch)
			}
			t.Channels = uint16(ch)
			t.Fmtp = d.string(4096)
			m.Desc.Tracks = append(m.Desc.Tracks, t)
		}
		m.Flags = d.uint32()
		if d.err == nil && len(d.b) > 0 {
			m.Hops = d.hops()
		}
	case msgStreamFlags:
		m.SubID = d.uint32()
		m.Flags = d.uint32()
	case msgStreamPath:
		m.SubID = d.uint32()
		m.Hops = d.hops()
	case msgSubscribeError:
		m.SubID = d.uint32()
		m.Code = d.uvarint()
		m.Reason = d.string(1024)
	case msgUnsubscribe, msgKeyframeRequest:
		m.SubID = d.uint32()
	case msgStreamEnd:
		m.SubID = d.uint32()
		m.Reason = d.string(1024)
		if d.err == nil && len(d.b) > 0 {
			m.Code = d.uvarint()
		}
	default:
		if d.err == nil {
			return nil, fmt.Errorf("unknown control message type %d", m.Type)
		}
	}
	if d.err != nil {
		return nil, fmt.Errorf("control message type %d: %w", m.Type, d.err)
	}
	if len(d.b) != 0 {
		return nil, fmt.Errorf("control message type %d: %d trailing bytes", m.Type, len(d.b))
	}
	return m, nil
}

// readControl reads one framed control message.
func readControl(r interface{ ReadByte() (byte, error) }, read func([]byte) error) (*controlMsg, error) {
	n, err := binary.ReadUvarint(r)
	if err != nil {
		return nil, err
	}
	if n == 0 || n > maxControlMessage {
		return nil, fmt.Errorf("control message of %d bytes (at most %d)", n, maxControlMessage)
	}
	body := make([]byte, n)
	if err := read(body); err != nil {
		return nil, err
	}
	return parseControl(body)
}
