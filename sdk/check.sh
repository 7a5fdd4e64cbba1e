#!/usr/bin/env bash
# Checks the SDK on its own (it is not in the main workspace): clippy for both wasm targets (with
# and without the `http` feature), its docs with warnings as errors, and its unit and doc tests
# on the host. Takes about a minute from cold, a few seconds warm.
set -euo pipefail
cd "$(dirname "$0")"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --target wasm32-wasip1 -- -D warnings
cargo clippy --workspace --all-targets --target wasm32-wasip2 -- -D warnings
cargo clippy --workspace --all-targets --all-features --target wasm32-wasip2 -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --all-features --target wasm32-wasip2
cargo test --workspace --all-features
