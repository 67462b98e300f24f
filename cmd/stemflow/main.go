// Command stemflow runs Stemflow: `stemflow dev` for a whole overlay in one
// process, `stemflow node` for one node of a real deployment, `stemflow
// certs` for their certificates. cli.go holds the command line.
package main

import (
	"os"
	"runtime/debug"
)

func main() {
	tuneGC()
	os.Exit(runCLI(os.Args[1:], os.Stdout, os.Stderr))
}

// gcPercent is the node's GC target, unless GOGC says otherwise (GOGC=25
// or GOGC=100 trade memory back for CPU). A node's heap is mostly
// per-viewer state that lives as long as the viewer, and its per-packet
// paths do not allocate, so collecting at 15 % heap growth instead of Go's
// 100 % keeps the process close to its live heap for little CPU. Measured
// with egress/whep BenchmarkFanout (which sets the same; 100 WHEP viewers,
// RSS growth per viewer 25 s after they joined, and the GC's share of the
// process CPU): GOGC=15 195-199 KB and 3.6-4.5 %, 25 201-214 KB and 2.2-2.6 %,
// 100 ~240-380 KB. Busy chat rooms pay a little for it in latency (node
// BenchmarkChatThroughput at 10,000 msg/s: p99 5.6-11.3 ms at 15, 3.2-6.4
// ms at 100; docs/chat.md).
const gcPercent = 15

// tuneGC sets gcPercent unless the GOGC environment variable is set.
func tuneGC() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(gcPercent)
	}
}
