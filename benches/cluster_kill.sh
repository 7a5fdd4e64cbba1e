#!/usr/bin/env bash
# Three Kiln nodes on one PostgreSQL under kill -9. Starts a throwaway PostgreSQL (Debian's
# binaries, a temporary directory, a loopback port), three `kiln serve` nodes on it sharing a
# `file://` blob store and a short async lease, deploys a function that sleeps a little and echoes
# its input, then submits N async invocations round-robin over the nodes (each with its own body
# and Idempotency-Key; a submit whose node is down is retried on the next node with the same key)
# while a killer loop `kill -9`s a random node every few seconds and restarts it on the same port
# and data directory. Then it restarts any dead node, waits until every accepted invocation is
# terminal and checks each one in the database: found, state, attempts, result == input.
# Exits non-zero if one is lost, not terminal within the deadline, or has another's result.
#
# With --db-cost instead: one node, and what one sync and one async invocation cost PostgreSQL
# (pg_stat_statements and pg_stat_database.xact_commit around N invocations, minus an idle
# baseline), then pgbench with Kiln's async statements: the invocations/s this PostgreSQL takes.
#
# Usage: benches/cluster_kill.sh [--db-cost] [path/to/kiln]
#   (default binary: target/release/kiln, built first; target/debug/kiln works for a quick run)
# Environment: N (2000), KILL_EVERY_S (3, whole seconds), LEASE_MS (2000), SLEEP_MS (200, the guest's sleep),
#   PARALLEL (8 submitting clients), DEADLINE_S (300, to drain), PGBENCH_S (20).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=kill
if [[ "${1:-}" == --db-cost ]]; then mode=db-cost; shift; fi
bin=${1:-}
N=${N:-2000}
KILL_EVERY_S=${KILL_EVERY_S:-3}
LEASE_MS=${LEASE_MS:-2000}
SLEEP_MS=${SLEEP_MS:-200}
PARALLEL=${PARALLEL:-8}
DEADLINE_S=${DEADLINE_S:-300}
PGBENCH_S=${PGBENCH_S:-20}

if [[ -z "$bin" ]]; then
  cargo build --release -p kiln >/dev/null 2>&1 || cargo build --release -p kiln
  bin=${CARGO_TARGET_DIR:-target}/release/kiln
