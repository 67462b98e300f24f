package node

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/stemflow/stemflow/relay"
	"github.com/stemflow/stemflow/topology"
)

// Config is the configuration of one node, as read from YAML by
// `stemflow node --config FILE`. Zero values take the defaults of
// [Config.SetDefaults].
type Config struct {
	// Datacenter is the name of this node's datacenter; it must match the
	// first DNS name of the node's overlay certificate.
	Datacenter string `yaml:"datacenter"`
	HTTP       struct {
		Listen string `yaml:"listen"` // default ":8080"
	} `yaml:"http"`
	RTSP struct {
		Listen string `yaml:"listen"` // default ":8554"
		// Sources maps stream names to RTSP URLs (cameras) that the node
		// pulls and publishes under that name.
		Sources map[string]string `yaml:"sources"`
		// RTPAddress and RTCPAddress are the UDP addresses for RTP over
		// UDP (an even port and the next one). Default: the RTSP port +1000
		// and +1001.
		RTPAddress  string `yaml:"rtp_address"`
		RTCPAddress string `yaml:"rtcp_address"`
	} `yaml:"rtsp"`
	Overlay struct {
		Listen string `yaml:"listen"` // UDP, default ":7000"
		// Neighbours maps neighbouring datacenters to their overlay
		// addresses (host:port).
		Neighbours map[string]string `yaml:"neighbours"`
		TLS        struct {
			CA   string `yaml:"ca"`
			Cert string `yaml:"cert"`
			Key  string `yaml:"key"`
		} `yaml:"tls"`
	} `yaml:"overlay"`
	WebRTC struct {
		// IPs are the host addresses ICE offers to browsers and publishers.
		IPs []string `yaml:"ips"`
		// NAT1To1IPs are public addresses that map 1:1 to IPs (e.g. a cloud
		// VM's public IP).
		NAT1To1IPs []string `yaml:"nat_1to1_ips"`
		// UDPPort, when set, carries every PeerConnection on one UDP port.
		UDPPort int `yaml:"udp_port"`
	} `yaml:"webrtc"`
	Auth struct {
		// PublishToken, when set, is the Bearer token WHIP publishers must
		// present.
		PublishToken string `yaml:"publish_token"`
	} `yaml:"auth"`
	Log struct {
		Level string `yaml:"level"` // debug, info, warn, error; default info
	} `yaml:"log"`

	// identity is set by stemflow dev, which makes certificates in memory.
	identity *relay.Identity
}

// LoadConfig reads and validates a YAML config file. Unknown keys are errors.
func LoadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	cfg, err := ParseConfig(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return cfg, nil
}

// ParseConfig decodes YAML strictly, applies defaults and validates.
func ParseConfig(data []byte) (*Config, error) {
	var cfg Config
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		return nil, err
	}
	cfg.SetDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &cfg, nil
}

// SetDefaults fills in unset fields.
func (c *Config) SetDefaults() {
	if c.HTTP.Listen == "" {
		c.HTTP.Listen = ":8080"
	}
	if c.RTSP.Listen == "" {
		c.RTSP.Listen = ":8554"
	}
	if c.Overlay.Listen == "" {
		c.Overlay.Listen = ":7000"
	}
	if c.Log.Level == "" {
		c.Log.Level = "info"
	}
}

// Validate reports the first problem in the config, naming the field.
func (c *Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	if err := topology.ValidateName(c.Datacenter); err != nil {
		bad("datacenter", "%v", err)
	}
	for field, addr := range map[string]string{"http.listen": c.HTTP.Listen, "rtsp.listen": c.RTSP.Listen, "overlay.listen": c.Overlay.Listen} {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			bad(field, "%q is not host:port", addr)
		}
	}
	for name, url := range c.RTSP.Sources {
		if err := relay.ValidateStreamName(name); err != nil {
			bad("rtsp.sources", "%v", err)
		}
		if !strings.HasPrefix(url, "rtsp://") && !strings.HasPrefix(url, "rtsps://") {
			bad("rtsp.sources."+name, "%q is not an rtsp:// URL", url)
		}
	}
	for name, addr := range c.Overlay.Neighbours {
		if err := topology.ValidateName(name); err != nil {
			bad("overlay.neighbours", "%v", err)
		}
		if name == c.Datacenter {
			bad("overlay.neighbours", "lists this node's own datacenter %q", name)
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			bad("overlay.neighbours."+name, "%q is not host:port", addr)
		}
	}
	if c.identity == nil && (c.Overlay.TLS.CA == "" || c.Overlay.TLS.Cert == "" || c.Overlay.TLS.Key == "") {
		bad("overlay.tls", "ca, cert and key are required (make them with `stemflow certs`)")
	}
	for _, ip := range append(append([]string(nil), c.WebRTC.IPs...), c.WebRTC.NAT1To1IPs...) {
		if net.ParseIP(ip) == nil {
			bad("webrtc.ips", "%q is not an IP address", ip)
		}
	}
	if len(c.WebRTC.IPs) == 0 {
		bad("webrtc.ips", "list the host IPs that ICE may use (e.g. the node's private IP)")
	}
	if c.WebRTC.UDPPort < 0 || c.WebRTC.UDPPort > 65535 {
		bad("webrtc.udp_port", "%d out of range", c.WebRTC.UDPPort)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "%q is not one of debug, info, warn, error", c.Log.Level)
	}
	return errors.Join(errs...)
}
