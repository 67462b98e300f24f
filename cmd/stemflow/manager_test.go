package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/topology/store"
)

// synthNodes registers one synthetic node per datacenter (a store client
// each, so that one can die alone) and writes the links each sends on.
type synthNodes struct {
	t      *testing.T
	cfg    store.Config
	stores map[string]*store.Store
	regs   map[string]*store.Registration
}

func newSynthNodes(t *testing.T, cfg store.Config, dcs ...string) *synthNodes {
	n := &synthNodes{t: t, cfg: cfg, stores: map[string]*store.Store{}, regs: map[string]*store.Registration{}}
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(20*time.Second))
	defer cancel()
	for _, dc := range dcs {
		s, err := store.Open(cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		r, err := s.RegisterNode(ctx, store.Node{DC: dc, Node: dc + "1"}, store.DefaultNodeTTL)
		if err != nil {
			t.Fatalf("registering node %s: %v", dc, err)
		}
		n.stores[dc], n.regs[dc] = s, r
	}
	return n
}

// diamond writes the issue's four-datacenter links (one-way delays a–d
// 150 ms, a–b and b–d 5 ms, a–c and c–d 20 ms; RTT twice that), publishes
// x at a and subscribes d to it.
func (n *synthNodes) diamond() {
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(20*time.Second))
	defer cancel()
	for _, l := range []struct {
		a, b string
		ms   float64
	}{{"a", "d", 150}, {"a", "b", 5}, {"b", "d", 5}, {"a", "c", 20}, {"c", "d", 20}} {
		for _, d := range [][2]string{{l.a, l.b}, {l.b, l.a}} {
			if err := n.stores[d[0]].PutLink(ctx, n.regs[d[0]], store.Link{To: d[1], RTTMs: 2 * l.ms, BandwidthKbps: 100000}); err != nil {
				n.t.Fatal(err)
			}
		}
	}
	if err := n.stores["a"].ClaimStream(ctx, n.regs["a"], "x"); err != nil {
		n.t.Fatal(err)
	}
	if err := n.stores["d"].Subscribe(ctx, n.regs["d"], "x"); err != nil {
		n.t.Fatal(err)
	}
}

// routePath renders x's route as the path from its origin to dc.
func routePath(rt store.Route, dc string) string {
	hops := []string{dc}
	for v := dc; v != rt.Origin; v = rt.Parent[v] {
		if _, ok := rt.Parent[v]; !ok || len(hops) > 10 {
			return "none"
		}
		hops = append(hops, rt.Parent[v])
	}
	slices.Reverse(hops)
	return strings.Join(hops, "→")
}

// waitRoute waits until s serves x's route with the given path to dc.
func waitRoute(t *testing.T, s *store.Store, within time.Duration, dc, want string) store.Route {
	t.Helper()
	return waitRouteFunc(t, s, within, "x's route to "+dc+" to be "+want, func(rt store.Route) bool { return routePath(rt, dc) == want })
}

// waitRouteFunc waits until s serves a route of x that ok accepts.
func waitRouteFunc(t *testing.T, s *store.Store, within time.Duration, what string, ok func(store.Route) bool) store.Route {
	t.Helper()
	var rt store.Route
	testutil.WaitForWithin(t, within, what, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		var found bool
		var err error
		rt, found, err = s.GetRoute(ctx, "x")
		return err == nil && found && ok(rt)
	})
	return rt
}

func startManagerProcess(t *testing.T, bin, dc string, args ...string) *process {
	t.Helper()
	return startProcess(t, "manager "+dc, "candidate "+dc+" campaigning", bin, append([]string{"manager", "--dc", dc, "--ttl", "2s"}, args...)...)
}

func waitOutput(t *testing.T, p *process, within time.Duration, text string) {
	t.Helper()
	testutil.WaitForWithin(t, within, p.label+" to log "+text, func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return strings.Contains(p.buf.String(), text)
	})
}

