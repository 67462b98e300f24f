package chat

import (
	"bufio"
	"context"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stemflow/stemflow/relay"
)

// Tree is the relay hub as chat uses it: where a room's stream comes from,
// a way to join its tree without taking media, and channels to neighbours.
type Tree interface {
	// Upstream returns the neighbour this node takes the stream from (or
	// would) and the stream's origin datacenter; ok is false when the
	// stream is not live anywhere.
	Upstream(stream string) (parent, origin string, ok bool)
	// Want marks the stream wanted here (chat clients in its room).
	Want(stream string) (release func())
	OpenChannel(ctx context.Context, peer string, kind relay.ChannelKind) (relay.Channel, error)
}

// Claims is the cluster's record of which datacenter sequences a room
// whose stream is not live, so that clients joining at two nodes before the
// stream starts get one order, not one per node. The node keeps it in etcd,
// each claim bound to the node's lease (it goes when the node does).
type Claims interface {
	// Owner returns the datacenter holding room's claim ("" when none
	// does).
	Owner(ctx context.Context, room string) (string, error)
	// Claim takes room's claim for this datacenter unless another holds it
	// (take: whoever holds it, because the room's stream is live here),
	// and returns the holder.
	Claim(ctx context.Context, room string, take bool) (owner string, err error)
	// Release gives up this datacenter's claim on room, if it holds it.
	Release(ctx context.Context, room string)
}

// Retention bounds each room's history; zero fields mean no bound.
type Retention struct {
	Count int
	Age   time.Duration
}

// Config configures a Service.
type Config struct {
	Datacenter string
	Tree       Tree
	// Store, when set, keeps every room's history across restarts.
	Store     *Store
	Retention Retention
	// Encode, when set, appends a message's encoding for the clients to b;
	// it runs once per message, when it joins the history here
	// (Msg.Frame).
	Encode func(b []byte, m *Msg) []byte
	// Claims, when set, picks one node to sequence each room whose stream
	// is not live (without it: the node where the room's first client
	// joined, each node deciding alone).
	Claims Claims
	// ClaimAfter is how long a room new here whose stream is not live
	// waits for a route before this node sequences it (default 3s): a
	// route that is missing for a moment must not start a second order.
	ClaimAfter time.Duration
	// Linger is how long a room stays after its last client or child left
	// (default 10s).
	Linger time.Duration
	Logger *slog.Logger
}

// Service holds the chat rooms of one node. Close stops every room.
type Service struct {
	cfg   Config
	log   *slog.Logger
	stats statsTable

	ctx    context.Context
	cancel context.CancelFunc

	mu    sync.Mutex // guards rooms
	rooms map[string]*roomRef

	lastWarn atomic.Int64 // unix nanos of the last store warning
}

// roomRef is a room and what holds it.
type roomRef struct {
	room   *Room
	refs   int         // clients and children
	local  int         // clients of this node
	want   func()      // releases the hub's Want while local > 0
	linger *time.Timer // set while refs == 0
	gen    uint64      // bumped when linger is stopped
}

