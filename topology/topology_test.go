package topology

import (
	"fmt"
	"testing"
)

func TestChain(t *testing.T) {
	got := fmt.Sprint(Chain([]string{"a", "b", "c"}))
	if want := "map[a:[b] b:[a c] c:[b]]"; got != want {
		t.Fatalf("Chain = %s, want %s", got, want)
	}
}

func TestParseDatacenters(t *testing.T) {
	for in, want := range map[string]string{"3": "[a b c]", "a,b": "[a b]", "eu-1, us-2": "[eu-1 us-2]"} {
		got, err := ParseDatacenters(in)
		if err != nil || fmt.Sprint(got) != want {
			t.Errorf("ParseDatacenters(%q) = %v, %v; want %s", in, got, err, want)
		}
	}
	for _, bad := range []string{"0", "27", "a,a", "A", "a,,b", "1x"} {
		if _, err := ParseDatacenters(bad); err == nil {
			t.Errorf("ParseDatacenters(%q) succeeded", bad)
		}
	}
}
