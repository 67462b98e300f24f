package rtspserver

// ReadersByStream counts the RTSP readers of each stream by stream name.
func (s *Server) ReadersByStream() map[string]int { return s.egress.ReadersByStream() }

// Stats are the RTSP server's counters. They only grow.
type Stats struct {
	// ReaderWriteErrors counts packets gortsplib could not queue to a slow
	// RTSP reader (its write queue was full): dropped.
	ReaderWriteErrors uint64
	// PublisherLost counts RTP packets missing from RTSP publishers' streams
	// on arrival (sequence gaps).
	PublisherLost uint64
}

// Stats returns the server's counters, read at call time.
func (s *Server) Stats() Stats {
	h, ok := s.rtsp.Handler.(*handler)
	if !ok {
		return Stats{}
	}
	return Stats{ReaderWriteErrors: h.writeErrs.Load(), PublisherLost: h.lost.Load()}
}
