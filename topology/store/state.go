package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sort"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// DefaultNodeTTL is how long a node's keys outlive its last keepalive: a
// dead node leaves the topology within this (plus etcd's expiry check, every
// 500 ms). The client sends keepalives every third of it.
const DefaultNodeTTL = 3 * time.Second

// ttlSeconds rounds a TTL up to whole seconds, etcd's unit.
func ttlSeconds(d time.Duration) int64 {
	return max(1, int64(math.Ceil(d.Seconds())))
}

// Registration is a node's lease: its nodes/{dc}/{node} key and every key
// it claims with it (the streams it publishes, its datacenter's
// subscriptions) live as long as the lease. A goroutine keeps the lease
// alive until Close.
type Registration struct {
	s        *Store
	dc, node string
	lease    clientv3.LeaseID
	cancel   context.CancelFunc
	lost     chan struct{} // closed when keepalives stop
	once     sync.Once
}

// RegisterNode writes n under nodes/{dc}/{node} with a lease of the given
// TTL (DefaultNodeTTL if 0) and keeps the lease alive until the returned
// Registration is closed. If keepalives fail for longer than the TTL (etcd
// unreachable), the lease expires and Lost's channel closes: register
// again.
func (s *Store) RegisterNode(ctx context.Context, n Node, ttl time.Duration) (*Registration, error) {
	if err := checkName("datacenter", n.DC); err != nil {
		return nil, err
	}
	if err := checkName("node", n.Node); err != nil {
		return nil, err
	}
	if ttl == 0 {
		ttl = DefaultNodeTTL
	}
	if n.Started.IsZero() {
		n.Started = time.Now().UTC()
	}
	val, err := json.Marshal(n)
	if err != nil {
		return nil, err
	}
	grant, err := s.cli.Grant(ctx, ttlSeconds(ttl))
	if err != nil {
		return nil, fmt.Errorf("store: registering node %s/%s: %w", n.DC, n.Node, err)
	}
	if _, err := s.cli.Put(ctx, s.NodeKey(n.DC, n.Node), string(val), clientv3.WithLease(grant.ID)); err != nil {
		s.revoke(grant.ID)
		return nil, fmt.Errorf("store: registering node %s/%s: %w", n.DC, n.Node, err)
	}
	kaCtx, cancel := context.WithCancel(context.Background())
	ka, err := s.cli.KeepAlive(kaCtx, grant.ID)
	if err != nil {
		cancel()
		s.revoke(grant.ID)
		return nil, fmt.Errorf("store: keeping node %s/%s alive: %w", n.DC, n.Node, err)
	}
	r := &Registration{s: s, dc: n.DC, node: n.Node, lease: grant.ID, cancel: cancel, lost: make(chan struct{})}
	go func() {
		for range ka { // the client closes ka when the lease is gone or kaCtx ends
		}
		close(r.lost)
	}()
	return r, nil
}

func (s *Store) revoke(id clientv3.LeaseID) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s.cli.Revoke(ctx, id) //nolint:errcheck // the lease expires anyway
}

// DC returns the registered node's datacenter.
func (r *Registration) DC() string { return r.dc }

// Node returns the registered node's id.
func (r *Registration) Node() string { return r.node }

// Lease returns the lease every key of the node is attached to.
func (r *Registration) Lease() clientv3.LeaseID { return r.lease }

// Lost returns a channel closed when the lease is no longer kept alive
// (Close, the client closed, or the lease expired).
func (r *Registration) Lost() <-chan struct{} { return r.lost }

// Close stops the keepalives and revokes the lease, so that the node's keys
// go at once (a clean goodbye). It waits for the keepalive goroutine.
func (r *Registration) Close() error {
	r.once.Do(func() {
		r.cancel()
		<-r.lost
		r.s.revoke(r.lease)
	})
	return nil
}

