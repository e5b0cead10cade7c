"""The model contract: the metadata JSON that travels beside every ONNX file in `models/`.

Training writes it (`training.export`), the service reads and validates it at start-up and checks it
against the ONNX session before becoming ready. Nothing else passes between the two sides, so every
preprocessing choice the service must reproduce lives here rather than in constants in code.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

# 2: `preprocessing.dicom` (the DICOM display pipeline) and `intended_use` (header gating, training
# population) became part of the contract. Version 1 files predate DICOM input and are refused.
# 3: `outputs`, a list of the graph's outputs with their roles (the classifier's scores and, for
# class activation maps, the last feature map), and `cam`, the dense head's weights. A version 2
# file (one `output`) still loads, as a model without explanations.
SCHEMA_VERSION = 3

# Said by every answer and every result object, whatever the model.
DISCLAIMER = (
    "Research use only. This is not a medical device and must not be used for diagnosis or "
    "treatment decisions; a qualified clinician must review every image."
)
SUPPORTED_SCHEMA_VERSIONS = (2, 3)


class _Strict(BaseModel):
    # An unknown key is an error: a misspelt field would otherwise be ignored and its default used.
    # What the service only echoes lives in the free-form `metrics` and `provenance` objects.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One named tensor of the ONNX graph. `None` in `shape` is a dynamic (batch) dimension."""

    name: str
    shape: list[int | None]
    dtype: Literal["float32"] = "float32"


class InputSpec(TensorSpec):
    layout: Literal["NHWC"] = "NHWC"


class OutputSpec(TensorSpec):
    """One graph output and what it is for.

    `classifier`: class scores (N, classes); with `kind: logits` the service applies
    softmax(logits / temperature), kept as logits so that calibration stays a number in this file,
    not a retrained graph. `cam_features`: the last convolutional feature map, the input of the
    global average pooling that feeds the dense head (see `CamSpec`), in `layout`.
    """

    role: Literal["classifier", "cam_features"] = "classifier"
    # Only the classifier's scores have a kind (default `logits`); a feature map has none, and
    # its serialisation has no `kind` key.
    kind: Literal["logits", "probabilities"] | None = Field(
        default=None, exclude_if=lambda value: value is None
    )
    layout: Literal["NC", "NCHW", "NHWC"] = "NC"

    @model_validator(mode="after")
    def _kind_by_role(self) -> OutputSpec:
        if self.role == "classifier" and self.kind is None:
            object.__setattr__(self, "kind", "logits")
        if self.role != "classifier" and self.kind is not None:
            raise ValueError(f"a {self.role} output has no kind (got {self.kind!r})")
        return self


class CamSpec(_Strict):
    """Exact class activation maps for a head of global average pooling then one dense layer.

    For class c, CAM_c(i, j) = sum_k weights[k][c] * features[k, i, j]. Its spatial mean is the
    class logit less bias[c], because the pooled features are the spatial means of the map.
    `sha256` is over the float32 little-endian bytes of `weights` (row-major) then `bias`, so that a
    hand-edited number is caught at start-up.
    """

    feature_output: str
    weights: list[list[float]] = Field(min_length=1, description="channels x classes")
    bias: list[float] = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @staticmethod
    def digest(weights: object, bias: object) -> str:
        import hashlib

        import numpy as np

        data = np.asarray(weights, dtype="<f4").tobytes() + np.asarray(bias, dtype="<f4").tobytes()
        return hashlib.sha256(data).hexdigest()

    @model_validator(mode="after")
    def _intact(self) -> CamSpec:
        if len({len(row) for row in self.weights}) != 1 or len(self.weights[0]) != len(self.bias):
            raise ValueError("cam weights must be channels x classes, bias one per class")
        if self.digest(self.weights, self.bias) != self.sha256:
            raise ValueError("cam weights do not match their sha256")
        return self


VoiSource = Literal["window", "voi_lut_sequence", "full_range"]


