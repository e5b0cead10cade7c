"""The model as the service runs it: one validated ONNX Runtime session and its contract.

`Classifier` turns upload bytes into the model's input by the contract's rules (`app.imaging`),
runs the session, applies the contract's calibration and decision rule (or, with a site profile,
the site's recalibration and threshold on top of the contract's calibration), and computes exact
class activation maps. `app.model.loading` builds it; nothing here decides whether it may serve.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import onnxruntime as ort
from PIL import Image

from app.contract import ModelMetadata
from app.errors import ModelLoadError
from app.imaging.boundary import image_boundary
from app.imaging.dicom import DicomFindings, DicomPolicy
from app.imaging.formats import OpenedUpload, open_upload
from app.imaging.preprocessing import (
    equalized_model_input,
    j2k_reduction_level,
    jpeg_scale_denominator,
    to_model_input,
)
from app.imaging.types import DecodeLimits
from app.model.explain import ClassActivationMap, class_activation_map
from app.model.site_profile import SiteProfile

# Warm-up probabilities must sum to 1 within float32 rounding.
_SUM_TOLERANCE = 1e-4
# CAM's spatial mean + bias against the logit: float32 sums over a few hundred channels.
_CAM_TOLERANCE = 1e-3


def calibrated_probabilities(outputs: np.ndarray, metadata: ModelMetadata) -> np.ndarray:
    """softmax(logits / temperature) per row, by the contract's rule (one rule for training's
    evaluation and for serving: `ModelMetadata.calibrated_probabilities`)."""
    return metadata.calibrated_probabilities(outputs)


@dataclass(frozen=True)
class PreparedImage:
    """An upload made ready for the model: its input tensor, and the DICOM header's findings."""

    tensor: np.ndarray  # (1, H, W, C) float32
    dicom: DicomFindings | None = None
    format: str = ""  # JPEG, PNG or DICOM
    stored_size: tuple[int, int] | None = None  # width, height as stored in the file
    grey_mean_std: tuple[float, float] | None = None  # of the input in 8-bit grey levels

    def with_grey_stats(self, scale: float, offset: float) -> PreparedImage:
        """This image with the mean and standard deviation of its input tensor in 8-bit grey
        levels (so that they do not depend on the model's input scaling): the drift metrics'
        figures, computed where the image was prepared rather than on the event loop."""
        # The tensor is an affine map of the grey levels: map its moments back instead of the
        # pixels (a third of the time, no float64 copy). Accumulated in float64 as before.
        mean = float(self.tensor.mean(dtype=np.float64))
        std = float(self.tensor.std(dtype=np.float64))
        return replace(self, grey_mean_std=((mean - offset) / scale, std / abs(scale)))

    @property
    def warnings(self) -> list[str]:
        return list(self.dicom.warnings) if self.dicom else []


class Classifier:
    """One validated ONNX Runtime session plus the metadata that describes it.

    `prepare` and `predict_batch` are synchronous and CPU-bound: callers run them off the event
    loop (see `app.serving.prediction` and `app.serving.batching`). ONNX Runtime sessions are safe
    to call from several threads.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        metadata: ModelMetadata,
        limits: DecodeLimits,
        refuse_outside_population: bool = False,
        site_profile: SiteProfile | None = None,
        codec_threads: int = 1,
    ) -> None:
        self.metadata = metadata
        # A site's recalibration and threshold, applied after the contract's calibration.
        self.site_profile = site_profile
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
            # Large JPEG 2000 frames are decoded at the reduced level the contract prescribes.
            j2k_level=partial(j2k_reduction_level, spec=metadata.preprocessing),
            codec_threads=codec_threads,
        )
        spec = metadata.preprocessing
        self._input_shape = (spec.height, spec.width, spec.channels)

    def open(self, data: bytes) -> OpenedUpload:
        """Read and check an upload's header (for DICOM: parse and gate it), before any pixel is
        decompressed; the result says what its decode will cost in memory."""
        return open_upload(data, self._limits, self._dicom)

    def prepare(self, upload: bytes | OpenedUpload) -> PreparedImage:
        """Upload bytes (or an opened upload) -> model input and DICOM findings, or a 415/422
        domain error."""
        opened = self.open(upload) if isinstance(upload, bytes) else upload
        decoded = opened.decode()
        # A fully decoded image can still carry an EXIF block or mode Pillow chokes on: still the
        # upload's fault, so the imaging stage's boundary holds here too.
        with image_boundary("the image could not be preprocessed"):
            tensor = to_model_input(
                decoded.image, self.metadata.preprocessing, decoded.approximation
            )
        return PreparedImage(
            tensor, decoded.dicom, decoded.format, decoded.stored_size or decoded.image.size
        )

    def preprocess(self, data: bytes) -> np.ndarray:
        """Upload bytes -> model input (1, H, W, C) float32, or a 415/422 domain error."""
        return self.prepare(data).tensor

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities, shape (N, len(classes)), for an (N, H, W, C) batch."""
        if batch.ndim != 4 or batch.shape[1:] != self._input_shape:
            raise ValueError(f"batch shape {batch.shape} is not (N, {self._input_shape})")
        (outputs,) = self._session.run(
            [self.metadata.output.name], {self.metadata.input.name: self._graph_input(batch)}
        )
        return calibrated_probabilities(outputs, self.metadata)

    def _graph_input(self, batch: np.ndarray) -> np.ndarray:
        """Model input tensors (contract step 4) -> what the graph takes (step 5, equalisation,
        when the contract asks for it). The tensors themselves stay what drift statistics and
        overlays describe."""
        return equalized_model_input(
            batch.astype(np.float32, copy=False), self.metadata.preprocessing
        )

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
            outputs, {self.metadata.input.name: self._graph_input(tensor)}
        )
        probabilities = calibrated_probabilities(scores, self.metadata)[0]
        label = class_name or self.label_for(probabilities)
        cam = class_activation_map(
            features[0], cam_spec, cam_output, self.metadata.classes.index(label)
        )
        return probabilities, cam

    def label_for(self, probabilities: np.ndarray) -> str:
        """The class at the operating point for one image's calibrated probabilities (the
        contract's rule: the positive class when its calibrated probability reaches the metadata's
        threshold, else the likeliest other). With a site profile, the same rule on the site's
        probabilities (`answer_probabilities`) with the site's threshold."""
        return self.metadata.label_at_threshold(
            self.answer_probabilities(probabilities), self.threshold
        )

    def answer_probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        """The probabilities an answer reports, from the model's calibrated ones: those same ones,
        or with a site profile the site's (`SiteProfile.site_probabilities`)."""
        if self.site_profile is None:
            return probabilities
        return self.site_profile.site_probabilities(probabilities, self.metadata.positive_index)

    @property
    def threshold(self) -> float:
        """The threshold that gives the label: the site profile's, else the metadata's."""
        if self.site_profile is not None:
            return self.site_profile.operating.threshold
        return self.metadata.decision.threshold

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
            [self.metadata.output.name, cam_output.name],
            {self.metadata.input.name: self._graph_input(tensor)},
        )
        assert self.metadata.cam is not None
        for index, name in enumerate(self.metadata.classes):
            cam = class_activation_map(features[0], self.metadata.cam, cam_output, index)
            if abs(cam.logit - float(logits[0][index])) > _CAM_TOLERANCE:
                raise ModelLoadError(
                    f"the CAM weights in the metadata do not reproduce the {name} logit "
                    f"({cam.logit:.5f} vs {float(logits[0][index]):.5f})"
                )