// ListNodes returns every registered node, sorted by datacenter and node.
func (s *Store) ListNodes(ctx context.Context) ([]Node, error) {
	resp, err := s.cli.Get(ctx, s.prefix+nodesDir, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("store: listing nodes: %w", err)
	}
	nodes := make([]Node, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		n, err := decode[Node](string(kv.Key), kv.Value)
		if err != nil {
			return nil, err
		}
		nodes = append(nodes, n)
	}
	sort.Slice(nodes, func(i, j int) bool {
		if nodes[i].DC != nodes[j].DC {
			return nodes[i].DC < nodes[j].DC
		}
		return nodes[i].Node < nodes[j].Node
	})
	return nodes, nil
}

// ErrStreamTaken is what ClaimStream's error matches (errors.Is) when
// another node publishes the stream already.
var ErrStreamTaken = errors.New("stream already published elsewhere")

// StreamTakenError says who holds a stream a node tried to claim.
type StreamTakenError struct {
	Holder Stream
}

func (e *StreamTakenError) Error() string {
	return fmt.Sprintf("store: stream %q is already published at datacenter %s (node %s) since %s: stop that publisher or pick another name",
		e.Holder.Name, e.Holder.OriginDC, e.Holder.OriginNode, e.Holder.Since.Format(time.RFC3339))
}

// Is makes errors.Is(err, ErrStreamTaken) hold.
func (e *StreamTakenError) Is(target error) bool { return target == ErrStreamTaken }

// ClaimStream records that the registered node publishes stream name. The
// key is written only if it does not exist (one transaction on
// CreateRevision == 0), so of two datacenters publishing one name at once
// exactly one wins; the other gets a *StreamTakenError naming the winner.
// The key is leased: it goes with the node. Claiming a stream the node
// holds already with this registration succeeds.
func (s *Store) ClaimStream(ctx context.Context, r *Registration, name string) error {
	if err := checkName("stream", name); err != nil {
		return err
	}
	key := s.StreamKey(name)
	val, err := json.Marshal(Stream{Name: name, OriginDC: r.dc, OriginNode: r.node, Since: time.Now().UTC()})
	if err != nil {
		return err
	}
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, string(val), clientv3.WithLease(r.lease))).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return fmt.Errorf("store: claiming stream %q: %w", name, err)
	}
	if resp.Succeeded {
		return nil
	}
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 0 { // deleted between the compare and the get: cannot happen in one txn
		return fmt.Errorf("store: claiming stream %q: the key vanished; try again", name)
	}
	if clientv3.LeaseID(kvs[0].Lease) == r.lease {
		return nil
	}
	holder, err := decode[Stream](key, kvs[0].Value)
	if err != nil {
		return err
	}
	return &StreamTakenError{Holder: holder}
}

// ReleaseStream deletes the stream's key if this registration holds it.
func (s *Store) ReleaseStream(ctx context.Context, r *Registration, name string) error {
	return s.deleteIfOurs(ctx, r, s.StreamKey(name))
}

func (s *Store) deleteIfOurs(ctx context.Context, r *Registration, key string) error {
	_, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.LeaseValue(key), "=", r.lease)).
		Then(clientv3.OpDelete(key)).
		Commit()
	if err != nil {
		return fmt.Errorf("store: deleting %s: %w", key, err)
	}
	return nil
}

// SetStreamBitrate records the measured rate of a stream the registered
// node publishes, for the manager's capacity planning. Like links, write it
// only when the rate changed by a margin (say 20 %), never per second. A
// stream this registration does not hold is refused.
func (s *Store) SetStreamBitrate(ctx context.Context, r *Registration, name string, kbps float64) error {
	key := s.StreamKey(name)
	for {
		resp, err := s.cli.Get(ctx, key)
		if err != nil {
			return fmt.Errorf("store: setting the bitrate of stream %q: %w", name, err)
		}
		if len(resp.Kvs) == 0 || clientv3.LeaseID(resp.Kvs[0].Lease) != r.lease {
			return fmt.Errorf("store: setting the bitrate of stream %q: node %s/%s does not hold it (claim it first)", name, r.dc, r.node)
		}
		st, err := decode[Stream](key, resp.Kvs[0].Value)
		if err != nil {
			return err
		}
		st.BitrateKbps = kbps
		val, err := json.Marshal(st)
		if err != nil {
			return err
		}
		txn, err := s.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(key), "=", resp.Kvs[0].ModRevision)).
			Then(clientv3.OpPut(key, string(val), clientv3.WithLease(r.lease))).
			Commit()
		if err != nil {
			return fmt.Errorf("store: setting the bitrate of stream %q: %w", name, err)
		}
		if txn.Succeeded {
			return nil
		}
	}
}

