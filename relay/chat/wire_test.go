package chat

import (
	"bufio"
	"bytes"
	"reflect"
	"testing"
	"time"
)

func seedFrames() []frame {
	ts := time.Unix(1764633600, 123456789)
	return []frame{
		{Type: frameSub, Room: "x", Epoch: "0123456789abcdef", Since: 42},
		{Type: frameSub, Room: "x"},
		{Type: frameSend, Msg: Msg{ID: "id-1", Nick: "ann", Text: "hello <b>world</b> é"}},
		{Type: frameJoined, Epoch: "e", First: 31, Last: 150, Reset: true},
		{Type: frameJoined, Epoch: "e", First: 1, Last: 0},
		{Type: frameMsg, Msg: Msg{Seq: 7, ID: "id-7", Nick: "bob", Text: "hi", TS: ts}},
		{Type: frameAck, Msg: Msg{ID: "id-7"}, Seq: 7},
		{Type: frameError, Code: "bad_room", Reason: "no"},
	}
}

// TestFrameRoundTrip: every frame type reads back as written, in a stream.
func TestFrameRoundTrip(t *testing.T) {
	var b []byte
	for i := range seedFrames() {
		b = appendFrame(b, &seedFrames()[i])
	}
	br := bufio.NewReader(bytes.NewReader(b))
	for i, want := range seedFrames() {
		got, _, err := readFrame(br, nil)
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if !got.Msg.TS.Equal(want.Msg.TS) {
			t.Fatalf("frame %d: ts %v, want %v", i, got.Msg.TS, want.Msg.TS)
		}
		got.Msg.TS, want.Msg.TS = time.Time{}, time.Time{}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("frame %d: got %+v, want %+v", i, got, want)
		}
	}
}

// FuzzFrame: no input makes the parser panic or loop, and whatever parses
// encodes back to the same bytes.
func FuzzFrame(f *testing.F) {
	for i := range seedFrames() {
		b := appendFrame(nil, &seedFrames()[i])
		f.Add(b)
	}
	f.Add([]byte{0})
	f.Add([]byte{200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 1})
	f.Fuzz(func(t *testing.T, data []byte) {
		fr, _, err := readFrame(bufio.NewReader(bytes.NewReader(data)), nil)
		if err != nil {
			return
		}
		again := appendFrame(nil, &fr)
		fr2, _, err := readFrame(bufio.NewReader(bytes.NewReader(again)), nil)
		if err != nil {
			t.Fatalf("re-encoded frame %x does not parse: %v", again, err)
		}
		if !fr.Msg.TS.Equal(fr2.Msg.TS) {
			t.Fatalf("ts changed: %v → %v", fr.Msg.TS, fr2.Msg.TS)
		}
		fr.Msg.TS, fr2.Msg.TS = time.Time{}, time.Time{}
		if !reflect.DeepEqual(fr, fr2) {
			t.Fatalf("round trip changed the frame: %+v → %+v", fr, fr2)
		}
	})
}
