package node

import (
	"fmt"
	"time"

	egresschat "github.com/stemflow/stemflow/egress/chat"
	"github.com/stemflow/stemflow/relay"
	"github.com/stemflow/stemflow/relay/chat"
)

// ChatConfig configures a node's chat rooms (the `chat:` key).
type ChatConfig struct {
	// DataDir is where the node keeps the rooms' history (DataDir/chat.db),
	// so that it survives a restart. Empty: in memory only.
	DataDir string `yaml:"data_dir"`
	// HistoryCount and HistoryAge bound each room's history: at most
	// HistoryCount messages (default 10000), none older than HistoryAge
	// (default 168h). 0 for HistoryAge keeps messages of any age.
	HistoryCount int            `yaml:"history_count"`
	HistoryAge   *time.Duration `yaml:"history_age"`
	// SyncInterval bounds how long stored messages wait to be flushed to
	// the disk (default 100ms): they are in the file at once, which a
	// node's crash does not lose; the machine's crash loses at most this
	// much, and then every room starts a new epoch. 0 flushes every commit
	// before its messages are seen (each message then waits for the disk).
	SyncInterval *time.Duration `yaml:"sync_interval"`
	// Rate and Burst limit each connection's sends (default 5 a second,
	// bursts of 10).
	Rate  float64 `yaml:"rate"`
	Burst int     `yaml:"burst"`
}

// Chat defaults.
const (
	defaultChatHistoryCount = 10000
	defaultChatHistoryAge   = 7 * 24 * time.Hour
)

func (c *ChatConfig) setDefaults() {
	if c.HistoryCount == 0 {
		c.HistoryCount = defaultChatHistoryCount
	}
	if c.HistoryAge == nil {
		d := defaultChatHistoryAge
		c.HistoryAge = &d
	}
	if c.SyncInterval == nil {
		d := chat.DefaultSyncInterval
		c.SyncInterval = &d
	}
	if c.Rate == 0 {
		c.Rate = egresschat.DefaultRate
	}
	if c.Burst == 0 {
		c.Burst = egresschat.DefaultBurst
	}
}

func (c *ChatConfig) validate(bad func(field, format string, args ...any)) {
	if c.HistoryCount < 0 {
		bad("chat.history_count", "%d: give the number of messages each room keeps (at least 1; default %d)", c.HistoryCount, defaultChatHistoryCount)
	}
	if c.HistoryAge != nil && *c.HistoryAge < 0 {
		bad("chat.history_age", "%v is negative: give how long messages are kept, e.g. 168h (0 keeps them however old)", *c.HistoryAge)
	}
	if c.SyncInterval != nil && *c.SyncInterval < 0 {
		bad("chat.sync_interval", "%v is negative: give how long stored messages may wait to be flushed to disk, e.g. 100ms (0 flushes every commit)", *c.SyncInterval)
	}
	if c.Rate < 0 {
		bad("chat.rate", "%g is negative: give the messages a second one connection may send (default %g)", c.Rate, egresschat.DefaultRate)
	}
	if c.Burst < 0 {
		bad("chat.burst", "%d is negative: give how many messages a connection may send at once (default %d)", c.Burst, egresschat.DefaultBurst)
	}
}

// startChat starts the node's chat rooms and their WebSocket endpoint; the
// hub serves the neighbours' chat channels from now on.
func (n *Node) startChat() error {
	cc := n.cfg.Chat
	cc.setDefaults()
	if cc.DataDir != "" {
		st, err := chat.OpenStore(cc.DataDir, chat.StoreOptions{SyncInterval: *cc.SyncInterval, Logger: n.log})
		if err != nil {
			return fmt.Errorf("chat.data_dir: %w", err)
		}
		n.chatStore = st
	} else {
		n.log.Info("chat history is kept in memory only: set chat.data_dir to keep it across restarts")
	}
	n.chat = chat.NewService(chat.Config{
		Datacenter: n.cfg.Datacenter,
		Tree:       n.hub,
		Store:      n.chatStore,
		Retention:  chat.Retention{Count: cc.HistoryCount, Age: *cc.HistoryAge},
		Encode:     egresschat.AppendMsg,
		Claims:     chatClaims{n},
		Logger:     n.log,
	})
	n.hub.HandleChannels(relay.ChannelChat, n.chat.ServeChannel)
	n.chatWS = egresschat.New(egresschat.Config{Rooms: n.chat, Rate: cc.Rate, Burst: cc.Burst, Logger: n.log})
	return nil
}

// closeChat ends the chat connections, then the rooms, then the store.
func (n *Node) closeChat() {
	if n.chatWS != nil {
		n.chatWS.Close()
	}
	if n.chat != nil {
		n.chat.Close()
	}
	if n.chatStore != nil {
		n.chatStore.Close()
	}
}

// Chat returns the node's chat rooms.
func (n *Node) Chat() *chat.Service { return n.chat }