// GetStream returns who publishes a stream; ok is false when nobody does.
func (s *Store) GetStream(ctx context.Context, name string) (st Stream, ok bool, err error) {
	resp, err := s.cli.Get(ctx, s.StreamKey(name))
	if err != nil {
		return Stream{}, false, fmt.Errorf("store: reading stream %q: %w", name, err)
	}
	if len(resp.Kvs) == 0 {
		return Stream{}, false, nil
	}
	st, err = decode[Stream](string(resp.Kvs[0].Key), resp.Kvs[0].Value)
	return st, err == nil, err
}

// Subscribe records that the registered node's datacenter wants a stream,
// leased by the node.
func (s *Store) Subscribe(ctx context.Context, r *Registration, stream string) error {
	if err := checkName("stream", stream); err != nil {
		return err
	}
	val, err := json.Marshal(Subscription{Stream: stream, DC: r.dc, Node: r.node, Since: time.Now().UTC()})
	if err != nil {
		return err
	}
	if _, err := s.cli.Put(ctx, s.SubscriptionKey(stream, r.dc), string(val), clientv3.WithLease(r.lease)); err != nil {
		return fmt.Errorf("store: subscribing %s to %q: %w", r.dc, stream, err)
	}
	return nil
}

// Unsubscribe deletes the datacenter's subscription if this registration
// made it.
func (s *Store) Unsubscribe(ctx context.Context, r *Registration, stream string) error {
	return s.deleteIfOurs(ctx, r, s.SubscriptionKey(stream, r.dc))
}

// Subscribers returns the datacenters subscribed to a stream, sorted.
func (s *Store) Subscribers(ctx context.Context, stream string) ([]string, error) {
	pfx := s.prefix + subscriptionsDir + stream + "/"
	resp, err := s.cli.Get(ctx, pfx, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, fmt.Errorf("store: listing subscribers of %q: %w", stream, err)
	}
	dcs := make([]string, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		dcs = append(dcs, strings.TrimPrefix(string(kv.Key), pfx))
	}
	sort.Strings(dcs)
	return dcs, nil
}

// ErrStaleRoute is returned by PutRoute for a version not above the stored
// one.
var ErrStaleRoute = errors.New("route version not above the stored one")

// PutRoute writes a stream's route if its Version is above the stored
// route's (compare-and-swap on the key's revision, so two writers cannot
// both replace one version).
func (s *Store) PutRoute(ctx context.Context, rt Route) error {
	return s.putRoute(ctx, rt, "", 0)
}

// DeleteRoute deletes a stream's route (the stream ended). Nodes see the
// deletion and fall back to announcements.
func (s *Store) DeleteRoute(ctx context.Context, stream string) error {
	return s.deleteRoute(ctx, stream, "", 0)
}

func (s *Store) deleteRoute(ctx context.Context, stream, leaderKey string, leaderRev int64) error {
	if err := checkName("stream", stream); err != nil {
		return err
	}
	key := s.RouteKey(stream)
	if leaderKey == "" {
		if _, err := s.cli.Delete(ctx, key); err != nil {
			return fmt.Errorf("store: deleting the route of %q: %w", stream, err)
		}
		return nil
	}
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(leaderKey), "=", leaderRev)).
		Then(clientv3.OpDelete(key)).
		Commit()
	if err != nil {
		return fmt.Errorf("store: deleting the route of %q: %w", stream, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("store: route of %q not deleted: %w", stream, ErrNotLeader)
	}
	return nil
}

