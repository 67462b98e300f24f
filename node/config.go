package node

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	ingestrtsp "github.com/stemflow/stemflow/ingest/rtsp"
	"github.com/stemflow/stemflow/node/rtspserver"
	"github.com/stemflow/stemflow/relay"
	"github.com/stemflow/stemflow/topology"
)

// Config is the configuration of one node, as read from YAML by
// `stemflow node --config FILE`. Zero values take the defaults of
// [Config.SetDefaults].
type Config struct {
	// Datacenter is the name of this node's datacenter; it must match the
	// first DNS name of the node's overlay certificate.
	Datacenter string `yaml:"datacenter"`
	HTTP       struct {
		Listen string `yaml:"listen"` // default ":8080"
	} `yaml:"http"`
	RTSP struct {
		Listen string `yaml:"listen"` // default ":8554"
		// Sources maps stream names to RTSP URLs (cameras) that the node
		// pulls and publishes under that name.
		Sources map[string]string `yaml:"sources"`
		// RTPAddress and RTCPAddress are the UDP addresses for RTP over
		// UDP (an even port and the next one). Default: the RTSP port +1000
		// and +1001.
		RTPAddress  string `yaml:"rtp_address"`
		RTCPAddress string `yaml:"rtcp_address"`
		// UDP, when false, serves RTSP over TCP only (publishers and readers
		// use "-rtsp_transport tcp"); no UDP port is opened. Default true.
		UDP *bool `yaml:"udp"`
	} `yaml:"rtsp"`
	Overlay struct {
		Listen string `yaml:"listen"` // UDP, default ":7000"
		// Neighbours maps neighbouring datacenters to their overlay
		// addresses (host:port).
		Neighbours map[string]string `yaml:"neighbours"`
		// Capacity is the bandwidth of the link to a neighbour (e.g.
		// {us: 1gbit}), published as its available bandwidth; links not
		// listed publish the delivery rate measured under load.
		Capacity map[string]Rate `yaml:"capacity"`
		TLS      struct {
			CA   string `yaml:"ca"`
			Cert string `yaml:"cert"`
			Key  string `yaml:"key"`
		} `yaml:"tls"`
	} `yaml:"overlay"`
	WebRTC struct {
		// IPs are the host addresses ICE offers to browsers and publishers.
		IPs []string `yaml:"ips"`
		// NAT1To1IPs are public addresses that map 1:1 to IPs (e.g. a cloud
		// VM's public IP).
		NAT1To1IPs []string `yaml:"nat_1to1_ips"`
		// UDPPort, when set, carries every PeerConnection on one UDP port.
		UDPPort int `yaml:"udp_port"`
	} `yaml:"webrtc"`
	Auth struct {
		// PublishToken, when set, is the Bearer token WHIP publishers must
		// present, and the password RTSP publishers must give.
		PublishToken string `yaml:"publish_token"`
	} `yaml:"auth"`
	Log struct {
		Level string `yaml:"level"` // debug, info, warn, error; default info
	} `yaml:"log"`
	// Etcd is where the control plane keeps its state (docs/etcd.md). With
	// no endpoints the node runs alone: routes come from announcements.
	Etcd EtcdConfig `yaml:"etcd"`
	// Manager, when true, runs a topology manager candidate beside the
	// node (it needs etcd): one of the candidates leads and computes the
	// trees.
	Manager bool `yaml:"manager"`
	// Chat configures the chat rooms beside the streams (docs/chat.md).
	Chat ChatConfig `yaml:"chat"`

	// identity is set by stemflow dev, which makes certificates in memory.
	identity *relay.Identity
	// overlayConn, when set (by the WAN lab), carries the overlay instead
	// of a socket bound for Overlay.Listen.
	overlayConn net.PacketConn
	// extraRoutes, when set (by the WAN lab), adds routes to the HTTP API.
	extraRoutes func(*http.ServeMux)
	// measureEvery, when set (by tests), is the link measurement interval.
	measureEvery time.Duration
	// capacity, when set (by the WAN lab: its rate caps, as they change),
	// replaces overlay.capacity.
	capacity func(peer string) int64
}

