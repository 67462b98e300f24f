package node

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/relay/chat"
)

// TestChatMetricsGoWithRoom: a room's series leave /metrics's collector when
// the room goes away here (its last holder left, Linger passed); another
// room's stay.
func TestChatMetricsGoWithRoom(t *testing.T) {
	testutil.CheckLeaks(t)
	svc := chat.NewService(chat.Config{Datacenter: "a", Linger: 100 * time.Millisecond, Logger: testutil.Logger()})
	defer svc.Close()
	reg := prometheus.NewRegistry()
	reg.MustRegister(newChatCollector("a", svc))
	rooms := map[string]func(){}
	for _, name := range []string{"gone", "stays"} {
		r, release := svc.Acquire(name, true)
		rooms[name] = release
		<-r.Synced()
		acks := make(chan chat.Ack, 1)
		if err := r.Submit(context.Background(), "m1", "ann", "hello", acks); err != nil {
			t.Fatal(err)
		}
		select {
		case <-acks:
		case <-time.After(testutil.Scale(5 * time.Second)):
			t.Fatalf("room %s: no ack", name)
		}
	}
	defer rooms["stays"]()
	// series returns the rooms with a stemflow_chat_sequenced_total series
	// and the number of series labelled with each.
	series := func() map[string]int {
		fams, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]int{}
		for _, f := range fams {
			for _, m := range f.Metric {
				for _, l := range m.Label {
					if l.GetName() == "room" {
						out[l.GetValue()]++
					}
				}
			}
		}
		return out
	}
	if s := series(); s["gone"] != len(chatMetrics) || s["stays"] != len(chatMetrics) {
		t.Fatalf("series by room %v, want %d for each of gone and stays", s, len(chatMetrics))
	}
	rooms["gone"]()
	testutil.WaitFor(t, "room gone's series to leave", func() bool { return series()["gone"] == 0 })
	if s := series(); s["stays"] != len(chatMetrics) {
		t.Fatalf("series by room %v after gone left: want stays' %d", s, len(chatMetrics))
	}
	// The room held again starts its series again, from zero.
	r, release := svc.Acquire("gone", true)
	defer release()
	<-r.Synced()
	st, _ := svc.Stats()
	for _, s := range st {
		if s.Room == "gone" && s.Sequenced != 0 {
			t.Errorf("room gone held again: sequenced %d, want 0 (a new series)", s.Sequenced)
		}
	}
}