class DicomRendering(_Strict):
    """How a DICOM image becomes the 8-bit grey image of `Preprocessing` step 2: the DICOM grayscale
    display pipeline (PS3.3 C.11, PS3.4 N.2), the way a viewer shows it. All arithmetic is float64.

    1. Stored values: one frame, one sample per pixel (MONOCHROME1/2), integer pixel data.
    2. Modality LUT: the Modality LUT Sequence when present (index = clip(x - first mapped value,
       0, entries - 1)), else `x * RescaleSlope + RescaleIntercept` (1 and 0 when absent).
    3. VOI, the first source of `voi_order` the file carries, giving v in [0, 1]:
       - `window`: Window Center/Width number `window_index` (c, w), by VOI LUT Function:
         LINEAR (w >= 1): v = clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1);
         LINEAR_EXACT (w > 0): v = clip((x - c) / w + 0.5, 0, 1);
         SIGMOID (w > 0): v = 1 / (1 + exp(-4 * (x - c) / w)).
         A window whose width breaks these bounds is skipped, with a warning.
       - `voi_lut_sequence`: the first VOI LUT, index = clip(floor(x) - first mapped value, 0,
         entries - 1), v = min(LUT value / (2**bits - 1), 1).
       - `full_range`: v = (x - lo) / (hi - lo) over the modality values' own [lo, hi], pixels
         equal to Pixel Padding Value (or inside the padding range) excluded
         (`full_range_excludes_padding`); a constant image gives v = 0.
    4. Polarity: v = 1 - v when Photometric Interpretation is MONOCHROME1 or Presentation LUT
       Shape is INVERSE (`invert`), once, never twice, so that air is dark.
    5. 8-bit: round_half_even(v * 255). Padding pixels become `padding_value` (black).
    """

    voi_order: list[VoiSource] = Field(min_length=1)
    window_index: int = Field(ge=0)
    full_range_excludes_padding: bool
    invert: Literal["monochrome1_or_presentation_inverse"]
    padding_value: int = Field(ge=0, le=255)

    @field_validator("voi_order")
    @classmethod
    def _ends_with_full_range(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v) or v[-1] != "full_range":
            raise ValueError("voi_order must list each source once and end with 'full_range'")
        return v


class JpegDctScaling(_Strict):
    """Step 1 for a large JPEG: decode it at 1/d of its size in the DCT domain (libjpeg's scaled
    inverse DCT, what Pillow's `Image.draft` asks for), which skips most of the decoding and
    resizing work for pixels the model never sees.

    For a JPEG stored as W x H, d is the largest of 8, 4, 2 that is at most `max_denominator` and
    satisfies `d * min_ratio * max(height, width) <= min(W, H)`; when none qualifies the JPEG is
    decoded at full size. The decoded image is ceil(W / d) x ceil(H / d) in the file's own colour
    mode, and steps 2-4 apply to it unchanged; its shorter side stays at least `min_ratio` times
    the target's longer side, so the final resize still averages over several pixels per output
    pixel. PNG and DICOM images are always decoded at full size.
    """

    min_ratio: int = Field(ge=1)
    # libjpeg's 1/2 scale stays closest to a full decode; 1/4 and 1/8 move a model more.
    max_denominator: Literal[2, 4, 8] = 8


# The second moment, in stored pixels squared, of one decomposition level's analysis low-pass
# filter (ITU-T T.800 Annex F): the reversible 5/3 filter (-1, 2, 6, 2, -1) / 8 (F.3.8.2) is
# slightly negative, the irreversible 9/7 one (F.4.8.2, Table F.4) positive. Level r's
# approximation is the cascade of r such filters at spacings 1, 2, ..., 2**(r-1), so its moment is
# this times (4**r - 1) / 3.
J2K_LOWPASS_SECOND_MOMENT = {"5/3": -0.5, "9/7": 0.460348}


