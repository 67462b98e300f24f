package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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

// process is a stemflow process a test started, with its output kept for
// the failure message.
type process struct {
	label  string // "node a", "member m1"
	dc     string // for nodes
	cmd    *exec.Cmd
	ready  chan struct{} // closed at the first output line holding the ready text
	exited chan struct{}

	mu  sync.Mutex // guards buf
	buf strings.Builder
}

// startProcess runs bin with args, collecting its output (stdout and
// stderr together), and kills it when the test ends.
func startProcess(t *testing.T, label, readyText, bin string, args ...string) *process {
	t.Helper()
	p := &process{label: label, cmd: exec.Command(bin, args...), ready: make(chan struct{}), exited: make(chan struct{})}
	out, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p.cmd.Stderr = p.cmd.Stdout
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(p.exited)
		sc := bufio.NewScanner(out)
		var once sync.Once
		for sc.Scan() {
			p.mu.Lock()
			p.buf.WriteString(sc.Text() + "\n")
			p.mu.Unlock()
			if strings.Contains(sc.Text(), readyText) {
				once.Do(func() { close(p.ready) })
			}
		}
		p.cmd.Wait()
	}()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.exited
		if t.Failed() {
			t.Log(p.log())
		}
	})
	return p
}

func (p *process) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return fmt.Sprintf("--- %s:\n%s", p.label, p.buf.String())
}

func TestMain(m *testing.M) {
	code := m.Run()
	if built.dir != "" {
		os.RemoveAll(built.dir)
	}
	os.Exit(code)
}
