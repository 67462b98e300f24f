package store

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// PutLink writes the measured link l under links/{from}/{to}, leased by the
// registered node, which must be the link's sending end: l.From empty means
// the node's datacenter, any other datacenter is refused. FromNode is the
// node's id unless set, Updated the current time unless set. Call it only
// when the smoothed figures changed beyond hysteresis: every write wakes the
// manager.
func (s *Store) PutLink(ctx context.Context, r *Registration, l Link) error {
	if l.From == "" {
		l.From = r.dc
	}
	if l.From != r.dc {
		return fmt.Errorf("store: node %s/%s cannot write link %s→%s: a link is written by its sending end (from %s)", r.dc, r.node, l.From, l.To, r.dc)
	}
	if err := checkName("datacenter", l.To); err != nil {
		return err
	}
	if l.To == l.From {
		return fmt.Errorf("store: link %s→%s goes nowhere: from and to must differ", l.From, l.To)
	}
	if l.FromNode == "" {
		l.FromNode = r.node
	}
	if l.Updated.IsZero() {
		l.Updated = time.Now().UTC()
	}
	val, err := json.Marshal(l)
	if err != nil {
		return err
	}
	if _, err := s.cli.Put(ctx, s.LinkKey(l.From, l.To), string(val), clientv3.WithLease(r.lease)); err != nil {
		return fmt.Errorf("store: writing link %s→%s: %w", l.From, l.To, err)
	}
	return nil
}

// DeleteLink deletes the link from the node's datacenter to datacenter to,
// if this registration wrote it (a neighbour the node no longer links to).
// A link that is down but still configured should stay, with Down set: the
// manager then knows why the link is missing.
func (s *Store) DeleteLink(ctx context.Context, r *Registration, to string) error {
	if err := checkName("datacenter", to); err != nil {
		return err
	}
	return s.deleteIfOurs(ctx, r, s.LinkKey(r.dc, to))
}

// ListLinks returns every measured link, sorted by from and to.
func (s *Store) ListLinks(ctx context.Context) ([]Link, error) {
	return list[Link](ctx, s, linksDir, "links", sortLinks)
}

// ListStreams returns every published stream, sorted by name.
func (s *Store) ListStreams(ctx context.Context) ([]Stream, error) {
	return list[Stream](ctx, s, streamsDir, "streams", sortStreams)
}

// ListSubscriptions returns every datacenter's subscriptions, sorted by
// stream and datacenter.
func (s *Store) ListSubscriptions(ctx context.Context) ([]Subscription, error) {
	return list[Subscription](ctx, s, subscriptionsDir, "subscriptions", sortSubscriptions)
}

// ListRoutes returns every stream's route, sorted by stream.
func (s *Store) ListRoutes(ctx context.Context) ([]Route, error) {
	return list[Route](ctx, s, routesDir, "routes", func(rs []Route) {
		sort.Slice(rs, func(i, j int) bool { return rs[i].Stream < rs[j].Stream })
	})
}

