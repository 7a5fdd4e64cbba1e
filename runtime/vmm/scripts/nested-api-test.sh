#!/usr/bin/env bash
# Runs the microvm tier's API test — `runtime/kiln/tests/all/microvm.rs`, the test that deploys a native
# function (boot + snapshot) and invokes it (restore + reseed + request) through Kiln's HTTP API
# on Kiln's own VMM — on a host without hardware virtualization, by nesting: QEMU with software
# emulation (TCG, `-cpu max`: AMD SVM with nested paging, emulated) boots Debian's kernel with its
# KVM modules, and that VM's /init (the `linux` example, as PID 1) brings up loopback and runs the
# test binary, which starts the real `kiln` binary inside the VM. Slow: about 3 minutes of
# emulation after the builds. Prints the VM's console; exits non-zero unless the test passed.
#
# Needs qemu-system-x86_64, the x86_64-unknown-linux-musl target, and the guest kernel and its KVM
# modules (fetched here by guest-kernel.sh).
set -euo pipefail

root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
guest="$root/target/kiln-guest"
musl="$guest/cargo/x86_64-unknown-linux-musl/release"
bash runtime/vmm/scripts/guest-kernel.sh
[ -s "$guest/modules/3-kvm-amd.ko" ] || { echo "no guest kernel or KVM modules" >&2; exit 1; }

echo "nested: building the guest agent, the test function and the PID-1 runner (musl)"
env -u RUSTFLAGS cargo build -q --release --target x86_64-unknown-linux-musl --target-dir "$guest/cargo" -p kiln-guest-agent
env -u RUSTFLAGS cargo build -q --release --target x86_64-unknown-linux-musl --target-dir "$guest/cargo" -p kiln-vmm --example linux
echo "nested: building kiln and its API tests"
cargo build -q -p kiln --bin kiln
tests=$(cargo test -q -p kiln --test all --no-run --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*/deps/all-[^"]*"' | cut -d'"' -f4 | tail -1)
[ -x "$tests" ] || { echo "cannot find the API test binary" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The debug binaries without their debug info: a fifth of the size, for the VM's RAM disk.
objcopy --strip-debug "$root/target/debug/kiln" "$work/kiln"
objcopy --strip-debug "$tests" "$work/all"
entries=(
  "init=$musl/examples/linux"
  "guest/kiln-agent=$musl/kiln-agent" "guest/kiln-upper=$musl/kiln-upper" "guest/kiln-webapp=$musl/kiln-webapp"
  # The test finds kiln and the kernel by the absolute paths it was built with.
  "${root#/}/target/debug/kiln=$work/kiln"
  "${root#/}/target/kiln-guest/vmlinuz=$guest/vmlinuz"
  "${root#/}/target/kiln-guest/guest-modules/tun.ko=$guest/guest-modules/tun.ko"
  "${root#/}/runtime/kiln/"
  "all=$work/all"
  "bin/busybox=/bin/busybox"
  "proc/" "sys/" "tmp/"
  "run:=/all\0microvm::native_functions_deploy\0--nocapture\0--test-threads\01"
  "run-env:=KILN_MICROVM_QUIRKS=available-tss\0KILN_GUEST_BINARIES=/guest\0RUST_BACKTRACE=1\0HOME=/tmp\0TMPDIR=/tmp"
)
for module in "$guest"/modules/*.ko; do entries+=("modules/$(basename "$module")=$module"); done
# The host's dynamic loader and the C libraries the two debug binaries link.
for lib in $(ldd "$work/kiln" "$work/all" | grep -o '/[^ ]*\.so[^ ]*' | sort -u); do
  entries+=("${lib#/}=$(readlink -f "$lib")")
done
cargo run -q -p kiln-vmm --example initramfs -- "$work/outer.cpio" "${entries[@]}"

echo "nested: running the API test in a QEMU TCG VM with KVM inside (a few minutes)"
timeout 1800 qemu-system-x86_64 -accel tcg -cpu max -m 4096 -smp 1 -nodefaults -no-reboot \
  -display none -serial stdio -kernel "$guest/vmlinuz" -initrd "$work/outer.cpio" \
  -append "console=ttyS0 panic=-1 rdinit=/init quiet" | tee "$work/console.log"
grep -q "test result: ok. 1 passed" "$work/console.log"
