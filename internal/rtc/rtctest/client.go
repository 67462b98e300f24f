package rtctest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pion/interceptor"
	"github.com/pion/interceptor/pkg/report"
	"github.com/pion/rtcp"
	"github.com/pion/rtp"
	"github.com/pion/webrtc/v4"

	"github.com/stemflow/stemflow/internal/rtc"
	"github.com/stemflow/stemflow/relay"
)

// StatusError is a WHIP/WHEP answer other than 201 Created.
type StatusError struct {
	Status int
	Body   string
	Header http.Header
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("HTTP %d: %s", e.Status, strings.TrimSpace(e.Body))
}

var feedback = []webrtc.RTCPFeedback{
	{Type: "goog-remb"}, {Type: "transport-cc"}, {Type: "ccm", Parameter: "fir"},
	{Type: "nack"}, {Type: "nack", Parameter: "pli"},
}

// ChromiumCodecs registers the codecs Chromium offers, in its order and with
// its payload types: VP8, then H264 constrained baseline, baseline and main
// (no High profile), then Opus.
func ChromiumCodecs(m *webrtc.MediaEngine) error {
	video := []webrtc.RTPCodecParameters{
		{PayloadType: 96, RTPCodecCapability: webrtc.RTPCodecCapability{MimeType: webrtc.MimeTypeVP8, ClockRate: 90000, RTCPFeedback: feedback}},
		{PayloadType: 103, RTPCodecCapability: webrtc.RTPCodecCapability{MimeType: webrtc.MimeTypeH264, ClockRate: 90000,
			SDPFmtpLine: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f", RTCPFeedback: feedback}},
		{PayloadType: 107, RTPCodecCapability: webrtc.RTPCodecCapability{MimeType: webrtc.MimeTypeH264, ClockRate: 90000,
			SDPFmtpLine: "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42001f", RTCPFeedback: feedback}},
		{PayloadType: 109, RTPCodecCapability: webrtc.RTPCodecCapability{MimeType: webrtc.MimeTypeH264, ClockRate: 90000,
			SDPFmtpLine: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f", RTCPFeedback: feedback}},
		{PayloadType: 115, RTPCodecCapability: webrtc.RTPCodecCapability{MimeType: webrtc.MimeTypeH264, ClockRate: 90000,
			SDPFmtpLine: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=4d001f", RTCPFeedback: feedback}},
	}
	for _, c := range video {
		if err := m.RegisterCodec(c, webrtc.RTPCodecTypeVideo); err != nil {
			return err
		}
	}
	return m.RegisterCodec(webrtc.RTPCodecParameters{PayloadType: 111, RTPCodecCapability: webrtc.RTPCodecCapability{
		MimeType: webrtc.MimeTypeOpus, ClockRate: 48000, Channels: 2, SDPFmtpLine: "minptime=10;useinbandfec=1",
	}}, webrtc.RTPCodecTypeAudio)
}

func newClientPC(e *rtc.Engine, register func(*webrtc.MediaEngine) error, light bool) (*webrtc.PeerConnection, error) {
	m := &webrtc.MediaEngine{}
	if err := register(m); err != nil {
		return nil, err
	}
	ir := &interceptor.Registry{}
	if light {
		// Receiver reports only, as every browser sends them.
		rr, err := report.NewReceiverInterceptor()
		if err != nil {
			return nil, err
		}
		ir.Add(rr)
	} else if err := webrtc.RegisterDefaultInterceptors(m, ir); err != nil {
		return nil, err
	}
	return e.NewAPI(m, ir).NewPeerConnection(webrtc.Configuration{})
}

// signal POSTs the local offer of pc to endpoint and applies the answer. It
// returns the absolute session URL.
func signal(ctx context.Context, pc *webrtc.PeerConnection, endpoint, token string) (string, error) {
	offer, err := pc.CreateOffer(nil)
	if err != nil {
		return "", err
	}
	gathered := webrtc.GatheringCompletePromise(pc)
	if err := pc.SetLocalDescription(offer); err != nil {
		return "", err
	}
	select {
	case <-gathered:
	case <-ctx.Done():
		return "", ctx.Err()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, strings.NewReader(pc.LocalDescription().SDP))
	if err != nil {
		return "", err
	}
	req.Header.Set("Content-Type", "application/sdp")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusCreated {
		return "", &StatusError{Status: resp.StatusCode, Body: string(body), Header: resp.Header}
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/sdp" {
		return "", fmt.Errorf("answer Content-Type is %q", ct)
	}
	base, err := url.Parse(endpoint)
	if err != nil {
		return "", err
	}
	loc, err := base.Parse(resp.Header.Get("Location"))
	if err != nil || resp.Header.Get("Location") == "" {
		return "", fmt.Errorf("bad Location %q", resp.Header.Get("Location"))
	}
	if err := pc.SetRemoteDescription(webrtc.SessionDescription{Type: webrtc.SDPTypeAnswer, SDP: string(body)}); err != nil {
		return "", err
	}
	return loc.String(), nil
}

// Delete sends DELETE to a session URL and returns the status.
func Delete(ctx context.Context, session, token string) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodDelete, session, nil)
	if err != nil {
		return 0, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}

// Do sends req and returns the status, body and headers of the answer,
// failing the test when there is none.
func Do(t testing.TB, req *http.Request) (int, string, http.Header) {
	t.Helper()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header
}

func waitConnected(ctx context.Context, pc *webrtc.PeerConnection, connected <-chan struct{}) error {
	select {
	case <-connected:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("not connected (%s): %w", pc.ConnectionState(), ctx.Err())
	}
}

// Publisher is a pion WHIP client publishing one video and one Opus track.
type Publisher struct {
	PC       *webrtc.PeerConnection
	Session  string // absolute session URL
	Video    *webrtc.TrackLocalStaticRTP
	Audio    *webrtc.TrackLocalStaticRTP
	Token    string
	plis     atomic.Int64
	conn     chan struct{}
	wg       sync.WaitGroup
	closeOne sync.Once
}

// PublishOptions choose what a Publisher offers.
type PublishOptions struct {
	Token string
	// Video is "video/H264" (default) or "video/VP8"; "none" sends no video.
	Video string
	// NoAudio sends no audio track.
	NoAudio bool
}

// Publish connects a WHIP publisher to endpoint (e.g.
// http://127.0.0.1:1234/whip/cam1). The caller closes it.
func Publish(ctx context.Context, e *rtc.Engine, endpoint string, opts PublishOptions) (*Publisher, error) {
	if opts.Video == "" {
		opts.Video = webrtc.MimeTypeH264
	}
	pc, err := newClientPC(e, func(m *webrtc.MediaEngine) error {
		if opts.Video == webrtc.MimeTypeVP8 {
			if err := m.RegisterCodec(webrtc.RTPCodecParameters{PayloadType: 96, RTPCodecCapability: webrtc.RTPCodecCapability{
				MimeType: webrtc.MimeTypeVP8, ClockRate: 90000, RTCPFeedback: feedback}}, webrtc.RTPCodecTypeVideo); err != nil {
				return err
			}
		} else if err := m.RegisterCodec(webrtc.RTPCodecParameters{PayloadType: 102, RTPCodecCapability: webrtc.RTPCodecCapability{
			MimeType: webrtc.MimeTypeH264, ClockRate: 90000, RTCPFeedback: feedback,
			SDPFmtpLine: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"}}, webrtc.RTPCodecTypeVideo); err != nil {
			return err
		}
		return m.RegisterCodec(webrtc.RTPCodecParameters{PayloadType: 111, RTPCodecCapability: webrtc.RTPCodecCapability{
			MimeType: webrtc.MimeTypeOpus, ClockRate: 48000, Channels: 2, SDPFmtpLine: "minptime=10;useinbandfec=1"}}, webrtc.RTPCodecTypeAudio)
	}, false)
	if err != nil {
		return nil, err
	}
	p := &Publisher{PC: pc, Token: opts.Token, conn: make(chan struct{})}
	var once sync.Once
	pc.OnConnectionStateChange(func(s webrtc.PeerConnectionState) {
		if s == webrtc.PeerConnectionStateConnected {
			once.Do(func() { close(p.conn) })
		}
	})
	if opts.Video != "none" {
		p.Video, err = webrtc.NewTrackLocalStaticRTP(webrtc.RTPCodecCapability{MimeType: opts.Video, ClockRate: 90000}, "video", "pub")
		if err != nil {
			pc.Close()
			return nil, err
		}
		sender, err := pc.AddTransceiverFromTrack(p.Video, webrtc.RTPTransceiverInit{Direction: webrtc.RTPTransceiverDirectionSendonly})
		if err != nil {
			pc.Close()
			return nil, err
		}
		p.wg.Go(func() {
			for {
				pkts, _, err := sender.Sender().ReadRTCP()
				if err != nil {
					return
				}
				for _, pkt := range pkts {
					switch pkt.(type) {
					case *rtcp.PictureLossIndication, *rtcp.FullIntraRequest:
						p.plis.Add(1)
					}
				}
			}
		})
	}
	if !opts.NoAudio {
		p.Audio, err = webrtc.NewTrackLocalStaticRTP(webrtc.RTPCodecCapability{MimeType: webrtc.MimeTypeOpus, ClockRate: 48000, Channels: 2}, "audio", "pub")
		if err != nil {
			pc.Close()
			return nil, err
		}
		if _, err := pc.AddTransceiverFromTrack(p.Audio, webrtc.RTPTransceiverInit{Direction: webrtc.RTPTransceiverDirectionSendonly}); err != nil {
			pc.Close()
			return nil, err
		}
	}
	p.Session, err = signal(ctx, pc, endpoint, opts.Token)
	if err != nil {
		p.Close()
		return nil, err
	}
	if err := waitConnected(ctx, pc, p.conn); err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// PLIs returns how many PLI or FIR the publisher has received.
func (p *Publisher) PLIs() int64 { return p.plis.Load() }

// Delete ends the WHIP session and returns the HTTP status.
func (p *Publisher) Delete(ctx context.Context) (int, error) { return Delete(ctx, p.Session, p.Token) }

// Close closes the PeerConnection and waits for the client's goroutines.
func (p *Publisher) Close() {
	p.closeOne.Do(func() { _ = p.PC.Close() })
	p.wg.Wait()
}

// Packet is what a Viewer records of each RTP packet it receives.
type Packet struct {
	Seq       uint16
	Timestamp uint32
	PT        uint8
	SSRC      uint32
	Keyframe  bool
	Size      int
	At        time.Time
}

// Viewer is a pion WHEP client that records what it receives.
type Viewer struct {
	PC      *webrtc.PeerConnection
	Session string
	Started time.Time // when View was called

	// Stall, while set, makes the viewer stop reading its tracks.
	Stall atomic.Bool

	mu     sync.Mutex // guards the following fields
	video  []Packet
	audio  []Packet
	vcodec webrtc.RTPCodecParameters
	vssrc  uint32

	firstKey chan struct{}
	keyOnce  sync.Once
	conn     chan struct{}
	wg       sync.WaitGroup
	closeOne sync.Once
	count    atomic.Int64
	keep     bool
}

// ViewOptions configure a Viewer.
type ViewOptions struct {
	// Register replaces the codecs the viewer offers (default ChromiumCodecs).
	Register func(*webrtc.MediaEngine) error
	// CountOnly makes the viewer count packets instead of recording them.
	CountOnly bool
	// NoAudio offers no audio section.
	NoAudio bool
	// Light runs the viewer with no interceptor but receiver reports (no
	// NACKs, no congestion control feedback), to keep load generators
	// cheap.
	Light bool
}

// View connects a WHEP viewer to endpoint (e.g. http://127.0.0.1:1234/whep/cam1).
func View(ctx context.Context, e *rtc.Engine, endpoint string, opts ViewOptions) (*Viewer, error) {
	if opts.Register == nil {
		opts.Register = ChromiumCodecs
	}
	v := &Viewer{Started: time.Now(), firstKey: make(chan struct{}), conn: make(chan struct{}), keep: !opts.CountOnly}
	pc, err := newClientPC(e, opts.Register, opts.Light)
	if err != nil {
		return nil, err
	}
	v.PC = pc
	var once sync.Once
	pc.OnConnectionStateChange(func(s webrtc.PeerConnectionState) {
		if s == webrtc.PeerConnectionStateConnected {
			once.Do(func() { close(v.conn) })
		}
	})
	pc.OnTrack(func(tr *webrtc.TrackRemote, _ *webrtc.RTPReceiver) {
		v.wg.Add(1)
		defer v.wg.Done()
		v.read(tr)
	})
	kinds := []webrtc.RTPCodecType{webrtc.RTPCodecTypeVideo}
	if !opts.NoAudio {
		kinds = append(kinds, webrtc.RTPCodecTypeAudio)
	}
	for _, k := range kinds {
		if _, err := pc.AddTransceiverFromKind(k, webrtc.RTPTransceiverInit{Direction: webrtc.RTPTransceiverDirectionRecvonly}); err != nil {
			v.Close()
			return nil, err
		}
	}
	v.Session, err = signal(ctx, pc, endpoint, "")
	if err != nil {
		v.Close()
		return nil, err
	}
	if err := waitConnected(ctx, pc, v.conn); err != nil {
		v.Close()
		return nil, err
	}
	return v, nil
}

func (v *Viewer) read(tr *webrtc.TrackRemote) {
	video := tr.Kind() == webrtc.RTPCodecTypeVideo
	if video {
		v.mu.Lock()
		v.vcodec = tr.Codec()
		v.vssrc = uint32(tr.SSRC())
		v.mu.Unlock()
	}
	buf := make([]byte, 1600)
	var h rtp.Header
	for {
		for v.Stall.Load() {
			time.Sleep(5 * time.Millisecond)
			if v.PC.ConnectionState() == webrtc.PeerConnectionStateClosed {
				return
			}
		}
		n, _, err := tr.Read(buf)
		if err != nil {
			return
		}
		v.count.Add(1)
		if !v.keep {
			continue
		}
		hl, err := h.Unmarshal(buf[:n])
		if err != nil {
			continue
		}
		p := Packet{Seq: h.SequenceNumber, Timestamp: h.Timestamp, PT: h.PayloadType, SSRC: h.SSRC, Size: n, At: time.Now()}
		if video {
			p.Keyframe = relay.IsKeyframe(relay.MimeH264, buf[hl:n])
			if p.Keyframe {
				v.keyOnce.Do(func() { close(v.firstKey) })
			}
		}
		v.mu.Lock()
		if video {
			v.video = append(v.video, p)
		} else {
			v.audio = append(v.audio, p)
		}
		v.mu.Unlock()
	}
}

// Count returns how many RTP packets the viewer has read.
func (v *Viewer) Count() int64 { return v.count.Load() }

// FirstKeyframe is closed when the first H264 keyframe packet arrives.
func (v *Viewer) FirstKeyframe() <-chan struct{} { return v.firstKey }

// Video returns a copy of the video packets received so far.
func (v *Viewer) Video() []Packet {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]Packet(nil), v.video...)
}

// Audio returns a copy of the audio packets received so far.
func (v *Viewer) Audio() []Packet {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]Packet(nil), v.audio...)
}

// VideoCodec returns the negotiated video codec and SSRC, once video flows.
func (v *Viewer) VideoCodec() (webrtc.RTPCodecParameters, uint32) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.vcodec, v.vssrc
}

// SendPLI asks the server for a keyframe.
func (v *Viewer) SendPLI() error {
	_, ssrc := v.VideoCodec()
	if ssrc == 0 {
		return errors.New("no video yet")
	}
	return v.PC.WriteRTCP([]rtcp.Packet{&rtcp.PictureLossIndication{MediaSSRC: ssrc}})
}

// SendNACK asks the server to resend video packets.
func (v *Viewer) SendNACK(seqs ...uint16) error {
	_, ssrc := v.VideoCodec()
	if ssrc == 0 {
		return errors.New("no video yet")
	}
	return v.PC.WriteRTCP([]rtcp.Packet{&rtcp.TransportLayerNack{MediaSSRC: ssrc, Nacks: rtcp.NackPairsFromSequenceNumbers(seqs)}})
}

// Delete ends the WHEP session and returns the HTTP status.
func (v *Viewer) Delete(ctx context.Context) (int, error) { return Delete(ctx, v.Session, "") }

// Closed is closed once the server has closed the viewer's connection.
func (v *Viewer) Closed() <-chan struct{} {
	c := make(chan struct{})
	go func() {
		defer close(c)
		for {
			switch v.PC.ConnectionState() {
			case webrtc.PeerConnectionStateClosed, webrtc.PeerConnectionStateFailed, webrtc.PeerConnectionStateDisconnected:
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	return c
}

// Close closes the PeerConnection and waits for the reading goroutines.
func (v *Viewer) Close() {
	v.Stall.Store(false)
	v.closeOne.Do(func() { _ = v.PC.Close() })
	v.wg.Wait()
}
