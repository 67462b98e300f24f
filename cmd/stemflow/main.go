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

// gcPercent is the node's GC target, unless GOGC says otherwise. A node's
// heap is mostly per-viewer state that lives as long as the viewer, and its
// per-packet paths do not allocate, so collecting at 25 % heap growth
// instead of Go's 100 % costs no measurable CPU while it keeps the process
// close to its live heap: ~200 KB instead of 240-380 KB of RSS per WHEP
// viewer (egress/whep BenchmarkFanout, which sets the same).
const gcPercent = 25

// tuneGC sets gcPercent unless the GOGC environment variable is set.
func tuneGC() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(gcPercent)
	}
}
