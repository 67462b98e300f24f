package testutil

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// UDPSocket is one UDP socket of this process as the kernel reports it.
type UDPSocket struct {
	FD    int
	Port  int    // local port
	Inode uint64 // of the socket
	// Drops counts datagrams the kernel dropped for this socket, mostly
	// because its receive buffer was full (each one also counts in
	// /proc/net/snmp's Udp: RcvbufErrors).
	Drops uint64
	// RcvBuf is the socket's SO_RCVBUF, in bytes (the kernel's default is
	// net.core.rmem_default).
	RcvBuf int
}

// UDPSockets returns the IPv4 UDP sockets this process holds, with their
// kernel drop counts, read from /proc (Linux only).
func UDPSockets() ([]UDPSocket, error) {
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil, err
	}
	byInode := make(map[uint64]int)
	for _, e := range fds {
		l, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil || !strings.HasPrefix(l, "socket:[") {
			continue
		}
		ino, err1 := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]"), 10, 64)
		fd, err2 := strconv.Atoi(e.Name())
		if err1 == nil && err2 == nil {
			byInode[ino] = fd
		}
	}
	f, err := os.Open("/proc/net/udp")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []UDPSocket
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		// sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ref pointer drops
		fs := strings.Fields(sc.Text())
		if len(fs) < 13 {
			continue
		}
		ino, err := strconv.ParseUint(fs[9], 10, 64)
		if err != nil {
			continue
		}
		fd, ours := byInode[ino]
		if !ours {
			continue
		}
		_, portHex, _ := strings.Cut(fs[1], ":")
		port, _ := strconv.ParseUint(portHex, 16, 16)
		drops, _ := strconv.ParseUint(fs[len(fs)-1], 10, 64)
		rb, _ := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_RCVBUF)
		out = append(out, UDPSocket{FD: fd, Port: int(port), Inode: ino, Drops: drops, RcvBuf: rb})
	}
	return out, sc.Err()
}

// UDPSocketOnPort returns this process's UDP socket bound to port.
func UDPSocketOnPort(port int) (UDPSocket, error) {
	socks, err := UDPSockets()
	if err != nil {
		return UDPSocket{}, err
	}
	for _, s := range socks {
		if s.Port == port {
			return s, nil
		}
	}
	return UDPSocket{}, fmt.Errorf("no UDP socket of this process on port %d", port)
}

// DefaultRcvBuf returns net.core.rmem_default: the receive buffer of a UDP
// socket nobody resized.
func DefaultRcvBuf() (int, error) {
	b, err := os.ReadFile("/proc/sys/net/core/rmem_default")
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// RcvbufErrors returns Udp: RcvbufErrors of /proc/net/snmp: receive-buffer
// drops of every UDP socket in this network namespace (other processes'
// too).
func RcvbufErrors() (uint64, error) {
	b, err := os.ReadFile("/proc/net/snmp")
	if err != nil {
		return 0, err
	}
	var names []string
	for line := range strings.SplitSeq(string(b), "\n") {
		fs := strings.Fields(line)
		if len(fs) == 0 || fs[0] != "Udp:" {
			continue
		}
		if names == nil {
			names = fs
			continue
		}
		for i, n := range names {
			if n == "RcvbufErrors" && i < len(fs) {
				return strconv.ParseUint(fs[i], 10, 64)
			}
		}
	}
	return 0, fmt.Errorf("no Udp: RcvbufErrors in /proc/net/snmp")
}
