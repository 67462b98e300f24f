package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stemflow/stemflow/relay"
)

func run(args ...string) (code int, stdout, stderr string) {
	var out, errb strings.Builder
	code = runCLI(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestCommandLine(t *testing.T) {
	for _, tc := range []struct {
		args     []string
		code     int
		contains string
	}{
		{[]string{"version"}, 0, "stemflow " + Version},
		{[]string{"--help"}, 0, "stemflow dev"},
		{[]string{"dev", "--help"}, 0, "-dcs"},
		{[]string{"node", "--help"}, 0, "-config"},
		{[]string{"certs", "--help"}, 0, "-out"},
		{[]string{"dev", "--dcs", "a,a"}, 1, `datacenter "a" is listed twice`},
		{[]string{"dev", "--dcs", "0"}, 1, "out of range"},
		{[]string{"node"}, 1, "--config is required"},
		{[]string{"node", "--config", "/nonexistent.yaml"}, 1, "no such file"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{nil, 2, "Usage"},
	} {
		code, out, errOut := run(tc.args...)
		if code != tc.code || !strings.Contains(out+errOut, tc.contains) {
			t.Errorf("stemflow %s: exit %d, output %q; want exit %d and %q", strings.Join(tc.args, " "), code, out+errOut, tc.code, tc.contains)
		}
	}
}

func TestCertsWritesLoadableFiles(t *testing.T) {
	dir := t.TempDir()
	if code, _, errOut := run("certs", "--dcs", "eu,us", "--out", dir); code != 0 {
		t.Fatalf("certs: exit %d: %s", code, errOut)
	}
	for _, f := range []string{"ca.pem", "ca-key.pem", "eu.pem", "eu-key.pem", "us.pem", "us-key.pem"} {
		if _, err := readFile(dir, f); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
	id, err := relay.LoadIdentity(filepath.Join(dir, "ca.pem"), filepath.Join(dir, "us.pem"), filepath.Join(dir, "us-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if len(id.Cert.Certificate) == 0 {
		t.Fatal("no certificate loaded")
	}
}

func readFile(dir, name string) ([]byte, error) { return os.ReadFile(filepath.Join(dir, name)) }
