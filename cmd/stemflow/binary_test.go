package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// built is the stemflow binary the process tests run, built once per test
// binary with `go build`, as a user builds it.
var built struct {
	once sync.Once
	dir  string
	path string
	err  error
	out  []byte
}

// stemflowBinary returns the path of the built binary, building it on first
// use.
func stemflowBinary(t *testing.T) string {
	t.Helper()
	built.once.Do(func() {
		if built.dir, built.err = os.MkdirTemp("", "stemflow-bin-"); built.err != nil {
			return
		}
		built.path = filepath.Join(built.dir, "stemflow")
		built.out, built.err = exec.Command("go", "build", "-o", built.path, ".").CombinedOutput()
	})
	if built.err != nil {
		t.Fatalf("go build: %v\n%s", built.err, built.out)
	}
	return built.path
}

func TestMain(m *testing.M) {
	code := m.Run()
	if built.dir != "" {
		os.RemoveAll(built.dir)
	}
	os.Exit(code)
}
