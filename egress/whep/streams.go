package whep

// ViewersByStream counts the live viewers of each stream by stream name.
// Like Stats it reads the session table at call time (for /metrics and the
// stream listing) and costs the forward path nothing.
func (s *Server) ViewersByStream() map[string]int {
	live := s.ep.Sessions()
	out := make(map[string]int)
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, v := range live {
		if !v.ended {
			out[v.Stream()]++
		}
	}
	return out
}
