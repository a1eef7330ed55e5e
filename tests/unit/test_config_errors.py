"""Settings from the environment, and the error table."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import Settings
from service.errors import STATUS, ErrorKind, deadline_exceeded, queue_full


def test_env_prefix_and_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_PORT", "9001")
    monkeypatch.setenv("MOE_MODELS", "a, b")
    monkeypatch.setenv("MOE_MAX_WAIT_MS", "0")
    monkeypatch.setenv("MOE_LOG_LEVEL", "DEBUG")
    s = Settings()
    assert (s.port, s.models, s.max_wait_ms, s.log_level) == (9001, ["a", "b"], 0.0, "debug")
    assert Settings(port=9002).port == 9002  # explicit values (CLI flags) win over the environment


def test_bad_settings_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValidationError, match="max_batch_size"):
        Settings()


def test_every_error_kind_has_a_status() -> None:
    assert set(STATUS) == set(ErrorKind)
    err = queue_full("m", 2300)
    assert err.status == 429 and err.headers == {"Retry-After": "3", "retry-after-ms": "2300"}
    assert err.body() == {"error": "model 'm' is at capacity; retry after 2300 ms", "type": "queue_full"}
    assert queue_full("m", 4).headers == {"Retry-After": "1", "retry-after-ms": "4"}  # never "0": that means now
    own = deadline_exceeded("m", 5)
    assert own.status == 408 and own.body()["type"] == "request_timeout" and own.field == "timeout_ms"
    assert deadline_exceeded("m").status == 504
