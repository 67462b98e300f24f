package chat

import (
	"encoding/json"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"

	rooms "github.com/stemflow/stemflow/relay/chat"
)

// FuzzClientFrame: no client frame makes the parser panic; a frame it
// refuses gets a bad_frame error with a message; a send it accepts and
// ValidateSend passes has a text of at most 2 KiB of valid UTF-8 and an id.
func FuzzClientFrame(f *testing.F) {
	for _, s := range []string{
		`{"type":"send","id":"m1","text":"hello"}`,
		`{"type":"nick","nick":"ann"}`,
		`{"type":"ping"}`,
		`{"type":"send","id":"m1","text":"<img src=x onerror=alert(1)>"}`,
		`{"type":"send","id":"m1","text":"\ud800"}`,
		`{"type":"send","id":1,"text":["x"]}`,
		`[]`, `null`, `{"type":"shout"}`, `not json`,
	} {
		f.Add(true, []byte(s))
	}
	f.Add(false, []byte{0, 1, 2})
	f.Fuzz(func(t *testing.T, text bool, data []byte) {
		typ := websocket.MessageBinary
		if text {
			typ = websocket.MessageText
		}
		fr, bad := parseClientFrame(typ, data)
		if bad != nil {
			if bad.Code != CodeBadFrame || bad.Message == "" {
				t.Fatalf("refusal %+v: want bad_frame with a message", bad)
			}
			return
		}
		if fr.Type != "send" {
			return
		}
		if err := rooms.ValidateSend(fr.ID, fr.Text); err == nil {
			if len(fr.Text) > rooms.MaxTextBytes || !utf8.ValidString(fr.Text) || fr.ID == "" {
				t.Fatalf("accepted send %+v", fr)
			}
		} else if sendErrorCode(err) == "" {
			t.Fatalf("no code for %v", err)
		}
	})
}

// FuzzEncodeMsg: EncodeMsg writes what json.Marshal writes for the same
// frame, whatever the strings hold.
func FuzzEncodeMsg(f *testing.F) {
	for _, s := range []string{"hello", "é ü ✓", `<b>"q"</b> & \`, "\x00\x1f\x7f", "\u2028\u2029", "\xff\xfe bad utf-8", ""} {
		f.Add(uint64(7), "id-1", "ann", s, int64(1700000000123456789))
	}
	f.Fuzz(func(t *testing.T, seq uint64, id, nick, text string, ns int64) {
		m := rooms.Msg{Seq: seq, ID: id, Nick: nick, Text: text, TS: time.Unix(0, ns)}
		want, err := json.Marshal(msgFrame{Type: "msg", Seq: m.Seq, ID: m.ID, Nick: m.Nick, Text: m.Text, TS: m.TS.UTC().Format(time.RFC3339Nano)})
		if err != nil {
			t.Fatal(err)
		}
		if got := EncodeMsg(m); string(got) != string(want) {
			t.Fatalf("EncodeMsg %s, json.Marshal %s", got, want)
		}
	})
}
