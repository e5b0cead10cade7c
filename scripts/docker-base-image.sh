#!/usr/bin/env bash
# Build a local stand-in for the `python:3.11-slim` base image from Debian 12 packages.
#
# Why: the Dockerfile starts `FROM python:3.11-slim`. Where no container registry can be reached
# (this project's CI machines, an air-gapped hospital network) that image cannot be pulled, so we
# make one with the same tag from a Debian mirror the machine already uses. Docker then finds the
# tag locally and never tries to pull. Debian 12 ships CPython 3.11, so the stand-in matches the
# interpreter line of the official image (its patch release is Debian's, not python.org's).
#
# Usage (root; talks to the engine in $DOCKER_HOST, or the default socket):
#   scripts/docker-base-image.sh            # build only if the tag is missing
#   scripts/docker-base-image.sh --force    # rebuild
# Environment:
#   BASE_IMAGE_TAG   tag to create                      (default python:3.11-slim)
#   DEBIAN_MIRROR    Debian mirror URL for debootstrap  (default: read from this machine's apt sources)
#   DEBIAN_SUITE     Debian release                     (default bookworm)
#   CA_BUNDLE        PEM bundle copied into the image   (default /etc/ssl/certs/ca-certificates.crt)
#                    Sites whose HTTPS goes through an intercepting proxy need its CA in this file,
#                    or pip inside `docker build` fails with CERTIFICATE_VERIFY_FAILED.
#   BASE_WORK_DIR    scratch directory for the root file system (default: a fresh temporary dir)
set -euo pipefail

TAG="${BASE_IMAGE_TAG:-python:3.11-slim}"
SUITE="${DEBIAN_SUITE:-bookworm}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { printf '[base-image] %s\n' "$*"; }
die() { printf '[base-image] ERROR: %s\n' "$*" >&2; exit 1; }

command -v docker >/dev/null || die "Docker is not installed: apt-get install docker.io (README, 'Docker on Debian')"
docker info >/dev/null 2>&1 || die "no Docker engine answers at ${DOCKER_HOST:-the default socket}: start it (systemctl start docker; without systemd: dockerd >/var/log/dockerd.log 2>&1 &)"

if [[ $FORCE -eq 0 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    log "$TAG already present ($(docker image inspect -f '{{.Id}}' "$TAG" | cut -c8-19)); nothing to do"
    exit 0
fi

# The first Debian (not -security) mirror in this machine's apt sources, deb822 or one-line format.
find_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        while read -r uri; do
            [[ $uri == *security* ]] && continue
            echo "$uri"; return 0
        done < <(sed -n 's/^URIs:[[:space:]]*//p' "$f" | tr ' ' '\n' | grep -E '^https?://')
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        uri=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) { print $i; exit } }' "$f" \
              | grep -v security | head -n1 || true)
        [[ -n $uri ]] && { echo "$uri"; return 0; }
    done
    return 1
}
MIRROR="${DEBIAN_MIRROR:-$(find_mirror || true)}"
[[ -n $MIRROR ]] || die "no Debian mirror found in /etc/apt/sources*; set DEBIAN_MIRROR"
[[ -r $CA_BUNDLE ]] || die "CA bundle $CA_BUNDLE not readable; set CA_BUNDLE"

# debootstrap creates device nodes and changes ownership inside the new root file system.
[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap needs it): sudo $0"
if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >/dev/null
fi

WORK="${BASE_WORK_DIR:-$(mktemp -d /tmp/python-slim-rootfs.XXXXXX)}"
ROOTFS="$WORK/rootfs"
cleanup() { rm -rf "$ROOTFS"; [[ -n ${BASE_WORK_DIR:-} ]] || rmdir "$WORK" 2>/dev/null || true; }
trap cleanup EXIT
rm -rf "$ROOTFS"
mkdir -p "$ROOTFS"

start=$SECONDS
log "debootstrap $SUITE from $MIRROR (minbase + python3, pip, venv)"
debootstrap --variant=minbase \
    --include=python3,python3-pip,python3-venv,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log above)"; }

log "adjusting the root file system"
# The official image's interpreter lives in /usr/local and pip may install system-wide; mirror that.
rm -f "$ROOTFS"/usr/lib/python3.*/EXTERNALLY-MANAGED
ln -sf /usr/bin/python3 "$ROOTFS/usr/local/bin/python"
ln -sf /usr/bin/python3 "$ROOTFS/usr/local/bin/python3"
ln -sf /usr/bin/pip3 "$ROOTFS/usr/local/bin/pip"
ln -sf /usr/bin/pip3 "$ROOTFS/usr/local/bin/pip3"
cp "$CA_BUNDLE" "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
# Slim: no package caches, docs, man pages or non-English locales (as the official slim images).
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/var/log/*.log "$ROOTFS"/var/cache/debconf/*-old
find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
find "$ROOTFS/usr/lib" -name '__pycache__' -type d -prune -exec rm -rf {} +

log "importing as $TAG"
tar -C "$ROOTFS" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    --message "local stand-in for $TAG: debootstrap $SUITE minbase + python3" \
    - "$TAG" >/dev/null

docker run --rm --network none "$TAG" python -c 'import sys, ssl, venv; print(sys.version.split()[0])' \
    | sed "s/^/[base-image] $TAG works: Python /"
log "done in $((SECONDS - start)) s; size $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
