package main

import (
	"fmt"
	"io"

	"github.com/stemflow/stemflow/internal/etcdembed"
)

// runEtcd runs one embedded etcd member until SIGINT or SIGTERM: a small
// deployment's control-plane store without a separate etcd install.
func runEtcd(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("etcd", "etcd --name m1 --data-dir DIR --client-url URL --peer-url URL [--initial-cluster m1=URL,m2=URL,m3=URL]", stderr)
	name := fs.String("name", "default", "this member's name, as --initial-cluster lists it")
	dir := fs.String("data-dir", "", "directory the member keeps its data in (required); a member restarted on it rejoins its cluster")
	clientURL := fs.String("client-url", "http://127.0.0.1:2379", "URL nodes and managers connect to (listened on and advertised)")
	peerURL := fs.String("peer-url", "http://127.0.0.1:2380", "URL the other members connect to (listened on and advertised)")
	initial := fs.String("initial-cluster", "", "every member of a new cluster as name=peer-url,name=peer-url (default: this member alone, NAME=PEER-URL)")
	token := fs.String("cluster-token", "stemflow", "tells apart clusters bootstrapped from the same --initial-cluster")
	certFile := fs.String("cert-file", "", "PEM certificate the member serves clients with over TLS (--client-url must then be https://); it should allow client auth too")
	keyFile := fs.String("key-file", "", "PEM key of --cert-file")
	caFile := fs.String("trusted-ca-file", "", "PEM CA: with it, clients must present a certificate this CA signed (managers: --etcd-cert)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("etcd takes no arguments, got %q", fs.Args())
	}
	cfg := etcdembed.Config{Name: *name, Dir: *dir, ClientURL: *clientURL, PeerURL: *peerURL, InitialCluster: *initial, ClusterToken: *token,
		CertFile: *certFile, KeyFile: *keyFile, TrustedCAFile: *caFile}
	if err := cfg.Validate(); err != nil {
		return err
	}
	ctx, stop := signalContext()
	defer stop()
	fmt.Fprintf(stdout, "stemflow etcd: member %s starting, clients %s, peers %s; waiting for a quorum of its cluster\n", *name, *clientURL, *peerURL)
	srv, err := etcdembed.Start(ctx, cfg)
	if err != nil {
		if ctx.Err() != nil {
			return nil // stopped before it was ready
		}
		return err
	}
	defer srv.Close()
	fmt.Fprintf(stdout, "stemflow etcd: member %s ready, clients at %s\n", *name, srv.ClientURL())
	select {
	case <-ctx.Done():
		fmt.Fprintln(stdout, "stemflow: shutting down")
		return nil
	case err := <-srv.Err():
		return fmt.Errorf("etcd member %s: %w", *name, err)
	}
}
