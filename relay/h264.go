package relay

import mbits "math/bits"

// B-frame detection. Browsers do not decode H264 B-frames received over
// WebRTC (Chromium shows 1–2 fps of a libx264 stream with its default
// B-frames, 30 fps of the same encode with -bf 0), so the relay marks a
// stream that carries them and the watch page tells the viewer why it cannot
// play it. The detector reads the slice type from the start of each slice's
// header: ITU-T H.264 7.3.3 slice_header() begins with ue(v)
// first_mb_in_slice and ue(v) slice_type, and slice_type%5 == 1 is a B slice.

// H264 NAL unit and RTP payload types read by the detector (H.264 table 7-1,
// RFC 6184 table 1).
const (
	h264NonIDRSlice = 1
	h264STAPA       = 24
	h264FUA         = 28
)

// h264BSlice reports whether an H264 RTP payload starts a B slice: a single
// NAL unit packet holding one, an aggregation packet (STAP-A) holding one, or
// the first fragment (FU-A) of one. Other packets (later fragments, parameter
// sets, IDR slices, which are never B) report false. It does not allocate.
func h264BSlice(p []byte) bool {
	if len(p) < 2 {
		return false
	}
	switch p[0] & 0x1f {
	case h264NonIDRSlice:
		return h264SliceIsB(p[1:])
	case h264STAPA:
		for p = p[1:]; len(p) > 2; {
			size := int(p[0])<<8 | int(p[1])
			if size == 0 || len(p) < 2+size {
				return false
			}
			if nal := p[2 : 2+size]; nal[0]&0x1f == h264NonIDRSlice && h264SliceIsB(nal[1:]) {
				return true
			}
			p = p[2+size:]
		}
	case h264FUA:
		// FU header: S E R type; the fragment continues the NAL unit right
		// after its one-byte header.
		return p[1]&0x80 != 0 && p[1]&0x1f == h264NonIDRSlice && h264SliceIsB(p[2:])
	}
	return false
}

// sliceHeaderBytes is how much of a slice header the detector unescapes:
// first_mb_in_slice below 2^20 macroblocks (8K video has 2^17.1) takes at
// most 41 bits and slice_type at most 7, so 48 bits suffice.
const sliceHeaderBytes = 6

// h264SliceIsB reports whether rbsp, a slice NAL unit after its header byte
// (still with emulation prevention bytes), is a B slice. A header too short
// or malformed to say reports false.
func h264SliceIsB(rbsp []byte) bool {
	_, typ, ok := h264SliceHeader(rbsp)
	return ok && typ%5 == 1
}

// h264SliceHeader returns first_mb_in_slice (below 2^20) and slice_type
// (0…9) from the start of a slice header. rbsp is the NAL unit after its
// header byte, emulation prevention bytes included. ok is false when the
// bytes end before slice_type or do not encode one.
func h264SliceHeader(rbsp []byte) (firstMB, typ uint32, ok bool) {
	// Unescape the first bytes (drop each 0x03 that follows two zero bytes)
	// into a 64-bit window, most significant bit first.
	var window uint64
	n, zeros := 0, 0
	for _, c := range rbsp {
		if n == sliceHeaderBytes {
			break
		}
		if zeros >= 2 && c == 0x03 {
			zeros = 0
			continue
		}
		if c == 0 {
			zeros++
		} else {
			zeros = 0
		}
		window |= uint64(c) << (56 - 8*n)
		n++
	}
	bits := 8 * n
	// first_mb_in_slice, then slice_type.
	firstMB, used, ok := readUE(window, bits, 20)
	if !ok || firstMB >= 1<<20 {
		return 0, 0, false
	}
	typ, _, ok = readUE(window<<used, bits-used, 3)
	if !ok || typ > 9 {
		return 0, 0, false
	}
	return firstMB, typ, true
}

// readUE decodes an unsigned Exp-Golomb code from the top of window, which
// holds bits valid bits, with at most maxZeros leading zero bits. It returns
// the value and the bits it took.
func readUE(window uint64, bits, maxZeros int) (v uint32, used int, ok bool) {
	zeros := mbits.LeadingZeros64(window)
	if zeros > maxZeros || 2*zeros+1 > bits {
		return 0, 0, false
	}
	// The code is zeros 0 bits, a 1 bit and zeros bits of suffix.
	code := window >> (63 - 2*zeros) // the 1 bit followed by the suffix
	return uint32(code - 1), 2*zeros + 1, true
}
