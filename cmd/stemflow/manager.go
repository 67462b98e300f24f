package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/stemflow/stemflow/node"
	"github.com/stemflow/stemflow/topology"
	"github.com/stemflow/stemflow/topology/manager"
	"github.com/stemflow/stemflow/topology/store"
)

const managerHelp = `Runs one topology manager candidate until SIGINT or SIGTERM. Run one in several
datacenters: they hold an election in etcd and only the leader plans. The leader
watches the nodes, measured links, streams and subscriptions in etcd, computes a
relay tree per stream, and writes each stream's route (parent and backup per
datacenter) when its tree changes; nodes follow the routes. When the leader dies
a standby leads within --ttl and carries on from the routes in etcd. With no
manager running, nodes keep their last routes. docs/etcd.md lists the keys.
`

// runManager runs a manager candidate: the control plane of a real
// deployment, beside (or inside) the nodes.
func runManager(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("manager", "manager --etcd URL[,URL...] --dc NAME [flags]\n\n"+managerHelp, stderr)
	endpoints := fs.String("etcd", "", "client URLs of the etcd cluster, comma-separated (required), e.g. https://10.0.0.1:2379,https://10.0.0.2:2379")
	dc := fs.String("dc", "", "this manager's datacenter: its name in the election (required)")
	ca := fs.String("etcd-ca", "", "PEM file of the CA that signed the etcd members' certificates (https:// URLs; default: the system's roots)")
	cert := fs.String("etcd-cert", "", "PEM file of this manager's client certificate, for a cluster that requires one (with --etcd-key)")
	key := fs.String("etcd-key", "", "PEM file of the key of --etcd-cert")
	prefix := fs.String("etcd-prefix", store.DefaultPrefix, "prefix of Stemflow's keys in etcd (the nodes must use the same)")
	ttl := fs.Duration("ttl", store.DefaultElectionTTL, "election session TTL: a dead leader's standby takes over within it (at least 2s)")
	bitrate := fs.Float64("default-bitrate", manager.DefaultBitrateKbps, "kbit/s planned for a stream whose node has not measured its rate")
	logLevel := fs.String("log", "info", "log level: debug, info, warn, error")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("manager takes no arguments, got %q", fs.Args())
	}
	if *endpoints == "" {
		return errors.New("--etcd is required: the client URLs of the etcd cluster, e.g. http://127.0.0.1:2379")
	}
	var urls []string
	for u := range strings.SplitSeq(*endpoints, ",") {
		if u = strings.TrimSpace(u); !strings.HasPrefix(u, "http://") && !strings.HasPrefix(u, "https://") {
			return fmt.Errorf("--etcd %q: each URL must start with http:// or https://", u)
		}
		urls = append(urls, u)
	}
	if *dc == "" {
		return errors.New("--dc is required: the datacenter this manager runs in")
	}
	if err := topology.ValidateName(*dc); err != nil {
		return fmt.Errorf("--dc: %w", err)
	}
	if *ttl < 2*time.Second {
		return fmt.Errorf("--ttl %v: etcd leases last at least 2s with its default election timeout; use 2s or more", *ttl)
	}
	if (*cert == "") != (*key == "") {
		return errors.New("--etcd-cert and --etcd-key go together: give both")
	}
	level, err := node.ParseLogLevel(*logLevel)
	if err != nil {
		return fmt.Errorf("--log %w", err)
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	s, err := store.Open(store.Config{Endpoints: urls, Prefix: *prefix, CAFile: *ca, CertFile: *cert, KeyFile: *key})
	if err != nil {
		return err
	}
	defer s.Close()
	ctx, stop := signalContext()
	defer stop()
	// Reach etcd once before campaigning, so that a wrong URL or TLS
	// setting fails here with a message instead of retrying for ever.
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	leader, err := s.Leader(pctx)
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("cannot reach etcd at %s within 10s (is it running? https:// URLs need --etcd-ca, and --etcd-cert/--etcd-key if it requires client certificates): %w", *endpoints, err)
	}
	m, err := manager.Start(manager.Config{Store: s, ID: *dc, Logger: log, LeaseTTL: *ttl, DefaultBitrateKbps: *bitrate})
	if err != nil {
		return err
	}
	defer m.Close()
	if leader == "" {
		leader = "none"
	}
	fmt.Fprintf(stdout, "stemflow manager: candidate %s campaigning on etcd %s (leader now: %s)\n", *dc, *endpoints, leader)
	<-ctx.Done()
	fmt.Fprintln(stdout, "stemflow: shutting down")
	return nil
}
