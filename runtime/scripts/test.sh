#!/usr/bin/env bash
# Sets up the machine and runs the whole test suite (unit tests and the integration tests, which
# start the real `kiln` binary on loopback and build the Rust guests). Extra arguments go to
# `cargo test`. A test that cannot run on this host records `SKIPPED <test>: <reason>` in
# target/test-skips.log (kiln-testkit); the list and the totals are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
runtime/scripts/setup.sh
mkdir -p target
export KILN_SKIP_LOG="$PWD/target/test-skips.log"
: >"$KILN_SKIP_LOG"
status=0
cargo test --workspace "$@" || status=$?
echo
if [[ -s $KILN_SKIP_LOG ]]; then
  echo "== tests skipped on this host ($(wc -l <"$KILN_SKIP_LOG")):"
  sort "$KILN_SKIP_LOG"
else
  echo "== no test skipped"
fi
exit "$status"
