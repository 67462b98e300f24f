package node

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"
	"github.com/stemflow/stemflow/relay"
)

// startLab starts a lab from a YAML profile on free ports.
func startLab(t *testing.T, profile string) *Lab {
	t.Helper()
	p, err := ParseLabProfile([]byte(profile))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(30*time.Second))
	defer cancel()
	l, err := StartLab(ctx, DevConfig{FreePorts: true, Logger: testutil.Logger()}, p, "test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	return l
}

// rttTo returns the median of a few readings of the smoothed RTT node n
// measures on its link to peer (0 when there is no such link).
func rttTo(n *Node, peer string) time.Duration {
	var rtts []time.Duration
	for range 7 {
		for _, ls := range n.Hub().Links() {
			if ls.Peer == peer {
				rtts = append(rtts, ls.RTT)
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(rtts) == 0 {
		return 0
	}
	slices.Sort(rtts)
	return rtts[len(rtts)/2]
}

// within reports whether got is within 10 % of want.
func within(got, want time.Duration) bool {
	return got >= want*9/10 && got <= want*11/10
}

// close3 reports whether two readings are within 3 % of each other.
func close3(x, y time.Duration) bool {
	d := x - y
	return d.Abs() <= y*3/100
}

func post(t *testing.T, url, body string) (int, string) {
	t.Helper()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// viewer counts the packets a subscriber at a node gets.
type viewer struct {
	sub  *relay.Subscription
	mu   sync.Mutex
	n    int
	last time.Time
	// gap is the longest time between two packets since markGap.
	gap time.Duration
}

// markGap starts measuring the longest gap between packets afresh.
func (v *viewer) markGap() {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.gap = 0
}

// maxGap returns the longest gap between packets since markGap, the time
// since the last packet included.
func (v *viewer) maxGap() time.Duration {
	v.mu.Lock()
	defer v.mu.Unlock()
	return max(v.gap, time.Since(v.last))
}

func (v *viewer) count() (int, time.Time) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.n, v.last
}

// watch subscribes to a stream at n and counts its packets until the test
// ends or the stream does.
func watch(t *testing.T, n *Node, name string) *viewer {
	t.Helper()
	q := relay.NewQueue(4096)
	var sub *relay.Subscription
	testutil.WaitFor(t, "the stream "+name+" at "+n.cfg.Datacenter, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(2*time.Second))
		defer cancel()
		s, err := n.Hub().Subscribe(ctx, name, q)
		sub = s
		return err == nil
	})
	v := &viewer{sub: sub}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case b := <-q.C():
				b.Release()
				now := time.Now()
				v.mu.Lock()
				v.n++
				if !v.last.IsZero() {
					v.gap = max(v.gap, now.Sub(v.last))
				}
				v.last = now
				v.mu.Unlock()
			case <-stop:
				return
			}
		}
	})
	t.Cleanup(func() {
		sub.Close()
		close(stop)
		wg.Wait()
		q.Drain()
	})
	return v
}

// hopsAt returns the path of datacenters a stream takes (or would take) to
// n, or "none".
func hopsAt(n *Node, name string) string {
	for _, s := range n.Hub().Streams() {
		if s.Name == name {
			return fmt.Sprint(s.Hops)
		}
	}
	return "none"
}

// waitRoute waits until n's best route to a stream is hops: the first
// announcement to arrive may come the long way round, over faster links.
func waitRoute(t *testing.T, n *Node, name, hops string) {
	t.Helper()
	testutil.WaitFor(t, name+" routed "+hops+" at "+n.cfg.Datacenter, func() bool { return hopsAt(n, name) == hops })
}

// flowing waits until the viewer has had more packets than before.
func (v *viewer) flowing(t *testing.T, what string, more int) {
	t.Helper()
	before, _ := v.count()
	testutil.WaitFor(t, what, func() bool { n, _ := v.count(); return n >= before+more })
}

