package relay

// link is a connection to a neighbouring datacenter, as the hub sees it.
type link interface {
	// announce tells the neighbour that a stream is live; hops is the path
	// of datacenters from the origin to this node.
	announce(name string, hops []string)
	unannounce(name string)
	// subscribe asks the neighbour for a stream. The link feeds s (its
	// description, packets and end) and returns the source to stop it by.
	subscribe(s *Stream) source
}

// route is how a stream announced by a neighbour can be reached.
type route struct {
	origin string
	via    string   // the neighbour it was announced by
	hops   []string // datacenters from the origin to via
}
