package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"sync"
	"time"
)

// Errors callers branch on.
var (
	// ErrStreamNotFound: no stream of that name is live anywhere in the overlay.
	ErrStreamNotFound = errors.New("stream not found")
	// ErrStreamExists: a stream of that name is already live.
	ErrStreamExists = errors.New("stream is already being published")
	// ErrPublisherGone is the reason a stream ends when its publisher leaves.
	ErrPublisherGone = errors.New("publisher left")
	// ErrClosed: the hub is shutting down.
	ErrClosed = errors.New("relay: hub closed")
)

// Config configures a Hub.
type Config struct {
	// Datacenter is this node's datacenter name, e.g. "a".
	Datacenter string
	// Logger carries the node's attributes (dc); the hub adds only its own
	// (component=relay).
	Logger *slog.Logger
	// GOPMaxPackets bounds the GOP cache of each stream (default 4096).
	GOPMaxPackets int
	// Linger is how long a relayed stream stays subscribed upstream after its
	// last local subscriber left, so that a viewer who reloads the page gets
	// the stream at once (default 2s).
	Linger time.Duration
	// Claim, when set, is called by Publish before the stream exists (not
	// under any lock): the node claims the name in etcd. An error refuses the
	// publication and is returned to the publisher; release is called once
	// when the publication ends.
	Claim func(stream string) (release func(), err error)
	// Heartbeat is how often a link tells its neighbour it is alive
	// (default 50ms). SuspectAfter is how long a neighbour may be quiet
	// before the streams taken from it start moving to their backups
	// make-before-break (default DeadAfter/2); DeadAfter is how long it may
	// be silent before this node stops taking streams from it and switches
	// those not moved yet at once (default 300ms). See heartbeat.go.
	Heartbeat    time.Duration
	SuspectAfter time.Duration
	DeadAfter    time.Duration
}

// Hub holds the streams of one node. It is safe for concurrent use.
type Hub struct {
	cfg Config
	log *slog.Logger

	// mu guards the following fields and the hub-owned fields of every
	// Stream (its source, interest and linger timer): every decision about
	// streams, routes and links is taken under it, and the control messages
	// it implies are queued on the links before it is released, so that
	// they leave in the order of the decisions.
	mu      sync.Mutex
	streams map[string]*Stream           // published here or relayed here
	routes  map[string]map[string]advert // stream → neighbour → what it announced
	links   map[string]link              // connected neighbours by datacenter name
	steer   map[string]Route             // routes set by the topology layer (steer.go)
	silent  map[string]bool              // neighbours whose link is up but silent (heartbeat.go)
	wants   map[string]int               // Want holders by stream
	// interest is what Interest reports; interestChanged is closed and
	// replaced when it changes.
	interest        Interest
	interestChanged chan struct{}
	closed          bool

	chans channelTable // handlers of the neighbours' channels (channel.go)
}

// NewHub returns a hub with no streams.
func NewHub(cfg Config) *Hub {
	if cfg.GOPMaxPackets <= 0 {
		cfg.GOPMaxPackets = 4096
	}
	if cfg.Linger <= 0 {
		cfg.Linger = 2 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = defaultHeartbeat
	}
	if cfg.DeadAfter <= 0 {
		cfg.DeadAfter = defaultDeadAfter
	}
	if cfg.SuspectAfter <= 0 || cfg.SuspectAfter > cfg.DeadAfter {
		cfg.SuspectAfter = cfg.DeadAfter / 2
	}
	return &Hub{
		cfg:     cfg,
		log:     cfg.Logger.With("component", "relay"),
		streams: make(map[string]*Stream),
		routes:  make(map[string]map[string]advert),
		links:   make(map[string]link),
		steer:   make(map[string]Route),
		silent:  make(map[string]bool),
		wants:   make(map[string]int),

		interestChanged: make(chan struct{}),
	}
}

// Datacenter returns the hub's datacenter name.
func (h *Hub) Datacenter() string { return h.cfg.Datacenter }

// PublishOptions are the optional parts of a publication.
type PublishOptions struct {
	// OnKeyframeRequest is called (rate-limited, on no particular goroutine)
	// when a subscriber anywhere needs a keyframe. It must not block.
	OnKeyframeRequest func()
}

