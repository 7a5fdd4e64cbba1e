#!/usr/bin/env bash
# Sets up the machine and runs `kiln serve` with its defaults (127.0.0.1:7878, ./kiln-data).
# Extra arguments go to `kiln serve`, e.g. `runtime/scripts/serve.sh --listen 0.0.0.0:7878`.
set -euo pipefail
cd "$(dirname "$0")/../.."
KILN_SETUP_POLYGLOT=0 KILN_SETUP_PYTHON_TOOLS=0 KILN_SETUP_BROWSER=0 runtime/scripts/setup.sh
# The microVM tier needs the guest kernel (setup.sh fetched it) and the guest agent. Where this host
# has hardware virtualization, build the agent and hand both to Kiln (through the environment, so a
# flag given here still wins); elsewhere the tier stays unavailable and /healthz says why.
if [[ -e /dev/kvm && -s target/kiln-guest/vmlinuz ]] && grep -qwE 'vmx|svm' /proc/cpuinfo; then
  RUSTFLAGS= cargo build --release -p kiln-guest-agent --target x86_64-unknown-linux-musl \
    --target-dir target/kiln-guest/cargo
  export KILN_MICROVM_KERNEL=${KILN_MICROVM_KERNEL:-$PWD/target/kiln-guest/vmlinuz}
  export KILN_MICROVM_AGENT=${KILN_MICROVM_AGENT:-$PWD/target/kiln-guest/cargo/x86_64-unknown-linux-musl/release/kiln-agent}
fi
# The language runtimes of functions from source, which setup.sh built.
export KILN_RUNTIMES_DIR=${KILN_RUNTIMES_DIR:-$PWD/target/kiln-runtimes}
exec cargo run --release -p kiln -- serve "$@"
