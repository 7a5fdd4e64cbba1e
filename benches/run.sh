#!/usr/bin/env bash
# Kiln's benchmark, every system measured in the same run on this machine:
#   - bare hyper answering a fixed body (the HTTP ceiling here);
#   - Kiln sync invoke of a trivial guest (guests/wat/hello.wat);
#   - Kiln sync invoke of a guest with ~0.3 s of init, served from its snapshot (snapshot.wat);
#   - Kiln HTTP trigger (guests/http-hello, a wasi:http/proxy component) next to `wasmtime serve`
#     (wasmtime-cli 48.0.8) serving the same component;
#   - async: submits (202 once on disk) and the end-to-end rate until every accepted one has run;
#   - in process, no HTTP: Kiln's invoke path next to raw wasmtime (benches/src/bin/instantiate.rs).
# Servers are pinned to CPU 0 and wrk to CPU 1, so the HTTP numbers compare servers on one core.
# Prints req/s and latency percentiles, and the ratios SPECIFICATION.md promises.
#
# Usage: benches/run.sh [--quick]      (quick: 5 s per run instead of 15 s)
set -euo pipefail
cd "$(dirname "$0")/.."

duration=15s
[[ "${1:-}" == "--quick" ]] && duration=5s
connections=32

runtime/scripts/setup.sh
if ! command -v wrk >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk
fi
cargo build --release -p kiln -p kiln-bench
(cd guests && cargo build --release --target wasm32-wasip2 -p http-hello)
http_hello=guests/target/wasm32-wasip2/release/http-hello.wasm
# The peer for HTTP triggers: `wasmtime serve` of the same wasmtime release, built once into
# benches/.tools (git-ignored; ~15 minutes of 2 cores the first time).
wasmtime=benches/.tools/bin/wasmtime
if ! "$wasmtime" --version 2>/dev/null | grep -q "^wasmtime 48.0.8"; then
  cargo install --locked wasmtime-cli --version 48.0.8 --root benches/.tools
fi
iterations=20000
[[ "${1:-}" == "--quick" ]] && iterations=5000

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

cat >"$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = "{}"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("KILN_TOKEN")
LUA

# Runs wrk and prints "req/s p50_ms p99_ms".
drive() {
  local url=$1
  taskset -c 1 wrk -t1 -c"$connections" -d"$duration" --latency -s "$work/post.lua" "$url" >"$work/wrk.txt"
  awk '
    /Requests\/sec/ {rps=$2}
    /^ +50%/ {p50=$2} /^ +99%/ {p99=$2}
    /Non-2xx/ {print "non-2xx responses: " $0 > "/dev/stderr"; bad=1}
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    END { printf "%.0f %.3f %.3f\n", rps, ms(p50), ms(p99); exit bad }' "$work/wrk.txt"
}

wait_for() { for _ in $(seq 100); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "server at $1 did not start" >&2; exit 1; }

