"""Service configuration: one pydantic-settings class read from `CXR_*` environment variables.

Every knob is validated when the process starts, so a typo in a deployment fails loudly at boot
instead of surfacing as odd behaviour under load. The field descriptions are the documentation:
`scripts/config_docs.py` writes `.env.example` and the README/DEPLOYMENT tables from them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from PIL import Image
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The directory that holds the `app` package: the repository checkout, or the copy of it that is
# the container's working directory.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

MiB = 1024 * 1024

# Pillow warns above its own MAX_IMAGE_PIXELS and refuses twice that. Capping our limit at Pillow's
# keeps every accepted image below both, so the decoder never has to juggle warning filters (which
# are process-global and not thread-safe) while decodes run concurrently.
_PILLOW_PIXEL_CEILING = Image.MAX_IMAGE_PIXELS or 89_478_485

Provider = Literal["auto", "cpu", "cuda"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class Settings(BaseSettings):
    """All runtime configuration. Construct explicitly in tests; from the environment in prod."""

    model_config = SettingsConfigDict(
        env_prefix="CXR_",
        env_file=".env",
        extra="ignore",
        frozen=True,
        # `model_metadata` is our name, not pydantic's `model_` namespace.
        protected_namespaces=(),
    )

    model_metadata: Path = Field(
        default=Path("models/pneumonia_cxr.json"),
        description="Metadata JSON of the model to serve; its `onnx_file` is resolved next to it "
        "and its sha256 must match. A relative path is looked up in the working directory, then "
        "under the project root. Missing or invalid: live but not ready (503 with the reason).",
    )
    provider: Provider = Field(
        default="auto",
        description="ONNX Runtime provider: `auto` (CUDA when the installed onnxruntime offers "
        "it, else CPU) | `cpu` | `cuda` (CUDA or not ready: never a silent fall back to CPU).",
    )
    max_upload_bytes: int = Field(
        default=32 * MiB,
        gt=0,
        description="Largest accepted upload (413 above it), enforced while the body streams in.",
    )
    max_image_pixels: int = Field(
        default=50_000_000,
        gt=0,
        le=_PILLOW_PIXEL_CEILING,
        description="Decompression-bomb guard: width*height above this is refused (422) from the "
        "header, before any pixel is decoded. At most Pillow's own limit (89478485).",
    )
    min_image_side: int = Field(
        default=64, ge=1, description="Smallest accepted width or height in pixels (422 below it)."
    )
    outside_population: Literal["warn", "refuse"] = Field(
        default="warn",
        description="A DICOM patient whose age is outside the model's training population: "
        "`warn` classifies it with a `warnings` entry, `refuse` answers 422 "
        "`outside_training_population`.",
    )
    ort_intra_op_threads: int = Field(
        default=0,
        ge=0,
        description="ONNX Runtime intra-op threads; 0: the usable cores the decode threads leave, "
        "at least one (on 2 cores, one ONNX Runtime thread beside two decoders measured faster "
        "than two).",
    )
    max_batch_size: int = Field(
        default=16,
        ge=1,
        description="Most images in one model run. Requests that arrive while the model is busy "
        "are run together, up to this many.",
    )
    max_batch_wait_ms: float = Field(
        default=0.0,
        ge=0.0,
        le=1000.0,
        description="How long a model run may wait for its batch to fill; 0 runs whatever is "
        "queued as soon as the model is free (an idle service never delays a lone request).",
    )
    max_in_flight_images: int = Field(
        default=48,
        ge=1,
        description="Admission limit: images being received, decoded, queued or run at once. "
        "Past it, requests are refused at once with 429 and Retry-After.",
    )
    max_in_flight_upload_bytes: int = Field(
        default=96 * MiB,
        gt=0,
        description="Admission limit on upload bytes held at once (declared Content-Length, or "
        "the upload limit for a body of unknown length); past it, 429.",
    )
    body_read_initial_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds an upload body may take to start arriving; after them it must keep "
        "up `CXR_BODY_MIN_BYTES_PER_S` on average, or the request is answered 408 and closed.",
    )
    body_min_bytes_per_s: int = Field(
        default=16 * 1024,
        ge=0,
        description="Slowest average rate an upload body may arrive at (each byte received adds "
        "1/rate s to `CXR_BODY_READ_INITIAL_S`); a slower sender gets 408 and the connection is "
        "closed, so it cannot hold an admission slot. 0: no body deadline.",
    )
    decode_memory_budget_bytes: int = Field(
        default=512 * MiB,
        ge=16 * MiB,
        description="Memory that decodes in progress may hold together, estimated from each "
        "image's header before decoding; a large image waits for room.",
    )
    request_timeout_ms: int = Field(
        default=0,
        ge=0,
        description="Default deadline from a request's arrival to its model run, in ms; past it "
        "the image is dropped with 503 `deadline_exceeded`. 0: none. A client may send a shorter "
        "one in `X-Request-Timeout-Ms`.",
    )
    retry_after_s: int = Field(
        default=1, ge=1, description="`Retry-After` seconds sent with 429 and 503 refusals."
    )
    max_images_per_request: int = Field(
        default=16, ge=1, le=256, description="Most `file` parts in one POST /predict/batch."
    )
    decode_concurrency: int = Field(
        default=0,
        ge=0,
        description="Uploads decoded at once; 0 means one per usable core, at most 4. The core "
        "count ignores a container's CPU limit: under Kubernetes set this to the pod's CPU limit.",
    )
    host: str = Field(default="127.0.0.1", description="Bind address for `pneumonia-serve`.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port for `pneumonia-serve`.")
    log_level: LogLevel = Field(
        default="INFO",
        description="DEBUG | INFO | WARNING | ERROR. Logs are JSON lines on stderr and never "
        "carry patient data, image content, file names or API keys.",
    )
    drain_seconds: float = Field(
        default=5.0,
        ge=0,
        le=600,
        description="After SIGTERM: seconds during which readiness answers 503 while the socket "
        "stays open and requests are still served; what is unanswered at the end gets a 503.",
    )
    api_keys: SecretStr | None = Field(
        default=None,
        description="Comma-separated API keys. When this or `api_keys_file` names at least one "
        "key, /predict and /model (and /metrics) need `Authorization: Bearer <key>` or "
        "`X-API-Key: <key>`; health probes and the docs stay open.",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="File of SHA-256 hex digests of API keys, one per line (the first field; "
        "`sha256sum` output works); `#` starts a comment. Read once at start-up.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("api_keys", "api_keys_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Compose and Kubernetes pass an unset variable as "": that means "no keys", not ".".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("provider", mode="before")
    @classmethod
    def _lower_provider(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def decode_slots(self) -> int:
        """Decodes at once: `decode_concurrency`, or one per usable core (at most 4)."""
        return self.decode_concurrency or min(len(os.sched_getaffinity(0)), 4)

    @property
    def ort_threads(self) -> int:
        """ONNX Runtime intra-op threads: `ort_intra_op_threads`, or the usable cores the decode
        threads leave, at least one. Decoding and inference run at the same time; an ORT pool
        as wide as the machine only makes its threads and the decoders take turns."""
        cores = len(os.sched_getaffinity(0))
        return self.ort_intra_op_threads or max(1, cores - self.decode_slots)

    def resolved_model_metadata(self) -> Path:
        """The metadata path to load.

        A relative path is looked up in the working directory first (an operator pointing at their
        own file), then under the project root (the shipped default, wherever the process starts).
        If neither exists, the project-root candidate is returned so the not-ready reason names it.
        """
        path = self.model_metadata.expanduser()
        if path.is_absolute():
            return path
        from_cwd = Path.cwd() / path
        return from_cwd if from_cwd.is_file() else PROJECT_ROOT / path
