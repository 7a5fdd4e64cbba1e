#!/usr/bin/env bash
# Functions from source against the Bad Lambda design, in one run on this machine.
#
# For a hello handler in Ruby, Python and JavaScript ({"name": "Ada"} in, {"hello": "Ada"} out):
#   kiln-<lang>   Kiln sync invoke of the handler deployed from source (snapshot, pooled instance)
#   bad-<lang>    a process per request running the same handler with the native interpreter
#                 (`ruby`, `python3`, `node`): fork-exec (src/bin/fork_exec.rs), body in, stdout out
#   kiln-rust     Kiln sync invoke of the Rust SDK hello (guests/hello, wasm32-wasip1)
# each at c=32 (throughput) and c=1 (latency), with wrk (POST {"name": "Ada"}). Also each source
# deploy's time (build + snapshot + compile) and its first invoke after deploy.
# Servers are pinned to CPU 0, wrk to CPU 1. Prints a Markdown table and writes it to
# benches/results/languages-latest.md.
#
# Usage: benches/languages.sh [--quick]    (full: 10 s per run; --quick: 3 s)
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE RUST_LIB_BACKTRACE
secs=10
[[ ${1:-} == --quick ]] && secs=3

for tool in wrk ruby node python3 taskset curl; do
  command -v "$tool" >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk ruby nodejs curl util-linux
    break
  }
done
guests/runtimes/build.sh install
cargo build --release -p kiln -p kiln-bench
(cd guests && cargo build --release --target wasm32-wasip1 -p hello)

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
base=${BENCH_PORT_BASE:-17890}
kiln_addr=127.0.0.1:$base fork_addr=127.0.0.1:$((base + 1))
wait_for() {
  for _ in $(seq 400); do
    kill -0 "$2" 2>/dev/null || { echo "the server for $1 exited" >&2; exit 1; }
    curl -fsS -o /dev/null -X POST -d '{"name":"Ada"}' "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "server at $1 did not start" >&2; exit 1
}

# The same handler in each language, and a runner per language for the process-per-request design.
mkdir -p "$work/src"
printf 'def handler(event)\n  { hello: event["name"] }\nend\n' >"$work/src/handler.rb"
printf 'def handler(event):\n    return {"hello": event["name"]}\n' >"$work/src/handler.py"
printf 'export default function handler(event) {\n  return { hello: event.name };\n}\n' >"$work/src/handler.mjs"
printf 'require "json"\nload ARGV[0]\nputs JSON.generate(handler(JSON.parse(STDIN.read)))\n' >"$work/src/run.rb"
printf 'import json, sys, runpy\nh = runpy.run_path(sys.argv[1])["handler"]\nprint(json.dumps(h(json.load(sys.stdin))))\n' >"$work/src/run.py"
printf 'import { readFileSync } from "node:fs";\nconst { default: handler } = await import(process.argv[2]);\nconsole.log(JSON.stringify(await handler(JSON.parse(readFileSync(0, "utf8")))));\n' >"$work/src/run.mjs"

cat >"$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"name":"Ada"}'
local token = os.getenv("KILN_TOKEN")
if token then wrk.headers["Authorization"] = "Bearer " .. token end
done = function(summary, latency, requests)
  local f = assert(io.open(os.getenv("BENCH_OUT"), "a"))
  f:write(string.format("%s %d %.1f %.3f %.3f %d\n", os.getenv("BENCH_SYSTEM"), tonumber(os.getenv("BENCH_C")),
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout + summary.errors.status))
  f:close()
end
LUA
out=$work/runs.txt
bench() { # bench SYSTEM URL
  for c in 32 1; do
    BENCH_OUT=$out BENCH_SYSTEM=$1 BENCH_C=$c taskset -c 1 wrk -t1 -c$c -d${secs}s --timeout 10s -s "$work/post.lua" "$2" >/dev/null
    tail -1 "$out" | awk '{printf "  %-12s c=%-3s %10s req/s  p50 %8s ms  p99 %8s ms%s\n", $1, $2, $3, $4, $5, ($6 > 0 ? "  (" $6 " errors)" : "")}'
  done
}

