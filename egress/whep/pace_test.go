package whep

import (
	"fmt"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/rtc/rtctest"
	"github.com/stemflow/stemflow/internal/testutil"
)

// seqReport sums what a viewer's packets of one track show: packets
// received, sequence numbers missing, and packets out of order or doubled.
type seqReport struct {
	received, missing, reordered int
}

func (r seqReport) lossPct() float64 {
	if r.received+r.missing == 0 {
		return 0
	}
	return 100 * float64(r.missing) / float64(r.received+r.missing)
}

func seqs(pkts []rtctest.Packet) seqReport {
	r := seqReport{received: len(pkts)}
	for i := 1; i < len(pkts); i++ {
		switch d := int16(pkts[i].Seq - pkts[i-1].Seq); {
		case d == 1:
		case d > 1:
			r.missing += int(d) - 1
		default:
			r.reordered++
		}
	}
	return r
}

// localSocket returns the viewer's UDP socket (the selected ICE candidate's),
// forced to the default receive buffer if something had resized it.
func localSocket(t *testing.T, v *rtctest.Viewer, rcvbuf int) testutil.UDPSocket {
	t.Helper()
	pair, err := v.PC.SCTP().Transport().ICETransport().GetSelectedCandidatePair()
	if err != nil || pair == nil {
		t.Fatalf("viewer has no selected candidate pair: %v", err)
	}
	s, err := testutil.UDPSocketOnPort(int(pair.Local.Port))
	if err != nil {
		t.Fatal(err)
	}
	if s.RcvBuf != rcvbuf {
		t.Fatalf("viewer's socket has SO_RCVBUF %d, want the default %d", s.RcvBuf, rcvbuf)
	}
	return s
}

// joinResult is what one viewer joining a stream saw.
type joinResult struct {
	drops        uint64 // the kernel's, on the viewer's socket
	video, audio seqReport
	keyFirst     bool
}

func (r joinResult) clean() bool {
	return r.keyFirst && r.drops == 0 && r.video.missing+r.audio.missing+r.video.reordered+r.audio.reordered == 0
}

func (r joinResult) String() string {
	return fmt.Sprintf("kernel drops %d; video %d pkts, %d missing (%.1f %%), %d out of order; audio %d pkts, %d missing (%.1f %%), %d out of order",
		r.drops, r.video.received, r.video.missing, r.video.lossPct(), r.video.reordered,
		r.audio.received, r.audio.missing, r.audio.lossPct(), r.audio.reordered)
}

// join connects a viewer to stream and records what it gets until it has
// had the GOP so far (gopPackets of video) and 2 s of live video after it.
func (e *env) join(t *testing.T, stream string, rcvbuf, gopPackets, framePackets int) joinResult {
	t.Helper()
	errs0 := e.srv.Stats().WriteErrors
	v := e.view(t, stream, rtctest.ViewOptions{})
	defer v.Close()
	sock := localSocket(t, v, rcvbuf)
	want := gopPackets + 60*framePackets
	testutil.WaitForWithin(t, 20*time.Second, "the GOP and 2 s of live video", func() bool { return len(v.Video()) >= want })
	time.Sleep(100 * time.Millisecond) // the last audio
	// A write before pion's SRTP runs is lost and counted: the viewer must
	// have waited for it. (Writes after a viewer has left fail too.)
	if errs := e.srv.Stats().WriteErrors - errs0; errs != 0 {
		t.Errorf("%d writes to the viewer failed: want none", errs)
	}
	sock, err := testutil.UDPSocketOnPort(sock.Port)
	if err != nil {
		t.Fatal(err)
	}
	video := v.Video()
	return joinResult{drops: sock.Drops, video: seqs(video), audio: seqs(v.Audio()), keyFirst: video[0].Keyframe}
}