// putRoute is PutRoute, fenced by a leader key when leaderKey is set: the
// write happens only while that key exists with that create revision.
func (s *Store) putRoute(ctx context.Context, rt Route, leaderKey string, leaderRev int64) error {
	if err := checkName("stream", rt.Stream); err != nil {
		return err
	}
	key := s.RouteKey(rt.Stream)
	if rt.Computed.IsZero() {
		rt.Computed = time.Now().UTC()
	}
	val, err := json.Marshal(rt)
	if err != nil {
		return err
	}
	for {
		cur, err := s.cli.Get(ctx, key)
		if err != nil {
			return fmt.Errorf("store: writing route of %q: %w", rt.Stream, err)
		}
		var modRev int64
		if len(cur.Kvs) > 0 {
			old, err := decode[Route](key, cur.Kvs[0].Value)
			if err == nil && old.Version >= rt.Version {
				return fmt.Errorf("store: route of %q version %d: %w (%d)", rt.Stream, rt.Version, ErrStaleRoute, old.Version)
			}
			modRev = cur.Kvs[0].ModRevision
		}
		cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", modRev)}
		var orElse []clientv3.Op
		if leaderKey != "" {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(leaderKey), "=", leaderRev))
			orElse = append(orElse, clientv3.OpGet(leaderKey))
		}
		resp, err := s.cli.Txn(ctx).If(cmps...).Then(clientv3.OpPut(key, string(val))).Else(orElse...).Commit()
		if err != nil {
			return fmt.Errorf("store: writing route of %q: %w", rt.Stream, err)
		}
		if resp.Succeeded {
			return nil
		}
		if leaderKey != "" {
			kvs := resp.Responses[0].GetResponseRange().Kvs
			if len(kvs) == 0 || kvs[0].CreateRevision != leaderRev {
				return fmt.Errorf("store: route of %q not written: %w", rt.Stream, ErrNotLeader)
			}
		}
		// Another writer came between the read and the write: look again.
	}
}

// GetRoute returns a stream's route; ok is false when it has none.
func (s *Store) GetRoute(ctx context.Context, stream string) (rt Route, ok bool, err error) {
	resp, err := s.cli.Get(ctx, s.RouteKey(stream))
	if err != nil {
		return Route{}, false, fmt.Errorf("store: reading route of %q: %w", stream, err)
	}
	if len(resp.Kvs) == 0 {
		return Route{}, false, nil
	}
	rt, err = decode[Route](string(resp.Kvs[0].Key), resp.Kvs[0].Value)
	return rt, err == nil, err
}

// RouteEvent is one change of routes/: the stream's new route, or its
// deletion.
type RouteEvent struct {
	Stream  string
	Route   Route // zero when Deleted
	Deleted bool
}

// WatchRoutes watches every route with one watch on the routes/ prefix (one
// per node, not one per stream). It first sends every existing route, then
// each change. After a broken watch (a member lost, history compacted) it
// lists every route again before watching on, and sends a deletion for
// every route gone meanwhile, so a consumer that applies each event as the
// stream's latest state stays right. A deleted route's stream may come back
// later with versions starting again at 1: forget a stream's version when
// its route is deleted. The channel closes when ctx ends.
func (s *Store) WatchRoutes(ctx context.Context) <-chan RouteEvent {
	ch := make(chan RouteEvent, 64)
	go func() {
		defer close(ch)
		s.watchPrefix(ctx, s.prefix+routesDir, func(evs []watchEvent, _ bool) bool {
			for _, ev := range evs {
				e := RouteEvent{Stream: ev.rel, Deleted: ev.deleted}
				if !e.Deleted {
					rt, err := decode[Route](ev.key, ev.value)
					if err != nil {
						continue
					}
					e.Route = rt
				}
				select {
				case ch <- e:
				case <-ctx.Done():
					return false
				}
			}
			return true
		})
	}()
	return ch
}

// routeBatch is how many routes one transaction writes: etcd refuses
// transactions of more than 128 operations (or comparisons) by default.
const routeBatch = 100

// putRoutes is putRoute for many routes at once, in transactions of up to
// routeBatch: one reads the batch's keys, one writes them, comparing each
// key's revision with the one read (and the leader key, when set). It
// returns one error per route, nil where the route was written.
func (s *Store) putRoutes(ctx context.Context, rts []Route, leaderKey string, leaderRev int64) []error {
	errs := make([]error, len(rts))
	for lo := 0; lo < len(rts); lo += routeBatch {
		hi := min(lo+routeBatch, len(rts))
		if err := s.putRouteBatch(ctx, rts[lo:hi], errs[lo:hi], leaderKey, leaderRev); err != nil {
			for i := lo; i < len(rts); i++ {
				if errs[i] == nil {
					errs[i] = err
				}
			}
			break
		}
	}
	return errs
}

