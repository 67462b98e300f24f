package node

import (
	"context"
	"encoding/json"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/stemflow/stemflow/topology/store"
)

// etcdSource lists links and routes until topology/store has ListLinks and
// ListRoutes of its own.
type etcdSource struct{ *store.Store }

func (s etcdSource) ListLinks(ctx context.Context) ([]store.Link, error) {
	return listJSON[store.Link](ctx, s.Store, s.LinkKey("", "")[:len(s.LinkKey("", ""))-1])
}

func (s etcdSource) ListRoutes(ctx context.Context) ([]store.Route, error) {
	return listJSON[store.Route](ctx, s.Store, s.RouteKey(""))
}

func listJSON[T any](ctx context.Context, s *store.Store, pfx string) ([]T, error) {
	resp, err := s.Client().Get(ctx, pfx, clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
	if err != nil {
		return nil, err
	}
	var out []T
	for _, kv := range resp.Kvs {
		var v T
		if err := json.Unmarshal(kv.Value, &v); err != nil {
			return nil, &badValue{string(kv.Key), err}
		}
		out = append(out, v)
	}
	return out, nil
}

type badValue struct {
	key string
	err error
}

func (e *badValue) Error() string {
	return "store: " + e.key + " holds no valid value: " + e.err.Error()
}

func putLink(t *testing.T, ctx context.Context, s *store.Store, l store.Link) {
	t.Helper()
	b, _ := json.Marshal(l)
	if _, err := s.Client().Put(ctx, s.LinkKey(l.From, l.To), string(b)); err != nil {
		t.Fatal(err)
	}
}