// EtcdConfig says how a node reaches etcd.
type EtcdConfig struct {
	// Endpoints are the client URLs of the etcd members, e.g.
	// https://10.0.0.5:2379.
	Endpoints []string `yaml:"endpoints"`
	// CAFile verifies the members' certificates (https endpoints);
	// CertFile and KeyFile, set together, are the node's client
	// certificate when the cluster asks for one.
	CAFile   string `yaml:"ca_file"`
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// Prefix is prepended to every key; default "/stemflow/".
	Prefix string `yaml:"prefix"`
}

// LoadConfig reads and validates a YAML config file. Its errors name the
// file, the line and the key: unknown keys, values of the wrong type and
// values that fail Validate. Relative paths in overlay.tls and etcd are
// relative to the directory of the file.
func LoadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	cfg, err := parseConfig(path, data)
	if err != nil {
		return nil, err
	}
	for _, p := range []*string{&cfg.Overlay.TLS.CA, &cfg.Overlay.TLS.Cert, &cfg.Overlay.TLS.Key,
		&cfg.Etcd.CAFile, &cfg.Etcd.CertFile, &cfg.Etcd.KeyFile} {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(filepath.Dir(path), *p)
		}
	}
	return cfg, nil
}

// ParseConfig decodes YAML strictly, applies defaults and validates. Its
// errors name the line as "config:LINE:".
func ParseConfig(data []byte) (*Config, error) { return parseConfig("config", data) }

func parseConfig(name string, data []byte) (*Config, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, yamlError(name, err, nil)
	}
	if len(doc.Content) == 0 {
		return nil, fmt.Errorf("%s is empty: write a node config (samples in deploy/, e.g. deploy/node-eu.yaml; keys: %s)",
			name, strings.Join(yamlKeys(reflect.TypeFor[Config]()), ", "))
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("%s:%d: a node config is a mapping of keys (%s), not a %s",
			name, root.Line, strings.Join(yamlKeys(reflect.TypeFor[Config]()), ", "), kindName(root))
	}
	w := keyWalker{file: name, lines: map[string]int{}, valueKey: map[int]string{}}
	w.walk(root, reflect.TypeFor[Config](), "")
	if err := errors.Join(w.errs...); err != nil {
		return nil, err
	}
	var cfg Config
	if err := root.Decode(&cfg); err != nil {
		return nil, yamlError(name, err, w.valueKey)
	}
	cfg.SetDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, w.locate(err)
	}
	return &cfg, nil
}

// keyWalker checks a YAML tree against the Config struct: every key must be
// a field's yaml name. It records the line of every key it passes, so that
// later errors can name it.
type keyWalker struct {
	file     string
	errs     []error
	lines    map[string]int // dotted key ("rtsp.listen") → line
	valueKey map[int]string // line of a scalar value → its dotted key
}

func (w *keyWalker) walk(n *yaml.Node, t reflect.Type, path string) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if n.Kind != yaml.MappingNode {
		if n.Kind == yaml.ScalarNode {
			w.valueKey[n.Line] = path
		}
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			f, ok := fieldByYAMLName(t, k.Value)
			if !ok {
				where := "at the top level"
				if path != "" {
					where = "in " + path
				}
				w.errs = append(w.errs, fmt.Errorf("%s:%d: unknown key %q %s (known: %s)",
					w.file, k.Line, k.Value, where, strings.Join(yamlKeys(t), ", ")))
				continue
			}
			key := join(path, k.Value)
			w.lines[key] = k.Line
			w.walk(v, f.Type, key)
		}
	case reflect.Map:
		for i := 0; i+1 < len(n.Content); i += 2 {
			key := join(path, n.Content[i].Value)
			w.lines[key] = n.Content[i].Line
			w.walk(n.Content[i+1], t.Elem(), key)
		}
	}
}