// TestManagerOnEtcdCluster: three `stemflow etcd` members and two `stemflow
// manager` processes (a leads, c stands by) plan the four-datacenter
// diamond: x flows a→b→d. SIGKILL takes the raft leader member down: the
// routes are still served, and when b's node dies the leading manager moves
// x to a→c→d through the two members left. SIGKILL then takes the leading
// manager down: c leads, keeps the route and plans the next change.
func TestManagerOnEtcdCluster(t *testing.T) {
	testutil.Watchdog(t, 240*time.Second)
	dir := t.TempDir()
	bin := stemflowBinary(t)
	names := []string{"m1", "m2", "m3"}
	clientURL, peerURL := map[string]string{}, map[string]string{}
	var initial []string
	for _, m := range names {
		clientURL[m] = fmt.Sprintf("http://127.0.0.1:%d", testutil.FreePort(t))
		peerURL[m] = fmt.Sprintf("http://127.0.0.1:%d", testutil.FreePort(t))
		initial = append(initial, m+"="+peerURL[m])
	}
	members := map[string]*process{}
	var all []string
	for _, m := range names {
		members[m] = startEtcdProcess(t, bin, m, "--name", m, "--data-dir", filepath.Join(dir, m),
			"--client-url", clientURL[m], "--peer-url", peerURL[m], "--initial-cluster", strings.Join(initial, ","))
		all = append(all, clientURL[m])
	}
	for _, m := range names {
		select {
		case <-members[m].ready:
		case <-members[m].exited:
			t.Fatalf("member %s exited before it was ready:\n%s", m, members[m].log())
		case <-time.After(testutil.Scale(30 * time.Second)):
			t.Fatalf("member %s not ready within 30 s:\n%s", m, members[m].log())
		}
	}
	cfg := store.Config{Endpoints: all}
	nodes := newSynthNodes(t, cfg, "a", "b", "c", "d")
	nodes.diamond()
	ma := startManagerProcess(t, bin, "a", "--etcd", strings.Join(all, ","))
	waitOutput(t, ma, 20*time.Second, "manager leads")
	mc := startManagerProcess(t, bin, "c", "--etcd", strings.Join(all, ","))
	<-mc.ready
	observer, err := store.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer observer.Close()
	first := waitRoute(t, observer, 20*time.Second, "d", "a→b→d")

	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(60*time.Second))
	defer cancel()
	var leader string
	for _, m := range names {
		st, err := observer.Client().Status(ctx, clientURL[m])
		if err != nil {
			t.Fatalf("status of %s: %v", m, err)
		}
		if st.Leader == st.Header.MemberId {
			leader = m
		}
	}
	if leader == "" {
		t.Fatal("no member says it leads")
	}
	members[leader].cmd.Process.Signal(syscall.SIGKILL)
	<-members[leader].exited
	var survivors []string
	for _, m := range names {
		if m != leader {
			survivors = append(survivors, clientURL[m])
		}
	}
	s2, err := store.Open(store.Config{Endpoints: survivors})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if rt := waitRoute(t, s2, 20*time.Second, "d", "a→b→d"); rt.Version != first.Version {
		t.Fatalf("route served by the survivors: %+v, want version %d", rt, first.Version)
	}

	nodes.stores["b"].Close() // b's node dies
	killed := time.Now()
	moved := waitRoute(t, s2, store.DefaultNodeTTL+5*time.Second, "d", "a→c→d")
	t.Logf("with member %s killed, the route moved to a→c→d %v after b's node died (node TTL %v), version %d",
		leader, time.Since(killed).Round(10*time.Millisecond), store.DefaultNodeTTL, moved.Version)
	if moved.Version != first.Version+1 {
		t.Fatalf("route after b died: version %d, want %d", moved.Version, first.Version+1)
	}

	ma.cmd.Process.Signal(syscall.SIGKILL) // the leading manager dies
	<-ma.exited
	died := time.Now()
	waitOutput(t, mc, 2*time.Second+5*time.Second, "manager leads")
	t.Logf("manager c leads %v after a's manager was killed (session TTL 2s)", time.Since(died).Round(10*time.Millisecond))
	if err := nodes.stores["c"].Subscribe(ctx, nodes.regs["c"], "x"); err != nil {
		t.Fatal(err)
	}
	// c wants x (it relays it already: no new tree) and d leaves: the
	// tree shrinks to a→c, one version up.
	if err := nodes.stores["d"].Unsubscribe(ctx, nodes.regs["d"], "x"); err != nil {
		t.Fatal(err)
	}
	next := waitRouteFunc(t, s2, 10*time.Second, "x's tree to shrink to a→c", func(rt store.Route) bool { return len(rt.Parent) == 1 })
	if routePath(next, "c") != "a→c" || next.Version != moved.Version+1 {
		t.Fatalf("route after d left: %+v, want version %d with c←a only", next, moved.Version+1)
	}

	mc.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-mc.exited:
	case <-time.After(testutil.Scale(15 * time.Second)):
		t.Fatalf("manager c still running 15 s after SIGTERM:\n%s", mc.log())
	}
	if code := mc.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("manager c exited with %d after SIGTERM:\n%s", code, mc.log())
	}
}

// testCA writes a CA and certificates it signs, as PEM files.
type testCA struct {
	t    *testing.T
	dir  string
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	File string
}

