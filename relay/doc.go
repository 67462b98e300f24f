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
// Where a node takes a relayed stream from is steered (steer.go): the
// topology manager's Route for the stream names a parent and a backup
// neighbour, and announcements decide where there is no route. A relayed
// Stream outlives each of its upstream subscriptions (its sources): when
// one dies the stream, with its viewers attached, takes the stream from
// elsewhere, and it ends only when its origin ends it or nowhere else has
// it. A new route moves a flowing stream make-before-break, and the
// stream's ingress (splice.go) splices the two sources by RTP sequence
// number so viewers see no gap and no duplicate. Links beat every 50 ms;
// the streams taken from a neighbour quiet for 150 ms start moving to their
// backups make-before-break, and one silent for 300 ms is dead for steering
// (heartbeat.go): what has not moved yet fails over at once.
//
// relay imports no protocol package; protocol packages import relay.
package relay
