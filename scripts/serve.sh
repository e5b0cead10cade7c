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
echo "[serve] starting on http://${CXR_HOST:-127.0.0.1}:${CXR_PORT:-8000} (docs: /docs; Ctrl-C stops it)"
exec .venv/bin/pneumonia-serve
