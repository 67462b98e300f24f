package node

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestSampleConfigsParse(t *testing.T) {
	files, err := filepath.Glob("../deploy/*.yaml")
	loopback, _ := filepath.Glob("../deploy/loopback/*.yaml")
	files = append(files, loopback...)
	if err != nil || len(files) == 0 {
		t.Fatalf("no sample configs in deploy/: %v", err)
	}
	for _, f := range files {
		cfg, err := LoadConfig(f)
		if err != nil {
			t.Errorf("%s: %v", f, err)
			continue
		}
		if len(cfg.Overlay.Neighbours) == 0 {
			t.Errorf("%s: no overlay neighbours", f)
		}
	}
}

func TestConfigErrorsNameTheField(t *testing.T) {
	base, err := os.ReadFile("../deploy/node-us.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ from, to, want string }{
		{"datacenter: us", "datacenter: US", "datacenter:"},
		{"listen: 0.0.0.0:8080", "listen: 8080", "http.listen"},
		{"udp_port: 8189", "udp_port: 70000", "webrtc.udp_port"},
		{"level: info", "level: loud", "log.level"},
		{"ips: [10.1.0.10]", "ips: [not-an-ip]", "webrtc.ips"},
		{"level: info", "level: info\nextra: 1", `config:32: unknown key "extra" at the top level (known: datacenter, http, rtsp, overlay, webrtc, auth, log, etcd, manager, chat)`},
		{"listen: 0.0.0.0:8080", "listen: 8080", `config:4: http.listen: "8080" is not host:port`},
		{"nat_1to1_ips: [198.51.100.20]", "nat_1to1_ips: [198.51.100.20, 198.51.100.21]", "webrtc.nat_1to1_ips: 2 addresses for 1 in webrtc.ips"},
		{"    eu: 10.0.0.10:7000", "    us: 10.0.0.10:7000", "own datacenter"},
		{"level: info", "level: info\nchat:\n  history_count: -1", "chat.history_count: -1"},
		{"level: info", "level: info\nchat:\n  rate: -2", "chat.rate: -2 is negative"},
		{"level: info", "level: info\nchat:\n  history_age: -1h", "chat.history_age: -1h0m0s is negative"},
		{"level: info", "level: info\nchat:\n  burst: many", "chat.burst"},
		{"level: info", "level: info\nchat:\n  sync_interval: -5ms", "chat.sync_interval: -5ms is negative"},
		{"level: info", "level: info\nchat:\n  sync_interval: soon", "chat.sync_interval"},
	} {
		bad := strings.Replace(string(base), tc.from, tc.to, 1)
		if bad == string(base) {
			t.Fatalf("test case %q does not apply", tc.from)
		}
		_, err := ParseConfig([]byte(bad))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("with %q: error %v, want one mentioning %q", tc.to, err, tc.want)
		}
	}
}

// TestConfigFileErrorsNameFileLineAndKey: what a user sees for an empty
// file, a mistyped key and a value of the wrong type (before: "EOF" and
// "field lisen not found in type struct { Listen string ... }").
func TestConfigFileErrorsNameFileLineAndKey(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "node.yaml")
	for _, tc := range []struct{ yaml, want string }{
		{"", path + " is empty: write a node config (samples in deploy/"},
		{"# just a comment\n", path + " is empty"},
		{"datacenter: a\nhttp:\n  lisen: 127.0.0.1:8080\n", path + `:3: unknown key "lisen" in http (known: listen)`},
		{"datacentre: a\n", path + `:1: unknown key "datacentre" at the top level (known: datacenter, http, rtsp, overlay, webrtc, auth, log, etcd, manager, chat)`},
		{"datacenter: a\noverlay:\n  tls:\n    crt: a.pem\n", path + `:4: unknown key "crt" in overlay.tls (known: ca, cert, key)`},
		{"datacenter: a\nwebrtc:\n  ips: [127.0.0.1]\n  udp_port: lots\n", path + ":4: webrtc.udp_port: cannot unmarshal !!str `lots` into int"},
		{"datacenter: a\nhttp: {listen: [\n", path + ":2: "},
		{"- a\n- b\n", path + ":1: a node config is a mapping of keys (datacenter, http, rtsp, overlay, webrtc, auth, log, etcd, manager, chat), not a list"},
		{"datacenter: A\n", path + `:1: datacenter: datacenter name "A"`},
		{"datacenter: a\n", path + ": webrtc.ips: list the host IPs"}, // not in the file: no line
	} {
		if err := os.WriteFile(path, []byte(tc.yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := LoadConfig(path)
		if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "yaml: line") || strings.Contains(err.Error(), "unmarshal errors") || strings.Contains(err.Error(), "struct {") {
			t.Errorf("config %q: error %v\nwant one containing %q", tc.yaml, err, tc.want)
		}
	}
}

