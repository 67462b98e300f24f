package node

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/stemflow/stemflow/player"
	"github.com/stemflow/stemflow/relay"
)

// The HTTP API's JSON shapes. They are views built from the relay's and the
// protocols' snapshots, so that renaming a Go field never changes the API;
// docs/api.md documents every key and the tests decode the real responses.

// apiStreams is the body of GET /api/v1/streams.
type apiStreams struct {
	Datacenter string      `json:"datacenter"`
	Streams    []apiStream `json:"streams"`
}

type apiStream struct {
	Name   string `json:"name"`
	Origin string `json:"origin"`
	// Local: the stream's packets reach this node now (published here, or
	// relayed here for local viewers or a downstream datacenter).
	Local  bool       `json:"local"`
	Hops   []string   `json:"hops"`
	Tracks []apiTrack `json:"tracks"`
	// Subscribers counts everything that takes the stream's packets here:
	// viewers of every protocol and downstream datacenters.
	Subscribers int `json:"subscribers"`
	// Viewers counts the local viewers by protocol.
	Viewers apiViewers `json:"viewers"`
	// Since is when the stream started flowing at this node (RFC 3339);
	// Packets and Bytes count what arrived since then (from the publisher,
	// or from the upstream datacenter). A relayed stream stops flowing a
	// short linger time after its last subscriber here left; when it flows
	// again it starts from 0 with a new Since. Absent when not Local.
	Since   *time.Time `json:"since,omitempty"`
	Packets uint64     `json:"packets"`
	Bytes   uint64     `json:"bytes"`
	// PacketsOut and BytesOut count what the stream handed to its
	// subscribers here since Since: each packet once per WHEP viewer, per
	// downstream datacenter, and once for all RTSP readers of the node.
	PacketsOut uint64 `json:"packets_out"`
	BytesOut   uint64 `json:"bytes_out"`
	// BFrames: the H264 video has B-frames, which browsers do not play
	// over WebRTC (the publisher should encode with -bf 0).
	BFrames bool `json:"b_frames"`
}

type apiViewers struct {
	WHEP int `json:"whep"`
	RTSP int `json:"rtsp"`
}

type apiTrack struct {
	Kind        string `json:"kind"`  // "video" or "audio"
	Codec       string `json:"codec"` // "H264", "VP8" or "opus"
	PayloadType uint8  `json:"payload_type"`
	ClockRate   uint32 `json:"clock_rate"`
	Channels    uint16 `json:"channels,omitempty"` // audio only
	Fmtp        string `json:"fmtp,omitempty"`
}

// apiLinks is the body of GET /api/v1/links.
type apiLinks struct {
	Datacenter string    `json:"datacenter"`
	Links      []apiLink `json:"links"`
}

type apiLink struct {
	Peer              string  `json:"peer"`
	PacketsSent       uint64  `json:"packets_sent"`
	DatagramsSent     uint64  `json:"datagrams_sent"`
	PacketsReceived   uint64  `json:"packets_received"`
	DatagramsReceived uint64  `json:"datagrams_received"`
	DatagramBudget    int     `json:"datagram_budget"`
	QueueDropped      uint64  `json:"queue_dropped"`
	SendErrors        uint64  `json:"send_errors"`
	HopLost           uint64  `json:"hop_lost"`
	ReceiveDropped    uint64  `json:"receive_dropped"`
	Unknown           uint64  `json:"unknown_subscription"`
	Duplicates        uint64  `json:"duplicates"`
	FragmentsGivenUp  uint64  `json:"fragments_given_up"`
	Malformed         uint64  `json:"malformed"`
	RTTMs             float64 `json:"rtt_ms"`
}

func trackView(t relay.Track) apiTrack {
	codec := t.MimeType
	if _, sub, ok := strings.Cut(t.MimeType, "/"); ok {
		codec = sub
	}
	return apiTrack{
		Kind:        t.Kind.String(),
		Codec:       codec,
		PayloadType: t.PayloadType,
		ClockRate:   t.ClockRate,
		Channels:    t.Channels,
		Fmtp:        t.Fmtp,
	}
}

func linkView(l relay.LinkStats) apiLink {
	return apiLink{
		Peer:              l.Peer,
		PacketsSent:       l.PacketsSent,
		DatagramsSent:     l.DatagramsSent,
		PacketsReceived:   l.PacketsReceived,
		DatagramsReceived: l.DatagramsReceived,
		DatagramBudget:    l.DatagramBudget,
		QueueDropped:      l.QueueDropped,
		SendErrors:        l.SendErrors,
		HopLost:           l.HopLost,
		ReceiveDropped:    l.ReceiveDropped,
		Unknown:           l.UnknownSubscription,
		Duplicates:        l.Duplicates,
		FragmentsGivenUp:  l.FragmentsGivenUp,
		Malformed:         l.Malformed,
		RTTMs:             float64(l.RTT) / float64(time.Millisecond),
	}
}

// routes is the node's HTTP API and pages; docs/api.md documents them.
func (n *Node) routes() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/whip/", n.whip)
	mux.Handle("/whep/", n.whep)
	mux.HandleFunc("GET /api/v1/streams", n.serveStreams)
	mux.HandleFunc("GET /api/v1/links", n.serveLinks)
	mux.Handle("GET /api/v1/topology", n.topologyAPI())
	mux.Handle("GET /metrics", n.metricsHandler())
	mux.Handle("GET /chat/{room}", n.chatWS) // chat.go
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	if n.cfg.extraRoutes != nil {
		n.cfg.extraRoutes(mux)
	}
	mux.Handle("/", player.Handler())
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Access-Control-Allow-Origin", "*")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func (n *Node) serveStreams(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, n.streamsView())
}

func (n *Node) streamsView() apiStreams {
	whep, rtsp := n.whep.ViewersByStream(), n.rtsp.ReadersByStream()
	infos := n.hub.Streams()
	out := apiStreams{Datacenter: n.cfg.Datacenter, Streams: make([]apiStream, 0, len(infos))}
	for _, s := range infos {
		v := apiStream{
			Name:        s.Name,
			Origin:      s.Origin,
			Local:       s.Local,
			Hops:        s.Hops,
			Tracks:      make([]apiTrack, 0, len(s.Tracks)),
			Subscribers: s.Subscribers,
			Viewers:     apiViewers{WHEP: whep[s.Name], RTSP: rtsp[s.Name]},
			Packets:     s.Packets,
			Bytes:       s.Bytes,
			PacketsOut:  s.SentPackets,
			BytesOut:    s.SentBytes,
			BFrames:     s.BFrames,
		}
		if v.Hops == nil {
			v.Hops = []string{}
		}
		if s.Local && !s.Since.IsZero() {
			since := s.Since.UTC()
			v.Since = &since
		}
		for _, t := range s.Tracks {
			v.Tracks = append(v.Tracks, trackView(t))
		}
		out.Streams = append(out.Streams, v)
	}
	return out
}

func (n *Node) serveLinks(w http.ResponseWriter, r *http.Request) {
	links := n.hub.Links()
	out := apiLinks{Datacenter: n.cfg.Datacenter, Links: make([]apiLink, 0, len(links))}
	for _, l := range links {
		out.Links = append(out.Links, linkView(l))
	}
	writeJSON(w, out)
}
