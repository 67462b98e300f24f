// Command stemflow runs Stemflow: `stemflow dev` for a whole overlay in one
// process, `stemflow node` for one node of a real deployment.
package main

import (
	"os"

	"github.com/stemflow/stemflow/internal/cli"
)

func main() {
	os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr))
}
