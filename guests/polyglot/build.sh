#!/usr/bin/env bash
# The same hello as guests/hello, in C, Python and JavaScript: installs each toolchain into
# guests/polyglot/.toolchain and js/node_modules (both git-ignored) and builds the hellos into
# guests/target/polyglot/hello-{c,python,js}.wasm.
#
#   build.sh install [LANG...]   install toolchains (idempotent: a no-op when they are there)
#   build.sh build [LANG...]     install if needed, then build
#   LANG: c, python, js (default: all three)
#
# Exit status: 0 when everything asked for is done; 3 when a toolchain could not be installed
# (the tests skip that language and say why); anything else is a real failure.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tools=$here/.toolchain
out=$(dirname "$here")/target/polyglot
venv=$tools/venv
# Pinned: the recipes in shared/TOOLCHAINS.md were checked with these.
python_packages=(ziglang==0.14.1 componentize-py==0.25.1)

log() { echo "polyglot: $*" >&2; }

# The Python venv carries two toolchains: zig (C) and componentize-py (Python).
install_venv() {
  local stamp=$venv/.installed-$(echo "${python_packages[*]}" | tr ' =' '-_')
  [[ -f $stamp ]] && return 0
  command -v python3 >/dev/null || { log "python3 is missing"; return 3; }
  log "installing ${python_packages[*]} into $venv"
  python3 -m venv "$venv" || { log "cannot create a venv"; return 3; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${python_packages[@]}" \
    || { log "pip install failed"; return 3; }
  touch "$stamp"
}

install_js() {
  local stamp=$here/js/node_modules/.installed
  [[ -f $stamp && $stamp -nt $here/js/package-lock.json ]] && return 0
  command -v npm >/dev/null || { log "node/npm is missing"; return 3; }
  log "installing @bytecodealliance/componentize-js into $here/js/node_modules"
  (cd "$here/js" && npm ci --no-audit --no-fund --loglevel=error) || { log "npm ci failed"; return 3; }
  touch "$stamp"
}

# One install at a time: the tests build the three languages in parallel, and C and Python share
# the venv.
install() {
  mkdir -p "$tools"
  (
    flock 9
    case $1 in
      c | python) install_venv ;;
      js) install_js ;;
    esac
  ) 9>"$tools/.install.lock"
}

# Up to date when the output is newer than its sources (the toolchain stamps count as sources).
fresh() {
  local target=$out/hello-$1.wasm
  [[ -f $target ]] || return 1
  local sources=("$here/build.sh")
  case $1 in
    c) sources+=("$here/c/hello.c" "$venv"/.installed-*) ;;
    python) sources+=("$here/python/app.py" "$here/wit" "$venv"/.installed-*) ;;
    js) sources+=("$here/js/hello.js" "$here/js/build.mjs" "$here/wit" "$here/js/node_modules/.installed") ;;
  esac
  local source
  for source in "${sources[@]}"; do
    [[ -e $source && $target -nt $source ]] || return 1
  done
}

build() {
  mkdir -p "$out"
  if fresh "$1"; then
    log "$out/hello-$1.wasm is up to date"
    return 0
  fi
  case $1 in
    c)
      # zig keeps its build of wasi-libc (~20 s the first time) in this cache.
      ZIG_GLOBAL_CACHE_DIR=$tools/zig-cache ZIG_LOCAL_CACHE_DIR=$tools/zig-cache \
        "$venv/bin/python" -m ziglang cc -target wasm32-wasi -Os -o "$out/hello-c.wasm" "$here/c/hello.c"
      ;;
    python)
      (cd "$here/python" && "$venv/bin/componentize-py" -d "$here/wit" -w hello componentize app \
        -o "$out/hello-python.wasm" >/dev/null)
      ;;
    js)
      node "$here/js/build.mjs" "$out/hello-js.wasm"
      ;;
  esac
  log "built $out/hello-$1.wasm"
}

action=${1:-build}
shift || true
langs=("$@")
[[ ${#langs[@]} -gt 0 ]] || langs=(c python js)
status=0
for lang in "${langs[@]}"; do
  case $lang in
    c | python | js) ;;
    *) log "unknown language $lang (c, python, js)"; exit 2 ;;
  esac
  if ! install "$lang"; then
    log "the $lang toolchain could not be installed"
    status=3
    continue
  fi
  if [[ $action == build ]]; then
    build "$lang"
  fi
done
exit $status
