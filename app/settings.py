"""Service configuration: one pydantic-settings class read from `CXR_*` environment variables.

Every knob is validated when the process starts, so a typo in a deployment fails loudly at boot
instead of surfacing as odd behaviour under load. `.env.example` documents each variable.
"""

from __future__ import annotations

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
        description="Metadata JSON of the model to serve; its `onnx_file` is relative to it.",
    )
    provider: Provider = Field(
        default="auto",
        description="ONNX Runtime provider: auto (CUDA if offered, else CPU) | cpu | cuda.",
    )
    max_upload_bytes: int = Field(default=32 * MiB, gt=0, description="Largest accepted upload.")
    max_image_pixels: int = Field(
        default=50_000_000,
        gt=0,
        le=_PILLOW_PIXEL_CEILING,
        description="Decompression-bomb guard: width*height above this is refused before decoding.",
    )
    min_image_side: int = Field(default=64, ge=1, description="Smallest accepted width or height.")
    outside_population: Literal["warn", "refuse"] = Field(
        default="warn",
        description="A DICOM patient whose age is outside the model's training population: "
        "`warn` classifies it with a `warnings` entry, `refuse` answers 422 "
        "`outside_training_population`.",
    )
    ort_intra_op_threads: int = Field(
        default=0,
        ge=0,
        description="ONNX Runtime intra-op threads; 0 lets ORT pick (one per core).",
    )
    inference_concurrency: int = Field(
        default=1,
        ge=1,
        description="ONNX Runtime runs in flight at once. One run already uses every intra-op "
        "thread, so more only makes CPU runs contend for the same cores.",
    )
    decode_concurrency: int = Field(
        default=0,
        ge=0,
        description="Uploads decoded at once; 0 means one per CPU the machine reports. Each can "
        "hold a full-resolution image in memory, and os.cpu_count() ignores a container's CPU "
        "limit: under Kubernetes set it to the pod's CPU limit so memory stays bounded.",
    )
    host: str = Field(default="127.0.0.1", description="Bind address for `pneumonia-serve`.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port for `pneumonia-serve`.")
    log_level: LogLevel = "INFO"
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
