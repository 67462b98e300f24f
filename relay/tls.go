package relay

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"time"
)

// ALPN is the application protocol the overlay negotiates on its QUIC links.
const ALPN = "stemflow-relay/1"

// Identity is what a node needs for mutual TLS on overlay links: its own
// certificate, whose first DNS name is its datacenter name, and the cluster
// CA that signed every node's certificate.
type Identity struct {
	Cert tls.Certificate
	CA   *x509.CertPool
}

// ClusterCA issues node certificates. `stemflow dev` keeps one in memory;
// real deployments make files with `stemflow certs`.
type ClusterCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
	der  []byte
}

// NewClusterCA makes a new self-signed CA, valid for ten years.
func NewClusterCA() (*ClusterCA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "Stemflow cluster CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &ClusterCA{cert: cert, key: key, pool: pool, der: der}, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	return n
}

// Issue makes the identity of the node of datacenter dc.
func (ca *ClusterCA) Issue(dc string) (Identity, error) {
	certPEM, keyPEM, err := ca.IssuePEM(dc)
	if err != nil {
		return Identity{}, err
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return Identity{}, err
	}
	return Identity{Cert: cert, CA: ca.pool}, nil
}

// IssuePEM makes a certificate and key for datacenter dc, PEM-encoded.
func (ca *ClusterCA) IssuePEM(dc string) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: dc},
		DNSNames:     []string{dc},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().AddDate(2, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, nil, err
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), nil
}

// PEM returns the CA's certificate and key, PEM-encoded.
func (ca *ClusterCA) PEM() (certPEM, keyPEM []byte, err error) {
	kder, err := x509.MarshalECPrivateKey(ca.key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), nil
}

// LoadIdentity reads a node's certificate and key and the cluster CA
// certificate from PEM files.
func LoadIdentity(caFile, certFile, keyFile string) (Identity, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return Identity{}, fmt.Errorf("loading node certificate: %w", err)
	}
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return Identity{}, fmt.Errorf("loading cluster CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return Identity{}, fmt.Errorf("cluster CA file %s holds no PEM certificate", caFile)
	}
	return Identity{Cert: cert, CA: pool}, nil
}

// Check reports whether the identity can serve datacenter dc: its
// certificate must name dc first and be signed by its cluster CA. Peers
// refuse a node that fails either, so a node checks itself at start-up. The
// error reads as a predicate of the certificate: "is for datacenter ...".
func (id Identity) Check(dc string) error {
	if len(id.Cert.Certificate) == 0 {
		return errors.New("holds no certificate")
	}
	leaf := id.Cert.Leaf
	if leaf == nil {
		var err error
		if leaf, err = x509.ParseCertificate(id.Cert.Certificate[0]); err != nil {
			return err
		}
	}
	if len(leaf.DNSNames) == 0 {
		return fmt.Errorf("names no datacenter: use the certificate made for %q by `stemflow certs`", dc)
	}
	if name := leaf.DNSNames[0]; name != dc {
		return fmt.Errorf("is for datacenter %q but this node is datacenter %q: use the certificate and key made for %q (%s.pem, %s-key.pem from `stemflow certs`)",
			name, dc, dc, dc, dc)
	}
	inter := x509.NewCertPool()
	for _, der := range id.Cert.Certificate[1:] {
		if c, err := x509.ParseCertificate(der); err == nil {
			inter.AddCert(c)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: id.CA, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}); err != nil {
		return fmt.Errorf("is not signed by the cluster CA (were they made by different `stemflow certs` runs?): %w", err)
	}
	return nil
}

func (id Identity) serverConfig() *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{id.Cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    id.CA,
		NextProtos:   []string{ALPN},
		MinVersion:   tls.VersionTLS13,
	}
}

func (id Identity) clientConfig(peer string) *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{id.Cert},
		RootCAs:      id.CA,
		ServerName:   peer,
		NextProtos:   []string{ALPN},
		MinVersion:   tls.VersionTLS13,
	}
}

// peerName returns the datacenter named by the verified peer certificate.
func peerName(state tls.ConnectionState) (string, error) {
	if len(state.PeerCertificates) == 0 || len(state.PeerCertificates[0].DNSNames) == 0 {
		return "", errors.New("peer certificate names no datacenter")
	}
	return state.PeerCertificates[0].DNSNames[0], nil
}
