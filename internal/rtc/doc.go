// Package rtc is the WebRTC setup shared by Stemflow's WebRTC protocols, the
// WHIP ingest (ingest/whip) and the WHEP egress (egress/whep): an [Engine]
// that builds pion APIs whose ICE agents gather candidates only on the
// configured IPs, the codec helpers that map between SDP offers, pion codec
// parameters and relay tracks, and the HTTP signalling helpers (CORS, reading
// an SDP offer, plain-text errors) both protocols answer with.
//
// rtc imports relay but no protocol package; the protocol packages import rtc
// and never each other.
package rtc
