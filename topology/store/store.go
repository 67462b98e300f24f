// Package store keeps Stemflow's control-plane state in etcd: which nodes
// are alive, the measured links, which datacenter publishes each stream,
// which datacenters want it, the computed route per stream, and the
// manager election. docs/etcd.md lists the keys and their values.
//
// The tree computation in package topology is pure; every etcd read and
// write lives here. Keys name datacenters and nodes apart (nodes/{dc}/{node}):
// today each datacenter runs one node, a later step runs several.
//
// A Store is safe for concurrent use. It owns its etcd client: Close closes
// the client without revoking any lease, which is exactly what a crashed
// process does — its leased keys (node, streams it publishes,
// subscriptions) vanish when the lease's TTL runs out.
package store

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// DefaultPrefix is where Stemflow's keys live unless configured otherwise.
const DefaultPrefix = "/stemflow/"

// Config says how to reach etcd.
type Config struct {
	// Endpoints are the client URLs of the etcd members, e.g.
	// http://127.0.0.1:2379.
	Endpoints []string
	// Prefix is prepended to every key; default DefaultPrefix. It must end
	// in "/".
	Prefix string
	// DialTimeout bounds the first connection; default 5 s.
	DialTimeout time.Duration
	// TLS, for https:// endpoints: CAFile is the PEM file of the CA that
	// signed the members' certificates (default: the system's roots);
	// CertFile and KeyFile are this client's certificate and key, for a
	// cluster that requires client certificates.
	CAFile, CertFile, KeyFile string
}

// tlsConfig builds the client's TLS configuration, or nil without TLS.
func (cfg Config) tlsConfig() (*tls.Config, error) {
	https := false
	for _, e := range cfg.Endpoints {
		https = https || strings.HasPrefix(e, "https://")
	}
	if !https && cfg.CAFile == "" && cfg.CertFile == "" && cfg.KeyFile == "" {
		return nil, nil
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("store: reading the etcd CA file: %w", err)
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("store: the etcd CA file %s holds no PEM certificate", cfg.CAFile)
		}
	}
	if (cfg.CertFile == "") != (cfg.KeyFile == "") {
		return nil, errors.New("store: an etcd client certificate needs its key, and a key its certificate: give both")
	}
	if cfg.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(cfg.CertFile, cfg.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("store: loading the etcd client certificate %s and key %s: %w", cfg.CertFile, cfg.KeyFile, err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}

// Store is a connection to etcd with Stemflow's typed keys.
type Store struct {
	cli    *clientv3.Client
	prefix string
}

// Open connects to etcd. It does not wait for a member to answer: the
// first request does (and fails after its context ends).
func Open(cfg Config) (*Store, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("store: no etcd endpoints: give the client URL of at least one member, e.g. http://127.0.0.1:2379")
	}
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	if !strings.HasSuffix(cfg.Prefix, "/") {
		return nil, fmt.Errorf("store: prefix %q must end in /", cfg.Prefix)
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	tc, err := cfg.tlsConfig()
	if err != nil {
		return nil, err
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   cfg.Endpoints,
		DialTimeout: cfg.DialTimeout,
		TLS:         tc,
		// The client logs retries and balancer changes at length; callers
		// see errors as return values.
		Logger: zap.NewNop(),
		// Notice a dead member quickly and move to another endpoint.
		DialKeepAliveTime:    time.Second,
		DialKeepAliveTimeout: time.Second,
	})
	if err != nil {
		return nil, fmt.Errorf("store: connecting to etcd at %s: %w", strings.Join(cfg.Endpoints, ","), err)
	}
	return &Store{cli: cli, prefix: cfg.Prefix}, nil
}

// Close closes the connection. Leases are not revoked: close a Registration
// first for a clean goodbye.
func (s *Store) Close() error { return s.cli.Close() }

// Client returns the underlying etcd client, for what this package does not
// cover yet.
func (s *Store) Client() *clientv3.Client { return s.cli }

// Key names, relative to the prefix. docs/etcd.md documents them.
const (
	nodesDir         = "nodes/"
	linksDir         = "links/"
	streamsDir       = "streams/"
	subscriptionsDir = "subscriptions/"
	routesDir        = "routes/"
	electionDir      = "manager/election"
)

