// Package etcdembed runs one etcd member inside a Stemflow process: the
// single member `stemflow dev` uses for its control plane, and the members
// `stemflow etcd` runs for small deployments. Real deployments point nodes
// at an external etcd cluster instead.
//
// The member logs nothing: embedded etcd logs at length (and logs errors when
// it shuts down), which would drown Stemflow's own log.
package etcdembed

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Config describes one member. Its fields are the flags of `stemflow etcd`,
// and Validate's messages name those flags.
type Config struct {
	// Name is the member's name in InitialCluster (--name); default "default".
	Name string
	// Dir holds the member's data (--data-dir); required. A member restarted
	// on the same Dir rejoins its cluster with its data.
	Dir string
	// ClientURL is where clients connect (--client-url), e.g.
	// http://127.0.0.1:2379; PeerURL is where the other members connect
	// (--peer-url), e.g. http://127.0.0.1:2380. Both are listened on and
	// advertised, so they must name an address of this machine.
	ClientURL, PeerURL string
	// InitialCluster lists every member of a new cluster as
	// name=peerURL,name=peerURL (--initial-cluster); default Name=PeerURL,
	// a cluster of one.
	InitialCluster string
	// ClusterToken tells clusters bootstrapped with the same member list
	// apart (--cluster-token); default "stemflow".
	ClusterToken string
	// UnsafeNoFsync skips fsync: for tests and `stemflow dev` only, where
	// the data does not outlive the process.
	UnsafeNoFsync bool
	// CertFile and KeyFile are the member's TLS certificate and key for
	// clients (--cert-file, --key-file): with them ClientURL must be
	// https://. TrustedCAFile (--trusted-ca-file), when set, makes the
	// member require client certificates signed by that CA. The
	// certificate should allow client authentication too: the member
	// dials itself with it. Peers still talk plain HTTP: keep PeerURL on a
	// private network.
	CertFile, KeyFile, TrustedCAFile string
	// Tick is the raft heartbeat (default 100 ms); the election timeout
	// is ten ticks. A member alone (StartFree) ticks faster: it elects
	// itself sooner, and has no peer to time out.
	Tick time.Duration
}

func (cfg *Config) setDefaults() {
	if cfg.Name == "" {
		cfg.Name = "default"
	}
	if cfg.InitialCluster == "" {
		cfg.InitialCluster = cfg.Name + "=" + cfg.PeerURL
	}
	if cfg.ClusterToken == "" {
		cfg.ClusterToken = "stemflow"
	}
}

// Validate checks the member's configuration before anything starts, naming
// the flag at fault. Empty Name, InitialCluster and ClusterToken are filled
// in by Start first.
func (cfg Config) Validate() error {
	cfg.setDefaults()
	if strings.ContainsAny(cfg.Name, "=, ") {
		return fmt.Errorf("--name %q: a member name cannot contain '=', ',' or spaces", cfg.Name)
	}
	if cfg.Dir == "" {
		return errors.New("--data-dir is required: the directory the member keeps its data in")
	}
	client, err := parseURL(cfg.ClientURL)
	if err != nil {
		return fmt.Errorf("--client-url %q: %w", cfg.ClientURL, err)
	}
	peer, err := parseURL(cfg.PeerURL)
	if err != nil {
		return fmt.Errorf("--peer-url %q: %w", cfg.PeerURL, err)
	}
	if tls := cfg.CertFile != "" || cfg.KeyFile != ""; tls != (client.Scheme == "https") {
		if tls {
			return fmt.Errorf("--client-url %q: with --cert-file and --key-file the client URL must be https://", cfg.ClientURL)
		}
		return fmt.Errorf("--client-url %q is https://: give the member's certificate and key (--cert-file, --key-file)", cfg.ClientURL)
	}
	if (cfg.CertFile == "") != (cfg.KeyFile == "") {
		return errors.New("--cert-file and --key-file go together: give both")
	}
	if cfg.TrustedCAFile != "" && cfg.CertFile == "" {
		return errors.New("--trusted-ca-file checks client certificates over TLS: give --cert-file and --key-file too")
	}
	if client.Host == peer.Host {
		return fmt.Errorf("--client-url and --peer-url both use %s: give them different ports", client.Host)
	}
	members, err := ParseInitialCluster(cfg.InitialCluster)
	if err != nil {
		return fmt.Errorf("--initial-cluster %q: %w", cfg.InitialCluster, err)
	}
	own, ok := members[cfg.Name]
	if !ok {
		return fmt.Errorf("--initial-cluster %q does not list this member: add %s=%s (--name=--peer-url)", cfg.InitialCluster, cfg.Name, cfg.PeerURL)
	}
	if own != peer.String() {
		return fmt.Errorf("--initial-cluster lists %s=%s but --peer-url is %s: they must be the same URL", cfg.Name, own, cfg.PeerURL)
	}
	return nil
}

// ParseInitialCluster parses name=peerURL,name=peerURL into a map from
// member name to peer URL.
func ParseInitialCluster(s string) (map[string]string, error) {
	members := map[string]string{}
	for entry := range strings.SplitSeq(s, ",") {
		name, raw, ok := strings.Cut(strings.TrimSpace(entry), "=")
		if !ok || name == "" {
			return nil, fmt.Errorf("%q is not name=peerURL", entry)
		}
		u, err := parseURL(raw)
		if err != nil {
			return nil, fmt.Errorf("member %s: %q: %w", name, raw, err)
		}
		if _, dup := members[name]; dup {
			return nil, fmt.Errorf("member %s is listed twice", name)
		}
		members[name] = u.String()
	}
	return members, nil
}

