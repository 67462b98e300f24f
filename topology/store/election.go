package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// DefaultElectionTTL is the manager session's TTL: a dead leader's
// candidacy lapses within it and a standby takes over. A little longer than
// DefaultNodeTTL, as a leader change costs more than a node's departure.
const DefaultElectionTTL = 5 * time.Second

// Candidate campaigns for manager leadership under manager/election (etcd's
// concurrency election) from a goroutine of its own, until Close. When its
// session's lease expires (etcd unreachable for longer than the TTL) it
// stops leading and campaigns again with a new session.
type Candidate struct {
	s   *Store
	id  string
	ttl int64

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex // guards the following fields
	leading bool
	changed chan struct{} // closed and replaced when leading changes
	// key and rev identify the term's leader key while leading.
	key string
	rev int64

	deposed chan struct{} // a fenced write was refused: end the term
}

// ErrNotLeader is returned by Candidate.PutRoute when the candidate does not
// lead (any more).
var ErrNotLeader = errors.New("this manager does not lead")

// PutRoute is Store.PutRoute fenced by leadership: the route is written in
// one transaction with a check that this candidate's leader key still
// exists, so a deposed manager that has not noticed yet (its session
// expired while it was cut off) cannot overwrite its successor's routes.
func (c *Candidate) PutRoute(ctx context.Context, rt Route) error {
	c.mu.Lock()
	leading, key, rev := c.leading, c.key, c.rev
	c.mu.Unlock()
	if !leading {
		return fmt.Errorf("store: route of %q not written by manager %s: %w", rt.Stream, c.id, ErrNotLeader)
	}
	return c.fenced(c.s.putRoute(ctx, rt, key, rev))
}

// DeleteRoute is Store.DeleteRoute fenced by leadership, as PutRoute is.
func (c *Candidate) DeleteRoute(ctx context.Context, stream string) error {
	c.mu.Lock()
	leading, key, rev := c.leading, c.key, c.rev
	c.mu.Unlock()
	if !leading {
		return fmt.Errorf("store: route of %q not deleted by manager %s: %w", stream, c.id, ErrNotLeader)
	}
	return c.fenced(c.s.deleteRoute(ctx, stream, key, rev))
}

// PutRoutes writes many routes, as PutRoute each but in transactions of
// up to 100 routes (two round trips per batch instead of two per route),
// fenced by leadership. It returns one error per route, nil where the route
// was written: ErrStaleRoute for a version not above the stored one; after
// ErrNotLeader or an etcd failure, every route not yet written has that
// error.
func (c *Candidate) PutRoutes(ctx context.Context, rts []Route) []error {
	c.mu.Lock()
	leading, key, rev := c.leading, c.key, c.rev
	c.mu.Unlock()
	if !leading {
		errs := make([]error, len(rts))
		for i := range errs {
			errs[i] = fmt.Errorf("store: routes not written by manager %s: %w", c.id, ErrNotLeader)
		}
		return errs
	}
	errs := c.s.putRoutes(ctx, rts, key, rev)
	for _, err := range errs {
		if errors.Is(err, ErrNotLeader) {
			c.fenced(err)
			break
		}
	}
	return errs
}

// DeleteRoutes deletes many routes in transactions of up to 100, fenced by
// leadership.
func (c *Candidate) DeleteRoutes(ctx context.Context, streams []string) error {
	c.mu.Lock()
	leading, key, rev := c.leading, c.key, c.rev
	c.mu.Unlock()
	if !leading {
		return fmt.Errorf("store: routes not deleted by manager %s: %w", c.id, ErrNotLeader)
	}
	return c.fenced(c.s.deleteRoutes(ctx, streams, key, rev))
}

// fenced passes err through; when the fence refused a write (the leader
// key is gone: this candidate was deposed without noticing), it also ends
// the term, so that Leading turns false and the candidate campaigns again.
func (c *Candidate) fenced(err error) error {
	if errors.Is(err, ErrNotLeader) {
		select {
		case c.deposed <- struct{}{}:
		default:
		}
	}
	return err
}

