#!/usr/bin/env bash
# Kiln's benchmark: every system measured in the same run on this machine, reported as ratios.
#
# Systems (same trivial work: a 2-byte POST in, a short greeting or echo out):
#   bare-hyper        hyper answering a fixed body (the HTTP ceiling here)
#   kiln-sync         Kiln sync invoke of guests/wat/hello.wat
#   kiln-lambda       the same through Lambda's API (SigV4-signed, verified per request)
#   kiln-snapshot     Kiln sync invoke of guests/wat/snapshot.wat (~0.3 s of init, run from its snapshot)
#   kiln-trigger      Kiln HTTP trigger, guests/http-hello (a wasi:http/proxy component)
#   kiln-sandbox      Kiln sandbox ingress, the same component (one live instance, no instantiation)
#   wasmtime-serve    `wasmtime serve` 48.0.8 of the same component
#   http-floor        the same component behind the least a wasmtime + hyper server can do
#                     (src/bin/http_floor.rs: no auth, limits, timeout, log or metrics)
#   fork-exec         a process per request (/bin/cat: body in, body out)
#   wasmtime-run      `wasmtime run` of hello (precompiled) per request
#   kiln-async-submit Kiln async submits (202 once on disk), then drained end to end
# Scenarios: c32 (throughput, wrk -c32), c1 (latency p50/p99/p99.9, wrk -c1), cold first invoke
# after deploy vs warm, deploy time (small and large module), N functions round-robin (10 vs N),
# resident memory per idle function, a 4 MiB sandbox suspended and resumed, 1,000 sandboxes
# suspended and resumed (resident memory), and Kiln's invoke path vs raw wasmtime in process.
# Servers are pinned to CPU 0, load generators to CPU 1.
#
# Writes benches/results/<UTC stamp>.json, latest.json, latest.md (printed) and latest.svg.
#
# Usage: benches/run.sh [--quick | --smoke]
#   full (default): 15 s per c32 run, 10 s per c1 run, 10,000 functions     (~6-8 min after builds)
#   --quick:         5 s / 3 s, 1,000 functions                              (< 5 min after builds)
#   --smoke:         1 s / 1 s, 100 functions: checks the harness, numbers mean nothing
# The first run also builds release binaries and installs wasmtime-cli 48.0.8 into benches/.tools
# (~15 minutes of both cores, once); neither counts in the times above.
set -euo pipefail
cd "$(dirname "$0")/.."
# Servers run as deployed: without RUST_BACKTRACE (a shell that sets it makes every error inside
# wasmtime walk the stack; `wasmtime serve` creates one per request, which would skew the peer).
unset RUST_BACKTRACE RUST_LIB_BACKTRACE

mode=full
case "${1:-}" in
  "") ;;
  --quick) mode=quick ;;
  --smoke) mode=smoke ;;
  *) echo "usage: benches/run.sh [--quick | --smoke]" >&2; exit 2 ;;
esac
case $mode in
  full)  c32=15s; c1=10s; functions=10000; fn_secs=15; cold_reps=200; small_reps=50; large_reps=10; iterations=20000
         sandbox_reps=200; sandboxes=1000 ;;
  quick) c32=5s;  c1=3s;  functions=1000;  fn_secs=5;  cold_reps=50;  small_reps=10; large_reps=3;  iterations=5000
         sandbox_reps=50; sandboxes=1000 ;;
  smoke) c32=1s;  c1=1s;  functions=100;   fn_secs=1;  cold_reps=5;   small_reps=2;  large_reps=1;  iterations=1000
         sandbox_reps=5; sandboxes=50 ;;
esac
large_functions=4000
connections=32
kiln_flags=(--max-queued 10000000)

started=$(date -u +%s)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n "$(git status --porcelain 2>/dev/null | grep -v ' benches/results/' || true)" ]] && commit="$commit+dirty"

# What the bench needs, installed if missing (idempotent; CI never runs this script).
if ! rustup target list --installed | grep -qx wasm32-wasip2; then rustup target add wasm32-wasip2; fi
for tool in wrk curl taskset; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk curl util-linux
    break
  fi
