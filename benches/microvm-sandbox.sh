#!/usr/bin/env bash
# What a microVM sandbox's lifecycle costs through Kiln's API (create-to-first-response, suspend,
# resume, resume-to-first-response, a request): `benches/src/bin/microvm_sandbox.rs` against a
# release `kiln serve` with the microVM tier. On a host with hardware virtualization it runs here;
# on one without (this project's development machines: PVM), nested — QEMU with software
# emulation boots Debian's kernel with its KVM modules and runs the bench inside, as
# runtime/vmm/scripts/nested-api-test.sh runs the API test. The table names the host it ran on.
#
# Usage: benches/microvm-sandbox.sh [ROUNDS]   (default 5; nested, each round takes a minute or so)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=${1:-5}
guest="$root/target/kiln-guest"
musl="$guest/cargo/x86_64-unknown-linux-musl/release"
bash runtime/vmm/scripts/guest-kernel.sh
echo "microvm-sandbox: building the guest agent and kiln-webapp (musl), kiln and the bench (release)"
env -u RUSTFLAGS cargo build -q --release --target x86_64-unknown-linux-musl --target-dir "$guest/cargo" -p kiln-guest-agent
cargo build -q --release -p kiln --bin kiln -p kiln-bench --bin microvm-sandbox
target=${CARGO_TARGET_DIR:-$root/target}
kiln="$target/release/kiln"
bench="$target/release/microvm-sandbox"

if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -e /dev/kvm ]; then
  exec "$bench" --kiln "$kiln" --kernel "$guest/vmlinuz" --agent "$musl/kiln-agent" \
    --webapp "$musl/kiln-webapp" --rounds "$rounds"
fi

[ -s "$guest/modules/3-kvm-amd.ko" ] || { echo "no guest kernel or KVM modules" >&2; exit 1; }
env -u RUSTFLAGS cargo build -q --release --target x86_64-unknown-linux-musl --target-dir "$guest/cargo" -p kiln-vmm --example linux
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
entries=(
  "init=$musl/examples/linux"
  "guest/kiln-agent=$musl/kiln-agent" "guest/kiln-webapp=$musl/kiln-webapp"
  "guest/vmlinuz=$guest/vmlinuz"
  "kiln=$kiln" "bench=$bench"
  "proc/" "sys/" "tmp/"
  "run:=/bench\0--kiln\0/kiln\0--kernel\0/guest/vmlinuz\0--agent\0/guest/kiln-agent\0--webapp\0/guest/kiln-webapp\0--rounds\0$rounds"
  "run-env:=KILN_MICROVM_QUIRKS=available-tss\0HOME=/tmp\0TMPDIR=/tmp"
)
for module in "$guest"/modules/*.ko; do entries+=("modules/$(basename "$module")=$module"); done
for lib in $(ldd "$kiln" "$bench" | grep -o '/[^ ]*\.so[^ ]*' | sort -u); do
  entries+=("${lib#/}=$(readlink -f "$lib")")
done
cargo run -q -p kiln-vmm --example initramfs -- "$work/outer.cpio" "${entries[@]}"
echo "microvm-sandbox: running nested in a QEMU TCG VM with KVM inside, on$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) ($(nproc) CPUs)"
timeout 3600 qemu-system-x86_64 -accel tcg -cpu max -m 3072 -smp 1 -nodefaults -no-reboot \
  -display none -serial stdio -kernel "$guest/vmlinuz" -initrd "$work/outer.cpio" \
  -append "console=ttyS0 panic=-1 rdinit=/init quiet" | tee "$work/console.log"
grep -q '^| a request to a suspended sandbox' "$work/console.log"
