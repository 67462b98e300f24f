// Package rtc is the WebRTC setup shared by Stemflow's WebRTC protocols, the
// WHIP ingest (ingest/whip) and the WHEP egress (egress/whep): an [Engine]
// that builds pion APIs whose ICE agents gather candidates only on the
// configured IPs, the codec helpers that map between SDP offers, pion codec
// parameters and relay tracks, and the HTTP signalling both protocols answer
// with: an [Endpoint] that routes POST, DELETE, PATCH and OPTIONS, checks
// bearer tokens, keeps the table of live [Session]s and owns their
// goroutines, leaving each protocol only its Start and Run (what it takes
// from the hub and how it moves media), plus the helpers it is built on
// (CORS, reading an SDP offer, plain-text errors).
//
// rtc imports relay but no protocol package; the protocol packages import rtc
// and never each other.
package rtc
