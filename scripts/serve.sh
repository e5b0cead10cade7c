#!/usr/bin/env bash
# Run the service with the shipped model, without Docker: sets up .venv with the serving
# dependencies (CPU ONNX Runtime, no TensorFlow) if needed, then starts uvicorn.
# Configuration: CXR_* environment variables (see .env.example); default http://127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import app.main, onnxruntime" 2>/dev/null; then
    echo "[serve] installing the serving dependencies into .venv"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[cpu]"
fi
exec .venv/bin/pneumonia-serve
