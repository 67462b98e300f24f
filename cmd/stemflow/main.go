// Command stemflow runs Stemflow: `stemflow dev` for a whole overlay in one
// process, `stemflow node` for one node of a real deployment, `stemflow
// certs` for their certificates. cli.go holds the command line.
package main

import "os"

func main() {
	os.Exit(runCLI(os.Args[1:], os.Stdout, os.Stderr))
}
