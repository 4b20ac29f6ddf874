#!/usr/bin/env bash
# Builds what goes into the container image and lays out the image's file system, for CI and
# for anyone without a Rust image to pull:
#
#   1. the static binary (glibc, +crt-static, stripped), checked to need no shared library;
#   2. the image itself with `podman build --build-arg BINARY=prebuilt`, when podman is here;
#   3. the image's root file system in OUT (default target/image-rootfs): taken from the built
#      image (podman image mount), or else assembled from the same files the Dockerfile copies.
#
# proxy-bin/tests/image.rs then runs that binary inside OUT (chroot) as the image's user.
# Usage: deploy/image/build.sh [OUT]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
OUT=${1:-$ROOT/target/image-rootfs}
TARGET=x86_64-unknown-linux-gnu
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/$TARGET/release/wazuh-proxy

RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release -p wazuh-proxy --target "$TARGET"
if ldd "$BIN" >/dev/null 2>&1 && ! ldd "$BIN" 2>&1 | grep -q 'statically linked'; then
    echo "image: $BIN is not static:" >&2
    ldd "$BIN" >&2
    exit 1
fi
echo "image: static binary $BIN ($(stat -c %s "$BIN") bytes)"

rm -rf "$OUT"
mkdir -p "$OUT"
# podman that cannot work here at all (no storage driver, no user namespaces) is said loudly
# and the file system assembled; podman that works must build the image.
if command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; then
    # The build context must hold the binary at the path the Dockerfile names.
    mkdir -p "$ROOT/target/$TARGET/release"
    if [ "$BIN" != "$ROOT/target/$TARGET/release/wazuh-proxy" ]; then
        cp "$BIN" "$ROOT/target/$TARGET/release/wazuh-proxy"
    fi
    podman build --build-arg BINARY=prebuilt -t wazuh-proxy:ci .
    echo "image: $(podman image inspect wazuh-proxy:ci --format '{{.Id}} user={{.Config.User}} size={{.Size}}')"
    mnt=$(podman image mount wazuh-proxy:ci)
    cp -a "$mnt/." "$OUT/"
    podman image unmount wazuh-proxy:ci >/dev/null
    podman image inspect wazuh-proxy:ci --format '{{.Config.User}}' >"$OUT.user"
else
    printf '\n!!! podman not found or not usable here: the image was not built; its file system is assembled from the\n!!! files the Dockerfile copies instead\n\n' >&2
    cp -a deploy/image/rootfs/. "$OUT/"
    mkdir -p "$OUT/usr/local/bin" "$OUT/run/wazuh-proxy" "$OUT/var/lib/wazuh-proxy"
    cp "$BIN" "$OUT/usr/local/bin/wazuh-proxy"
    chown 65532:65532 "$OUT/run/wazuh-proxy" "$OUT/var/lib/wazuh-proxy"
    # The same user as the Dockerfile's USER line.
    sed -n 's/^USER //p' Dockerfile >"$OUT.user"
fi
echo "image: root file system in $OUT, user $(cat "$OUT.user")"
