"""Typed response bodies; their field descriptions become the OpenAPI schema."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from app.contract import Calibration, Decision, InputSpec, OutputSpec, Preprocessing

DISCLAIMER = (
    "Research use only. This is not a medical device and must not be used for diagnosis or "
    "treatment decisions; a qualified clinician must review every image."
)


class ModelIdentity(BaseModel):
    name: str
    version: str
    sha256: str = Field(description="sha256 of the ONNX file that produced the answer.")


class TimingsMs(BaseModel):
    decode: float = Field(description="Decoding and preprocessing, milliseconds.")
    inference: float = Field(description="ONNX Runtime run, including queueing for it.")
    total: float = Field(description="From the request's arrival to the response, milliseconds.")


class PredictionResponse(BaseModel):
    label: str = Field(description="The class at the model's operating threshold.")
    probabilities: dict[str, float] = Field(
        description="Calibrated probability per class, in the model's class order; sums to 1."
    )
    threshold: float = Field(
        description="Operating threshold on the positive class's calibrated probability."
    )
    model: ModelIdentity
    execution_provider: str = Field(description="The ONNX Runtime provider that ran the model.")
    request_id: str = Field(description="Also returned as the X-Request-ID header.")
    timing_ms: TimingsMs
    disclaimer: str = DISCLAIMER

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "label": "PNEUMONIA",
                    "probabilities": {"NORMAL": 0.08, "PNEUMONIA": 0.92},
                    "threshold": 0.43,
                    "model": {"name": "pneumonia_cxr", "version": "1.0.0", "sha256": "3f5a..."},
                    "execution_provider": "CPUExecutionProvider",
                    "request_id": "0b9f6c1e2d7a4f0c9a8b7c6d5e4f3a2b",
                    "timing_ms": {"decode": 41.2, "inference": 18.7, "total": 63.5},
                    "disclaimer": DISCLAIMER,
                }
            ]
        }
    }


class LiveResponse(BaseModel):
    status: Literal["alive"] = "alive"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model: ModelIdentity
    execution_provider: str


class ModelInfo(BaseModel):
    """Everything a client needs to interpret an answer: the metadata contract, as served."""

    name: str
    version: str
    sha256: str
    classes: list[str] = Field(description="Class names in the model's output order.")
    input: InputSpec
    output: OutputSpec
    preprocessing: Preprocessing
    decision: Decision
    calibration: Calibration
    metrics: dict[str, object]
    provenance: dict[str, object]
    execution_provider: str
    disclaimer: str = DISCLAIMER
