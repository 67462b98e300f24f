package rtc_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/pion/interceptor"
	"github.com/pion/rtcp"
	"github.com/pion/webrtc/v4"

	"github.com/stemflow/stemflow/internal/rtc"
	"github.com/stemflow/stemflow/internal/rtc/rtctest"
	"github.com/stemflow/stemflow/internal/testutil"
)

// TestSenderAPIHandsOverRTCP connects a viewer to a send-only
// PeerConnection of NewSenderAPI: the RTCP the viewer sends reaches the
// handler, one packet at a time with the SSRC it names, for the sender's
// SSRC and for any other; the sender's SetReadDeadline still returns once
// SRTP runs.
func TestSenderAPIHandsOverRTCP(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, testutil.Scale(30*time.Second))
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Scale(10*time.Second))
	defer cancel()

	type got struct {
		ssrc uint32
		typ  rtcp.PacketType
	}
	var mu sync.Mutex
	var handled []got
	handle := func(ssrc uint32, pkt []byte) {
		var h rtcp.Header
		if h.Unmarshal(pkt) != nil {
			t.Errorf("handler got a packet without an RTCP header: %x", pkt)
			return
		}
		mu.Lock()
		handled = append(handled, got{ssrc, h.Type})
		mu.Unlock()
	}

	e := rtctest.NewEngine(t)
	sm := &webrtc.MediaEngine{}
	if err := sm.RegisterDefaultCodecs(); err != nil {
		t.Fatal(err)
	}
	server, err := e.NewSenderAPI(sm, &interceptor.Registry{}, handle).NewPeerConnection(webrtc.Configuration{})
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	track, err := webrtc.NewTrackLocalStaticRTP(webrtc.RTPCodecCapability{MimeType: webrtc.MimeTypeVP8}, "video", "s")
	if err != nil {
		t.Fatal(err)
	}
	sender, err := server.AddTrack(track)
	if err != nil {
		t.Fatal(err)
	}

	cm := &webrtc.MediaEngine{}
	if err := rtctest.ChromiumCodecs(cm); err != nil {
		t.Fatal(err)
	}
	viewer, err := rtctest.NewEngine(t).NewAPI(cm, &interceptor.Registry{}).NewPeerConnection(webrtc.Configuration{})
	if err != nil {
		t.Fatal(err)
	}
	defer viewer.Close()
	if _, err := viewer.AddTransceiverFromKind(webrtc.RTPCodecTypeVideo,
		webrtc.RTPTransceiverInit{Direction: webrtc.RTPTransceiverDirectionRecvonly}); err != nil {
		t.Fatal(err)
	}
	offer, err := viewer.CreateOffer(nil)
	if err != nil {
		t.Fatal(err)
	}
	gathered := webrtc.GatheringCompletePromise(viewer)
	if err := viewer.SetLocalDescription(offer); err != nil {
		t.Fatal(err)
	}
	<-gathered
	answer, err := rtc.Answer(ctx, server, viewer.LocalDescription().SDP)
	if err != nil {
		t.Fatal(err)
	}
	if err := viewer.SetRemoteDescription(webrtc.SessionDescription{Type: webrtc.SDPTypeAnswer, SDP: answer}); err != nil {
		t.Fatal(err)
	}

	srtp := make(chan error, 1)
	go func() { srtp <- sender.SetReadDeadline(time.Time{}) }()
	select {
	case err := <-srtp:
		if err != nil {
			t.Fatalf("waiting for SRTP: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("SRTP did not start")
	}

	ssrc := uint32(sender.GetParameters().Encodings[0].SSRC)
	const other = 0xbeef
	want := []got{{ssrc, rtcp.TypePayloadSpecificFeedback}, {other, rtcp.TypeReceiverReport}}
	testutil.WaitFor(t, "the handler to get a PLI for the sender and a report about another SSRC", func() bool {
		// Sent again until seen: RTCP may be lost before the viewer's
		// DTLS is done.
		_ = viewer.WriteRTCP([]rtcp.Packet{
			&rtcp.PictureLossIndication{MediaSSRC: ssrc},
			&rtcp.ReceiverReport{SSRC: 1, Reports: []rtcp.ReceptionReport{{SSRC: other}}},
		})
		mu.Lock()
		defer mu.Unlock()
		seen := 0
		for _, w := range want {
			for _, h := range handled {
				if h == w {
					seen++
					break
				}
			}
		}
		return seen == len(want)
	})
}