// Publish starts a stream published at this node. It fails with
// ErrStreamExists when the name is live here or anywhere in the overlay.
func (h *Hub) Publish(name string, desc Description, opts PublishOptions) (*Publisher, error) {
	if err := ValidateStreamName(name); err != nil {
		return nil, err
	}
	if err := desc.Validate(); err != nil {
		return nil, err
	}
	desc = desc.Clone()
	h.mu.Lock()
	err := h.publishableLocked(name)
	h.mu.Unlock()
	if err != nil {
		return nil, err
	}
	unclaim := func() {}
	if h.cfg.Claim != nil {
		release, err := h.cfg.Claim(name)
		if err != nil {
			return nil, fmt.Errorf("stream %q: %w", name, err)
		}
		if release != nil {
			unclaim = release
		}
	}
	h.mu.Lock()
	if err := h.publishableLocked(name); err != nil {
		h.mu.Unlock()
		unclaim()
		return nil, err
	}
	s := newStream(h, name, h.cfg.Datacenter)
	s.hops = []string{h.cfg.Datacenter}
	p := &Publisher{s: s, onKeyframe: opts.OnKeyframeRequest, unclaim: unclaim}
	s.src = p
	s.setReady(desc)
	h.streams[name] = s
	h.advertiseLocked(name, advert{})
	h.interestChangedLocked()
	h.mu.Unlock()
	h.log.Info("stream published", "stream", name, "tracks", len(desc.Tracks))
	return p, nil
}

// publishableLocked refuses a publication of a name live here or announced.
func (h *Hub) publishableLocked(name string) error {
	if h.closed {
		return ErrClosed
	}
	if s, ok := h.streams[name]; ok {
		return fmt.Errorf("%w: %q is live at datacenter %s", ErrStreamExists, name, s.origin)
	}
	for _, ad := range h.routes[name] { // through a silent neighbour too
		return fmt.Errorf("%w: %q is live at datacenter %s", ErrStreamExists, name, ad.hops[0])
	}
	return nil
}

// Subscribe attaches sub to the named stream, wherever in the overlay it is
// published, and returns once the stream's description is known. The GOP
// cache is replayed to sub before live packets. It fails with
// ErrStreamNotFound when the stream is not live.
func (h *Hub) Subscribe(ctx context.Context, name string, sub Subscriber) (*Subscription, error) {
	if err := ValidateStreamName(name); err != nil {
		return nil, err
	}
	from := ""
	if d, ok := sub.(downstreamSubscriber); ok {
		from = d.downstreamPeer()
	}
	local := from == ""
	s, err := h.acquire(name, from)
	if err != nil {
		return nil, err
	}
	if err := s.wait(ctx); err != nil {
		h.release(s, local)
		return nil, fmt.Errorf("stream %q: %w", name, err)
	}
	ss := s.attach(sub, local) // the subscription holds the interest acquire took
	select {
	case <-s.done:
		ss.Close()
		return nil, fmt.Errorf("stream %q: %w", name, s.err)
	default:
	}
	return ss, nil
}

// acquire returns the named stream, subscribing upstream when it is live in
// another datacenter, and takes an interest in it: a relayed stream stays
// while anything holds one (a Subscribe waiting for it, or attached) and
// lingers after the last is released. from is the downstream datacenter
// that asks, "" for this node's own clients: its interest is none of this
// node's clients', and the stream is never taken from it (a loop).
func (h *Hub) acquire(name, from string) (*Stream, error) {
	local := from == ""
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil, ErrClosed
	}
	s, ok := h.streams[name]
	if !ok {
		l, origin, hops := h.pickLinkLocked(name, map[string]bool{from: true})
		if l == nil {
			return nil, fmt.Errorf("%w: %q is not live in any datacenter", ErrStreamNotFound, name)
		}
		s = newStream(h, name, origin)
		s.hops = append(slices.Clone(hops), h.cfg.Datacenter)
		s.src = l.subscribe(s)
		s.in.setActive(s.src)
		h.streams[name] = s
	} else if from != "" && !s.localLocked() {
		// The neighbour asking takes it from here (its route says so),
		// while this node takes it from that neighbour (by
		// announcement): take it from elsewhere, or refuse the loop.
		h.syncSourcesLocked(s)
		if s.next != nil && s.next.peer() == from {
			h.dropJoiningLocked(s)
		}
		if s.src.peer() == from {
			if s.failed == nil {
				s.failed = make(map[string]bool)
			}
			s.failed[from] = true
			old := s.src
			if !h.replaceSourceLocked(s) {
				return nil, fmt.Errorf("stream %q: this datacenter takes it from datacenter %s and from nowhere else: subscribing there would loop", name, from)
			}
			old.stop()
		}
	}
	s.interest++
	if local {
		s.localInterest++
		h.interestChangedLocked()
	}
	h.stopLingerLocked(s)
	return s, nil
}