// TestLabMeasuredRTT starts a lab whose a–c link has 200 ms of delay each
// way, checks that the RTT a and c measure over the overlay (quic-go's
// smoothed RTT) is twice that within 10 %, then sets 300 ms through the API
// and checks the RTT follows; and checks the API's refusals.
func TestLabMeasuredRTT(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 120*time.Second)
	// Delays of WAN scale (RTTs of 400 and 600 ms, as across the world):
	// a busy machine adds a few to a few tens of milliseconds of scheduling
	// to every round trip, within 10 % of these but not of a few ms.
	// a–b and b–c slower still, so that the manager's tree to c stays
	// the direct link.
	l := startLab(t, "datacenters: [a, b, c]\nlinks:\n  - {between: [a, c], delay: 200ms}\n  - {between: [a, b], delay: 250ms}\n  - {between: [b, c], delay: 250ms}\n")
	a, c := l.Node("a"), l.Node("c")
	publish(t, a, "x")
	waitRoute(t, c, "x", "[a c]") // the stream's packets load the link measured
	v := watch(t, c, "x")
	v.flowing(t, "packets at c", 100)
	if h := hopsAt(c, "x"); h != "[a c]" {
		t.Fatalf("x reaches c through %s, want [a c]", h)
	}

	for _, step := range []struct {
		delay time.Duration
		post  string
	}{
		{200 * time.Millisecond, ""},
		{300 * time.Millisecond, `{"between":["c","a"],"delay":"300ms","jitter":"0ms","loss":0,"rate":"","down":false}`},
	} {
		if step.post != "" {
			code, body := post(t, l.HTTPURL(1)+"/api/v1/lab/links", step.post) // asked of b, a link it is not on
			if code != 200 || !strings.Contains(body, `"delay": "300ms"`) || !strings.Contains(body, `"between": [
    "a",
    "c"
  ]`) {
				t.Fatalf("POST /api/v1/lab/links: %d %s", code, body)
			}
		}
		want := 2 * step.delay
		var got map[string]time.Duration
		deadline := time.Now().Add(testutil.Scale(30 * time.Second))
		// quic-go smooths the RTT (an EWMA): read it until it has settled
		// (two medians in a row within 3 %), then compare.
		var prev map[string]time.Duration
		for {
			got = map[string]time.Duration{"a→c": rttTo(a, "c"), "c→a": rttTo(c, "a")}
			settled := prev != nil && close3(got["a→c"], prev["a→c"]) && close3(got["c→a"], prev["c→a"])
			if settled && within(got["a→c"], want) && within(got["c→a"], want) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("delay %v each way: RTT measured %v at a, %v at c (settled: %v); want %v within 10 %%", step.delay, got["a→c"], got["c→a"], settled, want)
			}
			prev = got
		}
		t.Logf("delay %v each way: RTT measured %v at a, %v at c (set %v)", step.delay, got["a→c"], got["c→a"], want)
	}
	v.flowing(t, "packets at c after the change", 100)

	// GET /api/v1/lab lists the datacenters and the links as set.
	var st struct {
		Profile     string
		Datacenters []struct {
			Name    string
			Up      bool
			LinksUp []string `json:"links_up"`
		}
		Links []struct {
			Between    []string
			Delay      string
			Impairment string
		}
	}
	resp, err := http.Get(l.HTTPURL(2) + "/api/v1/lab")
	if err != nil {
		t.Fatal(err)
	}
	json.NewDecoder(resp.Body).Decode(&st)
	resp.Body.Close()
	if st.Profile != "test.yaml" || len(st.Datacenters) != 3 || !st.Datacenters[0].Up || fmt.Sprint(st.Datacenters[0].LinksUp) != "[b c]" {
		t.Errorf("GET /api/v1/lab: %+v", st)
	}
	if len(st.Links) != 3 || fmt.Sprint(st.Links[1].Between) != "[a c]" || st.Links[1].Delay != "300ms" || st.Links[0].Impairment != "delay 250ms" {
		t.Errorf("GET /api/v1/lab links: %+v", st.Links)
	}

	// Refusals name the problem.
	for _, tc := range []struct {
		path, body string
		code       int
		want       string
	}{
		{"/api/v1/lab/links", `{"between":["a","c"],`, 400, "unexpected EOF"},
		{"/api/v1/lab/links", `{"between":["a","c"],"delya":"1ms"}`, 400, `unknown field "delya"`},
		{"/api/v1/lab/links", `{"between":["a","x"]}`, 404, `"x"`},
		{"/api/v1/lab/links", `{"between":["a","c"],"loss":120}`, 400, "loss 120% is not within 0–100"},
		{"/api/v1/lab/links", `{"between":["a","a"]}`, 400, "two different"},
		{"/api/v1/lab/links", `{"between":["a","c"],"rate":"fast"}`, 400, "not a rate"},
		{"/api/v1/lab/dcs/x/kill", ``, 404, `"x" (it has a, b, c)`},
		{"/api/v1/lab/dcs/b/start", ``, 409, "running already"},
	} {
		code, body := post(t, l.HTTPURL(0)+tc.path, tc.body)
		if code != tc.code || !strings.Contains(body, tc.want) {
			t.Errorf("POST %s %s: %d %q, want %d and %q", tc.path, tc.body, code, body, tc.code, tc.want)
		}
	}
	// A real node has no lab routes.
	if code, _, _ := get(t, newPlainNode(t), "/api/v1/lab"); code == 200 {
		t.Error("a node outside a lab serves GET /api/v1/lab")
	}
}

