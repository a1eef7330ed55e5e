"""Service errors and the one table that maps them to HTTP statuses (and to gRPC status codes).

Every error response has the same body: {"error": message, "type": kind, "field"?: location}. The "error" string
is what the Open Inference Protocol v2 asks for; "type" and "field" let clients act without parsing prose.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorKind(str, Enum):
    VALIDATION = "validation"
    INPUT_TOO_LONG = "input_too_long"
    MODEL_NOT_FOUND = "model_not_found"
    NOT_FOUND = "not_found"
    MODEL_NOT_READY = "model_not_ready"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    QUEUE_FULL = "queue_full"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    REQUEST_TIMEOUT = "request_timeout"
    MODEL_FAILED = "model_failed"
    CLIENT_GONE = "client_disconnected"
    UNAUTHORIZED = "unauthorized"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"
    MODEL_CONTROL_OFF = "model_control_off"
    NOT_SUPPORTED = "not_supported"
    TASK_NOT_FOUND = "task_not_found"


STATUS: dict[ErrorKind, int] = {
    ErrorKind.VALIDATION: 422,
    ErrorKind.INPUT_TOO_LONG: 422,
    ErrorKind.MODEL_NOT_FOUND: 404,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.MODEL_NOT_READY: 503,
    ErrorKind.PAYLOAD_TOO_LARGE: 413,
    ErrorKind.QUEUE_FULL: 429,
    ErrorKind.DEADLINE_EXCEEDED: 504,  # the server's own deadline (request_timeout_s) passed
    ErrorKind.REQUEST_TIMEOUT: 408,  # the request's own timeout_ms passed: the client's choice, not an upstream fault
    ErrorKind.MODEL_FAILED: 503,  # the model's folder could not be loaded; the other models serve
    ErrorKind.CLIENT_GONE: 499,  # never sent (nobody is listening); counted in metrics under this reason
    ErrorKind.UNAUTHORIZED: 401,
    ErrorKind.SHUTTING_DOWN: 503,
    ErrorKind.INTERNAL: 500,
    ErrorKind.MODEL_CONTROL_OFF: 409,  # load/unload asked of a server started without MOE_MODEL_CONTROL=explicit
    ErrorKind.NOT_SUPPORTED: 501,  # repository control in single-process mode (MOE_MODEL_PROCESS=false)
    ErrorKind.TASK_NOT_FOUND: 404,  # a task (or a task's v2 output) the model does not have, as for a model
}

# The same kinds over gRPC (service/api/grpc_v2): names of grpc.StatusCode members, so this table imports no grpc.
GRPC_STATUS: dict[ErrorKind, str] = {
    ErrorKind.VALIDATION: "INVALID_ARGUMENT",
    ErrorKind.INPUT_TOO_LONG: "INVALID_ARGUMENT",
    ErrorKind.MODEL_NOT_FOUND: "NOT_FOUND",
    ErrorKind.NOT_FOUND: "NOT_FOUND",
    ErrorKind.MODEL_NOT_READY: "UNAVAILABLE",
    ErrorKind.PAYLOAD_TOO_LARGE: "RESOURCE_EXHAUSTED",  # what gRPC itself answers to a message over its limit
    ErrorKind.QUEUE_FULL: "RESOURCE_EXHAUSTED",  # with retry-after-ms in the trailing metadata
    ErrorKind.DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
    ErrorKind.REQUEST_TIMEOUT: "DEADLINE_EXCEEDED",
    ErrorKind.MODEL_FAILED: "UNAVAILABLE",
    ErrorKind.CLIENT_GONE: "CANCELLED",
    ErrorKind.UNAUTHORIZED: "UNAUTHENTICATED",
    ErrorKind.SHUTTING_DOWN: "UNAVAILABLE",
    ErrorKind.MODEL_CONTROL_OFF: "FAILED_PRECONDITION",
    ErrorKind.NOT_SUPPORTED: "UNIMPLEMENTED",
    ErrorKind.TASK_NOT_FOUND: "NOT_FOUND",
    ErrorKind.INTERNAL: "INTERNAL",
}

# Statuses raised by the web framework itself (unknown route, streamed body over the limit) -> our error kinds.
FRAMEWORK_ERRORS: dict[int, ErrorKind] = {
    400: ErrorKind.VALIDATION,  # a body FastAPI cannot even decode (not UTF-8): a validation error like bad JSON
    404: ErrorKind.NOT_FOUND,
    413: ErrorKind.PAYLOAD_TOO_LARGE,
}


class ServiceError(Exception):
    def __init__(
        self, kind: ErrorKind, message: str, field: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.kind, self.message, self.field = kind, message, field
        self.headers = headers or {}

    @property
    def status(self) -> int:
        return STATUS[self.kind]

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message, "type": self.kind.value}
        if self.field:
            out["field"] = self.field
        return out


def queue_full(model: str, retry_after_ms: int) -> ServiceError:
    """429 with Retry-After in whole seconds (HTTP) and retry-after-ms, the estimate itself, for clients that can
    use it: a queue drains in milliseconds, so seconds alone make clients wait far too long."""
    seconds = max(1, -(-retry_after_ms // 1000))
    return ServiceError(
        ErrorKind.QUEUE_FULL,
        f"model {model!r} is at capacity; retry after {retry_after_ms} ms",
        headers={"Retry-After": str(seconds), "retry-after-ms": str(retry_after_ms)},
    )


def deadline_exceeded(model: str, own_timeout_ms: int | None = None) -> ServiceError:
    if own_timeout_ms is not None:
        return ServiceError(
            ErrorKind.REQUEST_TIMEOUT,
            f"request to model {model!r} passed its own timeout_ms ({own_timeout_ms} ms) before it ran",
            field="timeout_ms",
        )
    return ServiceError(ErrorKind.DEADLINE_EXCEEDED, f"request to model {model!r} passed its deadline before it ran")


def model_not_found(name: str, available: list[str]) -> ServiceError:
    return ServiceError(
        ErrorKind.MODEL_NOT_FOUND, f"unknown model {name!r}; available: {', '.join(available)}", field="model"
    )
