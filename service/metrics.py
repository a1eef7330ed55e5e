"""Every Prometheus metric of the service, in one place. Base units (seconds), `_total` counters.

Each app gets its own CollectorRegistry, so tests can build several apps in one process. Routing figures (tokens
per expert, imbalance, entropy, drift) are read from the engine's RoutingStats at scrape time by a collector, so
the hot path keeps one set of counts instead of two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from service.engine.routing_stats import RoutingStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# From 0.5 ms (a lone short text) to 30 s (the default request deadline).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_TEXT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
WINDOW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)
RATIO_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


class _RoutingCollector(Collector):
    """Model-wide series {model, layer}; with `per_task`, each task's of a multi-task model {model, task, layer},
    in families of their own (moe_task_*) so a model's series and sums over them (dashboards, alerts) are unchanged."""

    def __init__(self, sources: Callable[[], Iterable[tuple[Any, ...]]], per_task: bool = False) -> None:
        self.sources = sources  # (model, stats), or with per_task (model, task, stats)
        self.per_task = per_task

    def collect(self) -> Iterable[Metric]:
        p, who = ("moe_task_", ["model", "task"]) if self.per_task else ("moe_", ["model"])
        tokens = CounterMetricFamily(
            f"{p}expert_tokens",
            "Token assignments routed to each expert (a token counts once per chosen expert).",
            labels=[*who, "layer", "expert"],
        )
        imbalance = GaugeMetricFamily(
            f"{p}expert_imbalance_ratio",
            "Busiest expert's share over the mean share, recent window (1 = even).",
            labels=[*who, "layer"],
        )
        cv = GaugeMetricFamily(
            f"{p}expert_load_cv", "Coefficient of variation of expert load, recent window.", labels=[*who, "layer"]
        )
        entropy = GaugeMetricFamily(
            f"{p}router_entropy_ratio",
            "Entropy of expert shares over its maximum log(E), recent window (1 = even).",
            labels=[*who, "layer"],
        )
        drift = GaugeMetricFamily(
            f"{p}routing_drift_kl",
            "KL divergence of live expert shares (recent window) from the training profile.",
            labels=[*who, "layer"],
        )
        for *names, stats in self.sources():
            snap = stats.snapshot()
            for layer in snap["since_start"]["layers"]:
                for e, n in enumerate(layer["tokens_per_expert"]):
                    tokens.add_metric([*names, str(layer["layer"]), str(e)], n)
            for layer in snap["window"]["layers"]:
                labels = [*names, str(layer["layer"])]
                if layer["assignments"]:
                    imbalance.add_metric(labels, layer["imbalance_max_over_mean"])
                    cv.add_metric(labels, layer["cv"])
                    entropy.add_metric(labels, layer["normalized_entropy"])
                    if layer["drift_kl"] is not None:
                        drift.add_metric(labels, layer["drift_kl"])
        yield from (tokens, imbalance, cv, entropy, drift)


class _ReadinessCollector(Collector):
    def __init__(self, readiness: Callable[[], Iterable[tuple[str, bool]]]) -> None:
        self.readiness = readiness

    def collect(self) -> Iterable[Metric]:
        ready = GaugeMetricFamily(
            "moe_model_ready", "1 when the model serves; 0 while not ready or when its folder failed.", labels=["model"]
        )
        for model, ok in self.readiness():
            ready.add_metric([model], 1.0 if ok else 0.0)
        yield ready


@dataclass(frozen=True)
class ModelMetrics:
    """One model's engine metric children, looked up once: a labels() call per text or batch costs a lock and a
    dict."""

    queue_depth: Gauge
    tokenization: Histogram
    texts: Counter
    truncated: Counter
    windows: Histogram
    queue_wait: Histogram
    inference: Histogram
    batch_texts: Histogram
    batch_tokens: Histogram
    padding: Histogram


