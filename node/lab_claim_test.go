package node

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/rtc/rtctest"
	"github.com/stemflow/stemflow/internal/testutil"
)

// TestLabClaimRace: two WHIP publishers of one name at once, at a and at c,
// 300 ms apart each way (announcements cannot tell them in time): exactly
// one is accepted, the other is refused with 409 naming the datacenter
// that holds the name; etcd names the same holder. When the winner leaves,
// its claim goes and the name is free at the other datacenter.
func TestLabClaimRace(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 90*time.Second)
	l := startLab(t, "datacenters: [a, c]\nlinks:\n  - {between: [a, c], delay: 300ms}\n")
	s := labStore(t, l)
	eng := rtctest.NewEngine(t)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(20*time.Second))
	defer cancel()
	// Both nodes registered: their claims go to etcd.
	testutil.WaitFor(t, "a and c registered", func() bool { return nodesUp(s) == "[a c]" })

	var (
		wg   sync.WaitGroup
		pubs [2]*rtctest.Publisher
		errs [2]error
	)
	start := make(chan struct{})
	for i, dc := range []int{0, 1} {
		wg.Go(func() {
			<-start
			pubs[i], errs[i] = rtctest.Publish(ctx, eng, l.HTTPURL(dc)+"/whip/z", rtctest.PublishOptions{})
		})
	}
	close(start)
	wg.Wait()
	winner, loser := -1, -1
	for i := range 2 {
		if errs[i] == nil {
			t.Cleanup(pubs[i].Close)
			winner = i
		} else {
			loser = i
		}
	}
	if winner < 0 || loser < 0 {
		t.Fatalf("publishers of z at a and c at once: errors %v and %v, want exactly one accepted", errs[0], errs[1])
	}
	win := l.Datacenters()[winner]
	var se *rtctest.StatusError
	if !errors.As(errs[loser], &se) || se.Status != http.StatusConflict || !strings.Contains(se.Body, "is live at datacenter "+win) {
		t.Fatalf("the refused publisher got %v, want 409 naming datacenter %s", errs[loser], win)
	}
	t.Logf("winner %s; the other publisher was told: %d %s", win, se.Status, strings.TrimSpace(se.Body))
	st, ok, err := s.GetStream(ctx, "z")
	if err != nil || !ok || st.OriginDC != win {
		t.Errorf("etcd has streams/z %+v (ok %v, %v), want origin %s", st, ok, err, win)
	}

	// The winner leaves: its claim goes, and the other datacenter may
	// publish z.
	pubs[winner].Close()
	testutil.WaitFor(t, "streams/z to go", func() bool {
		_, ok, err := s.GetStream(ctx, "z")
		return err == nil && !ok
	})
	var p *rtctest.Publisher
	testutil.WaitFor(t, "z published at the other datacenter", func() bool {
		p, err = rtctest.Publish(ctx, eng, l.HTTPURL(loser)+"/whip/z", rtctest.PublishOptions{})
		return err == nil
	})
	defer p.Close()
	testutil.WaitFor(t, "etcd to name the new origin", func() bool {
		st, ok, err := s.GetStream(ctx, "z")
		return err == nil && ok && st.OriginDC == l.Datacenters()[loser]
	})
}