done
cargo build --release -p kiln -p kiln-bench
(cd guests && cargo build --release --target wasm32-wasip2 -p http-hello -p http-counter)
http_hello=guests/target/wasm32-wasip2/release/http-hello.wasm
http_counter=guests/target/wasm32-wasip2/release/http-counter.wasm
# The peer for HTTP triggers and per-request runs: wasmtime-cli of the same wasmtime release,
# built once into benches/.tools (git-ignored; ~15 minutes of 2 cores the first time).
wasmtime=benches/.tools/bin/wasmtime
if ! "$wasmtime" --version 2>/dev/null | grep -q "^wasmtime 48.0.8"; then
  cargo install --locked wasmtime-cli --version 48.0.8 --root benches/.tools
fi
built=$(date -u +%s)

work=$(mktemp -d)
raw=$work/raw.jsonl
touch "$raw"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
# Loopback ports base..base+6 (BENCH_PORT_BASE, default 17870); each must be free, so that a
# server someone else left running is never measured in place of ours.
base=${BENCH_PORT_BASE:-17870}
hyper_addr=127.0.0.1:$base kiln_addr=127.0.0.1:$((base + 1)) fleet_addr=127.0.0.1:$((base + 2))
serve_addr=127.0.0.1:$((base + 3)) fork_addr=127.0.0.1:$((base + 4)) run_addr=127.0.0.1:$((base + 5))
floor_addr=127.0.0.1:$((base + 6))
for port in $(seq "$base" $((base + 6))); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use; free it or set BENCH_PORT_BASE" >&2; exit 1
  fi
done
# wait_for URL PID: until the server answers, failing if its process has exited.
wait_for() {
  for _ in $(seq 400); do
    kill -0 "$2" 2>/dev/null || { echo "the server for $1 exited" >&2; exit 1; }
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "server at $1 did not start" >&2; exit 1
}

# wrk posts "{}" and, when the run ends, appends one record (see benches/src/record.rs).
cat >"$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = "{}"
local token = os.getenv("KILN_TOKEN")
if token then wrk.headers["Authorization"] = "Bearer " .. token end
-- Lambda's API: one SigV4 signature of this request, valid for 15 minutes; Kiln checks it whole
-- on every request (the signature, its scope and time, the body's SHA-256).
local aws = os.getenv("BENCH_AWS_AUTHORIZATION")
if aws then
  wrk.headers["Authorization"] = aws
  wrk.headers["X-Amz-Date"] = os.getenv("BENCH_AWS_DATE")
end
done = function(summary, latency, requests)
  local e = summary.errors
  local ms = function(us) return us / 1000 end
  local f = assert(io.open(os.getenv("BENCH_RAW"), "a"))
  f:write(string.format(
    '{"scenario":"%s","system":"%s","label":"%s","connections":%d,"duration_s":%.3f,' ..
    '"requests":%d,"rps":%.1f,"errors":%d,"non_2xx":%d,"p50_ms":%.3f,"p90_ms":%.3f,' ..
    '"p99_ms":%.3f,"p999_ms":%.3f,"mean_ms":%.3f,"max_ms":%.3f}\n',
    os.getenv("BENCH_SCENARIO"), os.getenv("BENCH_SYSTEM"), os.getenv("BENCH_LABEL"),
    tonumber(os.getenv("BENCH_CONNECTIONS")), summary.duration / 1e6, summary.requests,
    summary.requests / (summary.duration / 1e6), e.connect + e.read + e.write + e.timeout, e.status,
    ms(latency:percentile(50)), ms(latency:percentile(90)), ms(latency:percentile(99)),
    ms(latency:percentile(99.9)), ms(latency.mean), ms(latency.max)))
  f:close()
end
LUA

# bench SYSTEM LABEL URL: the c=32 run, then the c=1 run (unless C1=0), wrk on CPU 1.
bench() {
  local system=$1 label=$2 url=$3
  for scenario in c32 c1; do
    [[ $scenario == c1 && ${C1:-1} == 0 ]] && continue
    local c=$connections duration=$c32
    [[ $scenario == c1 ]] && { c=1; duration=$c1; }
    BENCH_RAW=$raw BENCH_SCENARIO=$scenario BENCH_SYSTEM=$system BENCH_LABEL=$label BENCH_CONNECTIONS=$c \
      taskset -c 1 wrk -t1 -c"$c" -d"$duration" --timeout 10s -s "$work/post.lua" "$url" >"$work/wrk.txt"
    tail -1 "$raw" | awk -v s="$system" -v sc="$scenario" -F'[:,]' \
      '{for (i = 1; i < NF; i++) { if ($i ~ /"rps"/) r = $(i+1); if ($i ~ /"p99_ms"/) p = $(i+1); if ($i ~ /"errors"|"non_2xx"/) e += $(i+1) }
        printf "  %-18s %-4s %10s req/s  p99 %8s ms%s\n", s, sc, r, p, (e > 0 ? "  (" e " errors)" : "") }'
  done
}