// newPlainNode starts a one-datacenter dev cluster.
func newPlainNode(t *testing.T) *Node {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(30*time.Second))
	defer cancel()
	c, err := StartDev(ctx, DevConfig{DCs: []string{"z"}, FreePorts: true, Logger: testutil.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c.Nodes[0]
}

// linksUp returns the peers n has a link to.
func linksUp(n *Node) []string {
	var out []string
	for _, ls := range n.Hub().Links() {
		out = append(out, ls.Peer)
	}
	return out
}

// TestLabKillAndStart: a stream from a to c keeps flowing while the
// unrelated link a–b is impaired and while b is killed; a and c see their
// links to b go down by silence; b, started again, links up and carries the
// stream again, as the relay between a and c once a–c is cut.
func TestLabKillAndStart(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 180*time.Second)
	l := startLab(t, "datacenters: [a, b, c]\n")
	a, c := l.Node("a"), l.Node("c")
	publish(t, a, "x")
	waitRoute(t, c, "x", "[a c]")
	v := watch(t, c, "x")
	v.flowing(t, "packets at c", 100)
	if h := hopsAt(c, "x"); h != "[a c]" {
		t.Fatalf("x reaches c through %s, want [a c] (not crossing b)", h)
	}

	// Impair the unrelated link a–b hard: a→c does not notice.
	if code, body := post(t, l.HTTPURL(2)+"/api/v1/lab/links", `{"between":["a","b"],"delay":"50ms","loss":30}`); code != 200 {
		t.Fatalf("POST /api/v1/lab/links: %d %s", code, body)
	}
	v.flowing(t, "packets at c with a–b impaired", 200)

	// Kill b through its own HTTP port.
	bURL := l.HTTPURL(1)
	code, body := post(t, bURL+"/api/v1/lab/dcs/b/kill", "")
	if code != 200 || !strings.Contains(body, `"up": false`) {
		t.Fatalf("POST kill b: %d %s", code, body)
	}
	if l.Node("b") != nil {
		t.Error("b still has a node after the kill")
	}
	// Peers notice by silence only: within the overlay's idle timeout (5 s),
	// not at once as a CONNECTION_CLOSE would tell them.
	killed := time.Now()
	time.Sleep(testutil.Scale(time.Second) / 2)
	if !slices.Contains(linksUp(a), "b") || !slices.Contains(linksUp(c), "b") {
		t.Errorf("a's links %v and c's %v lost b at once: the killed node said goodbye", linksUp(a), linksUp(c))
	}
	testutil.WaitForWithin(t, 20*time.Second, "a and c to see b go down", func() bool {
		return !slices.Contains(linksUp(a), "b") && !slices.Contains(linksUp(c), "b")
	})
	t.Logf("a and c saw b go down %v after the kill", time.Since(killed).Round(10*time.Millisecond))
	select {
	case <-v.sub.Done():
		t.Fatal("the stream a→c ended when b died")
	default:
	}
	v.flowing(t, "packets at c with b dead", 100)
	if _, err := http.Get(bURL + "/healthz"); err == nil {
		t.Error("b's HTTP port still answers after the kill")
	}
	var st struct {
		Datacenters []struct {
			Name string
			Up   bool
		}
	}
	resp, err := http.Get(l.HTTPURL(0) + "/api/v1/lab")
	if err != nil {
		t.Fatal(err)
	}
	json.NewDecoder(resp.Body).Decode(&st)
	resp.Body.Close()
	if fmt.Sprint(st.Datacenters) != "[{a true} {b false} {c true}]" {
		t.Errorf("GET /api/v1/lab datacenters after the kill: %v", st.Datacenters)
	}
	if code, body := post(t, l.HTTPURL(0)+"/api/v1/lab/dcs/b/kill", ""); code != 409 || !strings.Contains(body, "not running") {
		t.Errorf("killing b twice: %d %s", code, body)
	}

	// Start b again on the same ports: the links come back.
	if code, body := post(t, l.HTTPURL(0)+"/api/v1/lab/dcs/b/start", ""); code != 200 {
		t.Fatalf("POST start b: %d %s", code, body)
	}
	if code, _, _ := getURL(t, bURL+"/healthz"); code != 200 {
		t.Errorf("b's HTTP port after the start: %d", code)
	}
	b := l.Node("b")
	testutil.WaitForWithin(t, 30*time.Second, "b's links to a and c", func() bool {
		return len(b.Hub().Links()) == 2 && slices.Contains(linksUp(a), "b") && slices.Contains(linksUp(c), "b")
	})
	// b relays again: cut a–c, and a new viewer at c gets the stream
	// through b once c's link to a has idled out.
	if code, body := post(t, l.HTTPURL(1)+"/api/v1/lab/links", `{"between":["a","c"],"down":true}`); code != 200 {
		t.Fatalf("POST a–c down: %d %s", code, body)
	}
	testutil.WaitForWithin(t, 20*time.Second, "c to lose its link to a", func() bool { return !slices.Contains(linksUp(c), "a") })
	v2 := watch(t, c, "x")
	v2.flowing(t, "packets at c through b", 100)
	if hops := hopsAt(c, "x"); hops != "[a b c]" {
		t.Errorf("x reaches c through %s, want [a b c]", hops)
	}
}

