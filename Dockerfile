# Chest X-ray pneumonia screening service (research use only, not a diagnostic device).
#
#   docker compose build               # or: docker build -t pneumonia-screening:cpu .
#   docker compose up --wait           # serves on 127.0.0.1:8000
#
# Stages: `requirements` reads the serving dependency list from pyproject.toml, `builder` installs
# it into a virtual environment (FastAPI, ONNX Runtime, NumPy, Pillow, pydicom; never TensorFlow),
# `runtime` copies that venv beside the app code and the shipped model and runs as an unprivileged
# user. Build arg RUNTIME_EXTRA=gpu selects onnxruntime-gpu with NVIDIA's CUDA 13 and cuDNN 9 wheels
# instead (the compose `gpu` profile; app/model/gpu.py loads those libraries at start-up).
# No `# syntax=` line: that frontend would be pulled from a registry air-gapped sites cannot reach.
# Where python:3.11-slim cannot be pulled, scripts/docker-base-image.sh builds a local stand-in.

ARG PYTHON_IMAGE=python:3.11-slim

# The serving requirements: pyproject's base `dependencies` plus one runtime extra, read with
# tomllib rather than `pip install .[cpu]` (which would also package training/ and need README.md).
# A stage of its own so that edits elsewhere in pyproject.toml (tool settings, the train extra)
# leave requirements.txt, and so the slow install layer below, unchanged and cached.
FROM ${PYTHON_IMAGE} AS requirements
# Which ONNX Runtime build: `cpu` (onnxruntime) or `gpu` (onnxruntime-gpu), a pyproject extra.
ARG RUNTIME_EXTRA=cpu
WORKDIR /build
COPY pyproject.toml ./
RUN python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = p['optional-dependencies']; extra = sys.argv[1]; \
extra in extras or sys.exit(f'unknown RUNTIME_EXTRA {extra!r}; choose from {sorted(extras)}'); \
print(*p['dependencies'], *extras[extra], sep='\n')" "${RUNTIME_EXTRA}" > requirements.txt


FROM ${PYTHON_IMAGE} AS builder

# The package index pip uses during the build; a site mirror for air-gapped builds (docs/DEPLOYMENT.md).
ARG PIP_INDEX_URL=https://pypi.org/simple

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
COPY --from=requirements /build/requirements.txt /opt/requirements.txt

# Installers and the libraries' own test suites (numpy's alone is 10 MB) are not needed to serve.
RUN --mount=type=cache,target=/root/.cache/pip \
    cat /opt/requirements.txt \
    && /opt/venv/bin/pip install -r /opt/requirements.txt \
    && /opt/venv/bin/python -c "import importlib.util as u, sys; \
sys.exit('TensorFlow must not be in the serving image' if u.find_spec('tensorflow') else 0)" \
    && /opt/venv/bin/pip uninstall -y pip setuptools wheel \
    && find /opt/venv/lib -type d -name tests -prune -exec rm -rf {} +


FROM ${PYTHON_IMAGE} AS runtime

# A fixed numeric UID/GID so orchestrators can check runAsNonRoot and volumes can be chowned.
RUN groupadd --system --gid 10001 cxr \
    && useradd --system --uid 10001 --gid cxr --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin cxr

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/srv/pneumonia \
    CXR_MODEL_METADATA=/srv/pneumonia/models/pneumonia_cxr.json \
    CXR_STATE_DIR=/var/lib/pneumonia \
    CXR_DICOM_HOST=0.0.0.0 \
    CXR_HOST=0.0.0.0 \
    CXR_PORT=8000 \
    CXR_PROBE_PORT=8081 \
    CXR_PROBE_HOST=0.0.0.0

COPY --from=builder /opt/venv /opt/venv

WORKDIR /srv/pneumonia
# Root-owned and read-only to the service user: the process cannot alter its own code or model.
# The model is baked in so the image is one versioned artifact; mount another models/ directory
# and point CXR_MODEL_METADATA at it to serve a different one.
COPY models/ ./models/
COPY app/ ./app/
RUN python -m compileall -q app
# The one place the service writes: the DICOM results outbox and the intake spool
# (CXR_STATE_DIR), owned by the service user; compose and Kubernetes mount a volume here.
RUN mkdir -p /var/lib/pneumonia && chown 10001:10001 /var/lib/pneumonia && chmod 0700 /var/lib/pneumonia

# Declared last: a new revision changes only this metadata, not the cached layers above.
ARG RUNTIME_EXTRA=cpu
ARG VERSION=0.1.0
ARG GIT_REVISION=unknown

LABEL org.opencontainers.image.title="pneumonia-screening" \
      org.opencontainers.image.description="Chest X-ray pneumonia screening API (FastAPI + ONNX Runtime). Research use only; not a diagnostic device." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_REVISION}" \
      org.opencontainers.image.licenses="LicenseRef-Proprietary" \
      org.opencontainers.image.base.name="python:3.11-slim" \
      org.opencontainers.image.variant="${RUNTIME_EXTRA}"

USER 10001:10001
# HTTP (the API, STOW-RS), the health probes' own port (answered from a thread of their own, so
# that they stay fast when the API's event loop is saturated) and DICOM (the C-STORE listener,
# when CXR_DICOM_PORT is set)
EXPOSE 8000 8081 11112

# Readiness, not liveness: 200 only once the model is loaded and a warm-up inference passed.
# Stdlib Python because the image carries no curl; http.client rather than urllib so that a 503
# prints its reason (e.g. "model metadata not found") into `docker inspect`, not a traceback.
HEALTHCHECK --interval=10s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import http.client as h, sys; c = h.HTTPConnection('127.0.0.1', 8081, timeout=4); c.request('GET', '/health/ready'); r = c.getresponse(); print(r.status, r.read(300).decode(errors='replace')); sys.exit(r.status != 200)"]

# Exec form: the service (`python -m app`, which is `pneumonia-serve`: uvicorn with a deadline on
# request headers, app/http/protocol.py) is PID 1 and receives SIGTERM itself. The app then answers readiness 503 and
# keeps serving for CXR_DRAIN_SECONDS (default 5), answers what is still queued with a JSON 503,
# and hands over to uvicorn, which stops listening and waits up to 10 s for work already running
# (app/http/draining.py). The app writes its own structured access log (with request IDs), so
# uvicorn's is off.
CMD ["python", "-m", "app"]
