package node

// startSeam starts the goroutines that use the relay's steering seam.
func (c *control) startSeam() {}