// NewService returns a service with no rooms.
func NewService(cfg Config) *Service {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Linger <= 0 {
		cfg.Linger = 10 * time.Second
	}
	if cfg.ClaimAfter == 0 {
		cfg.ClaimAfter = 3 * time.Second
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Service{cfg: cfg, log: cfg.Logger.With("component", "chat"), ctx: ctx, cancel: cancel,
		rooms: make(map[string]*roomRef)}
}

// Datacenter returns the node's datacenter.
func (s *Service) Datacenter() string { return s.cfg.Datacenter }

// Acquire returns the named room (the caller validated the name), starting
// it when it is new here. local says the holder is a client of this node:
// while a room has one, the node wants the room's stream (it joins the
// stream's tree). Call release once.
func (s *Service) Acquire(name string, local bool) (r *Room, release func()) {
	s.mu.Lock()
	ref := s.rooms[name]
	if ref == nil {
		ref = &roomRef{room: newRoom(s, name)}
		s.rooms[name] = ref
		go ref.room.run()
	}
	ref.refs++
	if ref.linger != nil {
		ref.linger.Stop()
		ref.linger = nil
		ref.gen++
	}
	needWant := false
	if local {
		ref.local++
		needWant = ref.local == 1 && ref.want == nil
	}
	s.mu.Unlock()
	if needWant && s.cfg.Tree != nil {
		rel := s.cfg.Tree.Want(name)
		s.mu.Lock()
		if ref.local > 0 && ref.want == nil {
			ref.want, rel = rel, nil
		}
		s.mu.Unlock()
		if rel != nil {
			rel()
		}
	}
	var once sync.Once
	return ref.room, func() { once.Do(func() { s.release(name, ref, local) }) }
}

func (s *Service) release(name string, ref *roomRef, local bool) {
	s.mu.Lock()
	ref.refs--
	var want func()
	if local {
		ref.local--
		if ref.local == 0 {
			want, ref.want = ref.want, nil
		}
	}
	if ref.refs == 0 && s.rooms[name] == ref {
		gen := ref.gen
		ref.linger = time.AfterFunc(s.cfg.Linger, func() { s.lingerOut(name, ref, gen) })
	}
	s.mu.Unlock()
	if want != nil {
		want()
	}
}

func (s *Service) lingerOut(name string, ref *roomRef, gen uint64) {
	s.mu.Lock()
	if ref.refs > 0 || ref.gen != gen || s.rooms[name] != ref {
		s.mu.Unlock()
		return
	}
	delete(s.rooms, name)
	s.stats.drop(name) // its series go from /metrics (a new room starts new ones)
	s.mu.Unlock()
	ref.room.close()
}

// Rooms lists the rooms held here, sorted, with their role.
func (s *Service) Rooms() []RoomInfo {
	s.mu.Lock()
	refs := make([]*roomRef, 0, len(s.rooms))
	for _, ref := range s.rooms {
		refs = append(refs, ref)
	}
	s.mu.Unlock()
	out := make([]RoomInfo, 0, len(refs))
	for _, ref := range refs {
		role, parent := ref.room.Role()
		v := ref.room.Read(AnyEpoch, ^uint64(0)-1, 1)
		out = append(out, RoomInfo{Name: ref.room.name, Role: role, Parent: parent, Epoch: v.Epoch, LastSeq: v.Last})
	}
	slices.SortFunc(out, func(a, b RoomInfo) int {
		if a.Name < b.Name {
			return -1
		}
		if a.Name > b.Name {
			return 1
		}
		return 0
	})
	return out
}

// RoomInfo describes a room held at this node.
type RoomInfo struct {
	Name    string
	Role    string // origin, follower, waiting
	Parent  string // the follower's parent
	Epoch   string
	LastSeq uint64
}

// Close stops every room.
func (s *Service) Close() {
	s.cancel()
	s.mu.Lock()
	refs := make([]*roomRef, 0, len(s.rooms))
	for _, ref := range s.rooms {
		refs = append(refs, ref)
		if ref.linger != nil {
			ref.linger.Stop()
		}
	}
	s.rooms = map[string]*roomRef{}
	for _, ref := range refs {
		s.stats.drop(ref.room.name)
	}
	s.mu.Unlock()
	for _, ref := range refs {
		ref.room.close()
		if ref.want != nil {
			ref.want()
		}
	}
}

// role says where the room's sequencer is from here: this node (origin),
// or the parent to follow ("" while there is no route yet). A room whose
// stream is live has its origin at the stream's origin and follows the
// stream's tree. live is false when the stream is not live anywhere this
// node knows of: the room keeps the role it had (see Room.run).
func (s *Service) role(room string) (parent string, origin, live bool) {
	if s.cfg.Tree == nil {
		return "", true, true
	}
	p, o, ok := s.cfg.Tree.Upstream(room)
	if !ok {
		return "", false, false
	}
	if o == s.cfg.Datacenter {
		return "", true, true
	}
	return p, false, true
}

// warn logs a store problem at most once every 10 s.
func (s *Service) warn(msg string, args ...any) {
	now := time.Now().UnixNano()
	if last := s.lastWarn.Load(); now-last < int64(10*time.Second) || !s.lastWarn.CompareAndSwap(last, now) {
		return
	}
	s.log.Warn(msg, args...)
}

// ServeChannel serves a child's channel (relay.ChannelChat): it subscribes
// the child to the room, sends the history it lacks and then every new
// message, and forwards the child's sends to the room.
func (s *Service) ServeChannel(ch relay.Channel) {
	defer ch.Close()
	br := bufio.NewReaderSize(ch, 32<<10)
	ch.SetDeadline(time.Now().Add(openTimeout))
	sub, scratch, err := readFrame(br, nil)
	if err != nil || sub.Type != frameSub {
		s.log.Debug("chat: a neighbour's channel did not start with a subscription", "peer", ch.Peer(), "err", err)
		return
	}
	ch.SetDeadline(time.Time{})
	bw := bufio.NewWriterSize(ch, 32<<10)
	var buf []byte
	write := func(f *frame) error {
		buf = appendFrame(buf[:0], f)
		_, err := bw.Write(buf)
		return err
	}
	if err := relay.ValidateStreamName(sub.Room); err != nil {
		write(&frame{Type: frameError, Code: "bad_room", Reason: err.Error()})
		bw.Flush()
		return
	}
	r, release := s.Acquire(sub.Room, false)
	defer release()
	ctx, cancel := context.WithCancel(r.ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { ch.Close() })
	defer stop()

	win := NewAckWindow(8192)
	acks := make(chan Ack, win.Size())
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		defer cancel()
		for {
			f, b, err := readFrame(br, scratch)
			scratch = b
			if err != nil {
				return
			}
			if f.Type != frameSend || ValidateSend(f.Msg.ID, f.Msg.Text) != nil {
				s.log.Debug("chat: a neighbour sent a bad frame", "peer", ch.Peer(), "type", f.Type)
				return
			}
			if fresh, err := win.Acquire(ctx, f.Msg.ID); err != nil {
				return
			} else if !fresh {
				continue // in flight from this child already: its ack comes once
			}
			if err := r.Submit(ctx, f.Msg.ID, f.Msg.Nick, f.Msg.Text, acks); err != nil {
				return
			}
		}
	}()
	defer func() { cancel(); ch.Close(); <-readDone }()

	select {
	case <-r.Synced():
	case <-ctx.Done():
		return
	}
	epoch := sub.Epoch
	if epoch == AnyEpoch {
		epoch = "\x00none" // a child without history takes all of ours
	}
	cursor := sub.Since
	first := true
	for {
		v := r.Read(epoch, cursor, batchMax)
		if first || v.Reset {
			if err := write(&frame{Type: frameJoined, Epoch: v.Epoch, First: v.First, Last: v.Last, Reset: v.Reset}); err != nil {
				return
			}
			first = false
			epoch = v.Epoch
			if v.Reset {
				cursor = v.First - 1
			}
		}
		for i := range v.Len() {
			m := v.Msg(i)
			if err := write(&frame{Type: frameMsg, Msg: m}); err != nil {
				return
			}
			cursor = m.Seq
		}
	acks:
		for {
			select {
			case a := <-acks:
				win.Release(a.ID)
				if err := write(&frame{Type: frameAck, Msg: Msg{ID: a.ID}, Seq: a.Seq}); err != nil {
					return
				}
			default:
				break acks
			}
		}
		if v.Len() == batchMax {
			continue
		}
		if err := bw.Flush(); err != nil {
			return
		}
		select {
		case <-v.Changed:
		case a := <-acks:
			win.Release(a.ID)
			if err := write(&frame{Type: frameAck, Msg: Msg{ID: a.ID}, Seq: a.Seq}); err != nil {
				return
			}
		case <-ctx.Done():
			return
		}
	}
}
