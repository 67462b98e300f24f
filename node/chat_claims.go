package node

import (
	"context"
	"errors"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/stemflow/stemflow/relay/chat"
	"github.com/stemflow/stemflow/topology/store"
)

// chatClaims keeps the claims of rooms whose stream is not live in etcd
// (chat.Claims): the key PREFIX/chat/rooms/ROOM holds the datacenter that
// sequences the room, bound to that node's lease, so it goes with the node.
// Without etcd (or while the node is not registered) every call fails and
// each room decides alone.
type chatClaims struct{ n *Node }

var _ chat.Claims = chatClaims{}

var errNoControlPlane = errors.New("chat: no control plane (etcd) to hold the room's claim")

// session returns the etcd client, the room's key and this node's lease.
func (c chatClaims) session(room string) (*clientv3.Client, string, clientv3.LeaseID, error) {
	st := c.n.Store()
	ctl := c.n.control()
	if st == nil || ctl == nil {
		return nil, "", 0, errNoControlPlane
	}
	reg, _ := ctl.registration()
	if reg == nil {
		return nil, "", 0, errNoControlPlane
	}
	// The store's prefix, from a key it names (it keeps the prefix to
	// itself).
	prefix := strings.TrimSuffix(st.ElectionPrefix(), "manager/election")
	if !strings.HasSuffix(prefix, "/") {
		prefix = store.DefaultPrefix
	}
	return st.Client(), prefix + "chat/rooms/" + room, reg.Lease(), nil
}

func (c chatClaims) Owner(ctx context.Context, room string) (string, error) {
	cli, key, _, err := c.session(room)
	if err != nil {
		return "", err
	}
	resp, err := cli.Get(ctx, key)
	if err != nil {
		return "", err
	}
	if len(resp.Kvs) == 0 {
		return "", nil
	}
	return string(resp.Kvs[0].Value), nil
}

func (c chatClaims) Claim(ctx context.Context, room string, take bool) (string, error) {
	cli, key, lease, err := c.session(room)
	if err != nil {
		return "", err
	}
	dc := c.n.cfg.Datacenter
	put := clientv3.OpPut(key, dc, clientv3.WithLease(lease))
	if take {
		if _, err := cli.Put(ctx, key, dc, clientv3.WithLease(lease)); err != nil {
			return "", err
		}
		return dc, nil
	}
	resp, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(put).Else(clientv3.OpGet(key)).Commit()
	if err != nil {
		return "", err
	}
	if resp.Succeeded {
		return dc, nil
	}
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 0 {
		return "", nil // gone meanwhile: claim again next time
	}
	return string(kvs[0].Value), nil
}

func (c chatClaims) Release(ctx context.Context, room string) {
	cli, key, lease, err := c.session(room)
	if err != nil {
		return
	}
	cli.Txn(ctx).If(clientv3.Compare(clientv3.Value(key), "=", c.n.cfg.Datacenter),
		clientv3.Compare(clientv3.LeaseValue(key), "=", lease)).
		Then(clientv3.OpDelete(key)).Commit()
}