// TestRTSPUDPConfig: the RTSP even-port rule names the YAML keys, and
// rtsp.udp: false lifts it (before: `address ":8555": the RTSP port must be
// even ... or set the UDP addresses, or disable UDP`, naming no key, and no
// key to disable UDP).
func TestRTSPUDPConfig(t *testing.T) {
	base := "datacenter: a\noverlay: {tls: {ca: ca.pem, cert: a.pem, key: a-key.pem}}\nwebrtc: {ips: [127.0.0.1]}\nrtsp:\n"
	for _, tc := range []struct{ rtsp, want string }{
		{"  listen: :8554\n", ""},
		{"  listen: :8555\n", "config:5: rtsp.listen: port 8555: RTP and RTCP over UDP take the RTSP port +1000 and +1001, and RTP needs an even port: use an even rtsp.listen port"},
		{"  listen: :8555\n", "set rtsp.rtp_address and rtsp.rtcp_address, or turn RTSP over UDP off with rtsp.udp: false"},
		{"  listen: :0\n", "rtsp.listen: port 0"},
		{"  listen: :8555\n  udp: false\n", ""},
		{"  listen: :8555\n  rtp_address: :20000\n  rtcp_address: :20001\n", ""},
		{"  listen: :8555\n  rtp_address: :20001\n  rtcp_address: :20002\n", "config:6: rtsp.rtp_address: port 20001: RTP over UDP needs an even port"},
		{"  listen: :8555\n  rtp_address: :20000\n  rtcp_address: :20005\n", "config:7: rtsp.rtcp_address: port 20005: RTCP takes the port after rtsp.rtp_address's, 20001"},
		{"  listen: :8555\n  rtp_address: :20000\n", "rtsp.rtcp_address: not set: set rtsp.rtp_address and rtsp.rtcp_address together"},
		{"  udp: maybe\n", "config:5: rtsp.udp: cannot unmarshal"},
	} {
		cfg, err := ParseConfig([]byte(base + tc.rtsp))
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("rtsp:\n%s: %v", tc.rtsp, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("rtsp:\n%s: error %v\nwant one containing %q", tc.rtsp, err, tc.want)
		case err == nil && cfg.RTSPOverUDP() == strings.Contains(tc.rtsp, "udp: false"):
			t.Errorf("rtsp:\n%s: RTSPOverUDP() = %v", tc.rtsp, cfg.RTSPOverUDP())
		}
	}
}

// TestConfigTLSPathsRelativeToFile: relative certificate paths are read
// from the config file's directory, wherever the node is started.
func TestConfigTLSPathsRelativeToFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "a.yaml")
	os.WriteFile(path, []byte("datacenter: a\noverlay: {tls: {ca: tls/ca.pem, cert: /abs/a.pem, key: tls/a-key.pem}}\nwebrtc: {ips: [127.0.0.1]}\n"), 0o600)
	cfg, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(dir, "tls", "ca.pem"); cfg.Overlay.TLS.CA != want {
		t.Errorf("overlay.tls.ca = %q, want %q", cfg.Overlay.TLS.CA, want)
	}
	if cfg.Overlay.TLS.Cert != "/abs/a.pem" {
		t.Errorf("overlay.tls.cert = %q, want the absolute path unchanged", cfg.Overlay.TLS.Cert)
	}
}

