package node

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/stemflow/stemflow/relay"
	"github.com/stemflow/stemflow/topology/manager"
	"github.com/stemflow/stemflow/topology/store"
)

// control connects a node to the control plane in etcd: it registers the
// node (leased, TTL 3 s), claims the streams published here, publishes which
// streams are wanted here, applies the routes the manager computes, and
// publishes the measured links. etcd being away never stops media: the
// node keeps its last routes, and announcements route what has none; the
// control plane retries in the background and catches up when etcd is back.
//
// Each concern runs in a goroutine of its own (registration, claims,
// subscriptions, routes, measurement), all under one ctx; close cancels and
// waits for them.
type control struct {
	dc        string
	log       *slog.Logger
	hub       *relay.Hub
	st        *store.Store
	endpoints string
	self      store.Node // the registration's value
	ttl       time.Duration
	meter     *meter
	rates     *rates
	mgr       *manager.Manager // the manager candidate beside the node, if any

	ctx        context.Context
	cancel     context.CancelFunc
	wg         sync.WaitGroup
	closeStore sync.Once

	mu sync.Mutex // guards the following fields
	// reg is the node's lease while registered, nil while etcd is away.
	reg *store.Registration
	// regChanged is closed and replaced when reg changes.
	regChanged chan struct{}
	// abrupt: close without revoking the lease (the lab's kill: the keys
	// go when the lease expires, as after a crash).
	abrupt bool

	claimReqs chan claimReq // to runClaims
	releases  chan string   // to runClaims: streams no longer published here
}

// controlConfig is what a node's control plane needs.
type controlConfig struct {
	DC        string
	Etcd      EtcdConfig
	Hub       *relay.Hub
	Log       *slog.Logger
	Addresses map[string]string
	// Capacity returns the configured capacity of the link to a
	// neighbour, in bits per second, published as its bandwidth (0:
	// measured). It is called every interval, and must not block.
	Capacity func(peer string) int64
	// MeasureEvery is the measurement interval (default 1 s).
	MeasureEvery time.Duration
	// Manager runs a topology manager candidate beside the node, on the
	// node's etcd connection; ManagerLog is its logger (it adds the
	// datacenter itself).
	Manager    bool
	ManagerLog *slog.Logger
}

