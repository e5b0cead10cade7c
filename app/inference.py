"""The model as the service runs it: an ONNX Runtime session checked against its metadata.

`load_classifier` is the whole start-up gate. It returns a `Classifier` only when the metadata
validates, the ONNX file's sha256 matches it, the session's inputs and outputs agree with it, the
requested execution provider is really the active one, and a warm-up inference yields finite
probabilities that sum to 1. Anything else raises `ModelLoadError`, whose message the readiness
probe reports verbatim.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image
from pydantic import ValidationError

from app.contract import ModelMetadata, TensorSpec, load_metadata
from app.decoding import DECODER_ERRORS, DecodeLimits, decode_upload, estimate_decode_bytes
from app.dicom import DicomFindings, DicomPolicy
from app.errors import InvalidImage, ModelLoadError
from app.explain import ClassActivationMap, class_activation_map
from app.preprocessing import jpeg_scale_denominator, to_model_input
from app.settings import Provider, Settings

logger = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

_ORT_DTYPES = {"float32": "tensor(float)"}
# Warm-up probabilities must sum to 1 within float32 rounding.
_SUM_TOLERANCE = 1e-4
# CAM's spatial mean + bias against the logit: float32 sums over a few hundred channels.
_CAM_TOLERANCE = 1e-3


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


def calibrated_probabilities(outputs: np.ndarray, metadata: ModelMetadata) -> np.ndarray:
    """softmax(logits / temperature) per row, by the contract's rule (one rule for training's
    evaluation and for serving: `ModelMetadata.calibrated_probabilities`)."""
    return metadata.calibrated_probabilities(outputs)


@dataclass(frozen=True)
class PreparedImage:
    """An upload made ready for the model: its input tensor, and the DICOM header's findings."""

    tensor: np.ndarray  # (1, H, W, C) float32
    dicom: DicomFindings | None = None

    @property
    def warnings(self) -> list[str]:
        return list(self.dicom.warnings) if self.dicom else []


