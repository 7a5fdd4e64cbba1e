#!/usr/bin/env bash
# Runs every fuzz target for SECONDS_PER_TARGET (default 300) of wall time, at nice 19, each from
# the committed seeds (fuzz/seeds/<target>) plus its working corpus (fuzz/corpus/<target>, kept
# between runs, git-ignored). Crashes go to fuzz/artifacts/<target>/; the script exits non-zero if
# any target crashed. At the end it prints CPU-seconds and executions per target, and the total.
#
#   fuzz/run.sh [SECONDS_PER_TARGET]
#   FUZZ_JOBS=2 fuzz/run.sh 600      # two targets at a time (this machine has 2 cores)
#   FUZZ_TARGETS="router multipart" fuzz/run.sh 60
#
# cargo-fuzz needs unstable rustc flags (sanitizers, coverage passes): on the stable toolchain
# RUSTC_BOOTSTRAP=1 allows them. Build once (~30-60 min of 2 cores: wasmtime with coverage
# instrumentation); fuzz/target is kept. Needs `cargo install cargo-fuzz --locked`.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-300}
jobs=${FUZZ_JOBS:-1}
export RUSTC_BOOTSTRAP=1
all_targets=(wasm_validate elf_validate multipart signed_url router egress_rules is_internal config_json vmm_frames
  snapshot_state)
read -r -a targets <<<"${FUZZ_TARGETS:-${all_targets[*]}}"

if ! command -v cargo-fuzz >/dev/null; then
  echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
  exit 2
fi
if [[ -z "${FUZZ_NO_BUILD:-}" ]]; then
  # The same flags every time: any other set rebuilds everything.
  nice -n 19 cargo fuzz build --fuzz-dir fuzz --codegen-units 16
fi
bin_dir=fuzz/target/x86_64-unknown-linux-gnu/release
results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT

run_one() {
  local target=$1
  mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
  local log="fuzz/artifacts/$target.log"
  local before
  before=$(find "fuzz/artifacts/$target" -type f | wc -l)
  local status=0
  # `time` (bash) reports the user and system CPU of the fuzzer process. libFuzzer's -timeout is
  # wall time per input, and a fuzzer at nice 19 gets ~1.5 % of a core next to a nice-0 build
  # (scheduler weights 15 vs 1024): a 2 s input can then take minutes of wall time, hence a
  # generous one. The memory limit stays libFuzzer's default (2 GiB RSS and per allocation).
  local TIMEFORMAT='%U %S'
  {
    time nice -n 19 "$bin_dir/$target" "fuzz/corpus/$target" "fuzz/seeds/$target" \
      -max_total_time="$seconds" -timeout=600 -print_final_stats=1 \
      -artifact_prefix="fuzz/artifacts/$target/" >"$log" 2>&1 || status=$?
  } 2>"$results/$target.time"
  local after
  after=$(find "fuzz/artifacts/$target" -type f | wc -l)
  local execs
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  read -r user sys <"$results/$target.time"
  local crashed=no
  if [[ $status -ne 0 || $after -gt $before ]]; then
    crashed=yes
  fi
  echo "$target $(awk -v u="$user" -v s="$sys" 'BEGIN { print u + s }') ${execs:-0} $crashed $status" >"$results/$target.result"
  echo "$target: done (exit $status, crash: $crashed; log $log)"
}

echo "fuzzing ${#targets[@]} targets for ${seconds}s each, $jobs at a time, started $(date -u +%FT%TZ)"
running=0
for target in "${targets[@]}"; do
  run_one "$target" &
  running=$((running + 1))
  if [[ $running -ge $jobs ]]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait

printf '\n%-16s %10s %14s %s\n' target cpu-seconds executions crashed
total=0
failed=0
for target in "${targets[@]}"; do
  read -r name cpu execs crashed status <"$results/$target.result"
  printf '%-16s %10.1f %14d %s\n' "$name" "$cpu" "$execs" "$crashed"
  total=$(awk -v t="$total" -v c="$cpu" 'BEGIN { print t + c }')
  [[ $crashed == yes ]] && failed=1
done
printf '%-16s %10.1f   (%.1f CPU-minutes), finished %s\n' total "$total" "$(awk -v t="$total" 'BEGIN { print t / 60 }')" "$(date -u +%FT%TZ)"
if [[ $failed -ne 0 ]]; then
  echo "crashes: see fuzz/artifacts/<target>/ and fuzz/artifacts/<target>.log" >&2
  exit 1
fi
