package node

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/stemflow/stemflow/relay"
	"github.com/stemflow/stemflow/topology/store"
)

// The control plane's use of the relay's steering seam: claims of the
// streams published here (Config.Claim), subscriptions from what local
// clients want (Hub.Interest), and the manager's routes (Hub.SetRoute).

// claimReq asks the claims goroutine to claim a stream (reply set) or to
// release it (reply nil).
type claimReq struct {
	name  string
	reply chan error
}

// retryEvery is how soon a failed etcd write of the control plane is tried
// again.
const retryEvery = time.Second

// startSeam starts the goroutines that use the relay's steering seam.
func (c *control) startSeam() {
	c.wg.Add(3)
	go c.runClaims()
	go c.runSubscriptions()
	go c.runRoutes()
}

// claim claims a stream about to be published here: it fails, naming the
// holder, when another datacenter publishes it already. While etcd is away
// the publication goes ahead unclaimed and is claimed once etcd is back.
// release gives the claim back (asynchronously: it may be called under the
// hub's lock).
func (c *control) claim(name string) (release func(), err error) {
	req := claimReq{name: name, reply: make(chan error, 1)}
	select {
	case c.claimReqs <- req:
	case <-c.ctx.Done():
		return func() {}, nil
	}
	select {
	case err := <-req.reply:
		if err != nil {
			return nil, err
		}
	case <-c.ctx.Done():
		return func() {}, nil
	}
	released := false
	return func() {
		if released {
			return
		}
		released = true
		select {
		case c.releases <- name:
		default:
			// The goroutine is busy and the queue full: hand over later.
			go func() {
				select {
				case c.releases <- name:
				case <-c.ctx.Done():
				}
			}()
		}
	}, nil
}

// runClaims owns the claims: it claims and releases in the order asked, and
// claims every stream published here again after a new registration.
func (c *control) runClaims() {
	defer c.wg.Done()
	published := map[string]bool{}              // streams published here now
	claimed := map[string]*store.Registration{} // stream → the lease it is claimed with
	reclaim := time.NewTimer(time.Hour)
	defer reclaim.Stop()
	reclaimAll := func(reg *store.Registration) {
		failed := false
		for name := range published {
			if claimed[name] == reg {
				continue
			}
			ctx, cancel := context.WithTimeout(c.ctx, opTimeout)
			err := c.st.ClaimStream(ctx, reg, name)
			cancel()
			var taken *store.StreamTakenError
			switch {
			case errors.As(err, &taken):
				// Both published while cut off from each other: the other
				// claimed first. Its viewers get its stream; ours keep ours.
				c.log.Error("a stream published here is claimed in etcd by another datacenter (both were published while this node could not reach etcd): stop one of the publishers",
					"stream", name, "holder", taken.Holder.OriginDC)
				claimed[name] = reg // do not ask again under this lease
			case err != nil:
				failed = true
			default:
				claimed[name] = reg
			}
		}
		if failed {
			reclaim.Reset(retryEvery)
		}
	}
	for {
		reg, regChanged := c.registration()
		select {
		case <-c.ctx.Done():
			return
		case <-regChanged:
			if reg, _ := c.registration(); reg != nil {
				reclaimAll(reg)
			}
		case <-reclaim.C:
			if reg != nil {
				reclaimAll(reg)
			}
		case name := <-c.releases:
			delete(published, name)
			if r := claimed[name]; r != nil && r == reg {
				ctx, cancel := context.WithTimeout(c.ctx, opTimeout)
				if err := c.st.ReleaseStream(ctx, reg, name); err != nil {
					c.log.Debug("releasing a stream's claim failed: it goes with the node's lease", "stream", name, "err", err)
				}
				cancel()
			}
			delete(claimed, name)
		case req := <-c.claimReqs:
			if reg == nil {
				published[req.name] = true
				c.log.Warn("publishing a stream without claiming it in etcd (unreachable): it is claimed once etcd answers", "stream", req.name)
				req.reply <- nil
				continue
			}
			ctx, cancel := context.WithTimeout(c.ctx, opTimeout)
			err := c.st.ClaimStream(ctx, reg, req.name)
			cancel()
			var taken *store.StreamTakenError
			switch {
			case errors.As(err, &taken):
				req.reply <- fmt.Errorf("%w: %q is live at datacenter %s (claimed in etcd by node %s since %s)",
					relay.ErrStreamExists, req.name, taken.Holder.OriginDC, taken.Holder.OriginNode, taken.Holder.Since.Format(time.RFC3339))
				continue
			case err != nil:
				// etcd trouble: media first; claim it on the retry.
				c.log.Warn("claiming a stream in etcd failed: publishing it anyway, claiming it again shortly", "stream", req.name, "err", err)
				reclaim.Reset(retryEvery)
			default:
				claimed[req.name] = reg
			}
			published[req.name] = true
			req.reply <- nil
		}
	}
}

