#!/usr/bin/env bash
# Build a local Debian bookworm + python3.11 base image without any container registry:
# debootstrap a minimal root filesystem into a folder and `docker import` it.
#
# Cached: does nothing when the image already exists (FORCE=1 rebuilds). The rootfs tarball is
# kept under $CACHE_DIR so a rebuild after `docker image rm` skips debootstrap too.
#
#   BASE_IMAGE     image name to create (default shoal-base:bookworm)
#   DEBIAN_MIRROR  default http://deb.debian.org/debian
#   CACHE_DIR      default <repo>/.state/compose-smoke
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BASE_IMAGE="${BASE_IMAGE:-shoal-base:bookworm}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CACHE_DIR="${CACHE_DIR:-$ROOT/.state/compose-smoke}"
# What the Shoal image needs from the OS: python3.11 (bookworm's python3) with venv, TLS roots,
# tini as PID 1 (signals, zombie reaping), curl for health checks. postgresql is optional.
PACKAGES="${BASE_PACKAGES:-python3,python3-venv,ca-certificates,tini,curl}"

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "base image present: $BASE_IMAGE"
    exit 0
fi

mkdir -p "$CACHE_DIR"
TARBALL="$CACHE_DIR/rootfs-bookworm.tar"
if [ "${FORCE:-0}" = 1 ] || [ ! -s "$TARBALL" ]; then
    if ! command -v debootstrap >/dev/null 2>&1; then
        echo "installing debootstrap"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    ROOTFS="$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")"
    trap 'rm -rf "$ROOTFS"' EXIT
    echo "debootstrap bookworm ($PACKAGES) into $ROOTFS (a few minutes, once)"
    debootstrap --variant=minbase --include="$PACKAGES" bookworm "$ROOTFS" "$DEBIAN_MIRROR" \
        >"$CACHE_DIR/debootstrap.log" 2>&1 || {
        echo "error: debootstrap failed; see $CACHE_DIR/debootstrap.log" >&2
        tail -n 20 "$CACHE_DIR/debootstrap.log" >&2
        exit 1
    }
    # Keep the image small and reproducible-ish: no apt lists, caches or docs.
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
        "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/usr/share/doc/* \
        "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
    echo "deb $DEBIAN_MIRROR bookworm main" >"$ROOTFS/etc/apt/sources.list"
    tar --numeric-owner -C "$ROOTFS" -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
fi

echo "importing $TARBALL as $BASE_IMAGE"
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    "$TARBALL" "$BASE_IMAGE" >/dev/null
echo "base image ready: $BASE_IMAGE"