// startControl opens the store and starts the control plane's goroutines.
// It does not wait for etcd: an unreachable etcd is logged and retried.
func startControl(cfg controlConfig) (*control, error) {
	st, err := store.Open(store.Config{Endpoints: cfg.Etcd.Endpoints, Prefix: cfg.Etcd.Prefix,
		CAFile: cfg.Etcd.CAFile, CertFile: cfg.Etcd.CertFile, KeyFile: cfg.Etcd.KeyFile, DialTimeout: 2 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("etcd: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &control{
		dc:         cfg.DC,
		log:        cfg.Log.With("component", "control"),
		hub:        cfg.Hub,
		st:         st,
		endpoints:  strings.Join(cfg.Etcd.Endpoints, ","),
		self:       store.Node{DC: cfg.DC, Node: cfg.DC, Addresses: cfg.Addresses},
		ttl:        store.DefaultNodeTTL,
		ctx:        ctx,
		cancel:     cancel,
		regChanged: make(chan struct{}),
		claimReqs:  make(chan claimReq),
		releases:   make(chan string, 64),
	}
	c.meter = newMeter(cfg.DC, cfg.Hub.Links, cfg.Capacity)
	c.rates = newRates(cfg.DC, cfg.Hub.Streams)
	every := cfg.MeasureEvery
	if every <= 0 {
		every = time.Second
	}
	if cfg.Manager {
		if c.mgr, err = manager.Start(manager.Config{Store: st, ID: cfg.DC, Logger: cfg.ManagerLog}); err != nil {
			cancel()
			st.Close()
			return nil, err
		}
	}
	c.wg.Add(2)
	go c.runRegistration()
	go c.runMeasurements(every)
	c.startSeam()
	return c, nil
}

// registration returns the node's lease (nil while etcd is away) and a
// channel closed when it changes.
func (c *control) registration() (*store.Registration, <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reg, c.regChanged
}

func (c *control) setRegistration(r *store.Registration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.reg = r
	close(c.regChanged)
	c.regChanged = make(chan struct{})
}

// etcdDownLogEvery rate-limits the warning that etcd is unreachable.
const etcdDownLogEvery = 30 * time.Second

// runRegistration registers the node, keeps it registered, and registers
// again when the lease is lost (etcd away for longer than its TTL).
func (c *control) runRegistration() {
	defer c.wg.Done()
	var failingSince, lastWarn time.Time
	for c.ctx.Err() == nil {
		ctx, cancel := context.WithTimeout(c.ctx, 2*time.Second)
		reg, err := c.st.RegisterNode(ctx, c.self, c.ttl)
		cancel()
		if err != nil {
			if c.ctx.Err() != nil {
				return
			}
			now := time.Now()
			if failingSince.IsZero() {
				failingSince = now
			}
			if now.Sub(lastWarn) >= etcdDownLogEvery {
				lastWarn = now
				c.log.Warn("etcd unreachable: the node serves media without the control plane (streams route by announcements, routes already applied stay) and keeps retrying; check etcd.endpoints and that etcd runs",
					"etcd", c.endpoints, "for", now.Sub(failingSince).Round(time.Second), "err", err)
			}
			select {
			case <-c.ctx.Done():
				return
			case <-time.After(time.Second):
			}
			continue
		}
		if !failingSince.IsZero() {
			c.log.Info("etcd reachable again: node registered", "etcd", c.endpoints, "after", time.Since(failingSince).Round(time.Second))
		} else {
			c.log.Info("node registered in etcd", "etcd", c.endpoints)
		}
		failingSince, lastWarn = time.Time{}, time.Time{}
		c.setRegistration(reg)
		select {
		case <-reg.Lost():
			c.mu.Lock()
			abrupt := c.abrupt
			c.mu.Unlock()
			if abrupt || c.ctx.Err() != nil {
				return // killed: the client is closed, the lease runs out
			}
			c.setRegistration(nil)
			c.log.Warn("etcd lease lost (etcd unreachable for longer than its TTL): registering again; the node's streams, subscriptions and links are written again then", "etcd", c.endpoints)
		case <-c.ctx.Done():
			c.mu.Lock()
			abrupt := c.abrupt
			c.mu.Unlock()
			if !abrupt {
				reg.Close() // a clean goodbye: the node's keys go at once
			}
			return
		}
	}
}

// close stops the control plane. Unless abrupt, the node's lease is
// revoked, so its keys go at once.
func (c *control) close(abrupt bool) {
	if abrupt {
		c.abort()
	}
	if c.mgr != nil {
		// The manager resigns at once (unless abrupt). With etcd away its
		// campaign's resign waits on the etcd client's own context (etcd's
		// concurrency.Election.Campaign): closing the client ends it.
		done := make(chan struct{})
		go func() {
			defer close(done)
			c.mgr.Close()
		}()
		select {
		case <-done:
		case <-time.After(managerCloseWait):
			c.log.Warn("the manager did not resign in time (etcd unreachable): its election session expires instead", "etcd", c.endpoints)
			c.closeStore.Do(func() { c.st.Close() })
			<-done
		}
	}
	c.cancel()
	c.wg.Wait()
	c.closeStore.Do(func() { c.st.Close() })
}

// abort cuts the control plane off etcd at once, as when the process dies:
// the client closes, so the node's lease and its manager's election session
// run out on their own. close(true) then stops the goroutines.
func (c *control) abort() {
	c.mu.Lock()
	c.abrupt = true
	c.mu.Unlock()
	c.closeStore.Do(func() { c.st.Close() })
}

// managerCloseWait bounds a clean manager close while etcd is away.
const managerCloseWait = 3 * time.Second

// opTimeout bounds one etcd request of the control plane.
const opTimeout = 2 * time.Second
