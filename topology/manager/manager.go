// Package manager is Stemflow's topology manager: it decides which way each
// stream flows through the overlay and writes the decision to etcd as
// routes, which every node watches and follows.
//
// Every datacenter may run a manager; they campaign in one etcd election
// (store.Campaign, the candidate named by its datacenter) and only the
// leader plans. While it leads, a manager watches nodes, links, streams and
// subscriptions (store.WatchTopology), builds the overlay from them
// (datacenters with a live node; links that are up, with delay = RTT/2,
// their loss, capacity = measured bandwidth; streams with their origin,
// bitrate and subscribing datacenters), computes one tree per stream with
// topology's Planner, the routes in use given as the previous trees so that
// trees only move when a better one wins by a margin, and writes the routes
// whose tree changed, one version above the last. Bursts of changes are
// gathered for Config.Debounce before one recompute. A change of nodes or
// links re-places every stream; a change of a stream's subscribers or
// bitrate re-places that stream alone (keeping the others' load on the
// links), and every stream is re-placed again within 10 s after that. A new leader first
// reads the routes in etcd, so versions keep rising and hysteresis keeps
// the trees its predecessor chose: a takeover moves no stream.
//
// Writes are fenced by the leader key (store.Candidate.PutRoute): a manager
// deposed without noticing is refused, stops planning and waits to lead
// again. With no manager at all, the routes in etcd stay as they were and
// nodes keep following them.
package manager

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stemflow/stemflow/topology"
	"github.com/stemflow/stemflow/topology/store"
)

// DefaultBitrateKbps is the rate planned for a stream whose node has not
// published a measured one (store.Stream.BitrateKbps): a 720p30 H.264
// stream.
const DefaultBitrateKbps = 2500

// DefaultDebounce is how long the manager gathers changes before it
// recomputes.
const DefaultDebounce = 50 * time.Millisecond

// Config configures a manager.
type Config struct {
	// Store is the etcd connection (required). The manager does not close
	// it.
	Store *store.Store
	// ID names the manager in the election: its datacenter (required).
	ID string
	// Logger receives the manager's log; default slog.Default().
	Logger *slog.Logger
	// LeaseTTL is the election session's TTL (default
	// store.DefaultElectionTTL): a dead leader's standby takes over within
	// it.
	LeaseTTL time.Duration
	// Params tune the trees.
	Params topology.Params
	// DefaultBitrateKbps is planned for streams without a measured rate
	// (default DefaultBitrateKbps).
	DefaultBitrateKbps float64
	// Debounce is how long changes are gathered before a recompute
	// (default DefaultDebounce); a steady trickle of changes still
	// recomputes at least every 4 × Debounce.
	Debounce time.Duration
}

// Manager is one manager candidate. Its goroutine campaigns, and plans
// while it leads, until Close. Its methods are safe for concurrent use.
type Manager struct {
	cfg  Config
	log  *slog.Logger
	cand *store.Candidate

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	recomputes, fulls, written, deleted, refused atomic.Int64
	lastCompute                                  atomic.Int64 // ns
	unreached, overBound                         atomic.Int64
	planning                                     atomic.Bool
}

