// Package rtctest holds what the WHIP and WHEP tests share: pion WHIP and
// WHEP clients on loopback and synthetic H264 and Opus RTP sources (see
// internal/testutil for watchdogs and leak checks). It is for tests and
// benchmarks only.
package rtctest

import (
	"testing"

	"github.com/stemflow/stemflow/internal/rtc"
)

// NewEngine returns an rtc.Engine restricted to 127.0.0.1, closed when the
// test ends.
func NewEngine(t testing.TB) *rtc.Engine {
	t.Helper()
	e, err := rtc.New(rtc.Config{IPs: []string{"127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close() })
	return e
}
