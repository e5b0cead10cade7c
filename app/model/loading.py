"""The start-up gate: `load_classifier` builds a `Classifier` only when it may serve.

It returns one only when the metadata validates, the ONNX file's sha256 matches it, the session's
inputs and outputs agree with it, the requested execution provider is really the active one, and a
warm-up inference yields finite probabilities that sum to 1 (and, for a model that explains, the
CAM weights reproduce its logits), and, where `CXR_SITE_PROFILE` names a site profile, that profile
is valid and was fitted for this very ONNX file and decision. Anything else raises
`ModelLoadError`, whose message the readiness probe reports verbatim.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import onnxruntime as ort
from pydantic import ValidationError

from app.contract import ModelMetadata, TensorSpec, load_metadata
from app.errors import ModelLoadError
from app.imaging.dicom import use_codec_threads
from app.imaging.types import DecodeLimits
from app.model.classifier import Classifier
from app.model.site_profile import ProfileError, SiteProfile
from app.model.site_profile import load as load_site_profile
from app.settings import Provider, Settings

logger = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

_ORT_DTYPES = {"float32": "tensor(float)"}


def select_providers(requested: Provider, available: Sequence[str]) -> list[str]:
    """The ONNX Runtime provider list for a `CXR_PROVIDER` value.

    `auto` prefers CUDA when the installed onnxruntime offers it; `cuda` demands it and never
    falls back (a GPU deployment silently running on CPU is an outage in disguise).
    """
    if requested == "cpu":
        return [CPU_PROVIDER]
    has_cuda = CUDA_PROVIDER in available
    if requested == "cuda" and not has_cuda:
        raise ModelLoadError(
            f"CXR_PROVIDER=cuda but {CUDA_PROVIDER} is not available in this onnxruntime "
            f"(available: {', '.join(available)})"
        )
    return [CUDA_PROVIDER, CPU_PROVIDER] if has_cuda else [CPU_PROVIDER]


def check_signature(session: ort.InferenceSession, metadata: ModelMetadata) -> None:
    """Refuse a session whose inputs/outputs differ from the metadata (names, rank, dims, dtype)."""
    input_names = [arg.name for arg in session.get_inputs()]
    if input_names != [metadata.input.name]:
        raise ModelLoadError(
            f"ONNX graph inputs {input_names} do not match the metadata input "
            f"{metadata.input.name!r}"
        )
    _check_tensor("input", session.get_inputs()[0], metadata.input)
    outputs = {arg.name: arg for arg in session.get_outputs()}
    for spec in metadata.outputs:
        if spec.name not in outputs:
            raise ModelLoadError(
                f"ONNX graph outputs {sorted(outputs)} do not include the metadata output "
                f"{spec.name!r}"
            )
        _check_tensor("output", outputs[spec.name], spec)


def _check_tensor(role: str, arg: Any, spec: TensorSpec) -> None:
    where = f"ONNX {role} {arg.name!r}"
    if arg.type != _ORT_DTYPES[spec.dtype]:
        raise ModelLoadError(f"{where} has type {arg.type}, metadata says {spec.dtype}")
    if len(arg.shape) != len(spec.shape):
        raise ModelLoadError(f"{where} has shape {arg.shape}, metadata says {spec.shape}")
    for axis, (actual, declared) in enumerate(zip(arg.shape, spec.shape, strict=True)):
        # ORT reports a dynamic dimension as a symbolic name (str) or None.
        fixed = isinstance(actual, int)
        if declared is None and fixed:
            raise ModelLoadError(
                f"{where} fixes axis {axis} to {actual}, metadata declares it dynamic"
            )
        if declared is not None and fixed and actual != declared:
            raise ModelLoadError(
                f"{where} has shape {arg.shape}, metadata says {spec.shape} (axis {axis})"
            )


def _session_options(settings: Settings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.ort_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; ORT's warnings go to stderr unstructured
    # Idle ORT workers spin-wait by default; decoding threads share these cores, so let them sleep.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _read_metadata(path: Path) -> ModelMetadata:
    if not path.is_file():
        raise ModelLoadError(f"model metadata not found: {path}")
    try:
        return load_metadata(path)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ModelLoadError(f"model metadata {path} is invalid: {problems}") from exc
    except (OSError, ValueError) as exc:  # unreadable file, malformed JSON
        raise ModelLoadError(f"model metadata {path} could not be read: {exc}") from exc


def read_site_profile(settings: Settings, metadata: ModelMetadata) -> SiteProfile | None:
    """The site profile the settings name, checked against the model to serve; None without one.

    Refused (`ModelLoadError`) when it cannot be read or is invalid, when it was fitted for another
    ONNX file (its `model.sha256`), or when it decides for another positive class.
    """
    if settings.site_profile is None:
        return None
    try:
        profile = load_site_profile(settings.site_profile.expanduser())
        profile.check_model(metadata.sha256)
    except ProfileError as exc:
        raise ModelLoadError(str(exc)) from exc
    if profile.operating.positive_class != metadata.decision.positive_class:
        raise ModelLoadError(
            f"site profile {profile.name!r} decides for {profile.operating.positive_class!r}, "
            f"the model for {metadata.decision.positive_class!r}"
        )
    return profile


def installed_runtimes() -> list[str]:
    """The ONNX Runtime distributions installed. Both ship the same `onnxruntime` module, so with
    two of them whichever was installed last silently owns it (the `cpu`/`gpu` extras exclude
    each other for this reason)."""
    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib_metadata.distribution(dist)
        except importlib_metadata.PackageNotFoundError:
            continue
        found.append(dist)
    return found


def load_classifier(settings: Settings) -> Classifier:
    """Build and validate the classifier named by the settings, or raise `ModelLoadError`."""
    runtimes = installed_runtimes()
    if len(runtimes) > 1:
        raise ModelLoadError(
            f"both {' and '.join(runtimes)} are installed and share one module; install exactly "
            "one (the `cpu` or the `gpu` extra)"
        )
    metadata_path = settings.resolved_model_metadata()
    metadata = _read_metadata(metadata_path)
    onnx_path = metadata_path.parent / metadata.onnx_file
    try:
        model_bytes = onnx_path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"ONNX file {onnx_path} could not be read: {exc}") from exc
    # Hash the very bytes the session is built from, so the file cannot change in between.
    digest = hashlib.sha256(model_bytes).hexdigest()
    if digest != metadata.sha256:
        raise ModelLoadError(
            f"sha256 of {onnx_path.name} is {digest}, metadata says {metadata.sha256}"
        )

    site_profile = read_site_profile(settings, metadata)  # before the slow session build

    providers = select_providers(settings.provider, ort.get_available_providers())
    try:
        session = ort.InferenceSession(
            model_bytes, sess_options=_session_options(settings), providers=providers
        )
    except Exception as exc:  # ORT raises its own pybind exception types for bad graphs
        raise ModelLoadError(f"ONNX Runtime could not load {onnx_path.name}: {exc}") from exc

    # ORT quietly drops a provider whose libraries fail to load; believe the session, not the list.
    active = session.get_providers()[0]
    if settings.provider == "cuda" and active != CUDA_PROVIDER:
        raise ModelLoadError(
            f"CXR_PROVIDER=cuda but the session runs on {active} (CUDA failed to initialise)"
        )
    if active != providers[0]:
        logger.warning("requested %s, session runs on %s", providers[0], active)

    check_signature(session, metadata)
    limits = DecodeLimits(max_pixels=settings.max_image_pixels, min_side=settings.min_image_side)
    use_codec_threads(settings.codec_thread_count)  # for the process: OpenJPEG reads it
    classifier = Classifier(
        session,
        metadata,
        limits,
        refuse_outside_population=settings.outside_population == "refuse",
        site_profile=site_profile,
        codec_threads=settings.codec_thread_count,
    )
    classifier.warm_up()
    return classifier
