package e2e

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// netnsEnv marks the inner run of a test that re-executed itself inside a
// network namespace; its value is the namespace's name.
const netnsEnv = "STEMFLOW_E2E_NETNS"

// artifactsEnv names the folder for screenshots; the default is
// node/e2e/artifacts.
const artifactsEnv = "STEMFLOW_ARTIFACTS"

// inNetns reports whether this is the inner run, inside the namespace.
func inNetns() bool { return os.Getenv(netnsEnv) != "" }

// runInNetns creates a network namespace that has only a loopback interface,
// runs the current test again inside it (same test binary, same -test.run
// selecting only this test), relays its output to t.Log and fails t when the
// inner run fails or outlives timeout (its -test.timeout; the process group
// is killed 15 s later). The namespace is deleted in t.Cleanup.
//
// It needs root and iproute2's ip; it fails the test, never skips it, when
// either is missing.
func runInNetns(t *testing.T, timeout time.Duration) {
	t.Helper()
	ip, err := exec.LookPath("ip")
	if err != nil {
		t.Fatalf("the browser test needs iproute2's ip to make a network namespace: %v (apt-get install -y iproute2)", err)
	}
	if os.Geteuid() != 0 {
		t.Fatalf("the browser test must run as root to create a network namespace (ip netns add); run it as root, as CI does")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatalf("cannot find the test binary to run it again inside the namespace: %v", err)
	}
	artifacts, err := filepath.Abs(artifactsDir())
	if err != nil {
		t.Fatal(err)
	}

	var rnd [4]byte
	rand.Read(rnd[:])
	ns := "stemflow-e2e-" + hex.EncodeToString(rnd[:])
	runIP := func(args ...string) error {
		out, err := exec.Command(ip, args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
		return nil
	}
	if err := runIP("netns", "add", ns); err != nil {
		t.Fatalf("cannot create the test's network namespace (is this a container without CAP_SYS_ADMIN?): %v", err)
	}
	t.Cleanup(func() {
		if err := runIP("netns", "delete", ns); err != nil {
			t.Errorf("cannot delete the test's network namespace: %v", err)
		}
	})
	if err := runIP("-n", ns, "link", "set", "lo", "up"); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), timeout+15*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, ip, "netns", "exec", ns, exe,
		"-test.run", "^"+regexp.QuoteMeta(t.Name())+"$",
		"-test.v",
		"-test.count=1",
		"-test.timeout", timeout.String(),
	)
	cmd.Env = append(os.Environ(), netnsEnv+"="+ns, artifactsEnv+"="+artifacts)
	// The inner run starts Chromium; on a timeout kill the whole process group
	// so no browser outlives the test.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second

	pr, pw := io.Pipe()
	cmd.Stdout = pw
	cmd.Stderr = pw
	var relay sync.WaitGroup
	relay.Add(1)
	go func() {
		defer relay.Done()
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			t.Log("│ " + sc.Text())
		}
		io.Copy(io.Discard, pr)
	}()

	t.Logf("running %s again inside network namespace %s (loopback only)", t.Name(), ns)
	start := time.Now()
	err = cmd.Run()
	pw.Close()
	relay.Wait()

	switch {
	case ctx.Err() != nil:
		t.Fatalf("the run inside the namespace did not finish within %v and was killed", timeout+15*time.Second)
	case err != nil:
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			t.Fatalf("the run inside the namespace failed after %v (%v); its log is above", time.Since(start).Round(time.Millisecond), err)
		}
		t.Fatalf("cannot run the test inside the namespace: %v", err)
	}
	t.Logf("inner run passed in %v; screenshots in %s", time.Since(start).Round(time.Millisecond), artifacts)
}

// requireLoopbackOnly fails the test unless the only network interface is
// an up loopback: the browser and the nodes must not reach any other network.
func requireLoopbackOnly(t *testing.T) {
	t.Helper()
	ifs, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	for _, ifc := range ifs {
		if ifc.Name != "lo" {
			t.Fatalf("network interface %q is present inside the test namespace; only lo may be", ifc.Name)
		}
		if ifc.Flags&net.FlagUp == 0 {
			t.Fatalf("lo is down inside the test namespace")
		}
	}
}

// artifactsDir is where screenshots go: $STEMFLOW_ARTIFACTS, or artifacts/
// beside this file (go test runs in the package folder).
func artifactsDir() string {
	if d := os.Getenv(artifactsEnv); d != "" {
		return d
	}
	return "artifacts"
}