// ID returns the candidate's id.
func (c *Candidate) ID() string { return c.id }

// Campaign starts a candidate named id (the datacenter whose manager it
// is) with a session of the given TTL (DefaultElectionTTL if 0).
func (s *Store) Campaign(id string, ttl time.Duration) (*Candidate, error) {
	if err := checkName("candidate", id); err != nil {
		return nil, err
	}
	if ttl == 0 {
		ttl = DefaultElectionTTL
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Candidate{s: s, id: id, ttl: ttlSeconds(ttl), ctx: ctx, cancel: cancel, changed: make(chan struct{}),
		deposed: make(chan struct{}, 1)}
	c.wg.Add(1)
	go c.run()
	return c, nil
}

// Leading reports whether this candidate leads now, and a channel that
// closes at the next change.
func (c *Candidate) Leading() (bool, <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.leading, c.changed
}

func (c *Candidate) setLeading(v bool, key string, rev int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.key, c.rev = key, rev
	if c.leading != v {
		c.leading = v
		close(c.changed)
		c.changed = make(chan struct{})
	}
}

// Close resigns (if leading) and ends the campaign; it waits for the
// candidate's goroutine.
func (c *Candidate) Close() {
	c.cancel()
	c.wg.Wait()
}

func (c *Candidate) run() {
	defer c.wg.Done()
	for c.ctx.Err() == nil {
		if err := c.term(); err != nil {
			select {
			case <-c.ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
}

// term campaigns with one session and leads until the session ends or the
// candidate closes.
func (c *Candidate) term() error {
	grant, err := c.s.cli.Grant(c.ctx, c.ttl)
	if err != nil {
		return err
	}
	// The session's own context must outlive c.ctx so that Close can still
	// resign and revoke after c.ctx ended.
	sessCtx, sessCancel := context.WithCancel(context.Background())
	defer sessCancel()
	sess, err := concurrency.NewSession(c.s.cli, concurrency.WithLease(grant.ID), concurrency.WithTTL(int(c.ttl)), concurrency.WithContext(sessCtx))
	if err != nil {
		c.s.revoke(grant.ID)
		return err
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		sess.Orphan()
		c.s.cli.Revoke(ctx, grant.ID) //nolint:errcheck // the lease expires anyway
	}()
	el := concurrency.NewElection(sess, c.s.ElectionPrefix())
	// Stop campaigning when the session dies: the candidacy went with it.
	campCtx, campCancel := context.WithCancel(c.ctx)
	defer campCancel()
	go func() {
		select {
		case <-sess.Done():
			campCancel()
		case <-campCtx.Done():
		}
	}()
	if err := el.Campaign(campCtx, c.id); err != nil {
		return err
	}
	select {
	case <-c.deposed: // refused in an earlier term
	default:
	}
	c.setLeading(true, el.Key(), el.Rev())
	defer c.setLeading(false, "", 0)
	select {
	case <-c.deposed:
		// Our leader key is gone though the session lives: a write was
		// refused. End the session (the deferred revoke) and campaign
		// again, behind whoever leads now.
		return fmt.Errorf("store: manager %s was deposed: its leader key is gone", c.id)
	case <-sess.Done():
		return fmt.Errorf("store: manager %s lost its election session", c.id)
	case <-c.ctx.Done():
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		el.Resign(ctx) //nolint:errcheck // revoking the lease next ends the term anyway
		return nil
	}
}

// Leader returns the id of the leading manager, or "" when none leads.
func (s *Store) Leader(ctx context.Context) (string, error) {
	resp, err := s.cli.Get(ctx, s.ElectionPrefix()+"/", clientv3.WithFirstCreate()...)
	if err != nil {
		return "", fmt.Errorf("store: reading the manager leader: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return "", nil
	}
	return string(resp.Kvs[0].Value), nil
}