// release gives back an interest taken by acquire. When none is left, a
// relayed stream lingers, then stops and is unsubscribed upstream.
func (h *Hub) release(s *Stream, local bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	s.interest--
	if local {
		s.localInterest--
		h.interestChangedLocked()
	}
	if s.interest > 0 || h.streams[s.name] != s || s.localLocked() {
		return
	}
	h.stopLingerLocked(s)
	gen := s.lingerGen
	s.linger = time.AfterFunc(h.cfg.Linger, func() { h.lingerOut(s, gen) })
}

func (h *Hub) stopLingerLocked(s *Stream) {
	if s.linger != nil {
		s.linger.Stop()
		s.linger = nil
	}
	s.lingerGen++ // a timer that fired already finds it changed
}

// errIdle ends a relayed stream whose subscribers all left.
var errIdle = errors.New("no subscribers left")

// lingerOut stops a relayed stream that nothing took an interest in during
// the linger time that ended generation gen.
func (h *Hub) lingerOut(s *Stream, gen uint64) {
	h.mu.Lock()
	if s.lingerGen != gen || s.interest > 0 || h.streams[s.name] != s {
		h.mu.Unlock()
		return
	}
	stops := h.forgetLocked(s)
	h.mu.Unlock()
	for _, src := range stops {
		src.stop()
	}
	s.end(errIdle)
	h.log.Debug("relayed stream stopped: no subscribers", "stream", s.name, "linger", h.cfg.Linger)
}

// removeStream forgets s, stops its source and ends it.
func (h *Hub) removeStream(s *Stream, reason error) {
	h.mu.Lock()
	stops := []source{s.src}
	if h.streams[s.name] == s {
		stops = h.forgetLocked(s)
	}
	h.mu.Unlock()
	for _, src := range stops {
		src.stop()
	}
	s.end(reason)
}

// forgetLocked removes s from the streams and tells the neighbours what
// changed; it returns the sources to stop once h.mu is released.
func (h *Hub) forgetLocked(s *Stream) []source {
	h.syncSourcesLocked(s)
	stops := []source{s.src}
	if s.next != nil {
		stops = append(stops, s.next)
		s.in.drop(s.next)
		s.next = nil
	}
	before := h.advertLocked(s.name)
	delete(h.streams, s.name)
	h.stopLingerLocked(s)
	h.advertiseLocked(s.name, before)
	h.interestChangedLocked()
	return stops
}

// StreamInfo describes a live stream for listings. The HTTP API's JSON shape
// is not this struct's: node/api.go builds its own view from it.
type StreamInfo struct {
	Name string
	// Origin is the datacenter the stream is published at.
	Origin string
	// Local is true when the stream's packets reach this node now: it is
	// published here, or relayed here for local subscribers.
	Local       bool
	Tracks      []Track
	Subscribers int
	// Hops is the path of datacenters from the origin to this node, both
	// included: for a stream flowing here the path its packets take now
	// (it changes when the stream switches parent, here or upstream), for
	// one known only by announcement the best announced path.
	Hops []string
	// Since is when the stream started flowing at this node (Local only):
	// published here, or first subscribed from upstream. A relayed stream
	// that lingers out and is subscribed again starts afresh.
	Since time.Time
	// Packets and Bytes count the RTP packets that reached the stream at
	// this node since Since: from its publisher, or from upstream.
	Packets uint64
	Bytes   uint64
	// SentPackets and SentBytes count what the stream handed to its
	// subscribers at this node since Since, taps left out: each packet once
	// per local viewer (a WHEP viewer, or this node's RTSP server, which
	// shares one subscription among its readers) and once per downstream
	// datacenter, the GOP cache replayed to a joining subscriber included.
	SentPackets uint64
	SentBytes   uint64
	// BFrames is true when the stream's H264 video has B-frames, which
	// browsers do not play over WebRTC (see FlagBFrames).
	BFrames bool
}

