package store

import (
	"context"
	"strings"
)

// Kind says which directory of the prefix a TopologyEvent comes from.
type Kind uint8

// The kinds of TopologyEvent.
const (
	KindNode Kind = iota + 1
	KindLink
	KindStream
	KindSubscription
)

func (k Kind) String() string {
	switch k {
	case KindNode:
		return "node"
	case KindLink:
		return "link"
	case KindStream:
		return "stream"
	case KindSubscription:
		return "subscription"
	}
	return "unknown"
}

// TopologyEvent is one change of what the manager computes trees from: a
// node, link, stream or subscription written or deleted. A deletion carries
// only what its key names (a node's DC and Node; a link's From and To; a
// stream's Name; a subscription's Stream and DC).
type TopologyEvent struct {
	Kind         Kind
	Deleted      bool
	Node         Node
	Link         Link
	Stream       Stream
	Subscription Subscription
}

// TopologyBatch is what WatchTopology sends: a listing of the whole state,
// or the changes of one watch response.
type TopologyBatch struct {
	// Listing is set on a batch that lists the whole state (the first
	// batch, and the first after a broken watch). A listing after the
	// first also holds a deletion for every key gone while the watch was
	// broken, so applying every batch in order always gives the current
	// state.
	Listing bool
	Events  []TopologyEvent
}

// WatchTopology watches nodes/, links/, streams/ and subscriptions/ with
// one watch over the whole prefix (routes and the election are filtered
// out; the listing reads the four directories alone, in one transaction):
// first one batch listing everything, then one batch per change of
// etcd (a transaction's or a lease expiry's keys arrive together). The
// channel closes when ctx ends; a consumer that stops reading stalls the
// watch, not etcd.
func (s *Store) WatchTopology(ctx context.Context) <-chan TopologyBatch {
	ch := make(chan TopologyBatch, 16)
	go func() {
		defer close(ch)
		s.watchPrefix(ctx, s.prefix, func(evs []watchEvent, listing bool) bool {
			b := TopologyBatch{Listing: listing, Events: make([]TopologyEvent, 0, len(evs))}
			for _, ev := range evs {
				if te, ok := topologyEvent(ev); ok {
					b.Events = append(b.Events, te)
				}
			}
			select {
			case ch <- b:
				return true
			case <-ctx.Done():
				return false
			}
		}, nodesDir, linksDir, streamsDir, subscriptionsDir)
	}()
	return ch
}

// topologyEvent decodes one key; ok is false for a key that is not one of
// Stemflow's (a value that does not decode, a key of the wrong shape).
func topologyEvent(ev watchEvent) (TopologyEvent, bool) {
	dir, rest, _ := strings.Cut(ev.rel, "/")
	a, b, two := strings.Cut(rest, "/")
	var e TopologyEvent
	e.Deleted = ev.deleted
	var err error
	switch dir + "/" {
	case nodesDir:
		e.Kind = KindNode
		if !two {
			return e, false
		}
		if e.Node = (Node{DC: a, Node: b}); !ev.deleted {
			e.Node, err = decode[Node](ev.key, ev.value)
			e.Node.DC, e.Node.Node = a, b // the key names it
		}
	case linksDir:
		e.Kind = KindLink
		if !two {
			return e, false
		}
		if e.Link = (Link{From: a, To: b}); !ev.deleted {
			e.Link, err = decode[Link](ev.key, ev.value)
			e.Link.From, e.Link.To = a, b
		}
	case streamsDir:
		e.Kind = KindStream
		if two || rest == "" {
			return e, false
		}
		if e.Stream = (Stream{Name: rest}); !ev.deleted {
			e.Stream, err = decode[Stream](ev.key, ev.value)
			e.Stream.Name = rest
		}
	case subscriptionsDir:
		e.Kind = KindSubscription
		if !two {
			return e, false
		}
		if e.Subscription = (Subscription{Stream: a, DC: b}); !ev.deleted {
			e.Subscription, err = decode[Subscription](ev.key, ev.value)
			e.Subscription.Stream, e.Subscription.DC = a, b
		}
	default:
		return e, false
	}
	return e, err == nil
}
