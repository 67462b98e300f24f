package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stemflow/stemflow/node"
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

// TestFlagErrorsPrintedOnce: a mistyped flag is reported once, followed by
// the usage, and exits 2 (before: the error came twice, the second time
// after the usage).
func TestFlagErrorsPrintedOnce(t *testing.T) {
	for _, cmd := range []string{"dev", "node", "certs"} {
		code, _, errOut := run(cmd, "--bogus")
		if n := strings.Count(errOut, "flag provided but not defined: -bogus"); n != 1 || code != 2 {
			t.Errorf("stemflow %s --bogus: exit %d, error printed %d times, want exit 2 and once:\n%s", cmd, code, n, errOut)
		}
	}
}

// TestDevFlagsValidatedUpFront: bad flag values fail before anything
// starts, naming the flag and its value, not a datacenter or a derived port.
func TestDevFlagsValidatedUpFront(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--log", "loud"}, `--log "loud": use debug, info, warn or error`},
		{[]string{"--http-port", "70000"}, "--http-port 70000: ports 70000–70002 are out of range (1–65535)"},
		{[]string{"--http-port", "0"}, "--http-port 0: ports 0–2 are out of range (1–65535)"},
		{[]string{"--dcs", "1", "--http-port", "65535"}, ""},
		{[]string{"--rtsp-port", "65000"}, "--rtsp-port 65000: RTSP over UDP would use ports 66000–66005"},
		{[]string{"--http-port", "8080", "--rtsp-port", "8081"}, "--http-port 8080 and --rtsp-port 8081 overlap: HTTP uses ports 8080–8082 and RTSP 8081–8083"},
		{[]string{"--dcs", "5", "--http-port", "8550"}, "--http-port 8550 and --rtsp-port 8554 overlap: HTTP uses ports 8550–8554 and RTSP 8554–8558"},
		{[]string{"--http-port", "8554"}, "--http-port 8554 and --rtsp-port 8554 overlap"},
		{[]string{"--bind", "localhost:1"}, `--bind "localhost:1": give an IP address`},
		{[]string{"extra"}, `dev takes no arguments, got ["extra"]`},
	} {
		if tc.want == "" {
			continue // valid: would start a cluster
		}
		code, out, errOut := run(append([]string{"dev"}, tc.args...)...)
		if code != 1 || !strings.Contains(errOut, tc.want) || strings.Contains(errOut+out, "datacenter c") {
			t.Errorf("stemflow dev %s: exit %d, output %q; want exit 1 and %q", strings.Join(tc.args, " "), code, out+errOut, tc.want)
		}
	}
}

type fakeCluster []string

func (f fakeCluster) Datacenters() []string { return f }
func (f fakeCluster) HTTPURL(i int) string  { return fmt.Sprintf("http://127.0.0.1:%d", 8080+i) }
func (f fakeCluster) RTSPURL(i int, s string) string {
	return fmt.Sprintf("rtsp://127.0.0.1:%d/%s", 8554+i, s)
}

// TestBannerReadsWell: the banner's first line for one, three and five
// datacenters (before: "1 datacenters linked a").
func TestBannerReadsWell(t *testing.T) {
	for _, tc := range []struct {
		dcs        fakeCluster
		first      string
		publish    string
		watch      string
		notContain string
	}{
		{fakeCluster{"a"}, "Stemflow dev: 1 datacenter (a), no overlay links\n", `Publish a stream "x" at a:`, "Watch it at a:", "datacenters"},
		{fakeCluster{"a", "b", "c"}, "Stemflow dev: 3 datacenters, every pair linked: a, b, c\n", `Publish a stream "x" at a:`, "Watch it at c:", "1 datacenter"},
		{fakeCluster{"a", "b", "c", "d", "e"}, "Stemflow dev: 5 datacenters, every pair linked: a, b, c, d, e\n", `Publish a stream "x" at a:`, "Watch it at e:", "1 datacenter"},
	} {
		var b strings.Builder
		printBanner(&b, tc.dcs)
		out := b.String()
		if !strings.HasPrefix(out, tc.first) || !strings.Contains(out, tc.publish) || !strings.Contains(out, tc.watch) || strings.Contains(out, tc.notContain) {
			t.Errorf("banner for %d datacenters:\n%s\nwant it to start %q and say %q and %q", len(tc.dcs), out, tc.first, tc.publish, tc.watch)
		}
		if n := strings.Count(out, "http://127.0.0.1:"); n != len(tc.dcs)+4 {
			t.Errorf("banner for %d datacenters has %d HTTP URLs, want one per datacenter and 4 in the examples:\n%s", len(tc.dcs), n, out)
		}
	}
}

