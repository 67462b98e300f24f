package rtc_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stemflow/stemflow/internal/testutil"

	"github.com/stemflow/stemflow/internal/rtc"
	"github.com/stemflow/stemflow/internal/rtc/rtctest"
)

// fakeSession is a Runner that holds its session until the session ends,
// then takes a while to clean up.
type fakeSession struct {
	s     *rtc.Session
	ended chan error // receives the session's end reason
}

func (f *fakeSession) Run() {
	<-f.s.Context().Done()
	time.Sleep(50 * time.Millisecond)
	f.ended <- context.Cause(f.s.Context())
}

const endpointOffer = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n" +
	"m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendonly\r\na=rtpmap:96 VP8/90000\r\n"

func TestEndpoint(t *testing.T) {
	testutil.CheckLeaks(t)
	testutil.Watchdog(t, 30*time.Second)
	errClosed := errors.New("test: endpoint closed")
	var refuse atomic.Bool
	ended := make(chan error, 4)
	ep := rtc.NewEndpoint(rtc.EndpointConfig[*fakeSession]{
		Name: "test", Verb: "try", Doing: "trying", Elsewhere: "try elsewhere",
		Token: "tok", Logger: rtctest.Quiet, ErrClosed: errClosed,
		Start: func(_ context.Context, s *rtc.Session, o *rtc.Offer) (*fakeSession, string, error) {
			if refuse.Load() {
				return nil, "", rtc.Errorf(http.StatusConflict, "test: refused")
			}
			if s.Stream() != "cam" || len(o.Media) != 1 {
				t.Errorf("Start got stream %q and %d media sections", s.Stream(), len(o.Media))
			}
			return &fakeSession{s: s, ended: ended}, "answer-sdp", nil
		},
	})
	t.Cleanup(func() { ep.Close() })
	url := rtctest.Serve(t, "/test/", ep)

	request := func(method, path, token, body string) (int, string, http.Header) {
		req, err := http.NewRequest(method, url+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		if body != "" {
			req.Header.Set("Content-Type", "application/sdp")
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		return rtctest.Do(t, req)
	}

	status, body, h := request(http.MethodPost, "/test/cam", "tok", endpointOffer)
	loc := h.Get("Location")
	id := strings.TrimPrefix(loc, "/test/cam/")
	if status != http.StatusCreated || body != "answer-sdp" || id == loc || id == "" ||
		h.Get("ETag") != `"`+id+`"` || h.Get("Content-Type") != "application/sdp" {
		t.Fatalf("POST: %d %q %v", status, body, h)
	}
	if ep.Len() != 1 {
		t.Errorf("Len = %d after a POST, want 1", ep.Len())
	}

	for _, tc := range []struct {
		method, path, token, body string
		status                    int
		want                      string
	}{
		{http.MethodPost, "/test/cam", "", endpointOffer, 401, "test: no bearer token"},
		{http.MethodPost, "/test/a%20b", "tok", endpointOffer, 400, "test: bad stream name in the URL"},
		{http.MethodGet, "/test/cam", "tok", "", 405, "test: GET is not allowed: POST an SDP offer to try"},
		{http.MethodPatch, loc, "tok", "", 405, "test: this server does not support trickle ICE"},
		{http.MethodGet, loc, "tok", "", 405, "use DELETE to stop trying"},
		{http.MethodDelete, loc, "", "", 401, "test: no bearer token"},
		{http.MethodDelete, "/test/other/" + id, "tok", "", 404, "test: no session " + id + ` for stream "other"`},
		{http.MethodDelete, "/test/cam/nosuch", "tok", "", 404, "test: no session nosuch"},
	} {
		status, body, h := request(tc.method, tc.path, tc.token, tc.body)
		if status != tc.status || !strings.Contains(body, tc.want) || h.Get("Access-Control-Allow-Origin") != "*" {
			t.Errorf("%s %s: got %d %q, want %d containing %q and CORS", tc.method, tc.path, status, body, tc.status, tc.want)
		}
	}
	refuse.Store(true)
	if status, body, _ := request(http.MethodPost, "/test/cam", "tok", endpointOffer); status != 409 || body != "test: refused\n" {
		t.Errorf("refused POST: %d %q", status, body)
	}
	refuse.Store(false)

	if status, _, _ := request(http.MethodDelete, loc, "tok", ""); status != http.StatusOK {
		t.Fatalf("DELETE: %d", status)
	}
	select {
	case reason := <-ended:
		if reason == nil || reason.Error() != "client sent DELETE" {
			t.Errorf("session ended with %v, want client sent DELETE", reason)
		}
	default:
		t.Error("DELETE answered before the session's Run returned")
	}
	if ep.Len() != 0 {
		t.Errorf("Len = %d after DELETE, want 0", ep.Len())
	}

	request(http.MethodPost, "/test/cam", "tok", endpointOffer)
	ep.Close()
	if reason := <-ended; !errors.Is(reason, errClosed) {
		t.Errorf("session ended with %v at Close, want %v", reason, errClosed)
	}
	status, body, _ = request(http.MethodPost, "/test/cam", "tok", endpointOffer)
	if status != http.StatusServiceUnavailable || body != "test: the server is shutting down: try elsewhere\n" {
		t.Errorf("POST after Close: %d %q", status, body)
	}
	if reason := <-ended; !errors.Is(reason, errClosed) {
		t.Errorf("session refused at shutdown ended with %v, want %v", reason, errClosed)
	}
	if ep.Len() != 0 || len(ep.Sessions()) != 0 {
		t.Errorf("%d sessions after Close", ep.Len())
	}
}
