// Package chat keeps chat rooms and carries their messages over the overlay.
// A room is named like the stream it sits beside and lives on the stream's
// relay tree: one node, the room's origin, gives every message the room's
// next sequence number; every other node with chat clients (or with
// downstream nodes that have them) keeps a replica, subscribed from its
// parent in the tree on a reliable channel (relay.ChannelChat). Messages
// sent at any node travel up to the origin, hop by hop, and come back down
// to every replica in sequence order. Every replica keeps the retained
// history (and persists it when it has a Store), so a client resumes from
// `since` at any node and a replica that changes parent resumes from its
// last sequence number.
//
// The client protocol (WebSocket, JSON) is egress/chat's; docs/chat.md
// documents both.
package chat

import (
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Limits of what a client may send.
const (
	// MaxTextBytes bounds a message's text (UTF-8 bytes).
	MaxTextBytes = 2048
	// MaxIDBytes bounds a client-chosen message id.
	MaxIDBytes = 64
	// MaxNickRunes bounds a nickname.
	MaxNickRunes = 32
)

// Msg is one message of a room, as sequenced by its origin.
type Msg struct {
	Seq  uint64
	ID   string // chosen by the sending client: a retry with the same id takes effect once
	Nick string
	Text string
	TS   time.Time // when the origin sequenced it

	// Frame is the message as the client protocol sends it, encoded once
	// per node by Config.Encode (nil without one).
	Frame []byte
}

// Ack tells a sender which sequence number its message got.
type Ack struct {
	ID  string
	Seq uint64
}

// Errors of a send a client can mend; the client protocol turns each into its
// error code.
var (
	ErrTooLong   = fmt.Errorf("text is longer than %d bytes: split it", MaxTextBytes)
	ErrEmptyText = errors.New("text is empty: write something")
	ErrBadID     = fmt.Errorf("id must be 1 to %d printable ASCII characters, chosen by the client (e.g. a random UUID)", MaxIDBytes)
	ErrBadText   = errors.New("text is not valid UTF-8")
)

// ValidateSend checks a message a client sends.
func ValidateSend(id, text string) error {
	if id == "" || len(id) > MaxIDBytes {
		return ErrBadID
	}
	for i := 0; i < len(id); i++ {
		if id[i] < 0x21 || id[i] > 0x7e {
			return ErrBadID
		}
	}
	if len(text) > MaxTextBytes {
		return ErrTooLong
	}
	if !utf8.ValidString(text) {
		return ErrBadText
	}
	if strings.TrimSpace(text) == "" {
		return ErrEmptyText
	}
	return nil
}

// ValidateNick checks a nickname: 1 to 32 letters, digits, spaces, or
// -_.'; no space at either end, no two spaces in a row.
func ValidateNick(nick string) error {
	if nick == "" {
		return errors.New("nickname is empty: choose one (letters, digits, spaces, -_.')")
	}
	if !utf8.ValidString(nick) {
		return errors.New("nickname is not valid UTF-8")
	}
	if n := utf8.RuneCountInString(nick); n > MaxNickRunes {
		return fmt.Errorf("nickname is %d characters long, at most %d are allowed", n, MaxNickRunes)
	}
	if strings.TrimSpace(nick) != nick || strings.Contains(nick, "  ") {
		return errors.New("nickname starts or ends with a space, or has two in a row")
	}
	for _, c := range nick {
		if !(unicode.IsLetter(c) || unicode.IsDigit(c) || c == ' ' || strings.ContainsRune("-_.'", c)) {
			return fmt.Errorf("nickname has the character %q: use letters, digits, spaces and -_.'", c)
		}
	}
	return nil
}