// Start validates cfg, starts campaigning and returns; the manager plans
// whenever it leads, until Close.
func Start(cfg Config) (*Manager, error) {
	if cfg.Store == nil {
		return nil, errors.New("manager: no store: give the etcd connection (store.Open)")
	}
	if err := topology.ValidateName(cfg.ID); err != nil {
		return nil, fmt.Errorf("manager: the manager's id is its datacenter: %w", err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.DefaultBitrateKbps <= 0 {
		cfg.DefaultBitrateKbps = DefaultBitrateKbps
	}
	if cfg.Debounce <= 0 {
		cfg.Debounce = DefaultDebounce
	}
	cand, err := cfg.Store.Campaign(cfg.ID, cfg.LeaseTTL)
	if err != nil {
		return nil, fmt.Errorf("manager: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{cfg: cfg, log: cfg.Logger.With("component", "manager", "dc", cfg.ID), cand: cand, ctx: ctx, cancel: cancel}
	m.wg.Add(1)
	go m.run()
	return m, nil
}

// Run is Start, then Close when ctx ends.
func Run(ctx context.Context, cfg Config) error {
	m, err := Start(cfg)
	if err != nil {
		return err
	}
	<-ctx.Done()
	m.Close()
	return nil
}

// Close stops planning, resigns the leadership if held (a standby takes
// over at once) and waits for the manager's goroutines.
func (m *Manager) Close() {
	m.cancel()
	m.wg.Wait()
	m.cand.Close()
}

// Leading reports whether this manager leads the election now.
func (m *Manager) Leading() bool {
	l, _ := m.cand.Leading()
	return l
}

// Status is what a manager has done, for tests and the topology API.
type Status struct {
	// Leading: this manager leads the election; Planning: it has read the
	// state and plans (it leads and is not refused).
	Leading, Planning bool
	// Recomputes counts the recomputes done (their writes included),
	// FullRecomputes those that re-placed every stream (the others
	// re-placed only streams whose subscribers or bitrate changed),
	// RoutesWritten and
	// RoutesDeleted the routes changed in etcd, Refused the writes that
	// the fence refused (this manager no longer led).
	Recomputes, FullRecomputes, RoutesWritten, RoutesDeleted, Refused int64
	// LastCompute is how long the last recompute took, without the
	// writes.
	LastCompute time.Duration
	// Unreached counts the subscriptions no tree reaches (no path, or no
	// capacity left), OverDelayBound those reached later than
	// Params.DelayBound, as of the last recompute.
	Unreached, OverDelayBound int64
}

// Status returns the manager's counters.
func (m *Manager) Status() Status {
	return Status{Leading: m.Leading(), Planning: m.planning.Load(), Recomputes: m.recomputes.Load(), FullRecomputes: m.fulls.Load(),
		RoutesWritten: m.written.Load(), RoutesDeleted: m.deleted.Load(), Refused: m.refused.Load(),
		LastCompute: time.Duration(m.lastCompute.Load()), Unreached: m.unreached.Load(), OverDelayBound: m.overBound.Load()}
}

func (m *Manager) run() {
	defer m.wg.Done()
	for m.ctx.Err() == nil {
		leading, changed := m.cand.Leading()
		if leading {
			m.log.Info("manager leads")
			err := m.lead(changed)
			m.planning.Store(false)
			if errors.Is(err, store.ErrNotLeader) {
				// Deposed before the candidate noticed: its session ends
				// soon, or it is still first in line. Look again later.
				m.log.Info("manager no longer leads: a write was refused")
				select {
				case <-changed:
				case <-m.ctx.Done():
				case <-time.After(time.Second):
				}
				continue
			}
			if m.ctx.Err() == nil {
				m.log.Info("manager no longer leads")
			}
			continue
		}
		select {
		case <-changed:
		case <-m.ctx.Done():
		}
	}
}

// lead plans until leadership changes (changed closes), the manager
// closes, or a write is refused (ErrNotLeader).
func (m *Manager) lead(changed <-chan struct{}) error {
	ctx, cancel := context.WithCancel(m.ctx)
	defer cancel()
	s := m.cfg.Store
	// The routes in use first: versions continue from them and hysteresis
	// keeps their trees.
	var routes map[string]store.Route
	for routes == nil {
		list, err := s.ListRoutes(ctx)
		if err == nil {
			routes = make(map[string]store.Route, len(list))
			for _, rt := range list {
				routes[rt.Stream] = rt
			}
			break
		}
		m.log.Warn("manager cannot read the routes in use; retrying", "err", err)
		select {
		case <-changed:
			return nil
		case <-ctx.Done():
			return nil
		case <-time.After(500 * time.Millisecond):
		}
	}
	st := newState()
	pln := newPlanner(m.cfg.Params, m.cfg.DefaultBitrateKbps)
	// What the next recompute covers: every stream (needFull: nodes or
	// links changed, or nothing was planned yet), or the streams whose
	// subscribers or bitrate changed.
	needFull, streams := true, map[string]bool{}
	var lastFull time.Time
	batches := s.WatchTopology(ctx)
	synced, dirty := false, false
	var first time.Time // of the changes not yet planned
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	var rebalance <-chan time.Time // a full recompute after incremental ones
	for {
		select {
		case <-changed:
			return nil
		case <-ctx.Done():
			return nil
		case b, ok := <-batches:
			if !ok {
				return nil
			}
			changes := b.Listing && !synced
			for _, ev := range b.Events {
				if !st.apply(ev) {
					continue
				}
				changes = true
				switch ev.Kind {
				case store.KindStream:
					streams[ev.Stream.Name] = true
				case store.KindSubscription:
					streams[ev.Subscription.Stream] = true
				default:
					needFull = true
				}
			}
			synced = synced || b.Listing
			if !synced || !changes {
				continue
			}
			now := time.Now()
			if !dirty {
				dirty, first = true, now
			}
			// Wait for the burst to end, but not for ever.
			timer.Reset(min(m.cfg.Debounce, first.Add(4*m.cfg.Debounce).Sub(now)))
		case <-rebalance:
			rebalance = nil
			needFull, dirty, first = true, true, time.Now()
			timer.Reset(0)
		case <-timer.C:
			full := needFull
			err := m.recompute(ctx, st, routes, pln, full, streams)
			dirty, needFull, streams = false, false, map[string]bool{}
			if full {
				lastFull, rebalance = time.Now(), nil
			} else if rebalance == nil {
				// Incremental placements depend on their order; re-place
				// everything now and then, as the design notes ask.
				rebalance = time.After(time.Until(lastFull.Add(rebalanceEvery)))
			}
			if err != nil {
				if errors.Is(err, store.ErrNotLeader) {
					return err
				}
				if ctx.Err() != nil {
					return nil
				}
				m.log.Warn("manager could not write every route; retrying in 500 ms", "err", err)
				needFull, dirty, first = true, true, time.Now()
				timer.Reset(500 * time.Millisecond)
			}
		}
	}
}

// rebalanceEvery is how long after a full recompute incremental ones are
// followed by another full one.
const rebalanceEvery = 10 * time.Second

// recompute plans every stream (full) or the named ones, and writes what
// changed, updating routes as it goes.
func (m *Manager) recompute(ctx context.Context, st *state, routes map[string]store.Route, pln *planner, full bool, names map[string]bool) error {
	start := time.Now()
	var puts []store.Route
	var deletes []string
	if full {
		puts, deletes = pln.full(st, routes, start.UTC())
		m.fulls.Add(1)
	} else {
		puts, deletes = pln.streams(st, routes, names, start.UTC())
	}
	took := time.Since(start)
	m.lastCompute.Store(int64(took))
	if u, o := int64(pln.unreached), int64(pln.overBound); u != m.unreached.Load() || o != m.overBound.Load() {
		if u > 0 || o > 0 {
			m.log.Warn("some subscribers are out of reach: their datacenters get the stream from announcements, or late",
				"unreached", u, "over_delay_bound", o)
		}
		m.unreached.Store(u)
		m.overBound.Store(o)
	}
	m.planning.Store(true)
	defer m.recomputes.Add(1) // counted once its writes are done
	var errs []error
	for i, err := range m.cand.PutRoutes(ctx, puts) {
		rt := puts[i]
		if errors.Is(err, store.ErrStaleRoute) {
			// Another writer went past the version we knew (a
			// predecessor's write after we read): continue above it.
			if cur, ok, gerr := m.cfg.Store.GetRoute(ctx, rt.Stream); gerr == nil && ok {
				rt.Version = cur.Version + 1
				err = m.cand.PutRoute(ctx, rt)
			}
		}
		if errors.Is(err, store.ErrNotLeader) {
			m.refused.Add(1)
			return err
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		routes[rt.Stream] = rt
		m.written.Add(1)
		m.log.Debug("route written", "stream", rt.Stream, "version", rt.Version, "parent", rt.Parent, "backup", rt.Backup)
	}
	if len(deletes) > 0 {
		err := m.cand.DeleteRoutes(ctx, deletes)
		if errors.Is(err, store.ErrNotLeader) {
			m.refused.Add(1)
			return err
		}
		if err != nil {
			errs = append(errs, err)
		} else {
			for _, name := range deletes {
				delete(routes, name)
				m.log.Debug("route deleted: the stream ended", "stream", name)
			}
			m.deleted.Add(int64(len(deletes)))
		}
	}
	if len(puts)+len(deletes) > 0 {
		m.log.Info("routes updated", "streams", len(st.streams), "full", full, "written", len(puts), "deleted", len(deletes),
			"compute", took.Round(time.Microsecond), "total", time.Since(start).Round(time.Millisecond))
	}
	return errors.Join(errs...)
}
