// The command line: dev, node, certs, etcd, manager and version. Only cmd/stemflow prints
// to the terminal.

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/stemflow/stemflow/node"
	"github.com/stemflow/stemflow/relay"
	"github.com/stemflow/stemflow/topology"
)

// Version is set at build time with -ldflags "-X main.Version=...".
var Version = "0.1.0-dev"

const usage = `stemflow — live video and chat across datacenters

Usage:
  stemflow dev     [flags]   run several datacenters in one process on loopback
  stemflow node    --config FILE   run one node of a real deployment
  stemflow certs   --dcs a,b,c --out DIR   make a cluster CA and node certificates
  stemflow etcd    --name m1 --data-dir DIR [flags]   run one etcd member (small deployments)
  stemflow manager --etcd URL --dc NAME [flags]   run a topology manager candidate
  stemflow version           print the version

Run 'stemflow COMMAND --help' for a command's flags.
`

// runCLI runs the command line and returns the exit code.
func runCLI(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "dev":
		err = runDev(args[1:], stdout, stderr)
	case "node":
		err = runNode(args[1:], stderr)
	case "certs":
		err = runCerts(args[1:], stdout, stderr)
	case "etcd":
		err = runEtcd(args[1:], stdout, stderr)
	case "manager":
		err = runManager(args[1:], stdout, stderr)
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, "stemflow", Version)
	case "help", "--help", "-help", "-h":
		fmt.Fprint(stdout, usage)
	default:
		fmt.Fprintf(stderr, "stemflow: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if errors.Is(err, errUsage) {
		return 2 // the flag package printed the error and the usage
	}
	if err != nil {
		fmt.Fprintln(stderr, "stemflow:", err)
		return 1
	}
	return 0
}

// errUsage marks a command line the flag package could not parse; it has
// already said why.
var errUsage = errors.New("usage")

// parse parses a command's flags. Errors other than --help are returned as
// errUsage: the flag package has printed them with the usage.
func parse(fs *flag.FlagSet, args []string) error {
	err := fs.Parse(args)
	if err != nil && !errors.Is(err, flag.ErrHelp) {
		return errUsage
	}
	return err
}

func newFlagSet(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: stemflow %s\n\nFlags:\n", synopsis)
		fs.PrintDefaults()
	}
	return fs
}

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

