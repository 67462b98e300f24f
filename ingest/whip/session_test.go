package whip

import (
	"bytes"
	"testing"

	"github.com/pion/rtp"
)

func marshal(t *testing.T, p *rtp.Packet) []byte {
	t.Helper()
	b, err := p.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestStripExtension removes one-byte, two-byte and RFC 3550 header
// extensions and keeps everything else of the packet (CSRCs, marker,
// padding, payload).
func TestStripExtension(t *testing.T) {
	want := &rtp.Packet{Header: rtp.Header{Version: 2, Marker: true, PayloadType: 96, SequenceNumber: 7, Timestamp: 9000,
		SSRC: 0x1234, CSRC: []uint32{1, 2}}, Payload: []byte{0x65, 1, 2, 3, 4}}
	plain := marshal(t, want)
	padded := want.Clone()
	padded.Padding, padded.PaddingSize = true, 4

	oneByte := want.Clone()
	if err := oneByte.SetExtension(3, []byte{0xaa, 0xbb}); err != nil {
		t.Fatal(err)
	}
	if err := oneByte.SetExtension(5, []byte{0xcc}); err != nil {
		t.Fatal(err)
	}
	twoByte := want.Clone()
	twoByte.Extension, twoByte.ExtensionProfile = true, rtp.ExtensionProfileTwoByte
	if err := twoByte.SetExtension(20, make([]byte, 17)); err != nil {
		t.Fatal(err)
	}
	rfc3550 := want.Clone()
	rfc3550.Extension, rfc3550.ExtensionProfile = true, 0xabcd
	if err := rfc3550.SetExtension(0, []byte{1, 2, 3, 4}); err != nil {
		t.Fatal(err)
	}
	paddedExt := padded.Clone()
	if err := paddedExt.SetExtension(1, []byte{9}); err != nil {
		t.Fatal(err)
	}

	var hdr rtp.Header
	for name, c := range map[string]struct{ in, want []byte }{
		"no extension":       {plain, plain},
		"one-byte":           {marshal(t, oneByte), plain},
		"two-byte":           {marshal(t, twoByte), plain},
		"RFC 3550":           {marshal(t, rfc3550), plain},
		"padding, extension": {marshal(t, paddedExt), marshal(t, padded)},
	} {
		got, err := stripExtension(&hdr, bytes.Clone(c.in))
		if err != nil || !bytes.Equal(got, c.want) {
			t.Errorf("%s: got %x, %v; want %x", name, got, err, c.want)
		}
	}
	ext := marshal(t, oneByte)
	for _, n := range []int{3, 12, 16, 19} {
		if _, err := stripExtension(&hdr, bytes.Clone(ext[:n])); err == nil {
			t.Errorf("%d of %d bytes: no error", n, len(ext))
		}
	}

	// It allocates nothing once hdr's slices have grown.
	buf := make([]byte, len(ext))
	allocs := testing.AllocsPerRun(100, func() {
		copy(buf, ext)
		if _, err := stripExtension(&hdr, buf); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("%.1f allocations per packet, want 0", allocs)
	}
}

func FuzzStripExtension(f *testing.F) {
	f.Add([]byte{0x90, 0x60, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0xbe, 0xde, 0, 1, 0x10, 0xaa, 0, 0, 0x65, 1})
	f.Add([]byte{0x80, 0x60, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0x65})
	var hdr rtp.Header
	f.Fuzz(func(t *testing.T, b []byte) {
		var in rtp.Packet
		inErr := in.Unmarshal(bytes.Clone(b))
		out, err := stripExtension(&hdr, b)
		if inErr != nil {
			return
		}
		if err != nil {
			t.Fatalf("a packet pion parses was refused: %v", err)
		}
		var p rtp.Packet
		if err := p.Unmarshal(out); err != nil {
			t.Fatalf("stripped packet does not parse: %v", err)
		}
		in.Extension, in.ExtensionProfile, in.Extensions = false, 0, nil
		p.Extensions = nil
		if !bytes.Equal(marshal(t, &p), marshal(t, &in)) {
			t.Fatalf("stripped %+v, want %+v", p, in)
		}
	})
}
