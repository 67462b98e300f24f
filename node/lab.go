package node

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/stemflow/stemflow/internal/netem"
	"github.com/stemflow/stemflow/topology"
)

// LabProfile is a WAN lab: the datacenters `stemflow dev --lab FILE` starts
// and how the links between them are impaired. Links not listed are
// unimpaired. See deploy/lab/.
type LabProfile struct {
	Datacenters []string  `yaml:"datacenters"`
	Links       []LabLink `yaml:"links"`
	// ProbeBandwidth makes the nodes measure each link's bandwidth (probe
	// trains when idle, the delivery rate when saturated) instead of
	// publishing its rate cap as a configured capacity, the default.
	ProbeBandwidth bool `yaml:"probe_bandwidth"`
}

// LabLink impairs the link between two datacenters, both ways alike. It is
// also the body of `POST /api/v1/lab/links`, where fields left out mean
// unimpaired.
type LabLink struct {
	Between []string `yaml:"between" json:"between"`
	// Delay is added one way, in each direction: the link's round-trip
	// time grows by twice the delay, as with netem.
	Delay Duration `yaml:"delay" json:"delay"`
	// Jitter varies the delay by up to ±Jitter.
	Jitter Duration `yaml:"jitter" json:"jitter"`
	// Loss is the percentage of packets lost, each way.
	Loss float64 `yaml:"loss" json:"loss"`
	// Rate caps the link's bandwidth each way, e.g. "4mbit".
	Rate Rate `yaml:"rate" json:"rate"`
	// Down cuts the link.
	Down bool `yaml:"down" json:"down"`
}

// Impairment returns the emulation of one direction of the link.
func (l LabLink) Impairment() netem.Impairment {
	return netem.Impairment{Delay: time.Duration(l.Delay), Jitter: time.Duration(l.Jitter), Loss: l.Loss,
		RateBps: int64(l.Rate), Down: l.Down}
}

// Validate checks a link against the lab's datacenters.
func (l LabLink) Validate(dcs []string) error {
	if len(l.Between) != 2 || l.Between[0] == l.Between[1] {
		return fmt.Errorf("between must name two different datacenters, got %v", l.Between)
	}
	for _, dc := range l.Between {
		if !slices.Contains(dcs, dc) {
			return fmt.Errorf("between: datacenter %q is not in the lab (it has %s)", dc, strings.Join(dcs, ", "))
		}
	}
	if err := l.Impairment().Validate(); err != nil {
		return fmt.Errorf("link %s–%s: %w", l.Between[0], l.Between[1], err)
	}
	return nil
}

// LoadLabProfile reads and checks a lab profile.
func LoadLabProfile(path string) (*LabProfile, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("lab profile: %w", err)
	}
	p, err := ParseLabProfile(data)
	if err != nil {
		return nil, fmt.Errorf("lab profile %s: %w", path, err)
	}
	return p, nil
}

// ParseLabProfile parses a lab profile from YAML, refusing unknown keys.
func ParseLabProfile(data []byte) (*LabProfile, error) {
	var p LabProfile
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&p); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("the file is empty: it needs datacenters: [a, b, …] and optionally links")
		}
		return nil, err
	}
	if len(p.Datacenters) == 0 {
		return nil, errors.New("datacenters: list at least one datacenter")
	}
	seen := map[string]bool{}
	for _, dc := range p.Datacenters {
		if err := topology.ValidateName(dc); err != nil {
			return nil, fmt.Errorf("datacenters: %w", err)
		}
		if seen[dc] {
			return nil, fmt.Errorf("datacenters: %q is listed twice", dc)
		}
		seen[dc] = true
	}
	pairs := map[[2]string]bool{}
	for i, l := range p.Links {
		if err := l.Validate(p.Datacenters); err != nil {
			return nil, fmt.Errorf("links[%d]: %w", i, err)
		}
		pair := [2]string{min(l.Between[0], l.Between[1]), max(l.Between[0], l.Between[1])}
		if pairs[pair] {
			return nil, fmt.Errorf("links[%d]: the link %s–%s is listed twice", i, pair[0], pair[1])
		}
		pairs[pair] = true
	}
	return &p, nil
}

// Duration is a time.Duration written as "30ms" in YAML and JSON.
type Duration time.Duration

// UnmarshalText parses a duration such as "30ms"; empty is zero.
func (d *Duration) UnmarshalText(b []byte) error {
	if len(b) == 0 {
		*d = 0
		return nil
	}
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("%q is not a duration (write e.g. 30ms or 1.5s)", b)
	}
	*d = Duration(v)
	return nil
}

// MarshalText writes the duration as time.Duration.String does.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// Rate is a bandwidth in bits per second, written as "4mbit", "500kbit",
// "1gbit" or "64000bit" (the units of tc).
type Rate int64

// UnmarshalText parses a rate; empty is zero (unlimited).
func (r *Rate) UnmarshalText(b []byte) error {
	s := strings.ToLower(strings.TrimSpace(string(b)))
	if s == "" {
		*r = 0
		return nil
	}
	mult := float64(0)
	for _, u := range []struct {
		suffix string
		mult   float64
	}{{"gbit", 1e9}, {"mbit", 1e6}, {"kbit", 1e3}, {"bit", 1}} {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSuffix(s, u.suffix), u.mult
			break
		}
	}
	v, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
	if mult == 0 || err != nil || v < 0 {
		return fmt.Errorf("%q is not a rate (write e.g. 4mbit, 500kbit or 1gbit)", b)
	}
	*r = Rate(v * mult)
	return nil
}

// MarshalText writes the rate in the largest unit that keeps it whole.
func (r Rate) MarshalText() ([]byte, error) {
	switch {
	case r == 0:
		return []byte(""), nil
	case r%1e9 == 0:
		return []byte(fmt.Sprintf("%dgbit", r/1e9)), nil
	case r%1e6 == 0:
		return []byte(fmt.Sprintf("%dmbit", r/1e6)), nil
	case r%1e3 == 0:
		return []byte(fmt.Sprintf("%dkbit", r/1e3)), nil
	}
	return []byte(fmt.Sprintf("%dbit", r)), nil
}

// DecodeLabLink reads a POST /api/v1/lab/links body, refusing unknown
// fields.
func DecodeLabLink(body []byte) (LabLink, error) {
	var l LabLink
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&l); err != nil {
		return LabLink{}, fmt.Errorf("lab link: %w", err)
	}
	return l, nil
}