func newTestCA(t *testing.T, dir string) *testCA {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "etcd test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	ca := &testCA{t: t, dir: dir, cert: cert, key: key, File: filepath.Join(dir, "ca.pem")}
	ca.write(ca.File, "CERTIFICATE", der)
	return ca
}

func (ca *testCA) write(path, typ string, der []byte) {
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		ca.t.Fatal(err)
	}
}

// issue signs a certificate for 127.0.0.1, for servers and clients.
func (ca *testCA) issue(name string) (cert, key string) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		ca.t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &k.PublicKey, ca.key)
	if err != nil {
		ca.t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		ca.t.Fatal(err)
	}
	cert, key = filepath.Join(ca.dir, name+".pem"), filepath.Join(ca.dir, name+"-key.pem")
	ca.write(cert, "CERTIFICATE", der)
	ca.write(key, "PRIVATE KEY", kder)
	return cert, key
}

// TestManagerTLS: `stemflow etcd` serving clients over TLS with client
// certificates required, and `stemflow manager` with --etcd-ca,
// --etcd-cert and --etcd-key plans through it. Without its certificate the
// manager refuses to start, saying what to check.
func TestManagerTLS(t *testing.T) {
	testutil.Watchdog(t, 180*time.Second)
	dir := t.TempDir()
	bin := stemflowBinary(t)
	ca := newTestCA(t, dir)
	srvCert, srvKey := ca.issue("member")
	cliCert, cliKey := ca.issue("client")
	url := fmt.Sprintf("https://127.0.0.1:%d", testutil.FreePort(t))
	member := startEtcdProcess(t, bin, "m1", "--name", "m1", "--data-dir", filepath.Join(dir, "m1"),
		"--client-url", url, "--peer-url", fmt.Sprintf("http://127.0.0.1:%d", testutil.FreePort(t)),
		"--cert-file", srvCert, "--key-file", srvKey, "--trusted-ca-file", ca.File)
	select {
	case <-member.ready:
	case <-member.exited:
		t.Fatalf("member exited before it was ready:\n%s", member.log())
	case <-time.After(testutil.Scale(30 * time.Second)):
		t.Fatalf("member not ready within 30 s:\n%s", member.log())
	}
	cfg := store.Config{Endpoints: []string{url}, CAFile: ca.File, CertFile: cliCert, KeyFile: cliKey}
	nodes := newSynthNodes(t, cfg, "a", "b", "c", "d")
	nodes.diamond()
	m := startManagerProcess(t, bin, "b", "--etcd", url, "--etcd-ca", ca.File, "--etcd-cert", cliCert, "--etcd-key", cliKey)
	waitOutput(t, m, 20*time.Second, "manager leads")
	observer, err := store.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer observer.Close()
	waitRoute(t, observer, 20*time.Second, "d", "a→b→d")

	var stdout, stderr bytes.Buffer
	code := runCLI([]string{"manager", "--dc", "c", "--etcd", url, "--etcd-ca", ca.File}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "cannot reach etcd") || !strings.Contains(stderr.String(), "--etcd-cert") {
		t.Fatalf("manager without a client certificate: exit %d, stderr %q; want 1 and a message naming --etcd-cert", code, stderr.String())
	}
}

// TestManagerFlags: bad flags are refused before anything starts, naming
// the flag.
func TestManagerFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--dc", "a"}, "--etcd is required"},
		{[]string{"--etcd", "http://127.0.0.1:2379"}, "--dc is required"},
		{[]string{"--etcd", "127.0.0.1:2379", "--dc", "a"}, "http:// or https://"},
		{[]string{"--etcd", "http://127.0.0.1:2379", "--dc", "A/B"}, "--dc"},
		{[]string{"--etcd", "http://127.0.0.1:2379", "--dc", "a", "--ttl", "1s"}, "--ttl"},
		{[]string{"--etcd", "http://127.0.0.1:2379", "--dc", "a", "--etcd-cert", "c.pem"}, "--etcd-key"},
	} {
		var stdout, stderr bytes.Buffer
		if code := runCLI(append([]string{"manager"}, c.args...), &stdout, &stderr); code != 1 || !strings.Contains(stderr.String(), c.want) {
			t.Errorf("stemflow manager %s: exit %d, stderr %q; want 1 and a message naming %s", strings.Join(c.args, " "), code, stderr.String(), c.want)
		}
	}
	var stdout, stderr bytes.Buffer
	if code := runCLI([]string{"manager", "--help"}, &stdout, &stderr); code != 0 || !strings.Contains(stderr.String(), "standby leads") {
		t.Errorf("stemflow manager --help: exit %d, output %q; want 0 and the explanation", code, stderr.String())
	}
}