// TestConfigSourceErrorHidesPassword: a camera URL with a mistyped scheme is
// named in the error without its password.
func TestConfigSourceErrorHidesPassword(t *testing.T) {
	base, err := os.ReadFile("../deploy/node-eu.yaml")
	if err != nil {
		t.Fatal(err)
	}
	bad := strings.Replace(string(base), "rtsp://10.0.0.50:554/stream1", "http://admin:s3cret@cam.example/live", 1)
	if bad == string(base) {
		t.Fatal("no source in deploy/node-eu.yaml")
	}
	_, err = ParseConfig([]byte(bad))
	if err == nil || !strings.Contains(err.Error(), `"http://admin:xxxxx@cam.example/live" is not an rtsp:// URL`) || strings.Contains(err.Error(), "s3cret") {
		t.Errorf("error %v, want the URL without its password", err)
	}
}

// TestEtcdConfig: the etcd section's mistakes name the key; relative TLS
// paths follow the file.
func TestEtcdConfig(t *testing.T) {
	base := "datacenter: a\noverlay: {tls: {ca: ca.pem, cert: a.pem, key: a-key.pem}}\nwebrtc: {ips: [127.0.0.1]}\n"
	for _, tc := range []struct{ yaml, want string }{
		{"etcd: {endpoints: [http://127.0.0.1:2379]}\n", ""},
		{"etcd: {endpoints: [https://10.0.0.5:2379], ca_file: ca.pem, cert_file: a.pem, key_file: a-key.pem, prefix: /sf/}\nmanager: true\n", ""},
		{"etcd: {endpoints: [10.0.0.5:2379]}\n", `config:4: etcd.endpoints: "10.0.0.5:2379" is not an etcd client URL: write http://HOST:PORT or https://HOST:PORT`},
		{"etcd: {endpoints: [http://10.0.0.5]}\n", `"http://10.0.0.5" is not an etcd client URL`},
		{"etcd: {endpoints: [https://10.0.0.5:2379], cert_file: a.pem}\n", "etcd.key_file: not set: give etcd.cert_file and etcd.key_file together"},
		{"etcd: {endpoints: [http://10.0.0.5:2379], ca_file: ca.pem}\n", "etcd.endpoints: TLS files are set but every endpoint is http://"},
		{"etcd: {prefix: /sf/}\n", "etcd.endpoints: empty: list the etcd members' client URLs"},
		{"etcd: {endpoints: [http://10.0.0.5:2379], prefix: sf}\n", `etcd.prefix: "sf" must start and end with /`},
		{"manager: true\n", "config:4: manager: true needs etcd: set etcd.endpoints"},
		{"etcd: {endpoint: [http://10.0.0.5:2379]}\n", `unknown key "endpoint" in etcd (known: endpoints, ca_file, cert_file, key_file, prefix)`},
		{"overlay: {neighbours: {b: 127.0.0.1:7001}, capacity: {c: 1gbit}, tls: {ca: ca.pem, cert: a.pem, key: a-key.pem}}\n", `overlay.capacity.c: "c" is not in overlay.neighbours`},
		{"overlay: {neighbours: {b: 127.0.0.1:7001}, capacity: {b: fast}, tls: {ca: ca.pem, cert: a.pem, key: a-key.pem}}\n", `not a rate`},
	} {
		y := base + tc.yaml
		if strings.HasPrefix(tc.yaml, "overlay:") {
			y = "datacenter: a\nwebrtc: {ips: [127.0.0.1]}\n" + tc.yaml
		}
		cfg, err := ParseConfig([]byte(y))
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.yaml, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: error %v\nwant one containing %q", tc.yaml, err, tc.want)
		case tc.want == "" && len(cfg.Etcd.Endpoints) != 1:
			t.Errorf("%s: endpoints %v", tc.yaml, cfg.Etcd.Endpoints)
		}
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "a.yaml")
	os.WriteFile(path, []byte(base+"etcd: {endpoints: [https://10.0.0.5:2379], ca_file: etcd/ca.pem}\n"), 0o600)
	cfg, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(dir, "etcd", "ca.pem"); cfg.Etcd.CAFile != want {
		t.Errorf("etcd.ca_file = %q, want %q", cfg.Etcd.CAFile, want)
	}
}
