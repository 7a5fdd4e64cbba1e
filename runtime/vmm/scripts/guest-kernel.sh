#!/usr/bin/env bash
# Fetches the microVM tier's guest kernel: Debian's cloud kernel, a pinned package version checked
# against a pinned SHA-256, and puts its bzImage at target/kiln-guest/vmlinuz (QEMU boots it
# directly; Kiln's own VMM would load the ELF vmlinux inside it on hosts with hardware
# virtualization). Idempotent: does nothing when the kernel is there. Never fails the caller:
# without the kernel the Linux-guest test prints why and skips.
set -uo pipefail

PACKAGE=linux-image-6.1.0-56-cloud-amd64
VERSION=6.1.192-2
SHA256=e7d02b943971edcb8790e256c02cfab3bca6c3d37c1bf25392a57c71300615ee

root=$(cd "$(dirname "$0")/../../.." && pwd)
out="$root/target/kiln-guest"
[ -s "$out/vmlinuz" ] && exit 0
mkdir -p "$out"
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
dpkg-deb --fsys-tarfile "$deb" | tar -xO "./boot/vmlinuz-${PACKAGE#linux-image-}" > "$out/vmlinuz.tmp" \
  && mv "$out/vmlinuz.tmp" "$out/vmlinuz" && echo "setup: guest kernel at $out/vmlinuz"
