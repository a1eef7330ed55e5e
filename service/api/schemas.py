"""Request and response bodies of the /v1 API and the Open Inference Protocol v2 (pydantic, for validation + docs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr, WithJsonSchema

from service.modeling.windows import LongText

# A text to classify: the schema says what the code checks (not empty, not only whitespace); the code keeps its
# own clearer message, naming the text by index. Whitespace is what str.strip() removes, which is not regex's \s
# (it counts U+001C..U+001F and U+0085, not U+FEFF): the pattern spells out Python's set.
PY_SPACE = "\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
Text = Annotated[StrictStr, WithJsonSchema({"type": "string", "minLength": 1, "pattern": f"[^{PY_SPACE}]"})]


def _whole(v: object) -> object:
    """JSON Schema's integer includes 5.0: accept a float with no fraction, as the documented schema does; strings,
    booleans and 5.5 stay errors."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


PositiveWhole = Annotated[StrictInt, Field(ge=1), BeforeValidator(_whole)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not silently ignored


TaskList = Annotated[list[StrictStr], Field(min_length=1, json_schema_extra={"uniqueItems": True})]


class ClassifyRequest(BaseModel):
    model: StrictStr | None = Field(None, description="model name; default: the server's default model")
    inputs: Text | Annotated[list[Text], Field(min_length=1)] = Field(..., description="one text or a list of texts")
    top_k: PositiveWhole | None = Field(None, description="return only the k best labels (default: all)")
    truncate: StrictBool = Field(
        True,
        description="may a text be cut: false gives a 422 for a text over the model's maximum length (over "
        "max_windows windows with long_text=chunk) instead of cutting it",
    )
    long_text: LongText | None = Field(
        None,
        description="texts over the model's maximum length: chunk (read in overlapping windows, logits pooled) or "
        "truncate (the first window only); default: the server's long_text setting",
    )
    raw_scores: StrictBool = Field(
        False,
        description="return the temperature-scaled logits (logits / the model's temperature) instead of their softmax "
        "probabilities",
    )
    return_routing: StrictBool = Field(False, description="return the experts each token was routed to")
    timeout_ms: PositiveWhole | None = Field(None, description="deadline for this request (capped by the server)")
    task: StrictStr | TaskList | None = Field(
        None,
        description="multi-task models: the task, or tasks, to run on every text (default: every task); a "
        "single-task model takes none",
    )

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
    tokens: list[str] = Field(description="every window's tokens, window after window")
    window_tokens: list[int] = Field(description="tokens of each window, in order: splits tokens and experts")
    layers: list[LayerRoutingOut]


class Prediction(BaseModel):
    task: str | None = Field(None, description="multi-task models: the task this prediction is for")
    text: int | None = Field(None, description="multi-task models: the index of the text in inputs")
    label: str
    score: float
    scores: list[LabelScore] = Field(description="labels with scores, best first")
    tokens: int = Field(description="tokens the model read, every window's (overlaps and special tokens included)")
    windows: int = Field(description="windows the text was read in: 1 unless it was chunked")
    truncated: bool = Field(description="some of the text's tokens were read by no window")
    routing: RoutingOut | None = None


class ClassifyResponse(BaseModel):
    model: str
    predictions: list[Prediction]


class ErrorBody(BaseModel):
    error: str
    type: str
    field: str | None = None


# --- Open Inference Protocol v2 -------------------------------------------------------------------------------


TextRow = Annotated[list[Text], Field(min_length=1, max_length=1)]


class InferTensor(BaseModel):
    name: Literal["text"]
    shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=2)]
    datatype: Literal["BYTES"]
    parameters: dict[str, Any] | None = None
    data: Annotated[list[Text | TextRow], Field(min_length=1)] | None = None  # flat for [n], one per row for [n, 1]


# `label` and `probabilities`; a multi-task model's outputs are `<task>_label` and `<task>_probabilities`.
OutputName = Annotated[StrictStr, Field(pattern=r"^(label|probabilities|[A-Za-z0-9][\w.-]*_(label|probabilities))$")]


class InferRequestedOutput(BaseModel):
    name: OutputName
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: Annotated[list[InferTensor], Field(min_length=1, max_length=1)]  # exactly one tensor of texts
    outputs: list[InferRequestedOutput] | None = None


class InferOutputTensor(BaseModel):
    name: OutputName
    shape: list[int]
    datatype: Literal["BYTES", "FP32"]
    data: list[Any]


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[InferOutputTensor]


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


# --- GET /v1/models/{model}/experts (service/modeling/expert_profile.py) ------------------------------------------


class ClassShare(BaseModel):
    label: str
    share: float = Field(description="share of this class's assignments (test split) that went to the expert")


class ExpertOut(BaseModel):
    expert: int
    training_share: float | None = Field(description="share of the layer's assignments on the validation split")
    top_classes: list[ClassShare] = Field(description="the classes that rely on this expert most, best first")


class ExpertLayerOut(BaseModel):
    layer: int
    training_share: list[float] | None = Field(description="per expert: the reference routing drift is measured from")
    class_share: dict[str, list[float]] | None = Field(
        description="per true class: the share of its assignments each expert got (eval.json's expert_by_class)"
    )
    experts: list[ExpertOut]


class ExpertsResponse(BaseModel):
    model: str
    num_experts: int
    top_k: int
    labels: list[str]
    training_split: str | None = Field(description="split of routing_profile.json; null when the folder has none")
    evaluation_split: str | None = Field(description="split of eval.json's expert_by_class; null when none")
    layers: list[ExpertLayerOut] = Field(description="one per MoE layer; empty when the model was never evaluated")
