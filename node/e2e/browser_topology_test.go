package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/node"
	"github.com/stemflow/stemflow/relay"
)

// topologyState mirrors window.stemflowTopology
// (player/assets/static/topology.js).
type topologyState struct {
	Updated     int64       `json:"updated"`
	Source      string      `json:"source"`
	Stream      string      `json:"stream"`
	Datacenters []string    `json:"datacenters"`
	TreeEdges   [][2]string `json:"treeEdges"`
	Error       string      `json:"error"`
}

// apiTopology is the part of GET /api/v1/topology the test compares with
// the page.
type apiTopology struct {
	Source string `json:"source"`
	Nodes  []struct {
		DC string `json:"dc"`
	} `json:"nodes"`
	Trees []struct {
		Stream string `json:"stream"`
		Origin string `json:"origin"`
		Edges  []struct {
			From    string   `json:"from"`
			To      string   `json:"to"`
			DelayMs *float64 `json:"delay_ms"`
		} `json:"edges"`
		Backup map[string]string `json:"backup"`
	} `json:"trees"`
}

func getAPITopology(t *testing.T, base string) apiTopology {
	t.Helper()
	resp, err := http.Get(base + "/api/v1/topology")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v apiTopology
	if resp.StatusCode != 200 {
		t.Fatalf("GET /api/v1/topology: %s", resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

// drawnMap is what the SVG holds, read from the DOM.
type drawnMap struct {
	DCs       []string    `json:"dcs"`
	DCNames   []string    `json:"dcNames"`
	Links     [][2]string `json:"links"`
	TreeEdges [][2]string `json:"treeEdges"`
	Backups   [][2]string `json:"backups"`
	InTree    []string    `json:"inTree"`
	Path      string      `json:"path"`
}

func readMap(page *tab) drawnMap {
	page.b.t.Helper()
	var got drawnMap
	if err := page.eval(`(() => {
		const m = document.getElementById('map');
		const all = (sel) => [...m.querySelectorAll(sel)];
		return {
			dcs: all('g.dc').map((g) => g.dataset.dc),
			dcNames: all('g.dc .dc-name').map((e) => e.textContent),
			links: all('g.link').map((g) => [g.dataset.a, g.dataset.b]),
			treeEdges: all('line.tree-edge').map((e) => [e.dataset.from, e.dataset.to]),
			backups: all('line.backup-edge').map((e) => [e.dataset.from, e.dataset.to]),
			inTree: all('g.dc.origin, g.dc.in-tree').map((g) => g.dataset.dc),
			path: document.getElementById('tree-path').textContent,
		};
	})()`, &got); err != nil {
		page.fatalf("cannot read the map: %v", err)
	}
	return got
}

// checkMap says how the map differs from the topology answer, or "": one
// <g class="dc"> per datacenter with its name, the link b–c that c
// measures, exactly x's tree edges to c with both ends marked, its backups
// as dashed edges parent → dc, and the tree's hops and delays in words.
func checkMap(api apiTopology, got drawnMap) string {
	var dcs []string
	for _, n := range api.Nodes {
		dcs = append(dcs, n.DC)
	}
	for _, dc := range []string{"a", "b", "c"} {
		if !slices.Contains(dcs, dc) {
			return fmt.Sprintf("c's /api/v1/topology lists datacenters %v: %s is missing", dcs, dc)
		}
	}
	sorted := slices.Clone(got.DCs)
	slices.Sort(sorted)
	if !reflect.DeepEqual(sorted, dcs) || !reflect.DeepEqual(got.DCNames, got.DCs) {
		return fmt.Sprintf("the map draws datacenters %v (names %v); want one each of %v", got.DCs, got.DCNames, dcs)
	}
	if !slices.Contains(got.Links, [2]string{"b", "c"}) {
		return fmt.Sprintf("the map draws links %v; want the link b–c c measures", got.Links)
	}
	edges := treeEdges(api, "x")
	if len(edges) == 0 || edges[len(edges)-1][1] != "c" {
		return fmt.Sprintf("c's API gives x the tree %v; want one that reaches c", edges)
	}
	if !reflect.DeepEqual(got.TreeEdges, edges) {
		return fmt.Sprintf("the map highlights edges %v; want x's tree %v", got.TreeEdges, edges)
	}
	backups := backupEdges(api, "x")
	slices.SortFunc(got.Backups, compareEdges)
	if !reflect.DeepEqual(got.Backups, backups) && (len(got.Backups) > 0 || len(backups) > 0) {
		return fmt.Sprintf("the map draws backup edges %v; want %v", got.Backups, backups)
	}
	for _, e := range edges {
		if !slices.Contains(got.InTree, e[0]) || !slices.Contains(got.InTree, e[1]) {
			return fmt.Sprintf("datacenters marked in x's tree: %v; want both ends of every edge %v", got.InTree, edges)
		}
	}
	if !strings.HasPrefix(got.Path, "x from a: ") {
		return fmt.Sprintf("the tree's path reads %q; want it to start with \"x from a: \"", got.Path)
	}
	for _, tr := range api.Trees {
		if tr.Stream != "x" {
			continue
		}
		for _, e := range tr.Edges {
			// "a → b", with its delay ("a → b 2.6 ms") when measured.
			hop := regexp.QuoteMeta(e.From + " → " + e.To)
			if e.DelayMs != nil {
				hop += ` [0-9.]+ ms`
			}
			if !regexp.MustCompile(hop).MatchString(got.Path) {
				return fmt.Sprintf("the tree's path reads %q; want it to name the hop /%s/", got.Path, hop)
			}
		}
	}
	// c measures its own link, so the last hop (into c) has a delay.
	last := edges[len(edges)-1]
	if !regexp.MustCompile(regexp.QuoteMeta(last[0]+" → "+last[1]) + ` [0-9.]+ ms`).MatchString(got.Path) {
		return fmt.Sprintf("the tree's path reads %q; want the measured delay of the hop %s → %s that c measures", got.Path, last[0], last[1])
	}
	return ""
}

// backupEdges returns a stream's backups as edges parent → dc, sorted.
func backupEdges(api apiTopology, stream string) [][2]string {
	var edges [][2]string
	for _, tr := range api.Trees {
		if tr.Stream == stream {
			for dc, parent := range tr.Backup {
				edges = append(edges, [2]string{parent, dc})
			}
		}
	}
	slices.SortFunc(edges, compareEdges)
	return edges
}

func compareEdges(a, b [2]string) int {
	if c := strings.Compare(a[0], b[0]); c != 0 {
		return c
	}
	return strings.Compare(a[1], b[1])
}

// treeEdges returns a stream's tree edges in a topology answer.
func treeEdges(api apiTopology, stream string) [][2]string {
	var edges [][2]string
	for _, tr := range api.Trees {
		if tr.Stream == stream {
			for _, e := range tr.Edges {
				edges = append(edges, [2]string{e.From, e.To})
			}
		}
	}
	return edges
}

// publishAt publishes a stream (one H264 track, no packets needed: the
// overlay announces it) at a node's hub until the test ends.
func publishAt(t *testing.T, n *node.Node, name string) {
	t.Helper()
	pub, err := n.Hub().Publish(name, relay.Description{Tracks: []relay.Track{
		{Kind: relay.KindVideo, MimeType: relay.MimeH264, ClockRate: 90000, PayloadType: 96, Fmtp: "packetization-mode=1"},
	}}, relay.PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pub.Close)
}

// TestBrowserTopology opens the /topology page of datacenter c in headless
// Chromium (inside a network namespace with only loopback) and checks what it
// draws against the node's own /api/v1/topology: one circle per datacenter,
// the links, and — once the stream x is picked — exactly x's tree edges
// highlighted, with the path and its delays in words. The page follows the
// overlay live: a stream published later appears in the picker by itself.
// A screenshot goes to the artifacts.
func TestBrowserTopology(t *testing.T) {
	if !inNetns() {
		requireChromium(t)
		runInNetns(t, testutil.Scale(70*time.Second))
		return
	}
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 65*time.Second)
	requireLoopbackOnly(t)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(60*time.Second))
	t.Cleanup(cancel)

	sctx, scancel := context.WithTimeout(ctx, testutil.Scale(20*time.Second))
	c, err := node.StartDev(sctx, node.DevConfig{DCs: []string{"a", "b", "c"}, Bind: "127.0.0.1", HTTPPort: 18080, RTSPPort: 18554, Logger: testutil.Logger()})
	scancel()
	if err != nil {
		t.Fatalf("cannot start the dev cluster: %v", err)
	}
	t.Cleanup(c.Close)
	publishAt(t, c.Nodes[0], "x")
	// c wants x (as a viewer there would): with a manager, x gets a route
	// to c; without, c knows x's path by announcement.
	t.Cleanup(c.Nodes[2].Hub().Want("x"))
	cURL := c.HTTPURL(2)

	br := startBrowser(t, ctx)
	page := br.newTab("topology-c")
	page.navigate(cURL + "/topology")
	waitFor(page, "the topology page draws the overlay", `window.stemflowTopology || null`, 15*time.Second,
		func(s topologyState) bool { return s.Updated > 0 && len(s.Datacenters) >= 3 })

	// Pick x in the stream picker, as a user would.
	if err := page.eval(`(() => { const s = document.getElementById('stream');
		s.value = 'x'; s.dispatchEvent(new Event('change')); return s.value; })()`, new(string)); err != nil {
		page.fatalf("cannot pick x: %v", err)
	}
	// The tree may still change (a route replacing the announced path, a
	// backup named later): compare the map with what c's API answers at the
	// same moment until they agree.
	deadline := time.Now().Add(testutil.Scale(20 * time.Second))
	for {
		api := getAPITopology(t, cURL)
		got := readMap(page)
		problem := checkMap(api, got)
		if problem == "" {
			t.Logf("c's topology (source %s): x's tree %v, backups %v; drawn: %+v", api.Source, treeEdges(api, "x"), backupEdges(api, "x"), got)
			break
		}
		if time.Now().After(deadline) {
			page.fatalf("%s (drawn %+v; c's API: %+v)", problem, got, api)
		}
		time.Sleep(250 * time.Millisecond)
	}
	page.screenshot("topology.png")

	// Colour the links by load instead: every link line changes class and
	// the load legend replaces the RTT one.
	var classes []string
	if err := page.eval(`(() => { const s = document.getElementById('colour-by');
		s.value = 'load'; s.dispatchEvent(new Event('change'));
		if (document.getElementById('legend-load').hidden || !document.getElementById('legend-rtt').hidden) return ['legend not switched'];
		return [...document.querySelectorAll('#map g.link')].map((g) => g.getAttribute('class')); })()`, &classes); err != nil {
		page.fatalf("cannot colour the links by load: %v", err)
	}
	for _, c := range classes {
		if !strings.Contains(c, " load-") && !strings.Contains(c, " down") {
			page.fatalf("after choosing load the links have classes %q; want load-* on every link up", classes)
		}
	}
	page.screenshot("topology-load.png")

	// Live: a stream published at b later shows up in the picker without a
	// reload, and x stays selected.
	publishAt(t, c.Nodes[1], "y")
	waitFor(page, "the picker offers y, published after the page opened",
		`[...document.getElementById('stream').options].map((o) => o.value)`, 10*time.Second,
		func(opts []string) bool { return slices.Contains(opts, "y") && slices.Contains(opts, "x") })
	var sel string
	if err := page.eval(`document.getElementById('stream').value`, &sel); err != nil || sel != "x" {
		page.fatalf("after the refresh the picker selects %q (%v); want x still", sel, err)
	}
}