taskset -c 0 target/release/kiln serve --listen $kiln_addr --data "$work/data" 2>"$work/kiln.log" &
kiln=$!; pids+=("$kiln")
for _ in $(seq 400); do curl -fsS -o /dev/null http://$kiln_addr/healthz 2>/dev/null && break; sleep 0.05; done
export KILN_TOKEN
KILN_TOKEN=$(cat "$work/data/admin.token")
deploys=$work/deploys.txt
deploy() { # deploy NAME FILE: the PUT's time, then the first invoke's
  local put first
  put=$(curl -fsS -o /dev/null -w '%{time_total}' -X PUT -H "Authorization: Bearer $KILN_TOKEN" -F "code=@$2" \
    "http://$kiln_addr/v1/functions/$1")
  first=$(curl -fsS -o /dev/null -w '%{time_total}' -X POST -H "Authorization: Bearer $KILN_TOKEN" -d '{"name":"Ada"}' \
    "http://$kiln_addr/v1/functions/$1/invoke")
  echo "$1 $put $first" >>"$deploys"
  echo "  deployed $1 in $put s; first invoke $first s"
}
echo "== Kiln ($secs s per run; server on CPU 0, wrk on CPU 1)"
deploy kiln-rust guests/target/wasm32-wasip1/release/hello.wasm
for lang in rb py mjs; do deploy "kiln-$lang" "$work/src/handler.$lang"; done
# A second deploy of each language: the interpreter's instrumented module is compiled by then.
for lang in rb py mjs; do deploy "kiln-$lang-again" "$work/src/handler.$lang"; done
for system in kiln-rust kiln-rb kiln-py kiln-mjs; do bench $system http://$kiln_addr/v1/functions/$system/invoke; done
stop "$kiln"

echo "== Bad Lambda: a process per request, the native interpreter"
for lang in rb py mjs; do
  case $lang in rb) cmd=(ruby) ;; py) cmd=(python3) ;; mjs) cmd=(node) ;; esac
  taskset -c 0 target/release/fork-exec $fork_addr "${cmd[@]}" "$work/src/run.$lang" "$work/src/handler.$lang" 2>/dev/null &
  fork=$!; pids+=("$fork")
  wait_for http://$fork_addr/ "$fork"
  bench "bad-$lang" http://$fork_addr/
  stop "$fork"
done

versions="$(ruby --version | cut -d' ' -f1-2), $(python3 --version), node $(node --version)"
report=benches/results/languages-latest.md
{
  echo "# Functions from source vs a process per request — $(date -u +%Y-%m-%dT%H:%MZ), \`benches/languages.sh\` ($secs s runs)"
  echo
  echo "Load at start: $(cut -d' ' -f1-3 /proc/loadavg). Natives: $versions. Commit $(git rev-parse --short HEAD)."
  echo
  echo "| language | Kiln req/s c=32 | Bad Lambda req/s c=32 | ratio | Kiln p50/p99 ms c=1 | Bad Lambda p50/p99 ms c=1 | Kiln vs Rust SDK req/s | deploy s (first / again) | first invoke ms |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  awk -v deploys="$deploys" '
    BEGIN { while ((getline line < deploys) > 0) { split(line, d, " "); put[d[1]] = d[2]; first[d[1]] = d[3] } }
    { rps[$1 " " $2] = $3; p50[$1 " " $2] = $4; p99[$1 " " $2] = $5 }
    END {
      split("rb py mjs", langs, " "); split("Ruby Python JavaScript", names, " ")
      rust = rps["kiln-rust 32"]
      for (i = 1; i <= 3; i++) {
        l = langs[i]; k = "kiln-" l; b = "bad-" l
        printf "| %s | %.0f | %.1f | %.0fx | %.3f / %.3f | %.1f / %.1f | %.2f | %.1f / %.1f | %.1f |\n", names[i],
          rps[k " 32"], rps[b " 32"], rps[k " 32"] / rps[b " 32"], p50[k " 1"], p99[k " 1"], p50[b " 1"], p99[b " 1"],
          rps[k " 32"] / rust, put[k], put[k "-again"], first[k] * 1000
      }
      printf "| Rust SDK hello | %.0f | | | %.3f / %.3f | | 1 | %.3f | %.1f |\n", rust, p50["kiln-rust 1"], p99["kiln-rust 1"],
        put["kiln-rust"], first["kiln-rust"] * 1000
    }' "$out"
} >"$report"
echo
cat "$report"