// locate prefixes the file and line to each *FieldError in err.
func (w *keyWalker) locate(err error) error {
	var errs []error
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		errs = j.Unwrap()
	} else {
		errs = []error{err}
	}
	out := make([]error, len(errs))
	for i, e := range errs {
		out[i] = fmt.Errorf("%s: %w", w.file, e)
		var fe *FieldError
		if !errors.As(e, &fe) {
			continue
		}
		// The key itself, or the closest enclosing key the file has.
		for key := fe.Field; key != ""; key = parent(key) {
			if line, ok := w.lines[key]; ok {
				out[i] = fmt.Errorf("%s:%d: %w", w.file, line, e)
				break
			}
		}
	}
	return errors.Join(out...)
}

var yamlLine = regexp.MustCompile(`^(?:yaml: )?line (\d+): (.*)$`)

// yamlError turns yaml.v3's "yaml: line 3: ..." and "line 3: cannot
// unmarshal ..." into "FILE:3: KEY: ...".
func yamlError(file string, err error, valueKey map[int]string) error {
	var msgs []string
	var te *yaml.TypeError
	if errors.As(err, &te) {
		msgs = te.Errors
	} else {
		msgs = []string{err.Error()}
	}
	out := make([]error, len(msgs))
	for i, m := range msgs {
		sub := yamlLine.FindStringSubmatch(m)
		if sub == nil {
			out[i] = fmt.Errorf("%s: %s", file, strings.TrimPrefix(m, "yaml: "))
			continue
		}
		line, _ := strconv.Atoi(sub[1])
		if key := valueKey[line]; key != "" {
			out[i] = fmt.Errorf("%s:%d: %s: %s", file, line, key, sub[2])
		} else {
			out[i] = fmt.Errorf("%s:%d: %s", file, line, sub[2])
		}
	}
	return errors.Join(out...)
}

