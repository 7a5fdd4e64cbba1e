#!/usr/bin/env bash
# Durability of asynchronous invocations under kill -9, at scale: R rounds; in each round 32
# clients submit without pause, and once the round has its share of 202s (N/R) the server is
# killed with SIGKILL a random 0-300 ms later, while submits and runs are in flight, then restarted
# on the same data directory. At the end, every id that got a 202 must reach `succeeded` with its
# own input echoed back. Prints accepted, lost, duplicates.
#
# Usage: benches/async_crash.sh [N] [R]     (defaults: 20000 accepted over 100 restarts)
set -euo pipefail
cd "$(dirname "$0")/.."
total=${1:-20000}
rounds=${2:-100}
per_round=$(( total / rounds ))
addr=127.0.0.1:7899

cargo build --release -p kiln >/dev/null 2>&1 || cargo build --release -p kiln
work=$(mktemp -d)
trap 'pkill -f "kiln serve --listen $addr" 2>/dev/null || true; rm -rf "$work"' EXIT
data=$work/data
start() {
  target/release/kiln serve --listen $addr --data "$data" --max-queued 10000000 2>>"$work/kiln.log" &
  for _ in $(seq 600); do curl -fsS "http://$addr/healthz" >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "kiln did not start within 30 s; its log ends with:" >&2; tail -20 "$work/kiln.log" >&2; exit 1
}

start
token=$(cat "$data/admin.token")
curl -fsS -X PUT -H "Authorization: Bearer $token" --data-binary @guests/wat/echo.wat \
  "http://$addr/v1/functions/echo" >/dev/null

submit_one() {  # prints "id input" for a 202, nothing otherwise
  local input=$1 out
  out=$(curl -s -m 10 -X POST -H "Authorization: Bearer $token" --data "$input" \
    -w '\n%{http_code}' "http://$addr/v1/functions/echo/invoke-async" 2>/dev/null) || return 0
  [[ "${out##*$'\n'}" == 202 ]] || return 0
  local id=${out#*\"id\":\"}; echo "${id%%\"*} $input"
}
export -f submit_one; export token addr

touch "$work/accepted"
for round in $(seq "$rounds"); do
  quota=$(( round * per_round ))
  seq 1000000000 | sed "s/^/r$round-/" | xargs -P 32 -I{} bash -c 'submit_one {}' >>"$work/accepted" &
  feeder=$!
  while (( $(wc -l <"$work/accepted") < quota )); do sleep 0.02; done
  sleep "$(printf '0.%03d' $(( RANDOM % 300 )))"
  pkill -9 -f "kiln serve --listen $addr" || true
  # The listening socket closes only once the killed process is gone.
  while pgrep -f "kiln serve --listen $addr" >/dev/null; do sleep 0.01; done
  kill "$feeder" 2>/dev/null || true
  wait "$feeder" 2>/dev/null || true
  start
done

accepted=$(wc -l <"$work/accepted")
echo "accepted $accepted over $rounds kill -9 restarts; waiting for all to finish"
for _ in $(seq 600); do
  depth=$(curl -fsS "http://$addr/metrics" | awk '/^kiln_async_queue_depth/ {print $2}')
  [[ "$depth" == 0 ]] && break
  sleep 0.5
done
lost=0
while read -r id input; do
  record=$(curl -fsS -H "Authorization: Bearer $token" "http://$addr/v1/invocations/$id" || echo '{}')
  url=$(sed -n 's/.*"result_url":"\([^"]*\)".*/\1/p' <<<"$record")
  if [[ -z "$url" ]] || [[ "$(curl -fsS "http://$addr$url")" != "$input" ]]; then
    lost=$(( lost + 1 )); echo "lost: $id ($input): $record" >&2
  fi
done <"$work/accepted"
dupes=$(awk '{print $1}' "$work/accepted" | sort | uniq -d | wc -l)
echo "accepted=$accepted lost=$lost duplicate_ids=$dupes"
[[ $lost -eq 0 && $dupes -eq 0 ]]
