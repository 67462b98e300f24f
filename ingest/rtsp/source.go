package rtsp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/bluenviron/gortsplib/v4"
	"github.com/bluenviron/gortsplib/v4/pkg/base"
	"github.com/bluenviron/gortsplib/v4/pkg/description"
	"github.com/bluenviron/gortsplib/v4/pkg/liberrors"
	"github.com/pion/rtp"

	"github.com/stemflow/stemflow/relay"
)

// SourceConfig configures a Source.
type SourceConfig struct {
	// Hub receives the stream. Required.
	Hub *relay.Hub
	// Name is the stream name to publish as. Required.
	Name string
	// URL is the camera's rtsp:// URL. Required.
	URL string
	// Transport is "udp", "tcp", or "" to try UDP and fall back to TCP.
	Transport string
	// RetryMin and RetryMax bound the exponential backoff between attempts
	// while the camera is unreachable (defaults 1s and 30s).
	RetryMin, RetryMax time.Duration
	// ReadTimeout is how long the camera may stay silent (default 10s).
	ReadTimeout time.Duration
	Logger      *slog.Logger
}

// Source pulls a stream from an RTSP camera (DESCRIBE, SETUP, PLAY) and
// publishes it into the hub like an RTSP publisher. While the camera is
// unreachable or the name is taken it retries with exponential backoff. One
// goroutine owns the RTSP client; Close stops it and waits.
type Source struct {
	cfg    SourceConfig
	url    *base.URL
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// NewSource validates cfg and starts pulling.
func NewSource(cfg SourceConfig) (*Source, error) {
	if cfg.Hub == nil {
		return nil, errors.New("rtsp source: no hub")
	}
	if err := relay.ValidateStreamName(cfg.Name); err != nil {
		return nil, fmt.Errorf("rtsp source %q: %w", cfg.Name, err)
	}
	u, err := base.ParseURL(cfg.URL)
	if err != nil || (u.Scheme != "rtsp" && u.Scheme != "rtsps") || u.Host == "" {
		return nil, fmt.Errorf("rtsp source %q: URL %q is not an rtsp:// URL with a host (e.g. rtsp://user:pass@camera.example:554/stream)", cfg.Name, RedactURL(cfg.URL))
	}
	switch cfg.Transport {
	case "", "udp", "tcp":
	default:
		return nil, fmt.Errorf("rtsp source %q: transport %q: use \"udp\", \"tcp\" or leave it empty for automatic", cfg.Name, cfg.Transport)
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = time.Second
	}
	if cfg.RetryMax < cfg.RetryMin {
		cfg.RetryMax = max(30*time.Second, cfg.RetryMin)
	}
	if cfg.ReadTimeout <= 0 {
		cfg.ReadTimeout = 10 * time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	s := &Source{
		cfg: cfg,
		url: u,
		log: log.With("component", "ingest/rtsp", "source", cfg.Name, "url", (*url.URL)(u).Redacted()),
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.wg.Add(1)
	go s.run()
	return s, nil
}

// Close stops pulling, ends the stream and waits for the goroutine to exit.
func (s *Source) Close() {
	s.cancel()
	s.wg.Wait()
}

func (s *Source) run() {
	defer s.wg.Done()
	backoff := s.cfg.RetryMin
	for {
		started := time.Now()
		err := s.pull()
		if s.ctx.Err() != nil {
			return
		}
		if time.Since(started) > s.cfg.RetryMax {
			backoff = s.cfg.RetryMin // it worked for a while: retry soon
		}
		s.log.Warn("camera stream unavailable; retrying", "error", err, "retry_in", backoff)
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-s.ctx.Done():
			t.Stop()
			return
		}
		backoff = min(2*backoff, s.cfg.RetryMax)
	}
}

// pull runs one RTSP session with the camera until it ends or s is closed.
func (s *Source) pull() error {
	c := &gortsplib.Client{
		Scheme:        s.url.Scheme,
		Host:          s.url.Host,
		ReadTimeout:   s.cfg.ReadTimeout,
		WriteTimeout:  s.cfg.ReadTimeout,
		OnPacketsLost: func(uint64) {},
		OnDecodeError: func(err error) { s.log.Debug("RTP decode error", "error", err) },
	}
	switch s.cfg.Transport {
	case "udp":
		c.Transport = ptr(gortsplib.TransportUDP)
	case "tcp":
		c.Transport = ptr(gortsplib.TransportTCP)
	}
	if err := c.Start2(); err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	stop := context.AfterFunc(s.ctx, c.Close)
	defer func() {
		stop()
		c.Close()
	}()

	desc, _, err := c.Describe(s.url)
	if err != nil {
		var bad liberrors.ErrClientBadStatusCode
		if errors.As(err, &bad) && bad.Code == base.StatusUnauthorized {
			if s.url.User == nil {
				return fmt.Errorf("DESCRIBE: %w: the camera wants a user name and password: put them in the source URL, rtsp://user:pass@host/path", err)
			}
			return fmt.Errorf("DESCRIBE: %w: the camera refused the user name and password of the source URL", err)
		}
		return fmt.Errorf("DESCRIBE: %w", err)
	}
	tracks, skipped, err := plan(desc)
	if err != nil {
		return err
	}
	if skipped != "" {
		s.log.Warn("pulling only the supported tracks", "skipped", skipped, "supported", supportedCodecs)
	}
	medias := make([]*description.Media, 0, len(tracks))
	for _, t := range tracks {
		medias = append(medias, t.media)
	}
	if err := c.SetupAll(desc.BaseURL, medias); err != nil {
		return fmt.Errorf("SETUP: %w", err)
	}

	st, err := newIngestStream(s.cfg.Hub, s.cfg.Name, tracks, s.log, func(err error) {
		s.log.Warn("cannot publish the stream: disconnecting from the camera", "error", err)
		c.Close()
	})
	if err == nil {
		err = st.start()
	}
	if err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	defer st.close()
	for _, t := range st.tracks {
		c.OnPacketRTP(t.media, t.format, func(pkt *rtp.Packet) { st.handle(t, pkt) })
	}
	if _, err := c.Play(nil); err != nil {
		return fmt.Errorf("PLAY: %w", err)
	}
	s.log.Info("pulling camera stream", "tracks", len(tracks))
	return c.Wait()
}

// RedactURL hides the password of a URL that may not parse, for messages
// and logs: rtsp://admin:xxxxx@camera/live.
func RedactURL(s string) string {
	if u, err := url.Parse(s); err == nil {
		return u.Redacted()
	}
	scheme, rest, ok := strings.Cut(s, "://")
	if !ok {
		return s
	}
	if i := strings.LastIndex(rest, "@"); i >= 0 {
		return scheme + "://xxxxx@" + rest[i+1:]
	}
	return s
}

func ptr[T any](v T) *T { return &v }
