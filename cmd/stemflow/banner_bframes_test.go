package main

import (
	"regexp"
	"strings"
	"testing"
)

// fakeCluster is in cli_test.go.

// TestBannerPublishesWithoutBFrames checks that the ffmpeg command the dev
// banner offers turns libx264's default B-frames off (browsers cannot play
// them over WebRTC) and says why.
func TestBannerPublishesWithoutBFrames(t *testing.T) {
	var b strings.Builder
	printBanner(&b, fakeCluster{"a", "b", "c"})
	cmds := regexp.MustCompile(`ffmpeg -re .*libx264.*`).FindAllString(b.String(), -1)
	if len(cmds) == 0 {
		t.Fatalf("the banner offers no ffmpeg command:\n%s", b.String())
	}
	for _, cmd := range cmds {
		if !strings.Contains(cmd, "-bf 0") && !strings.Contains(cmd, "-tune zerolatency") {
			t.Errorf("the banner's %q makes B-frames, which browsers cannot play: add -bf 0", cmd)
		}
	}
	if !strings.Contains(b.String(), "B-frames") {
		t.Errorf("the banner does not say why -bf 0:\n%s", b.String())
	}
}
