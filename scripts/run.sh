#!/usr/bin/env bash
# The README's run command: start the service with the shipped model on http://127.0.0.1:8000,
# in the way this machine allows, and say which way it took.
#
#   with Docker  when an engine answers and the Compose v2 plugin is installed: makes sure the
#                python:3.11-slim base image exists (pulled, or built locally from Debian packages
#                when no registry can be reached), then `docker compose up --build --wait`; returns
#                once the container is healthy and leaves it running (stop: docker compose down);
#   without      otherwise: scripts/serve.sh sets up .venv (serving dependencies only) and runs
#                the service in the foreground (Ctrl-C stops it).
# Both also ask for the DICOM C-STORE listener (CXR_AI) on 127.0.0.1:11112. Without Docker it
# admits any AE title from this machine (CXR_DICOM_PEERS='*@127.0.0.1'); with Docker only the
# callers CXR_DICOM_PEERS lists (AE@address), or anyone with CXR_DICOM_OPEN=true, and with
# neither it stays off while HTTP serves. Without Docker, CXR_DICOM_PORT moves it (empty: none),
# and a port that is taken leaves the HTTP API serving with /health/ready and /model saying why
# (`dicom_listener_down`); with Docker, CXR_DICOM_HOST_PORT moves it, and a taken 11112 moves it
# to the next free port, loudly.
#
# Usage:  scripts/run.sh [--docker | --venv]
#   --docker  use Docker or fail, saying what is missing and how to install it
#   --venv    never use Docker
# Settings are CXR_* environment variables (.env.example); CXR_PORT changes the port.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=auto
for arg in "$@"; do
    case "$arg" in
        --docker) MODE=docker ;;
        --venv) MODE=venv ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

say() { printf '[run] %s\n' "$*"; }
die() { printf '[run] ERROR: %s\n' "$*" >&2; exit 1; }
# shellcheck source=scripts/docker-lib.sh
source scripts/docker-lib.sh

if [[ $MODE != venv ]]; then
    problem="$(docker_compose_problem)"
    if [[ -n $problem ]]; then
        [[ $MODE == docker ]] && die "cannot use Docker: $problem"
        say "not using Docker: $problem"
        MODE=venv
    else
        MODE=docker
    fi
fi

if [[ $MODE == venv ]]; then
    say "running from a virtual environment (scripts/serve.sh)"
    exec scripts/serve.sh
fi

say "running with Docker: $(docker compose version 2>/dev/null | head -n1), engine $(docker version -f '{{.Server.Version}}' 2>/dev/null)"
ensure_base_image
export_build_index_url
port="${CXR_PORT:-8000}"
# The C-STORE listener's host port: compose publishes it, and Docker refuses to start the
# container when another process holds it. Not asked for (CXR_DICOM_HOST_PORT unset) and 11112
# taken: publish it on the next free port and say so; asked for and taken: stop and say so.
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [[ -n ${CXR_DICOM_HOST_PORT:-} ]]; then
    port_taken "$CXR_DICOM_HOST_PORT" \
        && die "port $CXR_DICOM_HOST_PORT (CXR_DICOM_HOST_PORT) is taken; choose another for the C-STORE listener"
elif port_taken 11112; then
    for candidate in $(seq 11113 11199); do
        port_taken "$candidate" || { export CXR_DICOM_HOST_PORT=$candidate; break; }
    done
    [[ -n ${CXR_DICOM_HOST_PORT:-} ]] || die "ports 11112-11199 are all taken; set CXR_DICOM_HOST_PORT"
    say "WARNING: port 11112 is taken by another process; the C-STORE listener is published on $CXR_DICOM_HOST_PORT instead (CXR_DICOM_HOST_PORT=... chooses)"
fi
say "docker compose up --build --wait (first build: a minute or two)"
docker compose up --build --wait --wait-timeout 300 api \
    || die "the service did not become healthy; see: docker compose logs api"
say "the service is up on http://127.0.0.1:$port (docs: http://127.0.0.1:$port/docs)"
if [[ -n ${CXR_DICOM_PEERS:-}${CXR_DICOM_ALLOWED_AETS:-} ]] \
        || ! [[ ${CXR_DICOM_OPEN:-false} =~ ^(false|False|FALSE|0|no|off)$ ]]; then
    say "C-STORE listener: ${CXR_DICOM_AE_TITLE:-CXR_AI}@127.0.0.1:${CXR_DICOM_HOST_PORT:-11112}"
else
    say "C-STORE listener: not started, no caller is listed: CXR_DICOM_PEERS=AE@address,... (or CXR_DICOM_OPEN=true, this machine only: the port is published on 127.0.0.1) scripts/run.sh"
fi
say "STOW-RS: http://127.0.0.1:$port/dicomweb/studies"
say "logs: docker compose logs -f api    stop: docker compose down"