# Bare hyper.
taskset -c 0 target/release/bare-hyper 127.0.0.1:7979 2>/dev/null &
pids+=($!)
wait_for http://127.0.0.1:7979/
read -r hyper_rps hyper_p50 hyper_p99 < <(KILN_TOKEN=none drive http://127.0.0.1:7979/)

# Kiln with the trivial guest (a queue large enough that the async run never gets 429).
taskset -c 0 target/release/kiln serve --listen 127.0.0.1:7878 --data "$work/data" --max-queued 10000000 2>"$work/kiln.log" &
pids+=($!)
wait_for http://127.0.0.1:7878/healthz
export KILN_TOKEN=$(cat "$work/data/admin.token")
curl -fsS -X PUT -H "Authorization: Bearer $KILN_TOKEN" --data-binary @guests/wat/hello.wat \
  http://127.0.0.1:7878/v1/functions/hello >/dev/null
read -r kiln_rps kiln_p50 kiln_p99 < <(drive http://127.0.0.1:7878/v1/functions/hello/invoke)
curl -fsS -X PUT -H "Authorization: Bearer $KILN_TOKEN" --data-binary @guests/wat/snapshot.wat \
  http://127.0.0.1:7878/v1/functions/warm >/dev/null
read -r warm_rps warm_p50 warm_p99 < <(drive http://127.0.0.1:7878/v1/functions/warm/invoke)
curl -fsS -X PUT -H "Authorization: Bearer $KILN_TOKEN" --data-binary @"$http_hello" \
  http://127.0.0.1:7878/v1/functions/web >/dev/null
read -r trigger_rps trigger_p50 trigger_p99 < <(drive http://127.0.0.1:7878/fn/web/)

# Async: submits for $duration, then the time until every accepted invocation has run.
queue_depth() { curl -fsS http://127.0.0.1:7878/metrics | awk '/^kiln_async_queue_depth/ {print $2}'; }
successes() { curl -fsS http://127.0.0.1:7878/metrics | awk '/^kiln_async_invocations_total\{outcome="success"\}/ {print $2}'; }
before=$(successes)
async_start=$(date +%s.%N)
read -r submit_rps submit_p50 submit_p99 < <(drive http://127.0.0.1:7878/v1/functions/hello/invoke-async)
while [[ "$(queue_depth)" != "0" ]]; do sleep 0.1; done
async_end=$(date +%s.%N)
completed=$(( $(successes) - before ))

# `wasmtime serve` on the same component, same core, same load (Rust's std needs -Scli).
taskset -c 0 "$wasmtime" serve -Scli --addr 127.0.0.1:8081 "$http_hello" 2>"$work/wasmtime.log" &
pids+=($!)
wait_for http://127.0.0.1:8081/
read -r serve_rps serve_p50 serve_p99 < <(drive http://127.0.0.1:8081/)

printf '\n%-34s %10s %10s %10s\n' "system (c=$connections, $duration)" "req/s" "p50 ms" "p99 ms"
printf '%-34s %10s %10s %10s\n' "bare hyper" "$hyper_rps" "$hyper_p50" "$hyper_p99"
printf '%-34s %10s %10s %10s\n' "kiln sync invoke (hello)" "$kiln_rps" "$kiln_p50" "$kiln_p99"
printf '%-34s %10s %10s %10s\n' "kiln sync invoke (0.3 s init)" "$warm_rps" "$warm_p50" "$warm_p99"
printf '%-34s %10s %10s %10s\n' "kiln http trigger (wasi:http)" "$trigger_rps" "$trigger_p50" "$trigger_p99"
printf '%-34s %10s %10s %10s\n' "wasmtime serve (same component)" "$serve_rps" "$serve_p50" "$serve_p99"
printf '%-34s %10s %10s %10s\n' "kiln async submit (202 on disk)" "$submit_rps" "$submit_p50" "$submit_p99"
awk -v k="$kiln_rps" -v h="$hyper_rps" -v kp="$kiln_p99" -v hp="$hyper_p99" -v w="$warm_rps" \
  -v c="$completed" -v tr="$trigger_rps" -v sr="$serve_rps" -v tp="$trigger_p99" -v sp="$serve_p99" -v t0="$async_start" -v t1="$async_end" -v s="$submit_rps" \
  'BEGIN { printf "\nkiln / bare hyper: req/s %.2fx, p99 %.2fx\nsnapshot guest / trivial guest: req/s %.2fx\n", k/h, kp/hp, w/k;
           printf "kiln http trigger / wasmtime serve: req/s %.2fx, p99 %.2fx\n", tr/sr, tp/sp;
           a = c / (t1 - t0);
           printf "async: %d invocations submitted and run in %.1f s = %.0f/s end to end, %.2fx the sync req/s\n", c, t1 - t0, a, a/k }'

echo
taskset -c 0 target/release/instantiate guests/wat/hello.wat "$iterations"