// runSubscriptions keeps subscriptions/{stream}/{dc} equal to the streams
// this node's own clients want (viewers, RTSP readers, chat rooms).
func (c *control) runSubscriptions() {
	defer c.wg.Done()
	subscribed := map[string]*store.Registration{} // stream → the lease it is written with
	retry := time.NewTimer(time.Hour)
	defer retry.Stop()
	for {
		in, inChanged := c.hub.Interest()
		reg, regChanged := c.registration()
		if reg != nil {
			failed := false
			want := map[string]bool{}
			for _, name := range in.Wanted {
				want[name] = true
				if subscribed[name] == reg {
					continue
				}
				ctx, cancel := context.WithTimeout(c.ctx, opTimeout)
				err := c.st.Subscribe(ctx, reg, name)
				cancel()
				if err != nil {
					failed = true
					continue
				}
				subscribed[name] = reg
			}
			for name, r := range subscribed {
				if want[name] {
					continue
				}
				if r == reg {
					ctx, cancel := context.WithTimeout(c.ctx, opTimeout)
					err := c.st.Unsubscribe(ctx, reg, name)
					cancel()
					if err != nil {
						failed = true
						continue
					}
				}
				delete(subscribed, name)
			}
			if failed {
				retry.Reset(retryEvery)
			}
		}
		select {
		case <-c.ctx.Done():
			return
		case <-inChanged:
		case <-regChanged:
		case <-retry.C:
		}
	}
}

// runRoutes watches routes/ and applies this datacenter's parent and backup
// of each stream to the hub. When etcd or the manager is gone the routes
// applied stay: streams keep flowing where they flow, and streams without a
// route flow by announcement.
func (c *control) runRoutes() {
	defer c.wg.Done()
	applied := map[string]relay.Route{} // what this node follows, by stream
	for ev := range c.st.WatchRoutes(c.ctx) {
		rt := ev.Route
		parent := rt.Parent[c.dc]
		if ev.Deleted || parent == "" {
			// Deleted, or not in this stream's tree (or its origin):
			// announcements decide for any viewer that comes before the
			// next tree.
			if _, ok := applied[ev.Stream]; ok {
				c.hub.ClearRoute(ev.Stream)
				delete(applied, ev.Stream)
				c.log.Info("route cleared: the stream flows by announcement here", "stream", ev.Stream)
			}
			continue
		}
		r := relay.Route{Parent: parent, Backup: rt.Backup[c.dc], Version: uint64(rt.Version)}
		if old, ok := applied[ev.Stream]; ok && old.Parent == r.Parent && old.Backup == r.Backup {
			c.hub.SetRoute(ev.Stream, r) // the version rises; nothing to say
			applied[ev.Stream] = r
			continue
		}
		c.hub.SetRoute(ev.Stream, r)
		applied[ev.Stream] = r
		c.log.Info("route applied", "stream", ev.Stream, "parent", r.Parent, "backup", r.Backup, "version", rt.Version)
	}
}