class Jpeg2000Reduction(_Strict):
    """Step 1 for a large JPEG 2000 DICOM frame: decode it at resolution level r, the codestream's
    own wavelet approximation at 1/2**r per side (OpenJPEG's "reduce"), which skips the code-blocks
    of the r finest resolutions, most of the decoding work for pixels the model never sees.

    For a frame stored as W x H whose codestream's wavelet (the transformation its main header's
    COD, or a COC for its component, gives) is one of `wavelets`, r is the largest of 3, 2, 1 that
    is at most `max_level`, at most the number of wavelet decomposition levels that header gives,
    and satisfies `2**r * min_ratio * max(height, width) <= min(W, H)`; when
    none qualifies the frame is decoded at full size. The rule applies only to a frame whose SIZ
    describes one component of Bits Stored precision, signed as Pixel Representation says, with no
    image offset; other frames are decoded at full size. The reduced frame is exactly
    ceil(W / 2**r) x ceil(H / 2**r) stored values (anything else is refused), and the DICOM
    rendering (`DicomRendering`, the full range included) applies to it unchanged. Other transfer
    syntaxes, and JPEG and PNG uploads, are unaffected.

    The 8-bit frame is then resized (step 3) so that it samples the stored grid where the full-size
    resize would, through a filter of the same spread. Sample n of level r is the wavelet low-pass
    output centred on stored pixel 2**r * n, not on the middle of its 2**r pixels, so the resize
    box starts (2**r - 1) / 2**(r + 1) reduced pixels in and spans W / 2**r x H / 2**r (the frame
    is first padded by edge replication: one pixel before, two after). The approximation's own
    low-pass adds its second moment M (`J2K_LOWPASS_SECOND_MOMENT` x (4**r - 1) / 3, of the
    codestream's wavelet as its COD/COC says) to the resize filter's; each axis, vertical first, is
    first filtered with the taps [a, 1 - 2a, a], a = -M / (2 * 4**r), computed in float64 as
    a * (left + right) + (1 - 2a) * centre, which takes it off again. The resize then runs on
    float32 values (Pillow mode "F"), rounded half to even and clipped back to 0..255.
    """

    min_ratio: int = Field(ge=1)
    max_level: Literal[1, 2, 3] = 1
    # "5/3": the reversible wavelet (lossless, and some lossy), "9/7": the irreversible one (lossy).
    wavelets: list[Literal["5/3", "9/7"]] = Field(default=["5/3", "9/7"], min_length=1)


class Preprocessing(_Strict):
    """How an upload becomes the model input. Applied identically by training and serving.

    1. Decode (a large JPEG at a reduced scale, by `jpeg_dct_scaling`; a large JPEG 2000 DICOM
       frame at a reduced resolution level, by `dicom_j2k_reduction`); apply EXIF orientation.
    2. Bring to 8-bit grey: images with more than 8 bits per sample are linearly stretched from
       their own [min, max] to [0, 255] (`high_bit_depth: "minmax"`); 8-bit colour images go
       through the ITU-R 601-2 luma transform (Pillow's `convert("L")`); alpha is dropped.
       DICOM images are rendered by `dicom` (`DicomRendering`) instead.
    3. Resize to `height` x `width` with `resize_filter`, ignoring aspect ratio (`resize_mode:
       "stretch"`), as the training images were produced.
    4. float32 value = uint8 value * `scale` + `offset`; shape (1, height, width, channels).
    5. With `equalization: "histogram"`, the model's input is the step-3 image equalised per image
       and per channel before step 4's scaling: a grey level v becomes
       float32(255 * (c(v) - c_min)) / float32(P - c_min), where c(v) counts the image's pixels at
       or below v, c_min counts those at its darkest level and P = height * width (a constant
       image becomes 0). Every strictly increasing tone curve (gamma, a window, a VOI LUT without
       clipping) applied before step 3 leaves this input unchanged up to 8-bit rounding. Step 4's
       value (before equalisation) stays what drift statistics and overlays describe.
    """

    color_mode: Literal["grayscale", "rgb"] = "grayscale"
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    resize_filter: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = (
        "bilinear"
    )
    resize_mode: Literal["stretch"] = "stretch"
    scale: float = 1.0 / 255.0
    offset: float = 0.0
    high_bit_depth: Literal["minmax"] = "minmax"
    # "none": metadata written before step 5 existed, and models trained without it.
    # Left out of dumps when "none", so that earlier metadata and cache keys stay byte for byte.
    equalization: Literal["none", "histogram"] = Field(
        default="none", exclude_if=lambda value: value == "none"
    )
    dicom: DicomRendering
    # None: every JPEG is decoded at full size (metadata written before this rule existed).
    jpeg_dct_scaling: JpegDctScaling | None = None
    # None: every JPEG 2000 DICOM frame is decoded at full resolution (metadata written before
    # this rule existed).
    dicom_j2k_reduction: Jpeg2000Reduction | None = None

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "grayscale" else 3


