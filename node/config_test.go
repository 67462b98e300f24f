package node

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestSampleConfigsParse(t *testing.T) {
	files, err := filepath.Glob("../deploy/*.yaml")
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
		{"level: info", "level: info\nextra: 1", "field extra not found"},
		{"    eu: 10.0.0.10:7000", "    us: 10.0.0.10:7000", "own datacenter"},
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