// TestCertsRefusesToOverwrite: a second `stemflow certs` into the same
// directory refuses, naming the file and --force, and leaves the CA as it
// was; with --force it writes a new one.
func TestCertsRefusesToOverwrite(t *testing.T) {
	dir := t.TempDir()
	if code, _, errOut := run("certs", "--dcs", "a,b", "--out", dir); code != 0 {
		t.Fatalf("certs: exit %d: %s", code, errOut)
	}
	before, _ := readFile(dir, "ca.pem")
	code, _, errOut := run("certs", "--dcs", "a,b", "--out", dir)
	want := filepath.Join(dir, "ca.pem") + " already exists"
	if code != 1 || !strings.Contains(errOut, want) || !strings.Contains(errOut, "--force") {
		t.Errorf("second certs run: exit %d, %q; want exit 1 naming %q and --force", code, errOut, want)
	}
	if after, _ := readFile(dir, "ca.pem"); string(after) != string(before) {
		t.Error("second certs run without --force replaced ca.pem")
	}
	// Only a node's files in the way: still refused, naming that file.
	other := t.TempDir()
	os.WriteFile(filepath.Join(other, "b-key.pem"), []byte("keep"), 0o600)
	if code, _, errOut := run("certs", "--dcs", "a,b", "--out", other); code != 1 || !strings.Contains(errOut, filepath.Join(other, "b-key.pem")+" already exists") {
		t.Errorf("certs over an existing b-key.pem: exit %d, %q", code, errOut)
	}
	if code, _, errOut := run("certs", "--dcs", "a,b", "--out", dir, "--force"); code != 0 {
		t.Fatalf("certs --force: exit %d: %s", code, errOut)
	}
	if after, _ := readFile(dir, "ca.pem"); string(after) == string(before) {
		t.Error("certs --force did not write a new ca.pem")
	}
}

func readFile(dir, name string) ([]byte, error) { return os.ReadFile(filepath.Join(dir, name)) }

type fakeLab struct {
	fakeCluster
	links []node.LabLink
}

func (f fakeLab) Profile() string               { return "deploy/lab/lossy.yaml" }
func (f fakeLab) ImpairedLinks() []node.LabLink { return f.links }

// TestLabBanner: the lab's banner names the profile, lists the impaired
// links and shows the runtime API.
func TestLabBanner(t *testing.T) {
	p, err := node.LoadLabProfile("../../deploy/lab/lossy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	printLabBanner(&b, fakeLab{fakeCluster(p.Datacenters), p.Links})
	out := b.String()
	for _, want := range []string{
		"Stemflow WAN lab deploy/lab/lossy.yaml: 3 datacenters (a, b, c), every pair linked\n",
		"  a – c  delay 20ms ± 2ms, loss 2 %\n",
		"  b – c  delay 15ms\n",
		"curl -X POST http://127.0.0.1:8080/api/v1/lab/links -d",
		"/api/v1/lab/dcs/c/kill",
		"Watch it at c:",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("lab banner does not say %q:\n%s", want, out)
		}
	}
}

func TestDevLabFlagErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"dev", "--lab", "/nonexistent.yaml"}, "--lab /nonexistent.yaml: lab profile: open /nonexistent.yaml: no such file"},
		{[]string{"dev", "--lab", "../../deploy/lab/lossy.yaml", "--dcs", "a,b"}, "--dcs and --lab"},
	} {
		code, out, errOut := run(tc.args...)
		if code != 1 || !strings.Contains(out+errOut, tc.want) {
			t.Errorf("stemflow %s: exit %d, %q; want exit 1 and %q", strings.Join(tc.args, " "), code, out+errOut, tc.want)
		}
	}
}
