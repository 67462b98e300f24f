package rtsp

// ReadersByStream counts the RTSP readers (sessions past SETUP) of each
// stream by stream name, at call time.
func (e *Egress) ReadersByStream() map[string]int {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make(map[string]int, len(e.streams))
	for name, st := range e.streams {
		if st.readers > 0 {
			out[name] = st.readers
		}
	}
	return out
}
