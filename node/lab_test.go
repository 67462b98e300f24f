package node

import (
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLabProfilesParse(t *testing.T) {
	files, err := filepath.Glob("../deploy/lab/*.yaml")
	if err != nil || len(files) < 3 {
		t.Fatalf("lab profiles in deploy/lab: %v, %v", files, err)
	}
	for _, f := range files {
		p, err := LoadLabProfile(f)
		if err != nil {
			t.Errorf("%s: %v", f, err)
			continue
		}
		if len(p.Links) == 0 {
			t.Errorf("%s impairs no link", f)
		}
	}
}

func TestLabProfile(t *testing.T) {
	p, err := ParseLabProfile([]byte("datacenters: [a, b, c]\nlinks:\n  - {between: [a, c], delay: 30ms, jitter: 2ms, loss: 0.5, rate: 4mbit}\n  - {between: [b, c], down: true}\n"))
	if err != nil {
		t.Fatal(err)
	}
	im := p.Links[0].Impairment()
	if im.Delay != 30*time.Millisecond || im.Jitter != 2*time.Millisecond || im.Loss != 0.5 || im.RateBps != 4_000_000 || im.Down {
		t.Errorf("a–c impairment %+v", im)
	}
	if !p.Links[1].Impairment().Down {
		t.Error("b–c is not down")
	}
	for _, tc := range []struct{ yaml, want string }{
		{"", "empty"},
		{"datacenters: []", "at least one"},
		{"datacenters: [a, a]", "listed twice"},
		{"datacenters: [a, B]", "lowercase"},
		{"datacenters: [a, b]\nlinks: [{between: [a, x]}]", `"x" is not in the lab`},
		{"datacenters: [a, b]\nlinks: [{between: [a, a]}]", "two different"},
		{"datacenters: [a, b]\nlinks: [{between: [a, b], delay: 3 days}]", "not a duration"},
		{"datacenters: [a, b]\nlinks: [{between: [a, b], rate: 4mbps}]", "not a rate"},
		{"datacenters: [a, b]\nlinks: [{between: [a, b], loss: 120}]", "0–100"},
		{"datacenters: [a, b]\nlinks: [{between: [a, b], delay: 1ms, jitter: 2ms}]", "jitter"},
		{"datacenters: [a, b]\nlinks: [{between: [a, b]}, {between: [b, a]}]", "listed twice"},
		{"datacenters: [a, b]\nlinks: [{between: [a, b], lost: 1}]", "lost"},
	} {
		_, err := ParseLabProfile([]byte(tc.yaml))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want one saying %q", tc.yaml, err, tc.want)
		}
	}
}

func TestLabLinkJSON(t *testing.T) {
	l, err := DecodeLabLink([]byte(`{"between":["a","c"],"delay":"30ms","jitter":"0ms","loss":2.0,"rate":"4mbit","down":false}`))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Validate([]string{"a", "b", "c"}); err != nil {
		t.Fatal(err)
	}
	if im := l.Impairment(); im.Delay != 30*time.Millisecond || im.Loss != 2 || im.RateBps != 4e6 {
		t.Errorf("impairment %+v", im)
	}
	// Fields left out mean unimpaired.
	l, err = DecodeLabLink([]byte(`{"between":["a","c"]}`))
	if err != nil || l.Impairment() != (LabLink{}).Impairment() {
		t.Errorf("%+v, %v: want an unimpaired link", l, err)
	}
	if _, err := DecodeLabLink([]byte(`{"between":["a","c"],"rate":"fast"}`)); err == nil || !strings.Contains(err.Error(), "not a rate") {
		t.Errorf("bad rate: %v", err)
	}
	if _, err := DecodeLabLink([]byte(`{"between":["a","c"],"delya":"1ms"}`)); err == nil || !strings.Contains(err.Error(), "delya") {
		t.Errorf("unknown field: %v", err)
	}
}
