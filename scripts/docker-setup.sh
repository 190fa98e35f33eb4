#!/usr/bin/env bash
# Make a Docker Engine available and build the local test images (what CI runs before the tests).
#
# Idempotent: installs Debian's docker.io only if `dockerd` is missing, starts dockerd only if the
# daemon does not answer, then waits for it and builds the test images (skipped when present).
# No registry is needed or contacted.
#
#   DOCKERD_LOG       where dockerd logs (default /tmp/dockerd.log)
#   DOCKER_WAIT_SECS  how long to wait for the daemon (default 30)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DOCKERD_LOG="${DOCKERD_LOG:-/tmp/dockerd.log}"
WAIT_SECS="${DOCKER_WAIT_SECS:-30}"

SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
fi

daemon_up() { docker info >/dev/null 2>&1; }

if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    echo "installing docker.io"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker.io >/dev/null
fi
# docker-compose validates deploy/docker-compose.yml in the tests (tests/ops).
if ! command -v docker-compose >/dev/null 2>&1; then
    echo "installing docker-compose"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker-compose >/dev/null
fi

if ! daemon_up; then
    if pgrep -x dockerd >/dev/null 2>&1; then
        echo "dockerd is running but not answering yet; waiting"
    else
        echo "starting dockerd (log: $DOCKERD_LOG)"
        # setsid: the daemon outlives this script and the CI step's process group.
        $SUDO setsid nohup dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
    fi
    deadline=$((SECONDS + WAIT_SECS))
    until daemon_up; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "error: the Docker daemon did not answer within ${WAIT_SECS}s; last log lines:" >&2
            tail -n 30 "$DOCKERD_LOG" >&2 || true
            exit 1
        fi
        sleep 0.2
    done
fi
echo "docker engine up: $(docker version -f '{{.Server.Version}} (API {{.Server.APIVersion}})')"

"$HERE/build-test-images.sh"
