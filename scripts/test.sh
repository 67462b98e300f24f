#!/usr/bin/env bash
# The one command that runs every test, on a fresh machine too: it installs what
# the tests need (ffmpeg, chromium, iproute2, promtool), then checks formatting,
# go.mod tidiness, go vet and staticcheck, and runs every test under the race
# detector. Run it as root (the browser test
# makes a network namespace). Usage: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ffmpeg >/dev/null 2>&1 || need+=(ffmpeg)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if ((${#need[@]})); then
  echo "== installing ${need[*]} (waiting for the apt lock if another install runs)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=900 update -q
  apt-get -o DPkg::Lock::Timeout=900 install -y -q --no-install-recommends "${need[@]}"
fi

# quic-go wants large UDP buffers; without them the overlay drops datagrams
# under load. Best effort: a container may refuse.
sysctl -q -w net.core.rmem_max=7500000 net.core.wmem_max=7500000 2>/dev/null || true

echo "== gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go'))
if [ -n "$unformatted" ]; then
  echo "gofmt would change:"; echo "$unformatted"; exit 1
fi

echo "== go mod tidy (go.mod and go.sum must already be tidy)"
cp go.mod /tmp/stemflow-go.mod.$$ && cp go.sum /tmp/stemflow-go.sum.$$
go mod tidy
if ! cmp -s go.mod /tmp/stemflow-go.mod.$$ || ! cmp -s go.sum /tmp/stemflow-go.sum.$$; then
  echo "go mod tidy would change go.mod or go.sum; run it and commit the result:"
  diff -u /tmp/stemflow-go.mod.$$ go.mod || true
  cp /tmp/stemflow-go.mod.$$ go.mod && cp /tmp/stemflow-go.sum.$$ go.sum
  exit 1
fi
rm -f /tmp/stemflow-go.mod.$$ /tmp/stemflow-go.sum.$$

echo "== go vet"
go vet ./...

echo "== staticcheck (pinned in go.mod's tool directive)"
go tool staticcheck ./...

echo "== go test -race"
go test -race -count=1 -timeout 20m ./...

echo "== throughput tests (built without the race detector, which slows them many times over)"
go test -count=1 -timeout 5m -run 'TestFrameBurstsCrossTwoHops' ./relay/

echo "== benchmarks (smoke: one iteration each)"
go test -run '^$' -bench . -benchtime 1x -timeout 10m ./relay/ ./egress/... 
