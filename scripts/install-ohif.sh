#!/usr/bin/env bash
# Install the OHIF Viewer for the viewer tests (tests/app/pacs/test_ohif_viewer.py): the built
# viewer of the pinned npm package @ohif/app (its dist/, no build step, no CDN), unpacked into a
# cache directory outside the repository. Once there the tests need no network; a second run
# finds it and does nothing.
#
#   scripts/install-ohif.sh            # into ${CXR_OHIF_DIR:-~/.cache/cxr-ohif/<version>}
#
# `npm pack` fetches the registry's tarball through npm's own cache and checks it against the
# pinned integrity below. `npm install` is not used: it would also fetch the 39 packages the
# viewer was built from (React, cornerstone, ...), which dist/ already contains.
set -euo pipefail

OHIF_VERSION=3.13.2
OHIF_INTEGRITY=sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==
OHIF_DIR=${CXR_OHIF_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cxr-ohif/$OHIF_VERSION}

if [ -f "$OHIF_DIR/dist/index.html" ] && [ -f "$OHIF_DIR/package.json" ] \
        && grep -q "\"version\": \"$OHIF_VERSION\"" "$OHIF_DIR/package.json"; then
    echo "OHIF $OHIF_VERSION already in $OHIF_DIR"
    exit 0
fi
if ! command -v npm >/dev/null; then
    echo "npm not found: apt-get install npm" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent --json "@ohif/app@$OHIF_VERSION" >pack.json)
integrity=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[0]["integrity"])' \
    "$work/pack.json")
case "$integrity" in
    "$OHIF_INTEGRITY") ;;
    *) echo "@ohif/app@$OHIF_VERSION: integrity $integrity, expected $OHIF_INTEGRITY" >&2
       exit 1 ;;
esac
mkdir -p "$work/unpacked"
tar -xzf "$work/ohif-app-$OHIF_VERSION.tgz" -C "$work/unpacked" package/package.json package/dist
mkdir -p "$(dirname "$OHIF_DIR")"
rm -rf "$OHIF_DIR"
mv "$work/unpacked/package" "$OHIF_DIR"
echo "OHIF $OHIF_VERSION installed in $OHIF_DIR"