// Streams lists every stream live in the overlay as this node knows it,
// sorted by name.
func (h *Hub) Streams() []StreamInfo {
	h.mu.Lock()
	out := make([]StreamInfo, 0, len(h.streams)+len(h.routes))
	seen := make(map[string]bool)
	var local []*Stream
	hops := make(map[*Stream][]string, len(h.streams))
	for name, s := range h.streams {
		seen[name] = true
		local = append(local, s)
		h.syncSourcesLocked(s)
		hops[s] = slices.Clone(s.hops)
	}
	for name := range h.routes {
		if r, ok := h.bestRouteLocked(name); ok && !seen[name] {
			out = append(out, StreamInfo{Name: name, Origin: r.origin, Hops: append(slices.Clone(r.hops), h.cfg.Datacenter),
				BFrames: r.flags&FlagBFrames != 0})
		}
	}
	h.mu.Unlock()
	for _, s := range local {
		info := StreamInfo{Name: s.name, Origin: s.origin, Local: true, Subscribers: s.subscriberCount(),
			Hops: hops[s], Since: s.since, Packets: s.packets.Load(), Bytes: s.bytes.Load(),
			SentPackets: s.sentPackets.Load(), SentBytes: s.sentBytes.Load(), BFrames: s.Flags()&FlagBFrames != 0}
		select {
		case <-s.ready:
			info.Tracks = append(info.Tracks, s.desc.Tracks...)
		default:
		}
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Close ends every stream and refuses new ones.
func (h *Hub) Close() {
	h.mu.Lock()
	h.closed = true
	streams := make([]*Stream, 0, len(h.streams))
	for _, s := range h.streams {
		streams = append(streams, s)
	}
	h.mu.Unlock()
	for _, s := range streams {
		h.removeStream(s, ErrClosed)
	}
}

// packetPool holds the Packets handed to subscribers, which escape through
// the Subscriber interface and would otherwise be allocated per packet.
var packetPool = sync.Pool{New: func() any { return new(Packet) }}

// Publisher writes the packets of a stream published at this node. Its methods
// are safe for concurrent use, e.g. one goroutine per track.
type Publisher struct {
	s          *Stream
	onKeyframe func()
	unclaim    func() // gives back the Config.Claim
	closeOnce  sync.Once
}

var _ source = (*Publisher)(nil)

// Stream returns the published stream.
func (p *Publisher) Stream() *Stream { return p.s }

// WriteRTP hands one RTP packet of the given track to every subscriber. data
// is not kept after the call returns.
func (p *Publisher) WriteRTP(track int, data []byte) error {
	if track < 0 || track >= len(p.s.desc.Tracks) {
		return fmt.Errorf("relay: track %d out of range (stream has %d)", track, len(p.s.desc.Tracks))
	}
	if len(data) > MaxPacketSize {
		return ErrPacketTooLarge
	}
	payload, _, ok := rtpPayload(data)
	if !ok {
		return errors.New("relay: malformed RTP packet")
	}
	pkt := packetPool.Get().(*Packet)
	*pkt = Packet{Track: uint8(track), Data: data}
	if t := &p.s.desc.Tracks[track]; t.Kind == KindVideo {
		pkt.Keyframe = IsKeyframe(t.MimeType, payload)
		p.inspect(t, payload)
	}
	p.s.writePacket(pkt)
	*pkt = Packet{}
	packetPool.Put(pkt)
	return nil
}

// Close ends the stream: subscribers see Done, and the overlay forgets it.
func (p *Publisher) Close() {
	p.closeOnce.Do(func() {
		p.s.hub.removeStream(p.s, ErrPublisherGone)
		p.unclaim()
		p.s.hub.log.Info("stream ended", "stream", p.s.name)
	})
}

func (p *Publisher) requestKeyframe() {
	if p.onKeyframe != nil {
		p.onKeyframe()
	}
}

func (p *Publisher) stop() {}

func (p *Publisher) peer() string { return "" }