class Metrics:
    """http: the API's metrics (requests, failures, request time); engine: the batcher's (queue, batches, texts,
    routing, model info). One process serving both has both; with a model process each side has its own part and
    /metrics joins the two expositions, so their families must not overlap."""

    def __init__(self, http: bool = True, engine: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if http:
            self._http_metrics()
            self._repository_metrics()
        if engine:
            self._engine_metrics()

    def _http_metrics(self) -> None:
        r = self.registry
        # protocol: http or grpc. A gRPC call's route is its method path (/inference.GRPCInferenceService/ModelInfer)
        # and its status the HTTP status of its error kind (service/errors.py), so one status vocabulary (and the
        # alerts' "5..") covers both protocols.
        self.requests = Counter(
            "moe_requests",
            "Requests by model, route, status code and protocol.",
            ["model", "route", "status", "protocol"],
            registry=r,
        )
        self.failures = Counter("moe_request_failures", "Failed requests by reason.", ["model", "reason"], registry=r)
        self.request_duration = Histogram(
            "moe_request_duration_seconds",
            "Request time from receipt to response.",
            ["model", "route", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def _repository_metrics(self) -> None:
        """Kept by the API process, which starts, swaps and restarts the model processes."""
        r = self.registry
        labels = ["model", "outcome"]
        self.model_loads = Counter("moe_model_loads", "Model loads by outcome (ok, error).", labels, registry=r)
        self.model_reloads = Counter(
            "moe_model_reloads", "Zero-downtime reloads of a serving model by outcome (ok, error).", labels, registry=r
        )
        self.model_unloads = Counter("moe_model_unloads", "Model unloads by outcome (ok, error).", labels, registry=r)
        self.model_restarts = Counter(
            "moe_model_restarts",
            "Restarts of a crashed model process by outcome (ok; error: the new one failed to start; gave_up: the "
            "model is failed).",
            labels,
            registry=r,
        )
        self.model_version = Gauge(
            "moe_model_version_info",
            "The version serving (a hash of the folder's config, tokenizer and weights), value 1.",
            ["model", "version"],
            registry=r,
        )

    def _engine_metrics(self) -> None:
        r = self.registry
        self.tokenization_duration = Histogram(
            "moe_tokenization_duration_seconds",
            "Tokenization time per request.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "moe_queue_duration_seconds",
            "Time a text waited before its batch ran.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "moe_inference_duration_seconds",
            "Model forward time per batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_texts = Histogram(
            "moe_batch_size_texts", "Texts per executed batch.", ["model"], buckets=BATCH_TEXT_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "moe_batch_size_tokens",
            "Real (non-padding) tokens per executed batch.",
            ["model"],
            buckets=BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.padding_ratio = Histogram(
            "moe_batch_padding_ratio",
            "Share of padding in the attention layout of a batch (0 = none).",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("moe_queue_texts", "Texts waiting in the model's queue.", ["model"], registry=r)
        self.queue_capacity = Gauge(
            "moe_queue_capacity_texts", "Texts the model's queue holds before requests get 429.", ["model"], registry=r
        )
        self.texts = Counter("moe_texts", "Texts classified.", ["model"], registry=r)
        self.truncated = Counter(
            "moe_texts_truncated", "Texts some of whose tokens no window read (once per text).", ["model"], registry=r
        )
        self.text_windows = Histogram(
            "moe_text_windows",
            "Windows a text was read in (1: it fits the model's maximum length, or was truncated).",
            ["model"],
            buckets=WINDOW_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "moe_model_info", "Loaded models (value 1).", ["model", "backend", "device", "precision"], registry=r
        )

    def for_model(self, name: str) -> ModelMetrics:
        return ModelMetrics(
            queue_depth=self.queue_depth.labels(name),
            tokenization=self.tokenization_duration.labels(name),
            texts=self.texts.labels(name),
            truncated=self.truncated.labels(name),
            windows=self.text_windows.labels(name),
            queue_wait=self.queue_duration.labels(name),
            inference=self.inference_duration.labels(name),
            batch_texts=self.batch_texts.labels(name),
            batch_tokens=self.batch_tokens.labels(name),
            padding=self.padding_ratio.labels(name),
        )

    def watch_routing(self, sources: Callable[[], Iterable[tuple[str, RoutingStats]]]) -> None:
        self.registry.register(_RoutingCollector(sources))

    def watch_task_routing(self, sources: Callable[[], Iterable[tuple[str, str, RoutingStats]]]) -> None:
        """Multi-task models: each task's routing, (model, task, stats), as the moe_task_* families."""
        self.registry.register(_RoutingCollector(sources, per_task=True))

    def watch_models(self, readiness: Callable[[], Iterable[tuple[str, bool]]]) -> None:
        """moe_model_ready{model} at scrape time, from whoever knows every model's fate: the API process (a model
        process that died cannot report itself; a folder that failed to load is 0)."""
        self.registry.register(_ReadinessCollector(readiness))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge_expositions(parts: list[bytes]) -> bytes:
    """One exposition from several processes' (one per model process): each family once, with every process's
    samples (they differ by their model label), so /metrics stays one valid view."""
    from prometheus_client.parser import text_string_to_metric_families

    merged: dict[str, Metric] = {}
    for part in parts:
        for family in text_string_to_metric_families(part.decode()):
            if family.name in merged:
                merged[family.name].samples.extend(family.samples)
            else:
                merged[family.name] = family
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merged.values()))
    return generate_latest(registry)