func fieldByYAMLName(t reflect.Type, name string) (reflect.StructField, bool) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if f.IsExported() && yamlName(f) == name {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

// yamlKeys lists the yaml names of a struct's fields, in order.
func yamlKeys(t reflect.Type) []string {
	var keys []string
	for i := 0; i < t.NumField(); i++ {
		if f := t.Field(i); f.IsExported() && yamlName(f) != "-" {
			keys = append(keys, yamlName(f))
		}
	}
	return keys
}

func yamlName(f reflect.StructField) string {
	name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
	if name == "" {
		return strings.ToLower(f.Name)
	}
	return name
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.SequenceNode:
		return "list"
	case yaml.ScalarNode:
		return "single value"
	case yaml.AliasNode:
		return "alias"
	}
	return "mapping"
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func parent(key string) string {
	i := strings.LastIndexByte(key, '.')
	if i < 0 {
		return ""
	}
	return key[:i]
}

// A FieldError is a problem with the value of one config key, named by its
// dotted YAML path (e.g. "rtsp.rtp_address").
type FieldError struct {
	Field, Problem string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Problem }

// RTSPOverUDP reports whether the RTSP server takes RTP over UDP (rtsp.udp,
// default true).
func (c *Config) RTSPOverUDP() bool { return c.RTSP.UDP == nil || *c.RTSP.UDP }

// validateRTSPUDP checks the UDP ports of RTSP: RTP on an even port, RTCP on
// the next one, derived from rtsp.listen unless both addresses are set.
func (c *Config) validateRTSPUDP(bad func(field, format string, args ...any)) {
	if !c.RTSPOverUDP() {
		return
	}
	const off = "or turn RTSP over UDP off with rtsp.udp: false (RTSP over TCP still works)"
	rtp, rtcp := c.RTSP.RTPAddress, c.RTSP.RTCPAddress
	switch {
	case (rtp == "") != (rtcp == ""):
		missing := "rtsp.rtcp_address"
		if rtp == "" {
			missing = "rtsp.rtp_address"
		}
		bad(missing, "not set: set rtsp.rtp_address and rtsp.rtcp_address together (an even port and the next one) or neither (they follow rtsp.listen), %s", off)
	case rtp == "":
		port, err := addrPort(c.RTSP.Listen)
		if err != nil {
			return // reported as rtsp.listen
		}
		if port == 0 || port%2 != 0 || port+rtspserver.RTCPPortOffset > 65535 {
			bad("rtsp.listen", "port %d: RTP and RTCP over UDP take the RTSP port +%d and +%d, and RTP needs an even port: use an even rtsp.listen port of at most %d (8554 → UDP 9554 and 9555), set rtsp.rtp_address and rtsp.rtcp_address, %s",
				port, rtspserver.RTPPortOffset, rtspserver.RTCPPortOffset, 65535-rtspserver.RTCPPortOffset-1, off)
		}
	default:
		rtpPort, err := addrPort(rtp)
		if err != nil {
			bad("rtsp.rtp_address", "%q is not host:port", rtp)
			return
		}
		rtcpPort, err := addrPort(rtcp)
		if err != nil {
			bad("rtsp.rtcp_address", "%q is not host:port", rtcp)
			return
		}
		if rtpPort == 0 || rtpPort%2 != 0 {
			bad("rtsp.rtp_address", "port %d: RTP over UDP needs an even port (and rtsp.rtcp_address the one after it), %s", rtpPort, off)
		} else if rtcpPort != rtpPort+1 {
			bad("rtsp.rtcp_address", "port %d: RTCP takes the port after rtsp.rtp_address's, %d, %s", rtcpPort, rtpPort+1, off)
		}
	}
}

// addrPort returns the port of host:port.
func addrPort(addr string) (int, error) {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return 0, err
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 0 || port > 65535 {
		return 0, fmt.Errorf("port %q out of range", p)
	}
	return port, nil
}

// ParseLogLevel reads a log level: debug, info, warn or error.
func ParseLogLevel(s string) (slog.Level, error) {
	switch s {
	case "debug":
		return slog.LevelDebug, nil
	case "info":
		return slog.LevelInfo, nil
	case "warn":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("%q: use debug, info, warn or error", s)
}

// SetDefaults fills in unset fields.
func (c *Config) SetDefaults() {
	if c.HTTP.Listen == "" {
		c.HTTP.Listen = ":8080"
	}
	if c.RTSP.Listen == "" {
		c.RTSP.Listen = ":8554"
	}
	if c.Overlay.Listen == "" {
		c.Overlay.Listen = ":7000"
	}
	if c.Log.Level == "" {
		c.Log.Level = "info"
	}
	c.Chat.setDefaults()
}

// Validate reports every problem in the config, each a *FieldError naming
// the YAML key, joined with errors.Join.
func (c *Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, &FieldError{Field: field, Problem: fmt.Sprintf(format, args...)})
	}
	if err := topology.ValidateName(c.Datacenter); err != nil {
		bad("datacenter", "%v", err)
	}
	for _, l := range []struct{ field, addr string }{{"http.listen", c.HTTP.Listen}, {"rtsp.listen", c.RTSP.Listen}, {"overlay.listen", c.Overlay.Listen}} {
		if _, err := addrPort(l.addr); err != nil {
			bad(l.field, "%q is not host:port", l.addr)
		}
	}
	c.validateRTSPUDP(bad)
	for name, url := range c.RTSP.Sources {
		if err := relay.ValidateStreamName(name); err != nil {
			bad("rtsp.sources", "%v", err)
		}
		if !strings.HasPrefix(url, "rtsp://") && !strings.HasPrefix(url, "rtsps://") {
			bad("rtsp.sources."+name, "%q is not an rtsp:// URL", ingestrtsp.RedactURL(url))
		}
	}
	for name, addr := range c.Overlay.Neighbours {
		if err := topology.ValidateName(name); err != nil {
			bad("overlay.neighbours", "%v", err)
		}
		if name == c.Datacenter {
			bad("overlay.neighbours", "lists this node's own datacenter %q", name)
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			bad("overlay.neighbours."+name, "%q is not host:port", addr)
		}
	}
	for name, r := range c.Overlay.Capacity {
		if _, ok := c.Overlay.Neighbours[name]; !ok {
			bad("overlay.capacity."+name, "%q is not in overlay.neighbours: give the capacity of links to neighbours only", name)
		}
		if r <= 0 {
			bad("overlay.capacity."+name, "give a rate above 0, e.g. 1gbit")
		}
	}
	if c.identity == nil && (c.Overlay.TLS.CA == "" || c.Overlay.TLS.Cert == "" || c.Overlay.TLS.Key == "") {
		bad("overlay.tls", "ca, cert and key are required (make them with `stemflow certs`)")
	}
	for _, ip := range c.WebRTC.IPs {
		if p := net.ParseIP(ip); p == nil || p.IsUnspecified() {
			bad("webrtc.ips", "%q is not a host IP address (list this machine's own addresses, e.g. its private IP)", ip)
		}
	}
	for _, ip := range c.WebRTC.NAT1To1IPs {
		if p := net.ParseIP(ip); p == nil || p.IsUnspecified() {
			bad("webrtc.nat_1to1_ips", "%q is not an IP address", ip)
		}
	}
	if len(c.WebRTC.IPs) == 0 {
		bad("webrtc.ips", "list the host IPs that ICE may use (e.g. the node's private IP)")
	}
	if n := len(c.WebRTC.NAT1To1IPs); n > 1 && n != len(c.WebRTC.IPs) {
		bad("webrtc.nat_1to1_ips", "%d addresses for %d in webrtc.ips: give one public address for all of webrtc.ips, or one per entry of webrtc.ips in the same order", n, len(c.WebRTC.IPs))
	}
	if c.WebRTC.UDPPort < 0 || c.WebRTC.UDPPort > 65535 {
		bad("webrtc.udp_port", "%d out of range", c.WebRTC.UDPPort)
	}
	if _, err := ParseLogLevel(c.Log.Level); err != nil {
		bad("log.level", "%v", err)
	}
	c.validateEtcd(bad)
	c.Chat.validate(bad)
	return errors.Join(errs...)
}

