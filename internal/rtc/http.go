package rtc

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"
)

// MaxOfferSize is the largest SDP offer the servers read (64 KiB).
const MaxOfferSize = 64 << 10

// HTTPError is an error that carries the HTTP status a server answers it
// with. Its message is meant for the user and is sent as plain text.
type HTTPError struct {
	Status int
	Msg    string
}

func (e *HTTPError) Error() string { return e.Msg }

// Errorf returns an HTTPError with a formatted message.
func Errorf(status int, format string, args ...any) *HTTPError {
	return &HTTPError{Status: status, Msg: fmt.Sprintf(format, args...)}
}

// WriteError answers err: an *HTTPError (possibly wrapped) with its status
// and message, anything else with 500. A 401 carries WWW-Authenticate: Bearer.
func WriteError(w http.ResponseWriter, err error) {
	status, msg := http.StatusInternalServerError, err.Error()
	var he *HTTPError
	if errors.As(err, &he) {
		status, msg = he.Status, he.Msg
	}
	if status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="stemflow"`)
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = io.WriteString(w, msg+"\n")
}

// SetCORS sets the CORS headers WHIP and WHEP answers carry, so that browser
// pages of any origin can publish and play.
func SetCORS(h http.Header, methods string) {
	h.Set("Access-Control-Allow-Origin", "*")
	h.Set("Access-Control-Allow-Methods", methods)
	h.Set("Access-Control-Allow-Headers", "Authorization, Content-Type, If-Match")
	h.Set("Access-Control-Expose-Headers", "Location, ETag, Link, Accept-Patch")
	h.Set("Access-Control-Max-Age", "600")
}

// CheckBearer checks the request's bearer token against token; an empty
// token lets every request in. It returns a 401 *HTTPError.
func CheckBearer(r *http.Request, token, proto string) error {
	if token == "" {
		return nil
	}
	auth := r.Header.Get("Authorization")
	got, ok := strings.CutPrefix(auth, "Bearer ")
	if !ok {
		if auth == "" {
			return Errorf(http.StatusUnauthorized, "%s: no bearer token: send the header \"Authorization: Bearer <token>\"", proto)
		}
		return Errorf(http.StatusUnauthorized, "%s: the Authorization header is not a bearer token: send \"Authorization: Bearer <token>\"", proto)
	}
	if subtle.ConstantTimeCompare([]byte(strings.TrimSpace(got)), []byte(token)) != 1 {
		return Errorf(http.StatusUnauthorized, "%s: wrong bearer token: check the token configured for this server", proto)
	}
	return nil
}

// ReadOffer reads and parses the SDP offer of a WHIP or WHEP POST. Its
// errors are *HTTPError: 415 for a body that is not application/sdp, 413 for
// one larger than MaxOfferSize, 400 for one that is not a usable SDP offer.
func ReadOffer(w http.ResponseWriter, r *http.Request, proto string) (*Offer, error) {
	ct := r.Header.Get("Content-Type")
	mt, _, err := mime.ParseMediaType(ct)
	if err != nil || !strings.EqualFold(mt, "application/sdp") {
		if ct == "" {
			return nil, Errorf(http.StatusUnsupportedMediaType,
				"%s: no Content-Type: send the SDP offer with Content-Type: application/sdp", proto)
		}
		return nil, Errorf(http.StatusUnsupportedMediaType,
			"%s: Content-Type is %q: send the SDP offer with Content-Type: application/sdp", proto, ct)
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxOfferSize))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, Errorf(http.StatusRequestEntityTooLarge,
				"%s: offer is larger than %d KiB: send a plain SDP offer", proto, MaxOfferSize>>10)
		}
		return nil, Errorf(http.StatusBadRequest, "%s: reading the offer: %v", proto, err)
	}
	if len(body) == 0 {
		return nil, Errorf(http.StatusBadRequest, "%s: empty body: send an SDP offer", proto)
	}
	o, err := ParseOffer(string(body))
	if err != nil {
		return nil, Errorf(http.StatusBadRequest, "%s: %v", proto, err)
	}
	return o, nil
}

// NewSessionID returns a random session identifier for a resource URL.
func NewSessionID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