echo "== HTTP systems ($mode: c=$connections for $c32, c=1 for $c1; servers on CPU 0, wrk on CPU 1)"
taskset -c 0 target/release/bare-hyper $hyper_addr 2>/dev/null &
hyper=$!; pids+=("$hyper")
wait_for http://$hyper_addr/ "$hyper"
bench bare-hyper "bare hyper (fixed body)" http://$hyper_addr/
stop "$hyper"

taskset -c 0 target/release/kiln serve --listen $kiln_addr --data "$work/data" "${kiln_flags[@]}" 2>"$work/kiln.log" &
kiln=$!; pids+=("$kiln")
wait_for http://$kiln_addr/healthz "$kiln"
export KILN_TOKEN
KILN_TOKEN=$(cat "$work/data/admin.token")
put() { curl -fsS -o /dev/null -X PUT -H "Authorization: Bearer $KILN_TOKEN" --data-binary @"$2" "http://$3/v1/functions/$1"; }
put hello guests/wat/hello.wat $kiln_addr
bench kiln-sync "Kiln sync invoke, hello.wat" http://$kiln_addr/v1/functions/hello/invoke
# The same function through Lambda's API, with an access key and a signature made here.
aws_key=$(curl -fsS -X POST -H "Authorization: Bearer $KILN_TOKEN" --data '{"kind":"aws"}' http://$kiln_addr/v1/tokens)
eval "$(python3 benches/sigv4.py "$aws_key" POST "$kiln_addr" /2015-03-31/functions/hello/invocations '{}')"
BENCH_AWS_AUTHORIZATION=$aws_authorization BENCH_AWS_DATE=$aws_date \
  bench kiln-lambda "Lambda API invoke (SigV4), hello.wat" http://$kiln_addr/2015-03-31/functions/hello/invocations
put warm guests/wat/snapshot.wat $kiln_addr
bench kiln-snapshot "Kiln sync invoke, 0.3 s-init guest from its snapshot" http://$kiln_addr/v1/functions/warm/invoke
put web "$http_hello" $kiln_addr
bench kiln-trigger "Kiln HTTP trigger, http-hello (wasi:http)" http://$kiln_addr/fn/web/
sandbox=$(curl -fsS -X POST -H "Authorization: Bearer $KILN_TOKEN" --data '{"function":"web"}' \
  http://$kiln_addr/v1/sandboxes | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
bench kiln-sandbox "Kiln sandbox ingress, http-hello (one live instance)" http://$kiln_addr/sbx/$sandbox/

# Async: submits for the c32 duration, then the time until every accepted invocation has run.
metric() { curl -fsS http://$kiln_addr/metrics | awk -v m="$1" 'index($0, m " ") == 1 {v = $2} END {print v + 0}'; }
before=$(metric 'kiln_async_invocations_total{outcome="success"}')
async_start=$(date +%s.%N)
C1=0 bench kiln-async-submit "Kiln async submit (202 once on disk)" http://$kiln_addr/v1/functions/hello/invoke-async
while [[ "$(metric kiln_async_queue_depth)" != "0" ]]; do sleep 0.1; done
async_end=$(date +%s.%N)
completed=$(( $(metric 'kiln_async_invocations_total{outcome="success"}') - before ))
awk -v c="$completed" -v t0="$async_start" -v t1="$async_end" 'BEGIN {
  printf "{\"scenario\":\"async\",\"system\":\"kiln-async\",\"label\":\"Kiln async, submitted then drained\",\"completed\":%d,\"seconds\":%.3f,\"e2e_rps\":%.1f}\n", c, t1 - t0, c / (t1 - t0) }' >>"$raw"
stop "$kiln"

# `wasmtime serve` on the same component (Rust's std needs -Scli).
taskset -c 0 "$wasmtime" serve -Scli --addr $serve_addr "$http_hello" 2>"$work/wasmtime.log" &
serve=$!; pids+=("$serve")
wait_for http://$serve_addr/ "$serve"
bench wasmtime-serve "wasmtime serve 48.0.8, http-hello" http://$serve_addr/
stop "$serve"

# The floor: the same component, fresh pooled instance per request, nothing else.
taskset -c 0 target/release/http-floor "$http_hello" --serve $floor_addr 2>/dev/null &
floor=$!; pids+=("$floor")
wait_for http://$floor_addr/ "$floor"
bench http-floor "wasmtime + hyper floor (nothing but the instance), http-hello" http://$floor_addr/
stop "$floor"

# A process per request: native, then a Wasm runtime started per request (code precompiled, so
# the cost is process start and instantiation, not compilation).
taskset -c 0 target/release/fork-exec $fork_addr /bin/cat 2>/dev/null &
fork=$!; pids+=("$fork")
wait_for http://$fork_addr/ "$fork"
bench fork-exec "fork/exec per request (/bin/cat)" http://$fork_addr/
stop "$fork"
"$wasmtime" compile guests/wat/hello.wat -o "$work/hello.cwasm"
taskset -c 0 target/release/fork-exec $run_addr "$wasmtime" run --allow-precompiled "$work/hello.cwasm" 2>/dev/null &
fork=$!; pids+=("$fork")
wait_for http://$run_addr/ "$fork"
bench wasmtime-run "wasmtime run per request (hello, precompiled)" http://$run_addr/
stop "$fork"

echo "== Functions, memory, cold start, deploy (a fresh Kiln on CPU 0, the driver on CPU 1)"
taskset -c 0 target/release/kiln serve --listen $fleet_addr --data "$work/fleet" "${kiln_flags[@]}" 2>"$work/fleet.log" &
fleet=$!; pids+=("$fleet")
wait_for http://$fleet_addr/healthz "$fleet"
KILN_TOKEN=$(cat "$work/fleet/admin.token")
scenarios() { taskset -c 1 target/release/scenarios --addr $fleet_addr --out "$raw" "$@"; }
scenarios functions --count "$functions" --duration "$fn_secs" --connections "$connections" --kiln-pid "$fleet"
scenarios cold --reps "$cold_reps" --warm 20
scenarios deploy --small-reps "$small_reps" --large-reps "$large_reps" --large-functions "$large_functions"
stop "$fleet"

echo "== Sandboxes: suspend/resume of 4 MiB, then $sandboxes sandboxes (a fresh Kiln on CPU 0)"
taskset -c 0 target/release/kiln serve --listen $fleet_addr --data "$work/sandboxes" "${kiln_flags[@]}" \
  --max-sandboxes $((sandboxes + 10)) --max-instances $((4 * sandboxes + 100)) 2>"$work/sandboxes.log" &
fleet=$!; pids+=("$fleet")
wait_for http://$fleet_addr/healthz "$fleet"
KILN_TOKEN=$(cat "$work/sandboxes/admin.token")
scenarios sandboxes --component "$http_counter" --reps "$sandbox_reps" --count "$sandboxes" --kiln-pid "$fleet"
stop "$fleet"

echo "== In process, no HTTP (CPU 0)"
taskset -c 0 target/release/instantiate guests/wat/hello.wat "$iterations" --out "$raw" | tail -1

echo
target/release/report --raw "$raw" --out-dir benches/results --stamp "$stamp" --started-unix "$started" \
  --meta mode="$mode" --meta git_commit="$commit" --meta load_at_start="$load_at_start" \
  --meta "load generator=wrk -t1 (c32: -c$connections -d$c32; c1: -c1 -d$c1), POST {} ; scenarios: hyper client, keep-alive" \
  --meta "pinning=servers on CPU 0 (taskset -c 0), load generators on CPU 1" \
  --meta "kiln flags=${kiln_flags[*]} (defaults otherwise: --max-instances 1000)" \
  --meta "functions scenario=$functions functions (distinct code), $connections connections, $fn_secs s per set" \
  --meta "cold and deploy=$cold_reps cold functions x 20 warm invokes; deploys: $small_reps small, $large_reps large ($large_functions functions)"
ended=$(date -u +%s)
echo "run took $(( ended - started )) s: $(( built - started )) s of builds and installs, $(( ended - built )) s measuring"
