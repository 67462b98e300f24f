package rtsp

import (
	"crypto/subtle"
	"log/slog"
	"strings"

	"github.com/bluenviron/gortsplib/v4"
	"github.com/bluenviron/gortsplib/v4/pkg/base"
	"github.com/bluenviron/gortsplib/v4/pkg/headers"
	"github.com/bluenviron/gortsplib/v4/pkg/liberrors"
)

// challenge is a connection whose ANNOUNCE came without credentials and was
// answered 401 with a WWW-Authenticate challenge. A client with the token in
// its URL (ffmpeg: rtsp://user:TOKEN@host/x) answers it on the same
// connection; one without closes it, and only then is the refusal logged.
type challenge struct {
	log *slog.Logger
}

// authorize checks an ANNOUNCE's credentials against the publish token: the
// token is the password, with any user name, in RTSP Basic or Digest
// authentication (gortsplib checks Digest against its per-connection nonce).
// It returns nil when the publisher may go on, else the 401 response and
// the error that makes gortsplib add the challenge (no credentials) or close
// the connection (wrong ones).
func (h *Handler) authorize(ctx *gortsplib.ServerHandlerOnAnnounceCtx, log *slog.Logger) (*base.Response, error) {
	if h.token == "" {
		return nil, nil
	}
	var a headers.Authorization
	if err := a.Unmarshal(ctx.Request.Header["Authorization"]); err != nil {
		// Makes the connection's Digest nonce, which the challenge carries;
		// the empty password never matches a configured token.
		ctx.Conn.VerifyCredentials(ctx.Request, "-", "")
		h.mu.Lock()
		h.challenged[ctx.Conn] = challenge{log: log}
		h.mu.Unlock()
		log.Debug("RTSP publisher asked for credentials")
		return refusal(base.StatusUnauthorized, "rtsp: publishing needs the publish token: "+
			"give it as the URL's password, rtsp://user:TOKEN@host:port/<name> (any user name)"), liberrors.ErrServerAuth{}
	}
	h.forgetChallenge(ctx.Conn)
	var ok bool
	method := "digest"
	switch a.Method {
	case headers.AuthMethodBasic:
		method = "basic"
		ok = subtle.ConstantTimeCompare([]byte(a.BasicPass), []byte(h.token)) == 1
	case headers.AuthMethodDigest:
		// VerifyCredentials refuses an empty user name.
		ok = a.Username != "" && ctx.Conn.VerifyCredentials(ctx.Request, a.Username, h.token)
	}
	if ok {
		return nil, nil
	}
	msg := "rtsp: wrong publish token: check the token configured for this server"
	if a.Method == headers.AuthMethodDigest && a.Username == "" {
		msg = "rtsp: Digest authentication needs a user name: rtsp://user:TOKEN@host:port/<name> (any user name)"
	}
	log.Warn("RTSP publisher refused: "+strings.TrimPrefix(msg, "rtsp: "), "user", a.Username, "auth", method)
	return refusal(base.StatusUnauthorized, msg), liberrors.ErrServerAuth{}
}

// OnConnClose logs the refusal of a publisher that closed its connection
// without answering the credentials challenge.
func (h *Handler) OnConnClose(ctx *gortsplib.ServerHandlerOnConnCloseCtx) {
	if c, ok := h.forgetChallenge(ctx.Conn); ok {
		c.log.Warn("RTSP publisher refused: no credentials (the publish token is the URL's password: rtsp://user:TOKEN@host:port/<name>)")
	}
}

func (h *Handler) forgetChallenge(sc *gortsplib.ServerConn) (challenge, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	c, ok := h.challenged[sc]
	delete(h.challenged, sc)
	return c, ok
}
