"""The one settings object. Environment variables use the prefix MOE_ (MOE_PORT=9000); `moe-serve serve` flags,
generated from these fields (service/cli.py), override them. A new setting is a field here, with a description
(the flag's help), plus its row in README's configuration table (a test checks both)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.backends.variants import BACKEND_SETTINGS, PRECISION_SETTINGS, runs_summary
from service.modeling.windows import LongText, LongTextPolicy

DEFAULT_BATCH_TOKENS = 16384  # where neither the setting nor the model folder gives a budget

# Built from the variant table (a static type checker sees them as Literal of a tuple; pydantic and the CLI read
# the values).
BackendSetting = Literal[BACKEND_SETTINGS]  # "auto", "torch", "onnx"
PrecisionSetting = Literal[PRECISION_SETTINGS]  # "auto", "fp32", "bf16", "int8"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOE_", extra="ignore")

    models_dir: Path = Field(Path("models"), description="model repository: one folder per model")
    models: list[str] | None = Field(None, description="serve only these model folders, comma-separated (default: all)")
    default_model: str | None = Field(None, description="model used when a request names none (default: the first)")
    host: str = Field("127.0.0.1", description="bind address (the Docker image sets 0.0.0.0)")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    grpc_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="also serve the Open Inference Protocol over gRPC (inference.GRPCInferenceService) on this port, "
        "same host (default: off)",
    )

    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    threads: int | None = Field(None, ge=1, description="intra-op threads of torch / onnxruntime (default: theirs)")
    backend: BackendSetting = Field(
        "auto", description="auto: each model folder's measured choice (config.json serving), else torch"
    )
    precision: PrecisionSetting = Field("auto", description=f"auto: the folder's choice; {runs_summary()}")

    model_process: bool = Field(
        True,
        description="run the models in a process of their own, behind local IPC: HTTP work and the engine's Python "
        "work then run on two GILs (false: one process, the engine on a thread)",
    )

    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="token budget of one batch, counted as batch size x longest text (padded) (default: the model "
        f"folder's measured budget on the CPU, config.json serving, else {DEFAULT_BATCH_TOKENS})",
    )
    max_batch_size: int = Field(128, ge=1, description="most texts in one batch")
    max_wait_ms: float = Field(
        2.0, ge=0, description="when busy, how long a batch may wait for more texts to join (0 = continuous)"
    )
    keep_warm_s: float = Field(
        2.0,
        ge=0,
        description="after a batch, keep an idle engine warm this long with a tiny forward every 10 ms or more (under "
        "5% of a core), so a lone request after a pause is not slowed by cold caches and threads (0 = off)",
    )
    long_text: LongText = Field(
        LongTextPolicy.mode,
        description="texts over the model's maximum length: chunk (overlapping windows, logits pooled) or truncate "
        "(the first window only); a request's long_text overrides it",
    )
    chunk_overlap: int = Field(
        LongTextPolicy.overlap, ge=0, description="tokens two consecutive windows share (at most half a window)"
    )
    max_windows: int = Field(
        LongTextPolicy.max_windows,
        ge=1,
        description="most windows per text; the rest is cut (truncated: true), or a 422 for a request with "
        "truncate=false",
    )
    max_client_batch_size: int = Field(64, ge=1, description="most texts in one request")
    max_queue_texts: int = Field(2048, ge=1, description="texts waiting per model before new requests get 429")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline for a request, queue wait included")
    max_body_bytes: int = Field(2_000_000, ge=1024, description="largest request body; larger gets 413")
    worker_hang_s: float = Field(
        120.0, gt=0, description="a batch running longer than this marks the model dead and the process exits non-zero"
    )
    model_control: Literal["none", "explicit", "poll"] = Field(
        "none",
        description="none: the folders found at start serve until the server stops; explicit: also "
        "POST /v2/repository/models/{m}/load and /unload; poll: the models directory is watched and new, changed "
        "or removed folders are loaded, reloaded or unloaded (model process mode only)",
    )
    poll_interval_s: float = Field(2.0, gt=0, description="poll mode: how often the models directory is read")
    poll_settle_s: float = Field(
        3.0, ge=0, description="poll mode: a folder must stay unchanged this long before it is loaded (being copied)"
    )
    restart_backoff_s: float = Field(
        0.5, gt=0, description="first delay before a dead or hung model process is restarted; doubles per crash"
    )
    restart_backoff_max_s: float = Field(30.0, gt=0, description="longest delay between restarts of a model process")
    max_restarts: int = Field(
        5, ge=1, description="this many crashes of one model within restart_window_s make the model failed"
    )
    restart_window_s: float = Field(300.0, gt=0, description="the window in which crashes count toward max_restarts")
    exit_on_model_crash: bool = Field(
        False,
        description="stop the server (exit 3) when a model process dies, instead of restarting it (it exits anyway "
        "once every model has failed)",
    )
    shutdown_drain_s: float = Field(
        2.0, ge=0, description="on SIGTERM: keep accepting this long, answering 503 (Connection: close), then stop"
    )
    shutdown_grace_s: float = Field(10.0, ge=0, description="then: how long requests in flight may take to finish")
    routing_window_s: float = Field(60.0, gt=0, description="length of the recent window in routing statistics")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="server log level")
    api_key: SecretStr | None = Field(
        None, description="when set, every route but health, /metrics and the docs needs Authorization: Bearer <key>"
    )
    metrics_need_key: bool = Field(False, description="put /metrics behind the API key too")
    access_log: Literal["off", "json"] = Field("off", description="json: one JSON line per request on stderr")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, v: object) -> object:
        # MOE_MODELS=a,b as well as a JSON list; --models a,b too (the one place the list is parsed).
        if isinstance(v, str):
            return json.loads(v) if v.strip().startswith("[") else [s.strip() for s in v.split(",") if s.strip()]
        return v

    def batch_tokens(self, measured: int | None) -> int:
        """The token budget per batch in effect: the setting, else the folder's measured one, else the default."""
        return self.max_batch_tokens or measured or DEFAULT_BATCH_TOKENS

    def long_text_policy(self) -> LongTextPolicy:
        return LongTextPolicy(self.long_text, self.chunk_overlap, self.max_windows)
