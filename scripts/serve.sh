#!/usr/bin/env bash
# Run the service with the shipped model, without Docker, in the foreground (Ctrl-C stops it):
# sets up .venv with the serving dependencies (CPU ONNX Runtime, no TensorFlow) when they are
# missing or pyproject.toml changed, then starts uvicorn.
# Configuration: CXR_* environment variables (see .env.example); default http://127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/python-env.sh
source scripts/python-env.sh
ensure_venv serve

# Reinstall when pyproject.toml changes (a new dependency), not on every start.
stamp=".venv/.serve-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]] || ! .venv/bin/python -c "import onnxruntime, fastapi_offline" 2>/dev/null; then
    echo "[serve] installing the serving dependencies into .venv (first run: about a minute)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[cpu]"
    echo "$want" >"$stamp"
fi
# DICOM networking as in the container: results and received images kept in .state/, and the
# C-STORE listener (AE title CXR_AI) on 127.0.0.1:11112, for callers on this machine (CXR_DICOM_PORT= empty turns it off,
# CXR_DICOM_PORT=11113 moves it). A port that is taken leaves HTTP serving: the log's ERROR line
# "dicom listener not started", /health/ready and /model (`dicom_listener_down`) say why.
# The listener admits only the peers CXR_DICOM_PEERS lists (AE@address); unless that,
# CXR_DICOM_OPEN or the old CXR_DICOM_ALLOWED_AETS is set, any AE title from this machine.
export CXR_STATE_DIR="${CXR_STATE_DIR:-$PWD/.state}"
export CXR_DICOM_PORT="${CXR_DICOM_PORT-11112}"
if [[ -z ${CXR_DICOM_PEERS:-} && -z ${CXR_DICOM_ALLOWED_AETS:-} ]] \
        && [[ ${CXR_DICOM_OPEN:-false} =~ ^(false|False|FALSE|0|no|off)$ ]]; then
    export CXR_DICOM_PEERS='*@127.0.0.1'
fi
echo "[serve] starting on http://${CXR_HOST:-127.0.0.1}:${CXR_PORT:-8000} (docs: /docs; Ctrl-C stops it)"
if [[ -n $CXR_DICOM_PORT ]]; then
    echo "[serve] C-STORE listener ${CXR_DICOM_AE_TITLE:-CXR_AI}@${CXR_DICOM_HOST:-127.0.0.1}:$CXR_DICOM_PORT admitting ${CXR_DICOM_PEERS:-${CXR_DICOM_ALLOWED_AETS:-anyone (CXR_DICOM_OPEN)}} (CXR_DICOM_PORT= turns it off); state in $CXR_STATE_DIR"
fi
exec .venv/bin/pneumonia-serve