class Decision(_Strict):
    """The operating point: label = positive class when its calibrated probability >= threshold."""

    threshold: float = Field(ge=0.0, le=1.0)
    positive_class: str
    target_sensitivity: float | None = None
    chosen_on: str = "validation"


class Calibration(_Strict):
    """softmax(logits / temperature + logit_bias). With two classes a bias on the positive class
    shifts the log-odds: p = sigmoid((z_pos - z_neg) / T + b), a temperature and a bias fitted
    together (on validation and its synthetic-shift renderings since 2.0.0; 1.0.0 has none)."""

    method: Literal["temperature", "none"] = "temperature"
    temperature: float = Field(default=1.0, gt=0.0)
    logit_bias: list[float] | None = Field(
        default=None, exclude_if=lambda value: value is None, description="one per class"
    )
    # Where it was fitted and the expected calibration error there, before and after.
    fitted_on: str | None = None
    val_ece_before: float | None = None
    val_ece_after: float | None = None


class Population(_Strict):
    """Who the training images came from. Ages are in years, `[age_years_min, age_years_max)`."""

    description: str
    age_years_min: float = Field(ge=0)
    age_years_max: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Population:
        if self.age_years_max <= self.age_years_min:
            raise ValueError("age_years_max must be above age_years_min")
        return self


class IntendedUse(_Strict):
    """What the model is for, checked from a DICOM header before its pixels are decoded.

    A DICOM upload is classified only when its Modality is in `modalities`, its SOP Class UID in
    `sop_class_uids`, a present Body Part Examined in `body_parts`, and a present View Position not
    in `refused_view_positions`. A patient whose age (Patient's Age, or Birth Date with the study
    date) falls outside `training_population` gets a warning, or a refusal where the service's
    settings ask for one.
    """

    summary: str
    modalities: list[str] = Field(min_length=1)
    sop_class_uids: dict[str, str] = Field(min_length=1, description="UID -> name")
    body_parts: list[str] = Field(min_length=1)
    refused_view_positions: list[str]
    training_population: Population