// validateEtcd checks the etcd section: URLs, TLS files set together, the
// prefix, and that the manager has an etcd to run on.
func (c *Config) validateEtcd(bad func(field, format string, args ...any)) {
	e := &c.Etcd
	tlsURL := false
	for _, ep := range e.Endpoints {
		u, err := url.Parse(ep)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Port() == "" {
			bad("etcd.endpoints", "%q is not an etcd client URL: write http://HOST:PORT or https://HOST:PORT (e.g. https://10.0.0.5:2379)", ep)
			continue
		}
		tlsURL = tlsURL || u.Scheme == "https"
	}
	if (e.CertFile == "") != (e.KeyFile == "") {
		missing := "etcd.key_file"
		if e.CertFile == "" {
			missing = "etcd.cert_file"
		}
		bad(missing, "not set: give etcd.cert_file and etcd.key_file together (the node's client certificate and its key), or neither")
	}
	if (e.CAFile != "" || e.CertFile != "") && !tlsURL && len(e.Endpoints) > 0 {
		bad("etcd.endpoints", "TLS files are set but every endpoint is http://: use https:// URLs to reach etcd over TLS")
	}
	if (e.CAFile != "" || e.CertFile != "" || e.Prefix != "") && len(e.Endpoints) == 0 {
		bad("etcd.endpoints", "empty: list the etcd members' client URLs (e.g. [https://10.0.0.5:2379]) or leave the etcd section out")
	}
	if e.Prefix != "" && (!strings.HasPrefix(e.Prefix, "/") || !strings.HasSuffix(e.Prefix, "/")) {
		bad("etcd.prefix", "%q must start and end with / (e.g. /stemflow/)", e.Prefix)
	}
	if c.Manager && len(e.Endpoints) == 0 {
		bad("manager", "true needs etcd: set etcd.endpoints (the manager keeps its trees and its election there)")
	}
}
