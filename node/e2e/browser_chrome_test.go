package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"

	"github.com/chromedp/chromedp"
)

// chromiumEnv overrides the browser binary (default /usr/bin/chromium).
const chromiumEnv = "STEMFLOW_CHROMIUM"

func chromiumPath() string {
	if p := os.Getenv(chromiumEnv); p != "" {
		return p
	}
	return "/usr/bin/chromium"
}

// requireChromium fails the test when the browser is missing.
func requireChromium(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(chromiumPath()); err != nil {
		t.Fatalf("the browser test needs Chromium at %s: %v (apt-get install -y chromium, or set %s)", chromiumPath(), err, chromiumEnv)
	}
}

// browser is one headless Chromium with a fresh profile.
type browser struct {
	t   *testing.T
	ctx context.Context // chromedp context of the first tab; owns the process
	wg  sync.WaitGroup  // console relays
}

// startBrowser launches headless Chromium with a fake camera and microphone,
// WebRTC allowed on loopback, and nothing that talks to the outside. It is
// closed in t.Cleanup.
func startBrowser(t *testing.T, parent context.Context) *browser {
	t.Helper()
	requireChromium(t)
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromiumPath()),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.Headless, // --headless, plus hidden scrollbars and muted audio
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.WindowSize(1280, 860),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("use-fake-device-for-media-stream", true),
		chromedp.Flag("use-fake-ui-for-media-stream", true),
		chromedp.Flag("autoplay-policy", "no-user-gesture-required"),
		chromedp.Flag("disable-features", "WebRtcHideLocalIpsWithMdns,Translate"),
		chromedp.Flag("allow-loopback-in-peer-connection", true),
		// Every tab must keep running at full speed while another has focus.
		chromedp.Flag("disable-background-timer-throttling", true),
		chromedp.Flag("disable-backgrounding-occluded-windows", true),
		chromedp.Flag("disable-renderer-backgrounding", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("disable-extensions", true),
		chromedp.Flag("disable-breakpad", true),
		chromedp.Flag("password-store", "basic"),
		chromedp.Flag("use-mock-keychain", true),
	}
	actx, cancelAlloc := chromedp.NewExecAllocator(parent, opts...)
	ctx, cancelTab := chromedp.NewContext(actx)
	b := &browser{t: t, ctx: ctx}
	// The first Run starts the browser; its context must be the long-lived one.
	if err := chromedp.Do(ctx); err != nil {
		cancelTab()
		cancelAlloc()
		t.Fatalf("cannot start Chromium (%s): %v", chromiumPath(), err)
	}
	t.Cleanup(func() {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		chromedp.Cancel(cctx) // closes the browser gracefully and waits
		cancelTab()
		cancelAlloc()
		b.wg.Wait()
	})
	return b
}

// tab is one page of the browser.
type tab struct {
	b    *browser
	name string
	ctx  context.Context
}

// newTab opens a tab whose console is copied to the test log.
func (b *browser) newTab(name string) *tab {
	b.t.Helper()
	ctx, cancel := chromedp.NewContext(b.ctx)
	b.t.Cleanup(cancel)
	if err := chromedp.Do(ctx); err != nil {
		b.t.Fatalf("cannot open tab %s: %v", name, err)
	}
	tb := &tab{b: b, name: name, ctx: ctx}
	msgs := chromedp.Console(ctx)
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		for m, err := range msgs {
			if err != nil {
				return
			}
			b.t.Logf("[%s console] %s", name, m)
		}
	}()
	return tb
}

// navigate opens url in the tab without waiting for the load event (the
// pages stream media forever; "commit" is enough).
func (tb *tab) navigate(url string) {
	tb.b.t.Helper()
	ctx, cancel := context.WithTimeout(tb.ctx, testutil.Scale(15*time.Second))
	defer cancel()
	if err := chromedp.Do(ctx, chromedp.Navigate(url)); err != nil {
		tb.fatalf("cannot open %s: %v", url, err)
	}
}

// eval evaluates a JavaScript expression and decodes its JSON value into v.
func (tb *tab) eval(expr string, v any) error {
	ctx, cancel := context.WithTimeout(tb.ctx, testutil.Scale(5*time.Second))
	defer cancel()
	raw, err := chromedp.Run(ctx, chromedp.Evaluate[[]byte](expr))
	if err != nil {
		return err
	}
	return json.Unmarshal(raw, v)
}

// waitFor evaluates expr (an expression yielding a JSON-able value, or null)
// every 250 ms until done(v) holds for its decoded value v, and returns v. It
// fails the test after timeout, naming what it waited for and the last value.
func waitFor[T any](tb *tab, what, expr string, timeout time.Duration, done func(T) bool) T {
	tb.b.t.Helper()
	deadline := time.Now().Add(testutil.Scale(timeout))
	var last T
	var lastErr error
	for {
		var v T
		lastErr = tb.eval(expr, &v)
		if lastErr == nil {
			last = v
			if done(v) {
				return v
			}
		}
		if time.Now().After(deadline) || tb.ctx.Err() != nil {
			break
		}
		select {
		case <-tb.ctx.Done():
		case <-time.After(250 * time.Millisecond):
		}
	}
	state, _ := json.Marshal(last)
	tb.fatalf("%s: not within %v; last value %s (error: %v)", what, testutil.Scale(timeout), state, lastErr)
	panic("unreachable")
}

// screenshot saves a PNG of the tab's viewport as artifacts/<file>.
func (tb *tab) screenshot(file string) string {
	tb.b.t.Helper()
	ctx, cancel := context.WithTimeout(tb.ctx, testutil.Scale(10*time.Second))
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
	if err != nil {
		tb.b.t.Errorf("cannot take a screenshot of %s: %v", tb.name, err)
		return ""
	}
	dir := artifactsDir()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.b.t.Errorf("cannot create the artifacts folder: %v", err)
		return ""
	}
	path := filepath.Join(dir, file)
	if err := os.WriteFile(path, png, 0o644); err != nil {
		tb.b.t.Errorf("cannot save the screenshot: %v", err)
		return ""
	}
	tb.b.t.Logf("screenshot of %s: %s", tb.name, path)
	return path
}

// fatalf saves a screenshot of the tab for the post-mortem, then fails.
func (tb *tab) fatalf(format string, args ...any) {
	tb.b.t.Helper()
	if tb.ctx.Err() == nil {
		tb.screenshot("failed-" + tb.name + ".png")
	}
	tb.b.t.Fatalf("%s tab: %s", tb.name, fmt.Sprintf(format, args...))
}