func runDev(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("dev", "dev [flags]", stderr)
	dcs := fs.String("dcs", "a,b,c", "datacenters: names (a,b,c,d) or a count (4); every pair linked (a full mesh)")
	bind := fs.String("bind", "127.0.0.1", "address every datacenter listens on")
	httpPort := fs.Int("http-port", 8080, "HTTP port of the first datacenter; datacenter i uses port+i")
	rtspPort := fs.Int("rtsp-port", 8554, "RTSP port of the first datacenter; datacenter i uses port+i")
	token := fs.String("publish-token", "", "token publishers must present: WHIP as a Bearer token, RTSP as the URL's password (none if empty)")
	logLevel := fs.String("log", "info", "log level: debug, info, warn, error")
	dataDir := fs.String("data-dir", "", "directory the embedded etcd member keeps the control plane's state in (default: a temporary one, removed at exit)")
	lab := fs.String("lab", "", "WAN lab profile (e.g. deploy/lab/bottleneck.yaml): start its datacenters as a full mesh with its links impaired, and serve /api/v1/lab")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("dev takes no arguments, got %q", fs.Args())
	}
	if *lab != "" {
		dcsSet := false
		fs.Visit(func(f *flag.Flag) { dcsSet = dcsSet || f.Name == "dcs" })
		if dcsSet {
			return errors.New("--dcs and --lab: the lab profile names the datacenters; leave out --dcs")
		}
		*dcs = "a"
	}
	names, err := topology.ParseDatacenters(*dcs)
	if err != nil {
		return fmt.Errorf("--dcs: %w", err)
	}
	if _, err := node.ParseLogLevel(*logLevel); err != nil {
		return fmt.Errorf("--log %w", err)
	}
	cfg := node.DevConfig{
		DCs: names, Bind: *bind, HTTPPort: *httpPort, RTSPPort: *rtspPort,
		PublishToken: *token, Logger: node.NewLogger(*logLevel),
		EtcdDataDir: *dataDir,
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	var profile *node.LabProfile
	if *lab != "" {
		if profile, err = node.LoadLabProfile(*lab); err != nil {
			return fmt.Errorf("--lab %s: %w", *lab, err)
		}
		cfg.DCs = profile.Datacenters
		if err := cfg.Validate(); err != nil {
			return err
		}
	}
	ctx, stop := signalContext()
	defer stop()
	startCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if profile != nil {
		l, err := node.StartLab(startCtx, cfg, profile, *lab)
		if err != nil {
			return err
		}
		defer l.Close()
		printLabBanner(stdout, l)
		<-ctx.Done()
		fmt.Fprintln(stdout, "stemflow: shutting down")
		return nil
	}
	c, err := node.StartDev(startCtx, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	printBanner(stdout, c)
	<-ctx.Done()
	fmt.Fprintln(stdout, "stemflow: shutting down")
	return nil
}

// bannerCluster is what the banner reads of a running cluster.
type bannerCluster interface {
	Datacenters() []string
	HTTPURL(i int) string
	RTSPURL(i int, stream string) string
}

func printBanner(w io.Writer, c bannerCluster) {
	dcs := c.Datacenters()
	if len(dcs) == 1 {
		fmt.Fprintf(w, "Stemflow dev: 1 datacenter (%s), no overlay links\n\n", dcs[0])
	} else {
		fmt.Fprintf(w, "Stemflow dev: %d datacenters, every pair linked: %s\n\n", len(dcs), strings.Join(dcs, ", "))
	}
	printURLs(w, c)
}

// labCluster is what the lab's banner reads.
type labCluster interface {
	bannerCluster
	Profile() string
	ImpairedLinks() []node.LabLink
}

func printLabBanner(w io.Writer, l labCluster) {
	dcs := l.Datacenters()
	fmt.Fprintf(w, "Stemflow WAN lab %s: %d datacenters (%s), every pair linked\n", l.Profile(), len(dcs), strings.Join(dcs, ", "))
	links := l.ImpairedLinks()
	if len(links) == 0 {
		fmt.Fprintln(w, "No link impaired.")
	} else {
		fmt.Fprintln(w, "Impaired links (both ways; the others are unimpaired):")
		for _, ln := range links {
			fmt.Fprintf(w, "  %s – %s  %s\n", ln.Between[0], ln.Between[1], node.DescribeLink(ln))
		}
	}
	fmt.Fprintln(w)
	printURLs(w, l)
	a, c := dcs[0], dcs[len(dcs)-1]
	fmt.Fprintf(w, `Change the lab on any datacenter's HTTP port:
  curl %[1]s/api/v1/lab
  curl -X POST %[1]s/api/v1/lab/links -d '{"between":["%[2]s","%[3]s"],"delay":"30ms","loss":1}'
  curl -X POST %[1]s/api/v1/lab/dcs/%[3]s/kill      (then .../start)
`, l.HTTPURL(0), a, c)
}

func printURLs(w io.Writer, c bannerCluster) {
	dcs := c.Datacenters()
	last := len(dcs) - 1
	for i, dc := range dcs {
		fmt.Fprintf(w, "  %-4s %-24s %s\n", dc, c.HTTPURL(i), c.RTSPURL(i, "{stream}"))
	}
	fmt.Fprintf(w, `
Publish a stream "x" at %[1]s:
  browser: %[2]s/publish/x
  ffmpeg:  ffmpeg -re -f lavfi -i testsrc=size=1280x720:rate=30 -f lavfi -i sine -pix_fmt yuv420p -c:v libx264 -bf 0 -g 60 -c:a libopus -f rtsp %[3]s
           (-bf 0: browsers cannot decode H264 B-frames over WebRTC, and libx264 makes them by default)
  OBS 30+: Settings → Stream → Service "WHIP", Server %[2]s/whip/x
Watch it at %[4]s:
  browser: %[5]s/watch/x
  ffplay:  ffplay %[6]s
Streams: %[5]s/   (ready: GET /healthz on every datacenter)
`, dcs[0], c.HTTPURL(0), c.RTSPURL(0, "x"), dcs[last], c.HTTPURL(last), c.RTSPURL(last, "x"))
	if e, ok := c.(interface{ EtcdURL() string }); ok && e.EtcdURL() != "" {
		fmt.Fprintf(w, "etcd:    %s   (the control plane's state; keys in docs/etcd.md)\n", e.EtcdURL())
	}
}

func runNode(args []string, stderr io.Writer) error {
	fs := newFlagSet("node", "node --config FILE", stderr)
	path := fs.String("config", "", "YAML config file (see deploy/)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *path == "" {
		fs.Usage()
		return errors.New("node: --config is required")
	}
	cfg, err := node.LoadConfig(*path)
	if err != nil {
		return err
	}
	n, err := node.Start(cfg, nil)
	if err != nil {
		return err
	}
	ctx, stop := signalContext()
	defer stop()
	<-ctx.Done()
	n.Close()
	return nil
}

func runCerts(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("certs", "certs --dcs a,b,c --out DIR", stderr)
	dcs := fs.String("dcs", "", "datacenters to make node certificates for")
	out := fs.String("out", "", "directory to write ca.pem, ca-key.pem and DC.pem, DC-key.pem into")
	force := fs.Bool("force", false, "overwrite files already in --out (a new CA invalidates every certificate the old one signed)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *dcs == "" || *out == "" {
		fs.Usage()
		return errors.New("certs: --dcs and --out are required")
	}
	names, err := topology.ParseDatacenters(*dcs)
	if err != nil {
		return fmt.Errorf("--dcs: %w", err)
	}
	if !*force {
		if err := refuseOverwrite(*out, names); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(*out, 0o700); err != nil {
		return err
	}
	ca, err := relay.NewClusterCA()
	if err != nil {
		return err
	}
	caCert, caKey, err := ca.PEM()
	if err != nil {
		return err
	}
	files := map[string][]byte{"ca.pem": caCert, "ca-key.pem": caKey}
	for _, dc := range names {
		cert, key, err := ca.IssuePEM(dc)
		if err != nil {
			return err
		}
		files[dc+".pem"], files[dc+"-key.pem"] = cert, key
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(*out, name), data, 0o600); err != nil {
			return err
		}
	}
	fmt.Fprintf(stdout, "wrote the cluster CA and certificates for %s to %s\n", strings.Join(names, ", "), *out)
	return nil
}

// refuseOverwrite fails when a file `stemflow certs` would write into dir
// exists already, naming the first one (the CA first).
func refuseOverwrite(dir string, dcs []string) error {
	names := []string{"ca.pem", "ca-key.pem"}
	for _, dc := range dcs {
		names = append(names, dc+".pem", dc+"-key.pem")
	}
	var existing []string
	for _, name := range names {
		p := filepath.Join(dir, name)
		if _, err := os.Lstat(p); err == nil {
			existing = append(existing, p)
		} else if !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("certs: %w", err)
		}
	}
	switch len(existing) {
	case 0:
		return nil
	case 1:
		return fmt.Errorf("certs: %s already exists; pass --force to overwrite it (a new CA invalidates every certificate the old one signed) or choose another --out", existing[0])
	default:
		return fmt.Errorf("certs: %s already exists, and %d more of the files it would write; pass --force to overwrite them (a new CA invalidates every certificate the old one signed) or choose another --out",
			existing[0], len(existing)-1)
	}
}
