#!/usr/bin/env bash
# Hostile clients against Kiln (issue 16): sockets that never speak, slowloris, h2 stream floods,
# h2 rapid-reset floods (CVE-2023-44487), oversized headers, then all of them at once, while one
# real client sends GET /healthz on a fresh connection after another and measures p50/p99/max.
# The attackers reconnect whenever the server closes them (src/bin/attack.rs has the details).
#
# The server is a release `kiln serve` on a fresh data directory, pinned to CPU 0, with the
# issue's settings: --max-connections 50 --header-read-timeout-ms 2000 (KILN_ATTACK_FLAGS replaces
# them); the driver is pinned to CPU 1. Every client, hostile or not, comes from 127.0.0.1, the
# worst case for the per-address cap (a quarter of 50: 13 slots for everyone).
#
# Usage: benches/attack.sh [--seconds N] [--sockets N] [--drip-ms MS] [--h2 N] [SCENARIO...]
#   (arguments go to the driver; default: 10 s per scenario, 400 idle and 400 slowloris sockets)
# Prints the table, the server's open fds before and after, and its warnings.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in curl taskset; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl util-linux
    break
  fi
done
# BENCH_PROFILE=debug measures a debug build (same logic, slower code); BENCH_NO_BUILD=1 uses the
# binaries already built.
profile=${BENCH_PROFILE:-release}
if [[ -z ${BENCH_NO_BUILD:-} ]]; then
  if [[ $profile == release ]]; then cargo build --release -p kiln -p kiln-bench; else cargo build -p kiln -p kiln-bench; fi
fi
bin=${CARGO_TARGET_DIR:-target}/$profile

port=${BENCH_PORT:-17880}
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  echo "port $port is in use; free it or set BENCH_PORT" >&2; exit 1
fi
work=$(mktemp -d)
server=
cleanup() { [[ -n $server ]] && kill "$server" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

read -r -a flags <<<"${KILN_ATTACK_FLAGS:---max-connections 50 --header-read-timeout-ms 2000}"
taskset -c 0 "$bin/kiln" serve --listen "127.0.0.1:$port" --data "$work/data" "${flags[@]}" 2>"$work/kiln.log" &
server=$!
for _ in $(seq 400); do
  kill -0 "$server" 2>/dev/null || { cat "$work/kiln.log" >&2; echo "kiln exited" >&2; exit 1; }
  curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null && break
  sleep 0.05
done
fds() { ls "/proc/$server/fd" | wc -l; }

echo "# Hostile clients, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# $profile build: kiln serve ${flags[*]}; attack $*"
before=$(fds)
taskset -c 1 "$bin/attack" "127.0.0.1:$port" "$@"
# The last attackers' sockets are closed; the server may still be closing its ends.
for _ in $(seq 100); do [[ $(fds) -le $before ]] && break; sleep 0.05; done
echo
echo "server open fds: $before before the attacks, $(fds) after"
echo "server warnings: $(grep -c ' WARN ' "$work/kiln.log" || true) lines; by source:"
grep ' WARN ' "$work/kiln.log" | sed -E 's/.* WARN ([^ ]+).*/\1/' | sort | uniq -c | sed 's/^/  /' || true