class Classifier:
    """One validated ONNX Runtime session plus the metadata that describes it.

    `prepare` and `predict_batch` are synchronous and CPU-bound: callers run them off the event
    loop (see `app.prediction` and `app.engine`). ONNX Runtime sessions are safe to call from
    several threads.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        metadata: ModelMetadata,
        limits: DecodeLimits,
        refuse_outside_population: bool = False,
    ) -> None:
        self.metadata = metadata
        self.execution_provider: str = session.get_providers()[0]
        self._session = session
        # Large JPEGs are decoded at the reduced scale the contract prescribes.
        self._limits = replace(
            limits, jpeg_scale=partial(jpeg_scale_denominator, spec=metadata.preprocessing)
        )
        # Rendering and gating rules are the model's (metadata); the refusal choice is the site's.
        self._dicom = DicomPolicy(
            rendering=metadata.preprocessing.dicom,
            intended_use=metadata.intended_use,
            refuse_outside_population=refuse_outside_population,
            # the largest legal 16-bit image plus room for its header
            max_inflated_bytes=limits.max_pixels * 2 + 16 * 1024 * 1024,
        )
        spec = metadata.preprocessing
        self._input_shape = (spec.height, spec.width, spec.channels)

    def prepare(self, data: bytes) -> PreparedImage:
        """Upload bytes -> model input and DICOM findings, or a 415/422 domain error."""
        decoded = decode_upload(data, self._limits, self._dicom)
        try:
            tensor = to_model_input(decoded.image, self.metadata.preprocessing)
        except DECODER_ERRORS as exc:
            # A fully decoded image can still carry an EXIF block or mode Pillow chokes on.
            raise InvalidImage(f"the image could not be preprocessed: {exc}") from exc
        return PreparedImage(tensor, decoded.dicom)

    def decode_cost(self, data: bytes) -> int:
        """The memory, in bytes, that `prepare` will hold at its peak for these bytes (from the
        header alone; see `decoding.estimate_decode_bytes`)."""
        return estimate_decode_bytes(data, self._limits)

    def preprocess(self, data: bytes) -> np.ndarray:
        """Upload bytes -> model input (1, H, W, C) float32, or a 415/422 domain error."""
        return self.prepare(data).tensor

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities, shape (N, len(classes)), for an (N, H, W, C) batch."""
        if batch.ndim != 4 or batch.shape[1:] != self._input_shape:
            raise ValueError(f"batch shape {batch.shape} is not (N, {self._input_shape})")
        (outputs,) = self._session.run(
            [self.metadata.output.name], {self.metadata.input.name: batch.astype(np.float32)}
        )
        return calibrated_probabilities(outputs, self.metadata)

    @property
    def explains(self) -> bool:
        """Whether this model has the feature-map output that class activation maps need."""
        return self.metadata.cam is not None

    def predict_with_cam(
        self, tensor: np.ndarray, class_name: str | None = None
    ) -> tuple[np.ndarray, ClassActivationMap]:
        """Probabilities (classes,) and the class activation map of one image (1, H, W, C), for
        `class_name` or, by default, the class at the operating point. One session run yields
        both, so the map explains exactly the scores returned with it."""
        cam_spec, cam_output = self.metadata.cam, self.metadata.cam_output
        if cam_spec is None or cam_output is None:
            raise ValueError("this model has no class-activation-map output")
        outputs = [self.metadata.output.name, cam_output.name]
        scores, features = self._session.run(
            outputs, {self.metadata.input.name: tensor.astype(np.float32)}
        )
        probabilities = calibrated_probabilities(scores, self.metadata)[0]
        label = class_name or self.label_for(probabilities)
        cam = class_activation_map(
            features[0], cam_spec, cam_output, self.metadata.classes.index(label)
        )
        return probabilities, cam

    def label_for(self, probabilities: np.ndarray) -> str:
        """The class at the operating point (the contract's rule: the positive class when its
        calibrated probability reaches the metadata's threshold, else the likeliest other)."""
        return self.metadata.label_at_operating_point(probabilities)

    def warm_up(self) -> None:
        """Run one mid-grey image through preprocessing and the session; raise if it misbehaves."""
        spec = self.metadata.preprocessing
        grey = Image.new("L", (spec.width, spec.height), 128)
        try:
            probabilities = self.predict_batch(to_model_input(grey, spec))
        except Exception as exc:
            # ORT reports shape/type failures as its own exception types (not exported).
            raise ModelLoadError(f"warm-up inference failed: {exc}") from exc
        expected = (1, len(self.metadata.classes))
        if probabilities.shape != expected:
            raise ModelLoadError(
                f"warm-up output has shape {probabilities.shape}, expected {expected} "
                f"for classes {self.metadata.classes}"
            )
        if not np.all(np.isfinite(probabilities)):
            raise ModelLoadError("warm-up inference returned non-finite probabilities")
        total = float(probabilities.sum())
        if abs(total - 1.0) > _SUM_TOLERANCE:
            raise ModelLoadError(f"warm-up probabilities sum to {total}, not 1")
        if self.explains:
            self._check_cam(to_model_input(grey, spec))

    def _check_cam(self, tensor: np.ndarray) -> None:
        """The metadata's CAM weights must be the graph's: each class map's spatial mean plus its
        bias must reproduce that class's logit."""
        cam_output = self.metadata.cam_output
        if cam_output is None or self.metadata.output.kind != "logits":
            return
        logits, features = self._session.run(
            [self.metadata.output.name, cam_output.name], {self.metadata.input.name: tensor}
        )
        assert self.metadata.cam is not None
        for index, name in enumerate(self.metadata.classes):
            cam = class_activation_map(features[0], self.metadata.cam, cam_output, index)
            if abs(cam.logit - float(logits[0][index])) > _CAM_TOLERANCE:
                raise ModelLoadError(
                    f"the CAM weights in the metadata do not reproduce the {name} logit "
                    f"({cam.logit:.5f} vs {float(logits[0][index]):.5f})"
                )


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
    classifier = Classifier(
        session,
        metadata,
        limits,
        refuse_outside_population=settings.outside_population == "refuse",
    )
    classifier.warm_up()
    return classifier
