package chattest

import (
	"encoding/json"
	"testing"
	"time"

	egresschat "github.com/stemflow/stemflow/egress/chat"
	rooms "github.com/stemflow/stemflow/relay/chat"
)

// TestDecodeFast: the fast path decodes the server's msg and ack frames as
// json.Unmarshal does, and declines everything else.
func TestDecodeFast(t *testing.T) {
	ts := time.Date(2026, 12, 2, 0, 10, 3, 510000000, time.UTC)
	frames := [][]byte{
		egresschat.EncodeMsg(rooms.Msg{Seq: 42, ID: "a-1", Nick: "ann", Text: "hello all", TS: ts}),
		egresschat.EncodeMsg(rooms.Msg{Seq: 1, ID: "x", Nick: "bob o'neil", Text: "é ü ✓", TS: ts}),
		[]byte(`{"type":"ack","id":"a-1","seq":42}`),
	}
	for _, b := range frames {
		got, ok := decodeFast(b)
		var want Frame
		if err := json.Unmarshal(b, &want); err != nil {
			t.Fatal(err)
		}
		if !ok || got != want {
			t.Errorf("%s: fast %+v %v, want %+v", b, got, ok, want)
		}
	}
	for _, b := range []string{
		string(egresschat.EncodeMsg(rooms.Msg{Seq: 3, ID: "y", Nick: "cat", Text: "<b>escaped</b> \"q\"", TS: ts})),
		`{"type":"joined","room":"x","epoch":"e","last_seq":4}`,
		`{"type":"msg","seq":1,"id":"a"}`,
		`{"type":"ack","id":"a","seq":}`,
		`{"type":"ack","id":"a","seq":1}x`,
		`{"type":"ack","id":"a,"seq":1}`,
		`{"type":"msg","seq":99999999999999999999999,"id":"a","nick":"b","text":"c","ts":"d"}`,
	} {
		if f, ok := decodeFast([]byte(b)); ok {
			t.Errorf("%s: decoded fast as %+v, want declined", b, f)
		}
	}
}
