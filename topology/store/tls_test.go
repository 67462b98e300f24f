package store_test

import (
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
	"strings"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/etcdembed"
	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/topology/store"
)

// pki writes a CA and certificates it signs into dir, as PEM files.
type pki struct {
	t    *testing.T
	dir  string
	ca   *x509.Certificate
	key  *ecdsa.PrivateKey
	Cert string // the CA's certificate file
}

func newPKI(t *testing.T, dir, name string) *pki {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(der)
	p := &pki{t: t, dir: dir, ca: ca, key: key, Cert: filepath.Join(dir, name+".pem")}
	p.write(p.Cert, "CERTIFICATE", der)
	return p
}

func (p *pki) write(path, typ string, der []byte) {
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		p.t.Fatal(err)
	}
}

// issue signs a certificate for 127.0.0.1 usable by servers and clients,
// returning its certificate and key files.
func (p *pki) issue(name string) (cert, key string) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		p.t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, DNSNames: []string{"localhost"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &k.PublicKey, p.key)
	if err != nil {
		p.t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		p.t.Fatal(err)
	}
	cert, key = filepath.Join(p.dir, name+".pem"), filepath.Join(p.dir, name+"-key.pem")
	p.write(cert, "CERTIFICATE", der)
	p.write(key, "PRIVATE KEY", kder)
	return cert, key
}

// TestTLS: a member that serves clients over TLS and requires client
// certificates from its CA. A client with the CA and a certificate it
// signed writes and reads; a client without a certificate, one with a
// certificate of another CA, and one that does not trust the member's CA
// are all refused.
func TestTLS(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 120*time.Second)
	dir := t.TempDir()
	ca := newPKI(t, dir, "ca")
	srvCert, srvKey := ca.issue("member")
	cliCert, cliKey := ca.issue("manager")
	other := newPKI(t, dir, "other-ca")
	strangerCert, strangerKey := other.issue("stranger")

	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(60*time.Second))
	defer cancel()
	clientURL := fmt.Sprintf("https://127.0.0.1:%d", testutil.FreePort(t))
	srv, err := etcdembed.Start(ctx, etcdembed.Config{Name: "tls", Dir: filepath.Join(dir, "member"), UnsafeNoFsync: true,
		Tick: 10 * time.Millisecond, ClientURL: clientURL, PeerURL: fmt.Sprintf("http://127.0.0.1:%d", testutil.FreePort(t)),
		CertFile: srvCert, KeyFile: srvKey, TrustedCAFile: ca.Cert})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()

	try := func(cfg store.Config) error {
		cfg.Endpoints, cfg.Prefix, cfg.DialTimeout = []string{clientURL}, "/tls/", time.Second
		s, err := store.Open(cfg)
		if err != nil {
			return err
		}
		defer s.Close()
		rctx, cancel := context.WithTimeout(ctx, testutil.Scale(2*time.Second))
		defer cancel()
		if err := s.PutRoute(rctx, store.Route{Stream: "x", Version: time.Now().UnixNano(), Origin: "a"}); err != nil {
			return err
		}
		_, _, err = s.GetRoute(rctx, "x")
		return err
	}
	if err := try(store.Config{CAFile: ca.Cert, CertFile: cliCert, KeyFile: cliKey}); err != nil {
		t.Fatalf("a client with the CA and its certificate: %v", err)
	}
	for _, c := range []struct {
		what string
		cfg  store.Config
	}{
		{"no client certificate", store.Config{CAFile: ca.Cert}},
		{"a client certificate of another CA", store.Config{CAFile: ca.Cert, CertFile: strangerCert, KeyFile: strangerKey}},
		{"no trust in the member's CA", store.Config{CAFile: other.Cert, CertFile: cliCert, KeyFile: cliKey}},
	} {
		if err := try(c.cfg); err == nil {
			t.Errorf("a client with %s wrote and read a route; want it refused", c.what)
		} else {
			t.Logf("%s: %v", c.what, err)
		}
	}
	if _, err := store.Open(store.Config{Endpoints: []string{clientURL}, CertFile: cliCert}); err == nil || !strings.Contains(err.Error(), "give both") {
		t.Errorf("a certificate without its key: %v, want an error asking for both", err)
	}
	if _, err := store.Open(store.Config{Endpoints: []string{clientURL}, CAFile: filepath.Join(dir, "missing.pem")}); err == nil || !strings.Contains(err.Error(), "CA file") {
		t.Errorf("a missing CA file: %v, want an error naming the CA file", err)
	}
}
