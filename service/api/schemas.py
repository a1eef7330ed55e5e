"""Request and response bodies of the /v1 API and the Open Inference Protocol v2 (pydantic, for validation + docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not silently ignored


class ClassifyRequest(BaseModel):
    model: StrictStr | None = Field(None, description="model name; default: the server's default model")
    inputs: StrictStr | list[StrictStr] = Field(..., description="one text or a list of texts")
    top_k: StrictInt | None = Field(None, ge=1, description="return only the k best labels (default: all)")
    truncate: StrictBool = Field(True, description="cut texts longer than the model's maximum instead of a 422")
    raw_scores: StrictBool = Field(
        False,
        description="return the temperature-scaled logits (logits / the model's temperature) instead of their softmax "
        "probabilities",
    )
    return_routing: StrictBool = Field(False, description="return the experts each token was routed to")
    timeout_ms: StrictInt | None = Field(None, ge=1, description="deadline for this request (capped by the server)")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"inputs": ["Shares in the bank rose 5% after profits beat forecasts."]}]},
    )


class LabelScore(BaseModel):
    label: str
    score: float


class ExpertShare(BaseModel):
    expert: int
    share: float


class LayerRoutingOut(BaseModel):
    layer: int
    experts: list[list[int]] = Field(description="per token: the chosen experts, best first")
    gates: list[list[float]] = Field(description="per token: the gate weight of each chosen expert")
    top_experts: list[ExpertShare] = Field(description="experts this text used most (share of its assignments)")


class RoutingOut(BaseModel):
    tokens: list[str]
    layers: list[LayerRoutingOut]


class Prediction(BaseModel):
    label: str
    score: float
    scores: list[LabelScore] = Field(description="labels with scores, best first")
    tokens: int
    truncated: bool
    routing: RoutingOut | None = None


class ClassifyResponse(BaseModel):
    model: str
    predictions: list[Prediction]


class ErrorBody(BaseModel):
    error: str
    type: str
    field: str | None = None


# --- Open Inference Protocol v2 -------------------------------------------------------------------------------


class InferTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferRequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor]
    outputs: list[InferRequestedOutput] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[InferTensor]


class TensorMetadata(BaseModel):
    name: str
    datatype: Literal["BYTES", "FP32", "INT32"]
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
