"""The gRPC server (grpc.aio) on the API process's event loop, started by the app's lifespan when MOE_GRPC_PORT is
set, after the engine: it shares the engine, settings and metrics of the HTTP app (its state)."""

from __future__ import annotations

from typing import Any

import grpc

from service.api.grpc_v2.service import InferenceService


async def start(state: Any) -> grpc.aio.Server:
    settings = state.settings
    # A message over the HTTP body limit is refused by gRPC itself (RESOURCE_EXHAUSTED), as HTTP answers 413.
    limit = settings.max_body_bytes
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.so_reuseport", 0)],
    )
    server.add_generic_rpc_handlers((InferenceService(state).handler(),))
    address = f"{settings.host}:{settings.grpc_port}"
    if settings.host not in ("0.0.0.0", "::") and ":" in settings.host:
        address = f"[{settings.host}]:{settings.grpc_port}"  # an IPv6 literal
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"gRPC: cannot listen on {address}")
    await server.start()
    return server
