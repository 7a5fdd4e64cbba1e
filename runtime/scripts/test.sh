#!/usr/bin/env bash
# Sets up the machine and runs the whole test suite (unit tests and the integration tests, which
# start the real `kiln` binary on loopback and build the Rust guests). Extra arguments go to
# `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/../.."
runtime/scripts/setup.sh
exec cargo test --workspace "$@"
