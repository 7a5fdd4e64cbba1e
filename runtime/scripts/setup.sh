#!/usr/bin/env bash
# Installs what building, testing and running Kiln needs on a fresh machine. Idempotent: each step
# checks before it installs. Needs the Rust toolchain (rustup) already present.
set -euo pipefail

# The guests (tests, examples) compile to WASI preview 1 modules and preview 2 components.
installed=$(rustup target list --installed)
for target in wasm32-wasip1 wasm32-wasip2; do
  if ! grep -qx "$target" <<<"$installed"; then
    echo "setup: installing Rust target $target"
    rustup target add "$target"
  fi
done

# curl drives the README walkthrough.
if ! command -v curl >/dev/null 2>&1; then
  echo "setup: installing curl"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl
fi

# The C, Python and JavaScript hellos (guests/polyglot) need zig, componentize-py and
# componentize-js, installed into the project (git-ignored; about a minute the first time, a
# no-op after). A language whose toolchain cannot be installed has its test skipped, saying why.
# serve.sh does not need them and sets KILN_SETUP_POLYGLOT=0.
if [[ ${KILN_SETUP_POLYGLOT:-1} == 1 ]]; then
  if ! "$(dirname "$0")/../../guests/polyglot/build.sh" install; then
    echo "setup: some polyglot toolchains could not be installed; their tests will be skipped"
  fi
fi