// TestGOPReplayFitsDefaultReceiveBuffer joins viewers whose UDP socket has
// the kernel's default receive buffer (212,992 bytes here) at several points
// of a 2 s GOP of a 2 Mbit/s and a 4 Mbit/s stream: each must get the GOP and
// the live packets after it with nothing dropped by the kernel, no sequence
// gap and nothing out of order, video and audio.
//
// A receiver starved of CPU long enough overflows its socket whatever the
// server does (this machine runs many tests at once), so a join that loses
// packets is tried again, up to three times; sent as one burst, as it was,
// the GOP loses packets every time from a few frames into the GOP on.
func TestGOPReplayFitsDefaultReceiveBuffer(t *testing.T) {
	rcvbuf, err := testutil.DefaultRcvBuf()
	if err != nil {
		t.Fatal(err)
	}
	for _, rate := range []struct {
		name       string
		frameBytes int
	}{{"2Mbps", 8300}, {"4Mbps", 16600}} {
		t.Run(rate.name, func(t *testing.T) {
			e := setup(t)
			src := startSource(t, e.hub, "pace", sourceOptions{GOP: 60, FrameBytes: rate.frameBytes})
			framePackets := (rate.frameBytes + 1099) / 1100
			testutil.WaitFor(t, "a full GOP", func() bool { return src.frames.Load() > 62 })
			for _, at := range []int{3, 30, 57} { // frames into the GOP
				var r joinResult
				for try := 1; try <= 3; try++ {
					testutil.WaitFor(t, fmt.Sprintf("frame %d of a GOP", at), func() bool {
						return (src.frames.Load()-src.lastKey.Load())%60 == int64(at)
					})
					r = e.join(t, "pace", rcvbuf, (at-1)*framePackets+3*framePackets, framePackets)
					t.Logf("join at frame %2d, try %d: %v", at, try, r)
					if r.clean() {
						break
					}
				}
				if !r.keyFirst {
					t.Errorf("join at frame %d: video does not start with a keyframe", at)
				}
				if !r.clean() {
					t.Errorf("join at frame %d: three tries lost packets, the last %v", at, r)
				}
			}
			st := e.srv.Stats()
			t.Logf("server: %d sent, %d queue drops, %d write errors", st.PacketsSent, st.PacketsDropped, st.WriteErrors)
			if st.PacketsDropped != 0 {
				t.Errorf("server: %d queue drops: want none", st.PacketsDropped)
			}
		})
	}
}

// TestLateJoinToLongGOPGetsVideoAtOnce joins a viewer 80 frames into a 5 s
// GOP of a 4 Mbit/s stream whose publisher cannot make a keyframe on request
// (an RTSP publisher): the GOP so far (~1,400 packets) is more than a
// viewer's queue holds. The viewer must get video at once, from the GOP's
// keyframe, and no pause in it while audio flows.
//
// This was the viewer with no video for seconds while its audio flowed: the
// replay overflowed the 1024-slot queue (94 packets dropped at subscribe, 165
// by the time it connected), so the viewer dropped the queue and waited for a
// keyframe the publisher could not make on request: its first video packet
// came 3.9 s after the join, at the next GOP.
func TestLateJoinToLongGOPGetsVideoAtOnce(t *testing.T) {
	e := setup(t)
	src := startSource(t, e.hub, "long", sourceOptions{GOP: 150, FrameBytes: 16600, IgnoreKeyframeRequests: true})
	testutil.WaitFor(t, "80 frames into a GOP", func() bool {
		return src.frames.Load() > 150 && (src.frames.Load()-src.lastKey.Load())%150 == 80
	})
	joined := time.Now()
	v := e.view(t, "long", rtctest.ViewOptions{})
	testutil.WaitForWithin(t, 20*time.Second, "4 s of audio", func() bool { return len(v.Audio()) >= 200 })
	video, audio := v.Video(), v.Audio()
	if len(video) == 0 {
		t.Fatalf("no video in 4 s (%d audio packets): the viewer waited for the next keyframe", len(audio))
	}
	first := video[0].At.Sub(joined)
	var pause time.Duration
	for i := 1; i < len(video); i++ {
		pause = max(pause, video[i].At.Sub(video[i-1].At))
	}
	vr := seqs(video)
	t.Logf("first video packet %v after the join (keyframe %v), %d video packets, longest pause %v; %d audio packets; %d queue drops",
		first.Round(time.Millisecond), video[0].Keyframe, len(video), pause.Round(time.Millisecond), len(audio), e.srv.Stats().PacketsDropped)
	// Losses are TestGOPReplayFitsDefaultReceiveBuffer's business (a
	// receiver starved of CPU loses packets on a busy machine).
	if !video[0].Keyframe || vr.received < 80*16 {
		t.Errorf("video: first packet keyframe %v, %d packets (%d missing): want the GOP from its keyframe (≥ 1280 packets)",
			video[0].Keyframe, vr.received, vr.missing)
	}
	if pause > testutil.Scale(500*time.Millisecond) {
		t.Errorf("video paused for %v while audio flowed", pause.Round(time.Millisecond))
	}
}