// parseURL accepts http:// or https:// URLs with a host and a port and no
// path, as etcd listens on them.
func parseURL(s string) (*url.URL, error) {
	if s == "" {
		return nil, errors.New("is required, e.g. http://127.0.0.1:2379")
	}
	u, err := url.Parse(s)
	if err != nil {
		return nil, err
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, errors.New("want an http:// or https:// URL, e.g. http://127.0.0.1:2379")
	}
	host, port, err := net.SplitHostPort(u.Host)
	if err != nil || host == "" || port == "" {
		return nil, errors.New("want a host and a port, e.g. http://127.0.0.1:2379")
	}
	if u.Path != "" && u.Path != "/" || u.RawQuery != "" {
		return nil, errors.New("want no path or query, e.g. http://127.0.0.1:2379")
	}
	u.Path = ""
	return u, nil
}

// Server is a running member.
type Server struct {
	cfg Config
	e   *embed.Etcd
}

// Start starts a member and returns once it serves clients, which for a
// member of a new cluster of several means once a quorum of its members has
// started. It gives up when ctx ends.
func Start(ctx context.Context, cfg Config) (*Server, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	client, _ := parseURL(cfg.ClientURL)
	peer, _ := parseURL(cfg.PeerURL)
	ec := embed.NewConfig()
	ec.Name = cfg.Name
	ec.Dir = cfg.Dir
	ec.ListenClientUrls = []url.URL{*client}
	ec.AdvertiseClientUrls = []url.URL{*client}
	ec.ListenPeerUrls = []url.URL{*peer}
	ec.AdvertisePeerUrls = []url.URL{*peer}
	ec.InitialCluster = cfg.InitialCluster
	ec.InitialClusterToken = cfg.ClusterToken
	ec.UnsafeNoFsync = cfg.UnsafeNoFsync
	ec.ClientTLSInfo = transport.TLSInfo{CertFile: cfg.CertFile, KeyFile: cfg.KeyFile,
		TrustedCAFile: cfg.TrustedCAFile, ClientCertAuth: cfg.TrustedCAFile != ""}
	if cfg.Tick > 0 {
		ec.TickMs = uint(max(1, cfg.Tick.Milliseconds()))
		ec.ElectionMs = 10 * ec.TickMs
	}
	ec.LogLevel = "error"
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	// No gRPC gateway (an HTTP/JSON front Stemflow does not use) and only
	// the default metrics on the client port.
	ec.EnableGRPCGateway = false
	e, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, fmt.Errorf("etcd member %s: %w", cfg.Name, err)
	}
	select {
	case <-e.Server.ReadyNotify():
		return &Server{cfg: cfg, e: e}, nil
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("etcd member %s: %w", cfg.Name, err)
	case <-ctx.Done():
		e.Close()
		return nil, fmt.Errorf("etcd member %s did not become ready (is a quorum of --initial-cluster running?): %w", cfg.Name, context.Cause(ctx))
	}
}

// ClientURL returns the URL clients connect to.
func (s *Server) ClientURL() string { return s.cfg.ClientURL }

// Name returns the member's name.
func (s *Server) Name() string { return s.cfg.Name }

// Err reports a fatal error of the running member (its listeners failed).
func (s *Server) Err() <-chan error { return s.e.Err() }

// Close stops the member: it ends client requests (after at most a few
// seconds) and closes its listeners and data. Close is safe to call more
// than once.
func (s *Server) Close() {
	s.e.Close()
	<-s.e.Server.StopNotify()
}

// StartFree starts a member of a cluster of one on two ports of ip that were
// free a moment ago (for tests and `stemflow dev`), retrying when another
// process took a port first.
func StartFree(ctx context.Context, ip, dir string) (*Server, error) {
	var err error
	for attempt := range 3 {
		var ports [2]int
		if ports, err = freePorts(ip); err != nil {
			return nil, err
		}
		cfg := Config{
			// A fresh directory per attempt: a failed start may have
			// bootstrapped a member with the other URLs.
			Name: "dev", Dir: filepath.Join(dir, fmt.Sprintf("member%d", attempt)), UnsafeNoFsync: true,
			Tick:      10 * time.Millisecond,
			ClientURL: "http://" + net.JoinHostPort(ip, fmt.Sprint(ports[0])),
			PeerURL:   "http://" + net.JoinHostPort(ip, fmt.Sprint(ports[1])),
		}
		var s *Server
		if s, err = Start(ctx, cfg); err == nil {
			return s, nil
		}
		if !strings.Contains(err.Error(), "address already in use") {
			return nil, err
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil, err
}

func freePorts(ip string) ([2]int, error) {
	var ports [2]int
	for i := range ports {
		ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
		if err != nil {
			return ports, fmt.Errorf("finding a free port for etcd: %w", err)
		}
		defer ln.Close()
		ports[i] = ln.Addr().(*net.TCPAddr).Port
	}
	return ports, nil
}
