#!/usr/bin/env bash
# Fetches the microVM tier's guest kernel: Debian's cloud kernel, a pinned package version checked
# against a pinned SHA-256, and puts its bzImage at target/kiln-guest/vmlinuz (QEMU boots it
# directly; Kiln's own VMM loads the ELF vmlinux inside it) and the kernel's KVM modules at
# target/kiln-guest/modules/ (the nested test loads them in a QEMU VM to run Kiln's VMM there),
# and the `tun` module microVM guests load for their network at target/kiln-guest/guest-modules/.
# Idempotent: does nothing when both are there. Never fails the caller: without them the
# Linux-guest tests print why and skip.
set -uo pipefail

PACKAGE=linux-image-6.1.0-56-cloud-amd64
VERSION=6.1.192-2
SHA256=e7d02b943971edcb8790e256c02cfab3bca6c3d37c1bf25392a57c71300615ee

root=$(cd "$(dirname "$0")/../../.." && pwd)
out="$root/target/kiln-guest"
[ -s "$out/vmlinuz" ] && [ -s "$out/modules/3-kvm-amd.ko" ] && [ -s "$out/guest-modules/tun.ko" ] && exit 0
mkdir -p "$out/modules" "$out/guest-modules"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work" || exit 0
echo "setup: fetching the guest kernel $PACKAGE=$VERSION"
if ! apt-get download -qq "$PACKAGE=$VERSION" 2>/dev/null; then
  apt-get update -qq && apt-get download -qq "$PACKAGE=$VERSION" 2>/dev/null
fi
deb=$(ls ./*.deb 2>/dev/null | head -1)
if [ -z "$deb" ]; then
  echo "setup: WARNING: $PACKAGE=$VERSION is not in the package index (Debian replaced it?);" \
       "update PACKAGE, VERSION and SHA256 in $0. The Linux-guest test will skip." >&2
  exit 0
fi
if ! echo "$SHA256  $deb" | sha256sum -c --quiet -; then
  echo "setup: WARNING: $deb does not match the pinned SHA-256; not using it" >&2
  exit 0
fi
release=${PACKAGE#linux-image-}
dpkg-deb --fsys-tarfile "$deb" | tar -xO "./boot/vmlinuz-$release" > "$out/vmlinuz.tmp" \
  && mv "$out/vmlinuz.tmp" "$out/vmlinuz" && echo "setup: guest kernel at $out/vmlinuz"
# The KVM modules, numbered in load order (kvm needs irqbypass; kvm-amd needs kvm).
n=1
for module in virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-amd.ko; do
  name="$n-$(basename "$module")"
  dpkg-deb --fsys-tarfile "$deb" | tar -xO "./lib/modules/$release/kernel/$module" > "$out/modules/$name.tmp" \
    && mv "$out/modules/$name.tmp" "$out/modules/$name"
  n=$((n + 1))
done
echo "setup: KVM modules at $out/modules"
dpkg-deb --fsys-tarfile "$deb" | tar -xO "./lib/modules/$release/kernel/drivers/net/tun.ko" > "$out/guest-modules/tun.ko.tmp" \
  && mv "$out/guest-modules/tun.ko.tmp" "$out/guest-modules/tun.ko" && echo "setup: guest network module at $out/guest-modules"
