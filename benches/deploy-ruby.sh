#!/usr/bin/env bash
# Deploy time of a Ruby hello with and without Cranelift's incremental compilation cache
# (<data>/incremental/), through one `kiln serve` on a fresh data directory:
#   cold            the first Ruby deploy (compiles everything, fills the cache)
#   warm            another handler, same process
#   warm, restarted another handler after a restart (the cache is on disk)
#   cold, restarted another handler after a restart with the cache deleted
# Each handler differs, so none is an idempotent redeploy. Prints one line per deploy.
#
# Usage: benches/deploy-ruby.sh [path/to/kiln]   (default: target/release/kiln, built if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/kiln}
[[ -x $bin ]] || cargo build --release -p kiln
runtime/scripts/setup.sh >/dev/null
data=$(mktemp -d)
port=$((20000 + RANDOM % 10000))
trap 'kill $pid 2>/dev/null; rm -rf "$data"' EXIT
start() {
  "$bin" serve --listen "127.0.0.1:$port" --data "$data" >>"$data/log" 2>&1 &
  pid=$!
  until curl -sf "127.0.0.1:$port/healthz" >/dev/null; do kill -0 $pid; sleep 0.1; done
}
stop() { kill $pid; wait $pid 2>/dev/null || true; }
deploy() {
  printf 'def handler(event)\n  {"hello" => "%s"}\nend\n' "$1" >"$data/handler.rb"
  local started=$EPOCHREALTIME status
  status=$(curl -s -o "$data/answer" -w '%{http_code}' -X PUT -H "Authorization: Bearer $(cat "$data/admin.token")" \
    -F "code=@$data/handler.rb" "127.0.0.1:$port/v1/functions/$1")
  [[ $status == 201 ]] || { echo "deploy $1: $status $(cat "$data/answer")" >&2; exit 1; }
  printf '%-18s %6.1f s\n' "$2" "$(echo "$EPOCHREALTIME - $started" | bc)"
}
echo "Ruby hello deploys, $bin, $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg)"
start
deploy a "cold"
deploy b "warm"
stop; start
deploy c "warm, restarted"
stop; rm -rf "$data/incremental"; start
deploy d "cold, restarted"
echo "cache: $(du -sh "$data/incremental" | cut -f1)"
