package etcdembed

import (
	"strings"
	"testing"
)

// TestValidateNamesTheFlag: every refusal names the flag at fault and what
// to do.
func TestValidateNamesTheFlag(t *testing.T) {
	ok := Config{Name: "m1", Dir: "/tmp/x", ClientURL: "http://127.0.0.1:2379", PeerURL: "http://127.0.0.1:2380",
		InitialCluster: "m1=http://127.0.0.1:2380,m2=http://127.0.0.1:2382"}
	if err := ok.Validate(); err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
	for _, c := range []struct {
		change func(*Config)
		want   string
	}{
		{func(c *Config) { c.Dir = "" }, "--data-dir is required"},
		{func(c *Config) { c.ClientURL = "127.0.0.1:2379" }, "--client-url"},
		{func(c *Config) { c.ClientURL = "http://127.0.0.1" }, "want a host and a port"},
		{func(c *Config) { c.PeerURL = "ftp://127.0.0.1:2380" }, "--peer-url"},
		{func(c *Config) { c.PeerURL = c.ClientURL }, "give them different ports"},
		{func(c *Config) { c.Name = "m,1" }, "--name"},
		{func(c *Config) { c.InitialCluster = "m1" }, "--initial-cluster"},
		{func(c *Config) { c.InitialCluster = "m2=http://127.0.0.1:2382" }, "add m1=http://127.0.0.1:2380"},
		{func(c *Config) { c.InitialCluster = "m1=http://127.0.0.1:2390" }, "must be the same URL"},
		{func(c *Config) { c.InitialCluster = "m1=http://127.0.0.1:2380,m1=http://127.0.0.1:2381" }, "listed twice"},
	} {
		cfg := ok
		c.change(&cfg)
		err := cfg.Validate()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: error %v, want one containing %q", cfg, err, c.want)
		}
	}
}