fi
[[ -x "$bin" ]] || { echo "no kiln binary at $bin" >&2; exit 2; }
bin=$(realpath "$bin")
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[[ -x "$pgbin/initdb" ]] || { echo "PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 2; }

work=$(mktemp -d /tmp/kiln-cluster-kill.XXXXXX)
chmod 755 "$work"
pg=$work/pg
cleanup() {
  set +e  # every step, whatever the one before did
  exec 2>/dev/null
  touch "$work/stop" 2>/dev/null || true
  [[ -n "${killer:-}" ]] && kill "$killer" 2>/dev/null
  for f in "$work"/node*.pid; do
    [[ -e "$f" ]] && kill -9 "$(cat "$f")" 2>/dev/null
  done
  [[ -d "$pg/data" ]] && as_pg "$pgbin/pg_ctl" -D "$pg/data" -m immediate stop >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# PostgreSQL refuses to run as root: as the `postgres` user then.
as_pg() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_ports() {  # N free loopback ports
  python3 -c 'import socket,sys
s=[socket.socket() for _ in range(int(sys.argv[1]))]
[x.bind(("127.0.0.1",0)) for x in s]; print(" ".join(str(x.getsockname()[1]) for x in s))' "$1"
}
read -r pgport p1 p2 p3 <<<"$(free_ports 4)"
ports=("$p1" "$p2" "$p3")

mkdir -p "$pg"
[[ $(id -u) == 0 ]] && chown postgres:postgres "$pg"
as_pg "$pgbin/initdb" -A trust -U postgres -E UTF8 -D "$pg/data" >/dev/null
# fsync stays on (the default): commits are what a real server would pay.
as_pg "$pgbin/pg_ctl" -D "$pg/data" -l "$pg/log" -w -o "-p $pgport -k $pg -c listen_addresses=127.0.0.1 \
  -c max_connections=200 -c shared_preload_libraries=pg_stat_statements" start >/dev/null
psql_() { "$pgbin/psql" -X -q -t -A -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pgport" -U postgres "$@"; }
# Kiln connects as its own role, so that its statements can be told from this script's.
psql_ -d postgres -c "CREATE ROLE kiln LOGIN" -c "CREATE DATABASE kiln OWNER kiln" >/dev/null
db="postgres://kiln@127.0.0.1:$pgport/kiln"
q() { psql_ -d kiln -c "$1"; }

start_node() {  # start_node I: node I (0-2) on its port and data directory
  local i=$1 port=${ports[$1]}
  env -u KILN_ADMIN_TOKEN "$bin" serve --listen "127.0.0.1:$port" --data "$work/node$i" --database "$db" \
    --blob-store "file://$work/blobs" --async-lease-ms "$LEASE_MS" --max-queued 10000000 \
    2>>"$work/node$i.log" &
  disown $!  # no "Killed" notice from the shell for a node this script ends
  echo $! >"$work/node$i.pid"
  for _ in $(seq 1200); do
    curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && return 0
    kill -0 "$(cat "$work/node$i.pid")" 2>/dev/null || break
    sleep 0.05
  done
  echo "node $i did not start; its log ends with:" >&2; tail -20 "$work/node$i.log" >&2; return 1
}
kill_node() {  # kill -9 node I and wait until its port is closed
  local pid; pid=$(cat "$work/node$1.pid")
  kill -9 "$pid" 2>/dev/null || true
  # Not until the process is a zombie: its other threads may still be exiting, holding the
  # listening socket. Until a connection is refused.
  while (exec 3<>"/dev/tcp/127.0.0.1/${ports[$1]}") 2>/dev/null; do sleep 0.01; done
}
alive() { kill -0 "$(cat "$work/node$1.pid")" 2>/dev/null; }

# The guest: reads its input, sleeps SLEEP_MS in a host call, writes the input back.
cat >"$work/sleep-echo.wat" <<EOF
(module
  (import "wasi_snapshot_preview1" "fd_read" (func \$fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func \$fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func \$poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (local \$len i32)
    (block \$eof
      (loop \$more
        (i32.store (i32.const 0) (i32.add (i32.const 1024) (local.get \$len)))
        (i32.store (i32.const 4) (i32.sub (i32.const 4096) (local.get \$len)))
        (if (call \$fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)) (then unreachable))
        (br_if \$eof (i32.eqz (i32.load (i32.const 8))))
        (local.set \$len (i32.add (local.get \$len) (i32.load (i32.const 8))))
        (br_if \$eof (i32.ge_u (local.get \$len) (i32.const 4096)))
        (br \$more)))
    (i64.store (i32.const 64) (i64.const 7))
    (i32.store8 (i32.const 72) (i32.const 0))
    (i32.store (i32.const 80) (i32.const 1))
    (i64.store (i32.const 88) (i64.const ${SLEEP_MS}000000))
    (i64.store (i32.const 96) (i64.const 0))
    (i32.store16 (i32.const 104) (i32.const 0))
    (if (call \$poll_oneoff (i32.const 64) (i32.const 128) (i32.const 1) (i32.const 8)) (then unreachable))
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (local.get \$len))
    (drop (call \$fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
EOF

deploy() {  # deploy NAME on node 0
  curl -fsS -X PUT -H "Authorization: Bearer $token" --data-binary "@$work/sleep-echo.wat" \
    "http://127.0.0.1:${ports[0]}/v1/functions/$1" >/dev/null
}

if [[ $mode == db-cost ]]; then
  SLEEP_MS=0
  sed -i 's/(i64.const [0-9]*000000)/(i64.const 0)/' "$work/sleep-echo.wat"
  start_node 0
  token=$(cat "$work/node0/admin.token")
  deploy echo
  q "CREATE EXTENSION pg_stat_statements" >/dev/null
  url="http://127.0.0.1:${ports[0]}"
  reset() { q "SELECT pg_stat_statements_reset()" >/dev/null; q "SELECT pg_stat_reset()" >/dev/null; sleep 0.6; }
  commits() { q "SELECT xact_commit FROM pg_stat_database WHERE datname = 'kiln'"; }
  mine="s.userid = 'kiln'::regrole"
  calls() { q "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s WHERE $mine"; }
  top() {  # the statements of a phase, calls per invocation
    q "SELECT to_char(sum(calls)::numeric / $1, 'FM9990.00') || '  ' || left(regexp_replace(query, '\s+', ' ', 'g'), 90)
       FROM pg_stat_statements s WHERE $mine
       GROUP BY query ORDER BY sum(calls) DESC LIMIT 12" | sed 's/^/    /'
  }
  # Idle: what the node costs doing nothing (polls, heartbeats, lease renewals), per second.
  reset; c0=$(commits); t0=$(date +%s.%N); sleep 10
  idle_calls=$(calls); idle_commits=$(( $(commits) - c0 )); idle_s=$(echo "$(date +%s.%N) - $t0" | bc)
  echo "idle node: $idle_calls statements and $idle_commits commits in ${idle_s%????} s (stats lag ~0.5 s)"
  top 1
  phase() {  # phase NAME PATH PARALLEL: N requests, then until the queue is empty
    local name=$1 path=$2 par=$3 cfg=$work/$1.curl
    : >"$cfg"
    for j in $(seq "$N"); do
      (( j > 1 )) && echo next >>"$cfg"
      printf 'url = "%s%s"\nrequest = "POST"\nheader = "Authorization: Bearer %s"\ndata = "%s-%s"\noutput = "/dev/null"\nwrite-out = "%%{http_code}\\n"\n' \
        "$url" "$path" "$token" "$name" "$j" >>"$cfg"
    done
    reset; local c0 t0; c0=$(commits); t0=$(date +%s.%N)
    if [[ $par == 1 ]]; then curl -s -K "$cfg"; else curl -s --parallel --parallel-max "$par" -K "$cfg" 2>/dev/null; fi \
      | sort | uniq -c | awk '{printf "%s answered %s; ", $1, $2} END {print ""}' >"$work/answers"
    # Polled through the node's metrics, not the database, so as not to add to what is counted.
    until curl -fs "$url/metrics" | grep -qx 'kiln_async_queue_depth 0'; do sleep 0.1; done
    sleep 1.5  # the invocation-log writer's batch and the stats collector
    local s c; s=$(echo "$(date +%s.%N) - $t0" | bc); c=$(calls); local k=$(( $(commits) - c0 ))
    local net_calls net_commits
    net_calls=$(echo "scale=2; ($c - $idle_calls * $s / $idle_s) / $N" | bc)
    net_commits=$(echo "scale=2; ($k - $idle_commits * $s / $idle_s) / $N" | bc)
    echo "$name (N=$N, $par at once, ${s%????} s): $c statements, $k commits;" \
      "per invocation, idle rate subtracted: $net_calls statements, $net_commits commits; $(cat "$work/answers")"
    top "$N"
  }
  phase sync /v1/functions/echo/invoke 1
  phase async /v1/functions/echo/invoke-async 1
  phase async-c32 /v1/functions/echo/invoke-async 32
  kill_node 0
  # pgbench: Kiln's async path as a fresh submit on an idle node takes it (see the SQL in
  # runtime/core/src/invocations/leases.rs): one durable transaction that claims due rows, counts
  # the queue and inserts the row as running under a lease; one with synchronous_commit off that
  # records the outcome under the lease, claims again and counts. One pgbench transaction = one
  # invocation, unbatched (Kiln batches concurrent submits into one transaction; this does not).
  cat >"$work/kiln.pgbench" <<'EOF'
\set node random(1, 1000000)
\set now_ms 1000000000000 + :client_id
BEGIN;
UPDATE invocations SET state = 'running', attempts = attempts + 1, lease_owner = 'pgbench-' || :node, lease_until_ms = :now_ms::bigint + 30000
  WHERE id IN (SELECT id FROM invocations WHERE (state = 'queued' AND run_after_ms <= :now_ms::bigint)
               OR (state = 'running' AND lease_until_ms < :now_ms::bigint) ORDER BY run_after_ms, id LIMIT 64 FOR UPDATE SKIP LOCKED)
  RETURNING id, function, version, input, attempts, max_attempts;
SELECT COUNT(*) FROM invocations WHERE state = 'queued';
INSERT INTO invocations (id, function, version, state, input, idempotency_key, attempts, max_attempts, run_after_ms,
                         created_at, lease_owner, lease_until_ms)
  VALUES (gen_random_uuid()::text, 'pgbench', 1, 'running', '\x696e7075742d31323334'::bytea, NULL, 1, 3, :now_ms::bigint,
          now()::text, 'pgbench-' || :node, :now_ms::bigint + 30000)
  RETURNING id \gset
COMMIT;
BEGIN;
SET LOCAL synchronous_commit = off;
UPDATE invocations SET state = 'succeeded', result = '\x696e7075742d31323334'::bytea, result_digest = NULL, stderr = '',
    error = NULL, duration_us = 100, finished_at = now()::text, finished_ms = :now_ms::bigint, input = ''::bytea,
    lease_owner = NULL, lease_until_ms = NULL
  WHERE id = :id AND state = 'running' AND lease_owner = 'pgbench-' || :node AND attempts = 1;
UPDATE invocations SET state = 'running', attempts = attempts + 1, lease_owner = 'pgbench-' || :node, lease_until_ms = :now_ms::bigint + 30000
  WHERE id IN (SELECT id FROM invocations WHERE (state = 'queued' AND run_after_ms <= :now_ms::bigint)
               OR (state = 'running' AND lease_until_ms < :now_ms::bigint) ORDER BY run_after_ms, id LIMIT 64 FOR UPDATE SKIP LOCKED)
  RETURNING id, function, version, input, attempts, max_attempts;
SELECT COUNT(*) FROM invocations WHERE state = 'queued';
COMMIT;
EOF
  for clients in 1 8 32; do
    out=$("$pgbin/pgbench" -n -M prepared -f "$work/kiln.pgbench" -c "$clients" -j 2 -T "$PGBENCH_S" \
      -h 127.0.0.1 -p "$pgport" -U kiln kiln 2>&1)
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")
    lat=$(sed -n 's/^latency average = \(.*\)/\1/p' <<<"$out")
    echo "pgbench, Kiln's async statements, $clients clients, ${PGBENCH_S} s: $tps invocations/s (latency average $lat)"
  done
  echo "rows in invocations after pgbench: $(q "SELECT count(*) FROM invocations")"
  echo "load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
  exit 0
fi

# ---- the kill run ----
echo "$(date -u +%FT%TZ) binary $bin; load $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores"
start_node 0
token=$(cat "$work/node0/admin.token")
start_node 1
start_node 2
[[ $(cat "$work/node1/admin.token") == "$token" && $(cat "$work/node2/admin.token") == "$token" ]] \
  || { echo "a node did not take the cluster's admin token" >&2; exit 1; }
deploy sleep-echo

submit_one() {  # submit_one J: prints "id input tries" for a 202, or "- input tries" after giving up
  local j=$1 input="in-$1-$RANDOM$RANDOM" tries=0 out code
  for attempt in $(seq 0 59); do
    local port=${ports_list[$(( (j + attempt) % 3 ))]}
    tries=$(( tries + 1 ))
    out=$(curl -s -m 10 -X POST -H "Authorization: Bearer $token" -H "Idempotency-Key: key-$j" --data "$input" \
      -w '\n%{http_code}' "http://127.0.0.1:$port/v1/functions/sleep-echo/invoke-async" 2>/dev/null) || out=$'\n000'
    code=${out##*$'\n'}
    if [[ $code == 202 ]]; then
      local id=${out#*\"id\":\"}; echo "${id%%\"*} $input $tries"; return 0
    fi
    # A refused connection (the node is down), a reset (it died mid-request) or a 5xx: the next
    # node, same key. After a full round, a short pause.
    (( attempt % 3 == 2 )) && sleep 0.2
  done
  echo "- $input $tries"
}
export -f submit_one
export token
export ports_list="${ports[*]}"
# Arrays do not cross `export`: rebuild it in each child.
submit_cmd='ports_list=($ports_list); submit_one "$0"'

( # the killer: a random node every KILL_EVERY_S, restarted at once on the same port and data
  n=0
  while [[ ! -e "$work/stop" ]]; do
    for _ in $(seq "$(( KILL_EVERY_S * 10 ))"); do [[ -e "$work/stop" ]] && break; sleep 0.1; done
    [[ -e "$work/stop" ]] && break
    i=$(( RANDOM % 3 ))
    kill_node "$i"; n=$(( n + 1 )); echo "$n" >"$work/kills"
    start_node "$i" || true
  done
) &
killer=$!

t0=$(date +%s.%N)
seq "$N" | xargs -P "$PARALLEL" -n 1 bash -c "$submit_cmd" >"$work/submits"
t_submit=$(date +%s.%N)
touch "$work/stop"
wait "$killer" 2>/dev/null || true
killer=
kills=$(cat "$work/kills" 2>/dev/null || echo 0)
for i in 0 1 2; do alive "$i" || start_node "$i"; done

grep -v '^- ' "$work/submits" >"$work/accepted" || true
accepted=$(wc -l <"$work/accepted")
refused=$(grep -c '^- ' "$work/submits" || true)
resubmitted=$(awk '$3 > 1' "$work/accepted" | wc -l)
q "CREATE SCHEMA bench; CREATE TABLE bench.accepted (id text, input text, tries int)" >/dev/null
psql_ -d kiln -c "\\copy bench.accepted FROM '$work/accepted' WITH (FORMAT text, DELIMITER ' ')" >/dev/null

deadline=$(( $(date +%s) + DEADLINE_S ))
terminal_q="SELECT count(*) FROM bench.accepted a JOIN invocations i USING (id) WHERE i.state IN ('succeeded', 'failed')"
while [[ $(q "$terminal_q") != "$accepted" ]] && (( $(date +%s) < deadline )); do sleep 0.2; done
t_done=$(date +%s.%N)

IFS='|' read -r found distinct succeeded failed echoed once retried max_attempts not_terminal <<<"$(q "
  SELECT count(i.id), count(DISTINCT i.id),
         count(*) FILTER (WHERE i.state = 'succeeded'), count(*) FILTER (WHERE i.state = 'failed'),
         count(*) FILTER (WHERE i.state = 'succeeded' AND i.result = convert_to(a.input, 'UTF8')),
         count(*) FILTER (WHERE i.attempts = 1), count(*) FILTER (WHERE i.attempts > 1),
         coalesce(max(i.attempts), 0),
         count(i.id) FILTER (WHERE i.state NOT IN ('succeeded', 'failed'))
  FROM bench.accepted a LEFT JOIN invocations i USING (id)")"
lost=$(( accepted - found ))
submit_s=$(echo "$t_submit - $t0" | bc); drain_s=$(echo "$t_done - $t_submit" | bc)

printf '\n| %-44s | %8s |\n|%s|%s|\n' measure value "$(printf -- '-%.0s' {1..46})" "$(printf -- '-%.0s' {1..10})"
row() { printf '| %-44s | %8s |\n' "$1" "$2"; }
row "submits (N)" "$N"
row "accepted (202)" "$accepted"
row "gave up after 60 tries" "$refused"
row "accepted only after another node (same key)" "$resubmitted"
row "kill -9 during the submits" "$kills"
row "found in the database" "$found"
row "lost (accepted - found)" "$lost"
row "distinct ids" "$distinct"
row "succeeded" "$succeeded"
row "  of which result == its own input" "$echoed"
row "failed" "$failed"
row "not terminal at the deadline" "$not_terminal"
row "attempts == 1" "$once"
row "attempts > 1 (run again after a kill)" "$retried"
row "most attempts of one invocation" "$max_attempts"
row "submit phase, s" "${submit_s%??????}"
row "drain after the last submit, s" "${drain_s%??????}"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"

[[ $lost == 0 && $not_terminal == 0 && $found == "$accepted" && $refused == 0 && $echoed == "$succeeded" \
   && $distinct == "$accepted" && $succeeded == "$accepted" ]]
