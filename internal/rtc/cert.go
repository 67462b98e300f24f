package rtc

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"sync"
	"time"

	"github.com/pion/webrtc/v4"
)

// certRenewBefore is how long before its expiry a shared certificate is
// replaced; pion's certificates are valid for a month.
const certRenewBefore = 24 * time.Hour

// certStore shares one DTLS certificate among an endpoint's
// PeerConnections, as a server shares its TLS certificate among
// connections. Without it pion generates an ECDSA key and a certificate for
// every PeerConnection: CPU at each connection and ~3 KB kept per session.
// Its methods are safe for concurrent use.
type certStore struct {
	mu   sync.Mutex // guards the following field
	cert *webrtc.Certificate
}

// get returns the current certificate, generating one when there is none or
// it expires within certRenewBefore. Sessions keep the certificate they were
// given until they end.
func (c *certStore) get() (webrtc.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cert == nil || time.Until(c.cert.Expires()) < certRenewBefore {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return webrtc.Certificate{}, fmt.Errorf("generate DTLS key: %w", err)
		}
		cert, err := webrtc.GenerateCertificate(key)
		if err != nil {
			return webrtc.Certificate{}, fmt.Errorf("generate DTLS certificate: %w", err)
		}
		c.cert = cert
	}
	return *c.cert, nil
}
