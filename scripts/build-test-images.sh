#!/usr/bin/env bash
# Build the Docker images the test suite uses, locally (no registry is reachable from CI).
#
#   shoal-test/busybox:latest          busybox-static rootfs, platform = this machine's arch
#   shoal-test/busybox-foreign:latest  the same rootfs, labelled with another arch (bid-check tests)
#   shoal/python:3.11                  this machine's CPython (scripts/build-python-image.sh)
#
# Idempotent and fast: an image that already exists is left alone (FORCE=1 rebuilds).
set -euo pipefail

DOCKER="${DOCKER:-docker}"
NATIVE_IMAGE="shoal-test/busybox:latest"
FOREIGN_IMAGE="shoal-test/busybox-foreign:latest"

# Docker/Go architecture names for `uname -m`.
go_arch() {
    case "$1" in
        x86_64 | amd64) echo amd64 ;;
        aarch64 | arm64) echo arm64 ;;
        armv7l | armv7*) echo arm ;;
        i386 | i686) echo 386 ;;
        ppc64le) echo ppc64le ;;
        s390x) echo s390x ;;
        riscv64) echo riscv64 ;;
        *) echo "$1" ;;
    esac
}

NATIVE_ARCH="$(go_arch "$(uname -m)")"
if [ "$NATIVE_ARCH" = "arm64" ]; then FOREIGN_ARCH=amd64; else FOREIGN_ARCH=arm64; fi

have_image() { [ "${FORCE:-0}" != 1 ] && "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

# The image non-deterministic `shoal run python` jobs run in (idempotent too; FORCE=1 rebuilds).
"$(dirname "${BASH_SOURCE[0]}")/build-python-image.sh"

if have_image "$NATIVE_IMAGE" && have_image "$FOREIGN_IMAGE"; then
    echo "test images present: $NATIVE_IMAGE $FOREIGN_IMAGE"
    exit 0
fi

BUSYBOX="${BUSYBOX:-}"
if [ -z "$BUSYBOX" ]; then
    for candidate in /bin/busybox /usr/bin/busybox; do
        # Only a static busybox works inside an empty rootfs (no libc there).
        if [ -x "$candidate" ] && ! ldd "$candidate" >/dev/null 2>&1; then
            BUSYBOX="$candidate"
            break
        fi
    done
fi
if [ -z "$BUSYBOX" ]; then
    if command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null
        BUSYBOX=/bin/busybox
    else
        echo "error: a static busybox is needed (Debian: apt-get install busybox-static)" >&2
        exit 1
    fi
fi

ROOTFS="$(mktemp -d)"
LAYER="$(mktemp)"
trap 'rm -rf "$ROOTFS" "$LAYER" "$LAYER.d"' EXIT
mkdir -p "$ROOTFS"/{bin,tmp,etc,root,proc,sys,dev}
chmod 1777 "$ROOTFS/tmp"
cp "$BUSYBOX" "$ROOTFS/bin/busybox"
for applet in $("$ROOTFS/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$ROOTFS/bin/$applet"
done
ln -s bin "$ROOTFS/sbin"
mkdir -p "$ROOTFS/usr"
ln -s ../bin "$ROOTFS/usr/bin"
ln -s ../bin "$ROOTFS/usr/sbin"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$ROOTFS/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$ROOTFS/etc/group"

tar -C "$ROOTFS" --numeric-owner --owner=0 --group=0 --mtime=@0 --sort=name -cf "$LAYER" .

platform_of() { "$DOCKER" image inspect -f '{{.Os}}/{{.Architecture}}' "$1"; }

# `docker load` of a hand-written docker-save archive: the fallback for engines whose
# `docker import --platform` keeps the host's architecture (dockerd 20.10 does) or refuses it.
load_with_arch() {
    local image="$1" arch="$2" dir="$LAYER.d" diff_id config_id
    rm -rf "$dir" && mkdir -p "$dir/layer"
    cp "$LAYER" "$dir/layer/layer.tar"
    diff_id="sha256:$(sha256sum "$LAYER" | cut -d' ' -f1)"
    printf '{"architecture":"%s","os":"linux","created":"1970-01-01T00:00:00Z","config":{"Env":["PATH=/bin"],"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":["%s"]},"history":[{"created":"1970-01-01T00:00:00Z","comment":"shoal test image"}]}' \
        "$arch" "$diff_id" >"$dir/config.json"
    config_id="$(sha256sum "$dir/config.json" | cut -d' ' -f1)"
    mv "$dir/config.json" "$dir/$config_id.json"
    printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["layer/layer.tar"]}]' \
        "$config_id" "$image" >"$dir/manifest.json"
    tar -C "$dir" -cf - . | "$DOCKER" load >/dev/null
}

build() {
    local image="$1" arch="$2"
    if have_image "$image"; then return; fi
    if ! "$DOCKER" import --platform "linux/$arch" \
        --change 'ENV PATH=/bin' \
        --change 'CMD ["/bin/sh"]' \
        "$LAYER" "$image" >/dev/null 2>&1 ||
        [ "$(platform_of "$image")" != "linux/$arch" ]; then
        "$DOCKER" image rm "$image" >/dev/null 2>&1 || true
        load_with_arch "$image" "$arch"
    fi
    local got
    got="$(platform_of "$image")"
    if [ "$got" != "linux/$arch" ]; then
        echo "error: $image has platform $got, wanted linux/$arch" >&2
        exit 1
    fi
    echo "built $image (linux/$arch)"
}

build "$NATIVE_IMAGE" "$NATIVE_ARCH"
build "$FOREIGN_IMAGE" "$FOREIGN_ARCH"