class ProbabilityReference(_Strict):
    """The distribution of the calibrated probability of the positive class on a reference split
    (the validation split, written by `training.export`): what drift scores compare answers with.

    Bin i holds p with bin_edges[i] <= p < bin_edges[i + 1] (the last bin also holds 1.0);
    `fractions[i]` is the share of the reference images in bin i. The edges are the reference's
    own deciles (`from_probabilities`), so that every bin starts with about a tenth of the images.
    """

    split: str = Field(min_length=1, description="The split the fractions were measured on.")
    n_images: int = Field(ge=1)
    bin_edges: list[float] = Field(min_length=3)
    fractions: list[float] = Field(min_length=2)
    computed_with: str = Field(min_length=1, description="How the probabilities were obtained.")

    @model_validator(mode="after")
    def _a_distribution(self) -> ProbabilityReference:
        edges = self.bin_edges
        if edges[0] != 0.0 or edges[-1] != 1.0:
            raise ValueError("bin_edges must run from 0.0 to 1.0")
        if any(b <= a for a, b in itertools.pairwise(edges)):
            raise ValueError("bin_edges must increase strictly")
        if len(self.fractions) != len(edges) - 1:
            raise ValueError(f"{len(edges) - 1} bins need as many fractions")
        if any(not 0.0 <= f <= 1.0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError("fractions must be in [0, 1] and sum to 1")
        return self

    def bin_of(self, p: np.ndarray) -> np.ndarray:
        """The bin index of each probability (the rule in the class docstring)."""
        return np.searchsorted(np.asarray(self.bin_edges[1:-1]), np.asarray(p), side="right")

    @classmethod
    def from_probabilities(
        cls, p: np.ndarray, split: str, computed_with: str, n_bins: int = 10
    ) -> ProbabilityReference:
        """Decile bins of `p` and the share of `p` in each (bins that would be empty are merged)."""
        values = np.asarray(p, dtype=np.float64)
        inner = np.unique(np.quantile(values, np.arange(1, n_bins) / n_bins))
        inner = inner[(inner > 0.0) & (inner < 1.0)]
        edges = [0.0, *(float(e) for e in inner), 1.0]
        edges = [e for i, e in enumerate(edges) if i == 0 or e > edges[i - 1]]
        counts = np.bincount(
            np.searchsorted(np.asarray(edges[1:-1]), values, side="right"),
            minlength=len(edges) - 1,
        )
        fractions = [round(float(c) / len(values), 6) for c in counts]
        fractions[int(np.argmax(counts))] += round(1.0 - sum(fractions), 6)  # rounding remainder
        return cls(
            split=split,
            n_images=len(values),
            bin_edges=edges,
            fractions=fractions,
            computed_with=computed_with,
        )


class Monitoring(_Strict):
    """What the service needs to watch its answers for drift."""

    reference: ProbabilityReference


class ModelMetadata(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    onnx_file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    classes: list[str] = Field(min_length=2)
    input: InputSpec
    outputs: list[OutputSpec] = Field(min_length=1)
    preprocessing: Preprocessing
    decision: Decision
    calibration: Calibration = Calibration()
    intended_use: IntendedUse
    cam: CamSpec | None = None
    # Optional within schema 3: a model exported before drift monitoring has no reference, and
    # its drift score is then not computed.
    monitoring: Monitoring | None = None
    metrics: dict[str, object] = Field(default_factory=dict)
    provenance: dict[str, object] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _single_output_files(cls, data: object) -> object:
        """A version 2 file names one `output`: it becomes the only (classifier) output."""
        if isinstance(data, dict) and data.get("schema_version") == 2 and "output" in data:
            data = dict(data)
            data["outputs"] = [{**data.pop("output"), "role": "classifier"}]
        return data

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v not in SUPPORTED_SCHEMA_VERSIONS:
            hint = (
                " (version 1 predates DICOM rendering and intended-use rules: re-export the "
                "model with `python -m training.export`)"
                if v < min(SUPPORTED_SCHEMA_VERSIONS)
                else ""
            )
            raise ValueError(
                f"unsupported metadata schema_version {v} (expected {SCHEMA_VERSION}){hint}"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelMetadata:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must be unique")
        if self.decision.positive_class not in self.classes:
            raise ValueError(f"positive_class {self.decision.positive_class!r} is not in classes")
        p = self.preprocessing
        expected = [None, p.height, p.width, p.channels]
        if len(self.input.shape) != 4 or self.input.shape[1:] != expected[1:]:
            raise ValueError(
                f"input shape {self.input.shape} does not match preprocessing "
                f"(N, {p.height}, {p.width}, {p.channels})"
            )
        classifiers = [o for o in self.outputs if o.role == "classifier"]
        if len(classifiers) != 1:
            raise ValueError(
                f"exactly one output must have role 'classifier', not {len(classifiers)}"
            )
        if len({o.name for o in self.outputs}) != len(self.outputs):
            raise ValueError("output names must be unique")
        output = classifiers[0]
        if len(output.shape) != 2 or output.shape[1] != len(self.classes):
            raise ValueError(
                f"output shape {output.shape} does not match {len(self.classes)} classes"
            )
        bias = self.calibration.logit_bias
        if bias is not None and len(bias) != len(self.classes):
            raise ValueError(f"calibration.logit_bias has {len(bias)} values, not one per class")
        features = {o.name: o for o in self.outputs if o.role == "cam_features"}
        if self.cam is not None:
            spec = features.get(self.cam.feature_output)
            if spec is None:
                raise ValueError(
                    f"cam.feature_output {self.cam.feature_output!r} is not a cam_features output"
                )
            if spec.layout not in ("NCHW", "NHWC") or len(spec.shape) != 4:
                raise ValueError("a cam_features output must be 4-D, NCHW or NHWC")
            channels = spec.shape[1] if spec.layout == "NCHW" else spec.shape[3]
            if channels != len(self.cam.weights) or len(self.cam.bias) != len(self.classes):
                raise ValueError(
                    f"cam weights are {len(self.cam.weights)}x{len(self.cam.bias)}, the feature "
                    f"map has {channels} channels and there are {len(self.classes)} classes"
                )
        elif features:
            raise ValueError("a cam_features output needs the `cam` weights")
        return self

    @property
    def output(self) -> OutputSpec:
        """The classifier output (class scores)."""
        return next(o for o in self.outputs if o.role == "classifier")

    @property
    def cam_output(self) -> OutputSpec | None:
        """The feature-map output that class activation maps are computed from, if any."""
        if self.cam is None:
            return None
        return next(o for o in self.outputs if o.name == self.cam.feature_output)

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.decision.positive_class)

    def calibrated_probabilities(self, outputs: np.ndarray) -> np.ndarray:
        """The graph's outputs (N, classes) -> calibrated class probabilities, float64.

        softmax(logits / temperature) per row; a `probabilities` head is taken back to log space
        first, so that the same temperature applies to either kind of head.
        """
        values = np.asarray(outputs, dtype=np.float64)
        if self.output.kind == "probabilities":
            values = np.log(np.clip(values, 1e-12, 1.0))
        if self.calibration.method == "temperature":
            values = values / self.calibration.temperature
            if self.calibration.logit_bias is not None:
                values = values + np.asarray(self.calibration.logit_bias, dtype=np.float64)
        exp = np.exp(values - values.max(axis=1, keepdims=True))
        probabilities: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
        return probabilities

    def label_at_operating_point(self, probabilities: np.ndarray) -> str:
        """The decision rule at the model's own threshold (`label_at_threshold`)."""
        return self.label_at_threshold(probabilities, self.decision.threshold)

    def label_at_threshold(self, probabilities: np.ndarray, threshold: float) -> str:
        """The decision rule, the one place it is written: for one image's probabilities, the
        positive class when its probability reaches `threshold` (the model's, or a site
        profile's on the site's probabilities), otherwise the most probable other class."""
        positive = self.positive_index
        if probabilities[positive] >= threshold:
            return self.decision.positive_class
        others = [i for i in range(len(self.classes)) if i != positive]
        return self.classes[max(others, key=lambda i: probabilities[i])]


_SCALAR_LIST = re.compile(r"\[\s*((?:-?[0-9.eE+-]+|null)(?:,\s*(?:-?[0-9.eE+-]+|null))*)\s*\]")


def dump_metadata(meta: dict[str, Any]) -> str:
    """The metadata as the JSON text written beside a model: indented, with every list of numbers
    on one line (the CAM weights would otherwise take a line per number)."""
    text = json.dumps(meta, indent=2)
    return (
        _SCALAR_LIST.sub(lambda m: "[" + ", ".join(re.split(r",\s*", m.group(1))) + "]", text)
        + "\n"
    )


def load_metadata(path: Path) -> ModelMetadata:
    """Read and validate a metadata JSON file (raises `ValueError`/`pydantic.ValidationError`)."""
    with Path(path).open(encoding="utf-8") as fh:
        return ModelMetadata.model_validate(json.load(fh))
