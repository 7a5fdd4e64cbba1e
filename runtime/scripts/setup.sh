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
# The language runtimes of functions from source (Ruby, Python, JavaScript), built from pinned
# registry inputs into target/kiln-runtimes (git-ignored; a few minutes the first time, a no-op
# after). The Ruby one needs wabt. A runtime that cannot be built has its tests skipped, saying why,
# and its deploys refused. KILN_SETUP_RUNTIMES=0 skips this.
if [[ ${KILN_SETUP_RUNTIMES:-1} == 1 ]]; then
  if ! command -v wat2wasm >/dev/null 2>&1; then
    echo "setup: installing wabt"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wabt || true
  fi
  if ! "$(dirname "$0")/../../guests/runtimes/build.sh" install; then
    echo "setup: some language runtimes could not be built; their tests will be skipped"
  fi
fi
# PostgreSQL: the tests of the shared-database mode start throwaway servers from Debian's binaries
# (kiln-testkit's `postgres`), on loopback in temporary directories; nothing is started here.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "setup: installing postgresql"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql
fi
# The microVM tier's Linux guest: the agent is a static musl executable, the image is tested under
# QEMU (software emulation), and the kernel is Debian's cloud kernel, version- and checksum-pinned.
if ! grep -qx x86_64-unknown-linux-musl <<<"$installed"; then
  echo "setup: installing Rust target x86_64-unknown-linux-musl"
  rustup target add x86_64-unknown-linux-musl
fi
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  echo "setup: installing qemu-system-x86"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86
fi
# A static busybox at /bin/busybox: the root filesystem of the microvm image tests
# (`busybox_rootfs` in runtime/kiln/tests/all/support.rs), no network needed. Debian's dynamic
# `busybox` would not run in a guest without its C library: the static package replaces it.
if ! dpkg -s busybox-static >/dev/null 2>&1; then
  echo "setup: installing busybox-static"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox-static
fi
"$(dirname "$0")/../vmm/scripts/guest-kernel.sh"
# Python tools the tests drive Kiln with, each in a virtual environment under target/tools with
# every package version pinned: Schemathesis checks the served OpenAPI document against the server
# (`openapi::schemathesis_*`); boto3 and the AWS CLI speak Lambda's API (`lambda::*`). serve.sh
# needs neither and sets KILN_SETUP_PYTHON_TOOLS=0.
root=$(cd "$(dirname "$0")/../.." && pwd)
python_tool() { # python_tool NAME REQUIREMENTS
  local env=$root/target/tools/$1 requirements=$2
  cmp -s "$requirements" "$env/installed.txt" 2>/dev/null && return 0
  echo "setup: installing $1 into $env"
  if python3 -m venv "$env" && "$env/bin/pip" install -q --disable-pip-version-check -r "$requirements"; then
    cp "$requirements" "$env/installed.txt"
  else
    echo "setup: $1 could not be installed; its tests will be skipped"
  fi
}
if [[ ${KILN_SETUP_PYTHON_TOOLS:-1} == 1 ]]; then
  python_tool schemathesis "$root/runtime/kiln/tests/schemathesis/requirements.txt"
  python_tool aws "$root/runtime/kiln/tests/lambda/requirements.txt"
fi
# The web console's browser test (`console::*`): Debian's Chromium (Playwright cannot download a
# browser here), driven by playwright-core and checked by axe-core, both from npm at the versions
# of runtime/console/package-lock.json, into runtime/console/node_modules (git-ignored). The
# console itself needs none of it: its files are built into the binary. serve.sh sets
# KILN_SETUP_BROWSER=0. Without them the test is skipped, saying why.
if [[ ${KILN_SETUP_BROWSER:-1} == 1 ]]; then
  if ! command -v chromium >/dev/null 2>&1; then
    echo "setup: installing chromium"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
      || echo "setup: chromium could not be installed; the console's browser test will be skipped"
  fi
  if ! command -v npm >/dev/null 2>&1; then
    echo "setup: installing nodejs and npm"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm || true
  fi
  console=$root/runtime/console
  if command -v npm >/dev/null 2>&1 && ! cmp -s "$console/package-lock.json" "$console/node_modules/.kiln-installed" 2>/dev/null; then
    echo "setup: installing the console's test tools into $console/node_modules"
    if (cd "$console" && npm ci --no-audit --no-fund --loglevel=error); then
      cp "$console/package-lock.json" "$console/node_modules/.kiln-installed"
    else
      echo "setup: the console's test tools could not be installed; its browser test will be skipped"
    fi
  fi
fi