func list[T any](ctx context.Context, s *Store, dir, what string, sortFn func([]T)) ([]T, error) {
	resp, err := s.cli.Get(ctx, s.prefix+dir, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("store: listing %s: %w", what, err)
	}
	out := make([]T, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		v, err := decode[T](string(kv.Key), kv.Value)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	sortFn(out)
	return out, nil
}

func sortLinks(ls []Link) {
	sort.Slice(ls, func(i, j int) bool {
		if ls[i].From != ls[j].From {
			return ls[i].From < ls[j].From
		}
		return ls[i].To < ls[j].To
	})
}

func sortStreams(ss []Stream) { sort.Slice(ss, func(i, j int) bool { return ss[i].Name < ss[j].Name }) }

func sortSubscriptions(ss []Subscription) {
	sort.Slice(ss, func(i, j int) bool {
		if ss[i].Stream != ss[j].Stream {
			return ss[i].Stream < ss[j].Stream
		}
		return ss[i].DC < ss[j].DC
	})
}

// LinkEvent is one change of links/: the link's new measurement, or its
// deletion (then only From and To are set).
type LinkEvent struct {
	Link    Link
	Deleted bool
}

// WatchLinks watches every link with one watch on the links/ prefix. It
// first sends every existing link, then each change; after a broken watch
// (a member lost, history compacted) it lists every link again and sends
// what changed meanwhile, deletions included, so a consumer that applies
// each event as the link's latest state stays right. The channel closes
// when ctx ends.
func (s *Store) WatchLinks(ctx context.Context) <-chan LinkEvent {
	ch := make(chan LinkEvent, 64)
	go func() {
		defer close(ch)
		s.watchPrefix(ctx, s.prefix+linksDir, func(evs []watchEvent, _ bool) bool {
			for _, ev := range evs {
				var e LinkEvent
				if ev.deleted {
					from, to, ok := strings.Cut(ev.rel, "/")
					if !ok {
						continue
					}
					e = LinkEvent{Link: Link{From: from, To: to}, Deleted: true}
				} else {
					l, err := decode[Link](ev.key, ev.value)
					if err != nil {
						continue
					}
					e = LinkEvent{Link: l}
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

// watchEvent is one key of a listing or one change of a watch: rel is the
// key below the watched prefix.
type watchEvent struct {
	key, rel string
	value    []byte
	deleted  bool
}

// watchPrefix lists pfx and then watches it, calling fn (which returns
// false to stop) with the whole listing (listing true) and then with each
// watch response's changes. After a broken watch it lists again; that
// listing also holds a deletion for every key gone meanwhile, so fn sees
// every change. It returns when ctx ends or fn returns false.
//
// dirs, when given, are the directories below pfx to list and watch (keys
// elsewhere under pfx are left out): they are listed in one transaction, so
// at one revision, and watched with one watch over pfx.
func (s *Store) watchPrefix(ctx context.Context, pfx string, fn func(evs []watchEvent, listing bool) bool, dirs ...string) {
	wanted := func(rel string) bool {
		for _, d := range dirs {
			if strings.HasPrefix(rel, d) {
				return true
			}
		}
		return len(dirs) == 0
	}
	gets := []clientv3.Op{clientv3.OpGet(pfx, clientv3.WithPrefix())}
	if len(dirs) > 0 {
		gets = gets[:0]
		for _, d := range dirs {
			gets = append(gets, clientv3.OpGet(pfx+d, clientv3.WithPrefix()))
		}
	}
	known := map[string]bool{}
	for ctx.Err() == nil {
		resp, err := s.cli.Txn(ctx).Then(gets...).Commit()
		if err != nil {
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
			continue
		}
		rev := resp.Header.Revision
		var kvs []*mvccpb.KeyValue
		for _, r := range resp.Responses {
			kvs = append(kvs, r.GetResponseRange().Kvs...)
		}
		evs := make([]watchEvent, 0, len(kvs))
		listed := make(map[string]bool, len(kvs))
		for _, kv := range kvs {
			k := string(kv.Key)
			rel := strings.TrimPrefix(k, pfx)
			if !wanted(rel) {
				continue
			}
			listed[k] = true
			evs = append(evs, watchEvent{key: k, rel: rel, value: kv.Value})
		}
		for k := range known {
			if !listed[k] {
				evs = append(evs, watchEvent{key: k, rel: strings.TrimPrefix(k, pfx), deleted: true})
			}
		}
		known = listed
		if !fn(evs, true) {
			return
		}
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		for wr := range s.cli.Watch(wctx, pfx, clientv3.WithPrefix(), clientv3.WithRev(rev+1)) {
			if wr.Err() != nil {
				break
			}
			evs = evs[:0:0]
			for _, ev := range wr.Events {
				k := string(ev.Kv.Key)
				rel := strings.TrimPrefix(k, pfx)
				if !wanted(rel) {
					continue
				}
				del := ev.Type == clientv3.EventTypeDelete
				if del {
					delete(known, k)
				} else {
					known[k] = true
				}
				evs = append(evs, watchEvent{key: k, rel: rel, value: ev.Kv.Value, deleted: del})
			}
			if len(evs) > 0 && !fn(evs, false) {
				cancel()
				return
			}
		}
		cancel()
	}
}
