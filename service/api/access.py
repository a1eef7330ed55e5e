"""Who may call and how each call is traced: request ids, the optional API key, JSON access logs.

A pure ASGI middleware in front of every route:
- `x-request-id`: a client's own id is kept if it is short and plain (letters, digits, `._-`), otherwise one is
  made; it is echoed on the response and written in the access log and in the logs of errors.
- API key (`MOE_API_KEY`): when set, every route except liveness/readiness, the docs, the explorer page and (unless
  `MOE_METRICS_NEED_KEY`) /metrics needs `Authorization: Bearer <key>`; compared in constant time; 401 otherwise.
- Access log (`MOE_ACCESS_LOG=json`): one JSON line per request with id, method, path, status, model, duration.
- Draining (after SIGTERM, service/server.py): every request but health and metrics gets 503 + Connection: close.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.common import error_response
from service.api.explorer import PUBLIC_PATHS as EXPLORER_PATHS
from service.config import Settings
from service.errors import ErrorKind, ServiceError

log = logging.getLogger("moe_serve.access")
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
OPEN_PATHS = {"/health", "/v2/health/live", "/v2/health/ready", "/docs", "/openapi.json", "/docs/oauth2-redirect"}
OPEN_PATHS |= EXPLORER_PATHS  # the explorer page and its script: no data; its API calls carry the key
DRAIN_OPEN = {"/health", "/v2/health/live", "/v2/health/ready", "/metrics"}  # still answered while draining


def bearer_matches(authorization: bytes, key: bytes) -> bool:
    """`Bearer <key>` (HTTP's Authorization header, gRPC's authorization metadata), compared in constant time."""
    scheme, _, token = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


def request_id(scope: Scope) -> str:
    given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode("latin-1")
    return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RequestContext:
    def __init__(self, app: ASGIApp, settings: Settings, state: Any = None) -> None:
        self.app = app
        self.state = state  # the app's state; `draining` is set by the server on SIGTERM (service/server.py)
        self.key = settings.api_key.get_secret_value().encode() if settings.api_key else None
        self.open = OPEN_PATHS if settings.metrics_need_key else OPEN_PATHS | {"/metrics"}
        self.json_log = settings.access_log == "json"

    def authorised(self, scope: Scope) -> bool:
        if self.key is None or scope["path"] in self.open:
            return True
        return bearer_matches(next((v for k, v in scope["headers"] if k == b"authorization"), b""), self.key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        status = 500

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        if getattr(self.state, "draining", False) and scope["path"] not in DRAIN_OPEN:
            # Shutting down: answer, and close the connection so the client goes elsewhere.
            err = ServiceError(
                ErrorKind.SHUTTING_DOWN,
                "the server is shutting down; retry on another instance",
                headers={"Retry-After": "1", "Connection": "close"},
            )
            await error_response(err)(scope, receive, send_with_id)
        elif self.authorised(scope):
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                # Unhandled: logged with its traceback and the request id; the client gets a plain 500 with the id.
                log.exception("request %s failed", rid)
                if status == 500 and not started:
                    err = ServiceError(ErrorKind.INTERNAL, f"internal error (request id {rid})")
                    await error_response(err)(scope, receive, send_with_id)
        else:
            err = ServiceError(
                ErrorKind.UNAUTHORIZED,
                "missing or wrong API key: send Authorization: Bearer <key>",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await error_response(err)(scope, receive, send_with_id)
        if self.json_log:
            line = {
                "request_id": rid,
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "model": scope["state"].get("model", ""),
                "duration_ms": round((time.perf_counter() - t0) * 1000, 3),
            }
            log.info(orjson.dumps(line).decode())
