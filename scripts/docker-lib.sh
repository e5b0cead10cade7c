# Shared by scripts/run.sh, scripts/ci/docker-smoke.sh and scripts/ci/docker-replicas.sh (sourced,
# not run): what building the image needs from the machine, with messages that name the fix, and
# the CI stages' own engine. Talks to the engine in $DOCKER_HOST (or the default socket). Callers
# define `say` (progress), `info` and `die` (fatal error).

BASE_IMAGE="${BASE_IMAGE_TAG:-python:3.11-slim}"
SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Why `docker compose` cannot be used here, with the fix; empty when it can.
docker_compose_problem() {
    if ! command -v docker >/dev/null; then
        echo "Docker is not installed (Debian: apt-get install docker.io; then the Compose plugin, see README 'Docker on Debian')"
        return
    fi
    local info_err
    if ! info_err="$(docker info 2>&1 >/dev/null)"; then
        if [[ $info_err == *"permission denied"* ]]; then
            echo "this user may not use the Docker engine (sudo usermod -aG docker \"\$USER\", then log in again)"
        else
            echo "no Docker engine answers at ${DOCKER_HOST:-the default socket} (start it: systemctl start docker; without systemd: dockerd >/var/log/dockerd.log 2>&1 &)"
        fi
        return
    fi
    if ! docker compose version >/dev/null 2>&1; then
        if command -v docker-compose >/dev/null; then
            echo "only Compose v1 (docker-compose) is installed; this needs the Compose v2 plugin, \`docker compose\` (see README 'Docker on Debian')"
        else
            echo "the Docker Compose v2 plugin is missing (\`docker compose\`; see README 'Docker on Debian')"
        fi
    fi
}

# Make sure the base image exists: present already, or pulled, or (no registry) built locally from
# Debian packages by scripts/docker-base-image.sh. $1: scratch directory for that build (optional).
ensure_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        return 0
    fi
    say "pulling $BASE_IMAGE"
    local pull_err
    if pull_err="$(timeout 300 docker pull -q "$BASE_IMAGE" 2>&1)"; then
        return 0
    fi
    say "cannot pull $BASE_IMAGE (${pull_err##*$'\n'})"
    say "building it locally from Debian packages instead: scripts/docker-base-image.sh (about a minute)"
    [[ $(id -u) -eq 0 ]] || die "building the base image needs root: sudo scripts/docker-base-image.sh, then run this again"
    BASE_WORK_DIR="${1:-}" "$SCRIPTS_DIR/docker-base-image.sh" || die "scripts/docker-base-image.sh failed (output above)"
}

# The package index for `docker compose build`: the host pip's own http(s) index, when a container
# can reach it (file:// and loopback mirrors are not visible from inside the build).
export_build_index_url() {
    local index_url
    index_url="${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}"
    if [[ $index_url =~ ^https?:// && ! $index_url =~ ://(localhost|127\.|\[::1\]) ]]; then
        export CXR_BUILD_PIP_INDEX_URL="$index_url"
        say "pip index for the build: $index_url"
    fi
}

# The CI stages' own engine on $WORK/docker.sock (data root $WORK/data): sets DOCKER_HOST, and
# DOCKERD_PID when it starts one (an engine already answering there, left over from an interrupted
# run, is used but not ours to stop). $1: the engine's log file.
start_ci_engine() {
    local log=$1
    SOCK="$WORK/docker.sock"
    export DOCKER_HOST="unix://$SOCK"
    # containerd's socket lives under the exec root and a unix socket path may hold 107 bytes.
    EXEC_ROOT="$WORK/exec"
    if [[ ${#EXEC_ROOT} -gt 60 ]]; then
        EXEC_ROOT="/run/cxr-docker-$(printf '%s' "$WORK" | sha256sum | cut -c1-12)"
    fi
    DOCKERD_PID=""
    if docker info >/dev/null 2>&1; then
        info "an engine already answers on $SOCK; using it (it will be left running)"
        return 0
    fi
    rm -f "$SOCK"
    mkdir -p "$WORK/data" "$EXEC_ROOT"
    dockerd --data-root "$WORK/data" --exec-root "$EXEC_ROOT" --pidfile "$WORK/dockerd.pid" \
        -H "unix://$SOCK" >"$log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -n 20 "$log" >&2; DOCKERD_PID=""; die "dockerd exited"; }
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { tail -n 20 "$log" >&2; die "dockerd did not answer in 30 s"; }
    info "dockerd $(docker version -f '{{.Server.Version}}') up, pid $DOCKERD_PID"
}

# Stop the engine start_ci_engine started (SIGTERM, then SIGKILL after 20 s), if it did.
stop_ci_engine() {
    [[ -n ${DOCKERD_PID:-} ]] || return 0
    say "stopping the dockerd this script started (pid $DOCKERD_PID)"
    kill -TERM "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 1 40); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID" 2>/dev/null
    DOCKERD_PID=""
}