// NodeKey is the key of a node's registration.
func (s *Store) NodeKey(dc, node string) string { return s.prefix + nodesDir + dc + "/" + node }

// LinkKey is the key of the measured link from one datacenter to another.
func (s *Store) LinkKey(from, to string) string { return s.prefix + linksDir + from + "/" + to }

// StreamKey is the key naming a stream's origin.
func (s *Store) StreamKey(name string) string { return s.prefix + streamsDir + name }

// SubscriptionKey is the key saying datacenter dc wants a stream.
func (s *Store) SubscriptionKey(stream, dc string) string {
	return s.prefix + subscriptionsDir + stream + "/" + dc
}

// RouteKey is the key of a stream's route.
func (s *Store) RouteKey(stream string) string { return s.prefix + routesDir + stream }

// ElectionPrefix is the prefix the manager election campaigns under.
func (s *Store) ElectionPrefix() string { return s.prefix + electionDir }

// checkName refuses names that would make keys ambiguous.
func checkName(what, name string) error {
	if name == "" {
		return fmt.Errorf("store: empty %s name", what)
	}
	if strings.ContainsAny(name, "/\x00") {
		return fmt.Errorf("store: %s name %q contains '/': names are single key segments", what, name)
	}
	return nil
}

// Node is the value of nodes/{dc}/{node}.
type Node struct {
	DC   string `json:"dc"`
	Node string `json:"node"`
	// Addresses the node serves on, by purpose: "overlay", "http", "rtsp".
	Addresses map[string]string `json:"addresses,omitempty"`
	Started   time.Time         `json:"started"`
}

// Link is the value of links/{from}/{to}: one direction of an overlay link
// between datacenters as its sending end measures it, smoothed, written only
// when it changes beyond hysteresis (never per packet or per second).
type Link struct {
	From string `json:"from"` // datacenters
	To   string `json:"to"`
	// FromNode and ToNode name the nodes that measured it.
	FromNode      string    `json:"from_node,omitempty"`
	ToNode        string    `json:"to_node,omitempty"`
	RTTMs         float64   `json:"rtt_ms"`
	JitterMs      float64   `json:"jitter_ms"`
	Loss          float64   `json:"loss"` // fraction, 0 to 1
	BandwidthKbps float64   `json:"bandwidth_kbps"`
	Down          bool      `json:"down,omitempty"`
	Updated       time.Time `json:"updated"`
}

// Stream is the value of streams/{name}: where a stream is published.
type Stream struct {
	Name       string    `json:"name"`
	OriginDC   string    `json:"origin_dc"`
	OriginNode string    `json:"origin_node"`
	Since      time.Time `json:"since"`
	// BitrateKbps is the stream's measured rate, when its node has
	// published one (SetStreamBitrate); 0 means unknown, and the manager
	// plans with its default.
	BitrateKbps float64 `json:"bitrate_kbps,omitempty"`
}

// Subscription is the value of subscriptions/{stream}/{dc}.
type Subscription struct {
	Stream string    `json:"stream"`
	DC     string    `json:"dc"`
	Node   string    `json:"node"`
	Since  time.Time `json:"since"`
}

// Route is the value of routes/{stream}: the tree a stream flows along,
// written by the manager and read by every node.
type Route struct {
	Stream string `json:"stream"`
	// Version rises with every new tree of the stream.
	Version int64  `json:"version"`
	Origin  string `json:"origin"` // datacenter
	// Parent maps each datacenter of the tree but the origin to the
	// datacenter it receives the stream from.
	Parent map[string]string `json:"parent"`
	// Backup maps a datacenter to the parent it switches to on its own
	// when its parent dies, disjoint from the primary where the graph
	// allows.
	Backup   map[string]string `json:"backup,omitempty"`
	Computed time.Time         `json:"computed"`
}

func decode[T any](key string, b []byte) (T, error) {
	var v T
	if err := json.Unmarshal(b, &v); err != nil {
		return v, fmt.Errorf("store: %s holds no valid value: %w", key, err)
	}
	return v, nil
}