// putRouteBatch writes one batch, filling errs for routes refused one by
// one (a bad name, a stale version); it returns an error that ends the
// whole write (etcd failed, or the fence refused).
func (s *Store) putRouteBatch(ctx context.Context, rts []Route, errs []error, leaderKey string, leaderRev int64) error {
	vals := make([]string, len(rts))
	for i := range rts {
		if err := checkName("stream", rts[i].Stream); err != nil {
			errs[i] = err
			continue
		}
		if rts[i].Computed.IsZero() {
			rts[i].Computed = time.Now().UTC()
		}
		b, err := json.Marshal(rts[i])
		if err != nil {
			errs[i] = err
			continue
		}
		vals[i] = string(b)
	}
	for {
		var gets []clientv3.Op
		var idx []int
		for i, rt := range rts {
			if errs[i] == nil {
				gets = append(gets, clientv3.OpGet(s.RouteKey(rt.Stream)))
				idx = append(idx, i)
			}
		}
		if len(idx) == 0 {
			return nil
		}
		cur, err := s.cli.Txn(ctx).Then(gets...).Commit()
		if err != nil {
			return fmt.Errorf("store: reading routes before writing them: %w", err)
		}
		var cmps []clientv3.Cmp
		var puts []clientv3.Op
		for j, i := range idx {
			key := s.RouteKey(rts[i].Stream)
			var modRev int64
			if kvs := cur.Responses[j].GetResponseRange().Kvs; len(kvs) > 0 {
				old, err := decode[Route](key, kvs[0].Value)
				if err == nil && old.Version >= rts[i].Version {
					errs[i] = fmt.Errorf("store: route of %q version %d: %w (%d)", rts[i].Stream, rts[i].Version, ErrStaleRoute, old.Version)
					continue
				}
				modRev = kvs[0].ModRevision
			}
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(key), "=", modRev))
			puts = append(puts, clientv3.OpPut(key, vals[i]))
		}
		if len(puts) == 0 {
			return nil
		}
		var orElse []clientv3.Op
		if leaderKey != "" {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(leaderKey), "=", leaderRev))
			orElse = append(orElse, clientv3.OpGet(leaderKey))
		}
		resp, err := s.cli.Txn(ctx).If(cmps...).Then(puts...).Else(orElse...).Commit()
		if err != nil {
			return fmt.Errorf("store: writing routes: %w", err)
		}
		if resp.Succeeded {
			return nil
		}
		if leaderKey != "" {
			kvs := resp.Responses[0].GetResponseRange().Kvs
			if len(kvs) == 0 || kvs[0].CreateRevision != leaderRev {
				return fmt.Errorf("store: routes not written: %w", ErrNotLeader)
			}
		}
		// Another writer changed one of the keys between the read and the
		// write: read the batch again (a route now stale is refused).
	}
}

// deleteRoutes deletes routes in transactions of up to routeBatch, fenced
// by the leader key when set.
func (s *Store) deleteRoutes(ctx context.Context, streams []string, leaderKey string, leaderRev int64) error {
	for lo := 0; lo < len(streams); lo += routeBatch {
		var dels []clientv3.Op
		for _, name := range streams[lo:min(lo+routeBatch, len(streams))] {
			if err := checkName("stream", name); err != nil {
				return err
			}
			dels = append(dels, clientv3.OpDelete(s.RouteKey(name)))
		}
		txn := s.cli.Txn(ctx)
		if leaderKey != "" {
			txn = txn.If(clientv3.Compare(clientv3.CreateRevision(leaderKey), "=", leaderRev))
		}
		resp, err := txn.Then(dels...).Commit()
		if err != nil {
			return fmt.Errorf("store: deleting routes: %w", err)
		}
		if !resp.Succeeded {
			return fmt.Errorf("store: routes not deleted: %w", ErrNotLeader)
		}
	}
	return nil
}
