#!/usr/bin/env bash
# Build the Docker image non-deterministic `shoal run python` jobs run in, locally (no registry).
#
#   shoal/python:3.11   this machine's CPython 3.11 (interpreter, stdlib without its tests, the
#                       shared libraries ldd finds), pip, and a shell; platform = this machine's
#
# How: the files are copied at the same paths they have on this machine (so the interpreter finds
# its prefix exactly as it does here), pip is unpacked from a wheel (the interpreter's ensurepip
# wheel, Debian's python3-pip-whl, or a pinned download from PyPI), missing .pyc files are
# compiled, and the folder is loaded with `docker load` from a hand-written image config (fixed
# dates), so the same machine always gets the same image ID. About 10 s on an idle 2-core
# machine (45 s at a load average of 16); no Dockerfile, no registry. Idempotent: an existing image is left alone (FORCE=1 rebuilds).
#
#   PYTHON          the interpreter to package (default: /usr/bin/python$PY_VERSION, else PATH)
#   PY_VERSION      default 3.11
#   PYTHON_IMAGE    the tag (default shoal/python:$PY_VERSION)
#   BUSYBOX         a static busybox for /bin/sh and the usual tools (default: found, else the
#                   host's /bin/sh alone)
set -euo pipefail

DOCKER="${DOCKER:-docker}"
PY_VERSION="${PY_VERSION:-3.11}"
IMAGE="${PYTHON_IMAGE:-shoal/python:$PY_VERSION}"
# Used only when neither the interpreter nor Debian ships a pip wheel.
PIP_URL="https://files.pythonhosted.org/packages/8a/6a/19e9fe04fca059ccf770861c7d5721ab4c2aebc539889e97c7977528a53b/pip-24.0-py3-none-any.whl"
PIP_SHA256="ba0d021a166865d2265246961bec0152ff124de910c5cc39f1156ce3fa7c69dc"

if [ "${FORCE:-0}" != 1 ] && "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "python image present: $IMAGE"
    exit 0
fi

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    for candidate in "/usr/bin/python$PY_VERSION" "$(command -v "python$PY_VERSION" || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            PYTHON="$candidate"
            break
        fi
    done
