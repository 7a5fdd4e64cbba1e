#!/usr/bin/env bash
# Sets up the machine and runs `kiln serve` with its defaults (127.0.0.1:7878, ./kiln-data).
# Extra arguments go to `kiln serve`, e.g. `runtime/scripts/serve.sh --listen 0.0.0.0:7878`.
set -euo pipefail
cd "$(dirname "$0")/../.."
KILN_SETUP_POLYGLOT=0 runtime/scripts/setup.sh
exec cargo run --release -p kiln -- serve "$@"
