// Package topology decides which datacenters link to which and which way
// each stream flows. tree.go computes relay trees from link measurements
// (pure, no I/O: the topology manager will run it on what it reads from
// etcd); this file holds the static layouts that `stemflow dev` and simple
// deployments use until the manager lands.
package topology

import (
	"fmt"
	"strconv"
	"strings"
)

// Chain links datacenters in the order given: each to the one before and the
// one after it. With a, b, c: a–b–c, and b relays between a and c.
func Chain(dcs []string) map[string][]string {
	out := make(map[string][]string, len(dcs))
	for i, dc := range dcs {
		out[dc] = nil
		if i > 0 {
			out[dc] = append(out[dc], dcs[i-1])
		}
		if i+1 < len(dcs) {
			out[dc] = append(out[dc], dcs[i+1])
		}
	}
	return out
}

// ParseDatacenters reads a list of datacenter names, "a,b,c", or a count,
// "4", which names them a, b, c, d.
func ParseDatacenters(s string) ([]string, error) {
	if n, err := strconv.Atoi(s); err == nil {
		if n < 1 || n > 26 {
			return nil, fmt.Errorf("datacenter count %d out of range 1–26", n)
		}
		out := make([]string, n)
		for i := range out {
			out[i] = string(rune('a' + i))
		}
		return out, nil
	}
	var out []string
	seen := map[string]bool{}
	for _, name := range strings.Split(s, ",") {
		name = strings.TrimSpace(name)
		if err := ValidateName(name); err != nil {
			return nil, err
		}
		if seen[name] {
			return nil, fmt.Errorf("datacenter %q is listed twice", name)
		}
		seen[name] = true
		out = append(out, name)
	}
	return out, nil
}

// ValidateName checks a datacenter name: 1 to 32 lowercase letters, digits
// and dashes, starting with a letter (it becomes a TLS certificate name).
func ValidateName(name string) error {
	if name == "" || len(name) > 32 {
		return fmt.Errorf("datacenter name %q must be 1 to 32 characters", name)
	}
	for i, c := range name {
		if !(c >= 'a' && c <= 'z' || i > 0 && (c >= '0' && c <= '9' || c == '-')) {
			return fmt.Errorf("datacenter name %q: use lowercase letters, digits and dashes, starting with a letter", name)
		}
	}
	return nil
}
