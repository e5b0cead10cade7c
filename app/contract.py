"""The model contract: the metadata JSON that travels beside every ONNX file in `models/`.

Training writes it (`training.export`), the service reads and validates it at start-up and checks it
against the ONNX session before becoming ready. Nothing else passes between the two sides, so every
preprocessing choice the service must reproduce lives here rather than in constants in code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1


class _Strict(BaseModel):
    # Unknown keys are kept (the metadata also carries provenance the service only echoes), but the
    # fields the service acts on are typed and validated.
    model_config = ConfigDict(extra="allow", frozen=True)


class TensorSpec(_Strict):
    """One named tensor of the ONNX graph. `None` in `shape` is a dynamic (batch) dimension."""

    name: str
    shape: list[int | None]
    dtype: Literal["float32"] = "float32"


class InputSpec(TensorSpec):
    layout: Literal["NHWC"] = "NHWC"


class OutputSpec(TensorSpec):
    # "logits": the service applies softmax(logits / temperature). Kept as logits so that
    # calibration stays a number in this file, not a retrained graph.
    kind: Literal["logits", "probabilities"] = "logits"


class Preprocessing(_Strict):
    """How an upload becomes the model input. Applied identically by training and serving.

    1. Decode; apply EXIF orientation.
    2. Bring to 8-bit grey: images with more than 8 bits per sample are linearly stretched from
       their own [min, max] to [0, 255] (`high_bit_depth: "minmax"`); 8-bit colour images go
       through the ITU-R 601-2 luma transform (Pillow's `convert("L")`); alpha is dropped.
    3. Resize to `height` x `width` with `resize_filter`, ignoring aspect ratio (`resize_mode:
       "stretch"`), as the training images were produced.
    4. float32 value = uint8 value * `scale` + `offset`; shape (1, height, width, channels).
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
    method: Literal["temperature", "none"] = "temperature"
    temperature: float = Field(default=1.0, gt=0.0)


class ModelMetadata(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    onnx_file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    classes: list[str] = Field(min_length=2)
    input: InputSpec
    output: OutputSpec
    preprocessing: Preprocessing
    decision: Decision
    calibration: Calibration = Calibration()
    metrics: dict[str, object] = Field(default_factory=dict)
    provenance: dict[str, object] = Field(default_factory=dict)

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unsupported metadata schema_version {v} (expected {SCHEMA_VERSION})")
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
        if len(self.output.shape) != 2 or self.output.shape[1] != len(self.classes):
            raise ValueError(
                f"output shape {self.output.shape} does not match {len(self.classes)} classes"
            )
        return self

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.decision.positive_class)


def load_metadata(path: Path) -> ModelMetadata:
    """Read and validate a metadata JSON file (raises `ValueError`/`pydantic.ValidationError`)."""
    with Path(path).open(encoding="utf-8") as fh:
        return ModelMetadata.model_validate(json.load(fh))
