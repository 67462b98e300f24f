package e2e

import (
	"context"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"

	"github.com/stemflow/stemflow/node"
)

// startCluster starts datacenters a, b and c (a full mesh) in this process and
// returns their HTTP base URLs. The test runs in a fresh network namespace,
// so fixed ports cannot collide with anything.
func startCluster(t *testing.T, ctx context.Context) []string {
	t.Helper()
	sctx, cancel := context.WithTimeout(ctx, testutil.Scale(20*time.Second))
	defer cancel()
	c, err := node.StartDev(sctx, node.DevConfig{
		DCs:      []string{"a", "b", "c"},
		Bind:     "127.0.0.1",
		HTTPPort: 18080,
		RTSPPort: 18554,
	})
	if err != nil {
		t.Fatalf("cannot start the dev cluster: %v", err)
	}
	t.Cleanup(c.Close)
	return []string{c.HTTPURL(0), c.HTTPURL(1), c.HTTPURL(2)}
}