fi
if [ -z "$PYTHON" ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$PY_VERSION" >/dev/null
    PYTHON="/usr/bin/python$PY_VERSION"
fi
if [ -z "$PYTHON" ] || ! [ -x "$PYTHON" ]; then
    echo "error: no python$PY_VERSION found; set PYTHON=/path/to/python$PY_VERSION" >&2
    exit 1
fi

# Where this interpreter keeps everything (realpath: pyenv and Debian both use symlinks).
mapfile -t INFO < <("$PYTHON" -I - <<'EOF'
import glob, os, sys, sysconfig
print(os.path.realpath(sys.executable))
print("%d.%d" % sys.version_info[:2])
print(os.path.realpath(sysconfig.get_path("stdlib")))
print(os.path.realpath(sysconfig.get_path("platstdlib")))
print(sysconfig.get_path("purelib"))
wheels = sorted(glob.glob(os.path.join(sysconfig.get_path("stdlib"), "ensurepip", "_bundled", "pip-*.whl")))
print(wheels[-1] if wheels else "")
EOF
)
EXE="${INFO[0]}" VERSION="${INFO[1]}" STDLIB="${INFO[2]}" PLATSTDLIB="${INFO[3]}"
PURELIB="${INFO[4]}" PIP_WHEEL="${INFO[5]}"
if [ "$VERSION" != "$PY_VERSION" ]; then
    echo "error: $PYTHON is Python $VERSION, wanted $PY_VERSION" >&2
    exit 1
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
ROOTFS="$WORK/rootfs"
STAMP="$WORK/stamp"
# Anything newer than this was made here, not copied: it gets a fixed date at the end.
touch -d "@$(($(date +%s) - 1))" "$STAMP"
mkdir -p "$ROOTFS"/{bin,etc,root,proc,sys,dev,tmp,usr/local/bin}
chmod 1777 "$ROOTFS/tmp"

# Files and folders at the same paths, with their dates (tar: cp --parents trips on symlinked dirs).
copy() { tar -C / -cf - "${@#/}" | tar -C "$ROOTFS" -xpf -; }
# A library at the path the loader looks for, as a file (symlinks resolved).
copy_lib() {
    [ -e "$ROOTFS$1" ] && return
    mkdir -p "$ROOTFS$(dirname "$1")"
    cp -L --preserve=timestamps,mode "$1" "$ROOTFS$1"
}

copy "$EXE"
# The stdlib without tests, GUI toolkits, the static library and this machine's own packages.
for dir in $(printf '%s\n' "$STDLIB" "$PLATSTDLIB" | sort -u); do
    copy --exclude='*/test' --exclude='*/tests' --exclude='*/idlelib' --exclude='*/tkinter' \
        --exclude='*/turtledemo' --exclude='*/site-packages/*' --exclude='*/dist-packages/*' \
        --exclude='*/config-[0-9]*' --exclude='*/EXTERNALLY-MANAGED' \
        --exclude='*/sitecustomize.py' "$dir"
done

# A shell: static busybox (with the usual tools) if there is one, else the host's /bin/sh.
BUSYBOX="${BUSYBOX:-}"
for candidate in /bin/busybox /usr/bin/busybox; do
    if [ -z "$BUSYBOX" ] && [ -x "$candidate" ] && ! ldd "$candidate" >/dev/null 2>&1; then
        BUSYBOX="$candidate"
    fi
done
if [ -z "$BUSYBOX" ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null && BUSYBOX=/bin/busybox
fi
NEEDS_LIBS=("$EXE" "$PLATSTDLIB"/lib-dynload/*.so)
if [ -n "$BUSYBOX" ]; then
    cp "$BUSYBOX" "$ROOTFS/bin/busybox"
    # One process for the ~400 applet links (a `ln` each takes seconds on a slow disk).
    "$ROOTFS/bin/busybox" --list | "$PYTHON" -I -c '
import os, sys
for name in sys.stdin.read().split():
    if name != "busybox" and not os.path.lexists(os.path.join(sys.argv[1], name)):
        os.symlink("busybox", os.path.join(sys.argv[1], name))' "$ROOTFS/bin"
else
    cp -L "$(readlink -f /bin/sh)" "$ROOTFS/bin/sh"
    NEEDS_LIBS+=(/bin/sh)
fi

# Shared libraries (and the loader) at the paths ldd resolves them to on this machine.
for binary in "${NEEDS_LIBS[@]}"; do
    ldd "$binary" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
done | sort -u >"$WORK/libs"
while read -r lib; do copy_lib "$lib"; done <"$WORK/libs"
xargs -n 1 dirname <"$WORK/libs" | sort -u >"$ROOTFS/etc/ld.so.conf"
# A loader cache, where ldconfig may chroot (root); the loader's default paths cover Debian.
ldconfig -r "$ROOTFS" >/dev/null 2>&1 || rm -f "$ROOTFS/etc/ld.so.cache"

# pip, unpacked into the interpreter's site folder (a wheel is a zip; pip runs from it as is).
if [ -z "$PIP_WHEEL" ]; then
    PIP_WHEEL="$(ls /usr/share/python-wheels/pip-*.whl 2>/dev/null | sort -V | tail -n 1 || true)"
fi
if [ -z "$PIP_WHEEL" ]; then
    PIP_WHEEL="$WORK/${PIP_URL##*/}"
    "$PYTHON" -I -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
        "$PIP_URL" "$PIP_WHEEL"
    echo "$PIP_SHA256  $PIP_WHEEL" | sha256sum -c --quiet -
fi
mkdir -p "$ROOTFS$PURELIB"
"$PYTHON" -I -m zipfile -e "$PIP_WHEEL" "$ROOTFS$PURELIB"
printf 'shoal\n' >"$(echo "$ROOTFS$PURELIB"/pip-*.dist-info)/INSTALLER"
# Fixed source dates, so the .pyc files compiled from them are the same on every build.
find "$ROOTFS$PURELIB" -exec touch -h -d @315532800 {} +
"$PYTHON" -I -m compileall -q -j 0 -s "$ROOTFS" -p / "$ROOTFS$STDLIB" "$ROOTFS$PURELIB" >/dev/null

# (The interpreter may itself live in /usr/local/bin, as in the python:3.11 images.)
for name in "python$PY_VERSION" python3 python; do
    [ -e "$ROOTFS/usr/local/bin/$name" ] || ln -s "$EXE" "$ROOTFS/usr/local/bin/$name"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' \
    >"$ROOTFS/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$ROOTFS/etc/group"
# Everything made here (not copied) gets one fixed date.
find "$ROOTFS" -newer "$STAMP" -exec touch -h -d @0 {} +
touch -h -d @0 "$ROOTFS"

LAYER_DIR="$WORK/image"
mkdir -p "$LAYER_DIR/layer"
tar -C "$ROOTFS" --numeric-owner --owner=0 --group=0 --sort=name -cf "$LAYER_DIR/layer/layer.tar" .

go_arch() {
    case "$1" in
        x86_64 | amd64) echo amd64 ;;
        aarch64 | arm64) echo arm64 ;;
        armv7l | armv7*) echo arm ;;
        *) echo "$1" ;;
    esac
}
ARCH="$(go_arch "$(uname -m)")"
DIFF_ID="sha256:$(sha256sum "$LAYER_DIR/layer/layer.tar" | cut -d' ' -f1)"
printf '{"architecture":"%s","os":"linux","created":"1970-01-01T00:00:00Z","config":{"Env":["PATH=/usr/local/bin:/usr/bin:/bin","LANG=C.UTF-8"],"Cmd":["python3"],"WorkingDir":"/","Labels":{"org.shoal.python":"%s"}},"rootfs":{"type":"layers","diff_ids":["%s"]},"history":[{"created":"1970-01-01T00:00:00Z","comment":"shoal python image from %s"}]}' \
    "$ARCH" "$VERSION" "$DIFF_ID" "$EXE" >"$LAYER_DIR/config.json"
CONFIG_ID="$(sha256sum "$LAYER_DIR/config.json" | cut -d' ' -f1)"
mv "$LAYER_DIR/config.json" "$LAYER_DIR/$CONFIG_ID.json"
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["layer/layer.tar"]}]' \
    "$CONFIG_ID" "$IMAGE" >"$LAYER_DIR/manifest.json"
tar -C "$LAYER_DIR" -cf - . | "$DOCKER" load >/dev/null

# The image must run what Python jobs run: the interpreter, its C modules, pip.
"$DOCKER" run --rm --network none "$IMAGE" python -c \
    'import ssl, sqlite3, ctypes, zlib, json, pip; print("ok")' >/dev/null ||
    { echo "error: $IMAGE does not run Python" >&2; exit 1; }
echo "built $IMAGE (linux/$ARCH, $(du -sh "$LAYER_DIR/layer/layer.tar" | cut -f1), from $EXE)"
