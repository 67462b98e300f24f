// Package relay is Stemflow's data plane: the hub that every ingest and egress
// protocol plugs into, and the QUIC links that carry streams between datacenters.
//
// A [Hub] holds the streams a node knows. An ingest protocol calls
// [Hub.Publish] and writes RTP packets into the returned [Publisher]; an egress
// protocol calls [Hub.Subscribe] with a [Subscriber] and receives every packet
// of the stream, starting with the last group of pictures (GOP) so that a new
// viewer sees a picture at once. When the stream was published in another
// datacenter, the hub subscribes to it over the overlay, through the neighbour
// the stream was announced from, and unsubscribes when the last local
// subscriber leaves: a stream crosses a link only while something downstream
// watches it.
//
// relay imports no protocol package; protocol packages import relay.
package relay