func getURL(t *testing.T, url string) (int, http.Header, []byte) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, body
}

// TestLabStartWhenPortTaken: while b is killed another process takes its
// HTTP port. Starting b still works: it keeps its overlay address (its
// neighbours redial it there) and takes a new HTTP port, which HTTPURL
// names. Before, the start failed with "address already in use".
func TestLabStartWhenPortTaken(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 120*time.Second)
	l := startLab(t, "datacenters: [a, b]\n")
	old := l.HTTPURL(1)
	if code, body := post(t, l.HTTPURL(0)+"/api/v1/lab/dcs/b/kill", ""); code != 200 {
		t.Fatalf("POST kill b: %d %s", code, body)
	}
	var taken net.Listener
	testutil.WaitFor(t, "b's HTTP port to be free to take", func() bool {
		var err error
		taken, err = net.Listen("tcp", strings.TrimPrefix(old, "http://"))
		return err == nil
	})
	defer taken.Close()
	if code, body := post(t, l.HTTPURL(0)+"/api/v1/lab/dcs/b/start", ""); code != 200 {
		t.Fatalf("POST start b with its HTTP port taken: %d %s", code, body)
	}
	if l.HTTPURL(1) == old {
		t.Fatalf("b restarted on its taken HTTP address %s", old)
	}
	if code, _, _ := get(t, l.Node("b"), "/api/v1/streams"); code != 200 {
		t.Fatalf("GET b's /api/v1/streams on its new port: %d", code)
	}
	if addr := "http://" + l.Node("b").HTTPAddr().String(); addr != l.HTTPURL(1) {
		t.Fatalf("b serves HTTP on %s, HTTPURL says %s", addr, l.HTTPURL(1))
	}
	testutil.WaitFor(t, "b's link to a", func() bool { return slices.Contains(linksUp(l.Node("b")), "a") })
}
