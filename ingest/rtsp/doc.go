// Package rtsp ingests RTSP streams into the relay hub: publishers that push
// with ANNOUNCE/RECORD (ffmpeg -f rtsp, OBS, encoders) and cameras that this
// node pulls with DESCRIBE/SETUP/PLAY ([Source]).
//
// Every stream is converted on the way in so that browsers can play it:
// H264 is depacketized into access units, SPS/PPS are put in-band before
// every IDR frame, and the access units are re-packetized into RTP packets of
// at most [MaxPacketSize] bytes with a fixed SSRC and continuous sequence
// numbers, keeping the publisher's timestamps. VP8 is re-packetized the same
// way; Opus passes through. Tracks of other codecs are skipped; a stream with
// none of H264, VP8 or Opus is refused with an RTSP error that names the codecs.
//
// The package serves no RTSP port itself: [Handler] plugs into the
// gortsplib.Server that node/rtspserver shares with the RTSP egress.
package rtsp
