"""A light closed-loop gRPC load generator, wrk's counterpart for the gRPC rows of the served benchmark: in its own
process, `concurrency` calls in flight on one channel, each sending the next ModelInfer as soon as the last is
answered. Requests are serialised once beforehand and responses left undecoded, so the client's per-call cost is
gRPC's own. Prints one JSON line with the same figures wrk's script reports.

    python -m service.bench.grpc_load ADDRESS MODEL TEXTS_JSONL CONCURRENCY SECONDS
"""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from service.api.grpc_v2.stubs import SERVICE, pb2


def infer_bytes(model: str, text: str) -> bytes:
    """One text as tritonclient sends it: a BYTES tensor of shape [1] in raw_input_contents."""
    req = pb2.ModelInferRequest(model_name=model)
    req.inputs.add(name="text", datatype="BYTES", shape=[1])
    raw = text.encode()
    req.raw_input_contents.append(struct.pack("<I", len(raw)) + raw)
    return req.SerializeToString()


async def _run(address: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    next_body = itertools.cycle(bodies)
    async with grpc.aio.insecure_channel(address) as channel:
        infer = channel.unary_unary(f"/{SERVICE}/ModelInfer")  # bytes in, bytes out
        await infer(next(next_body))  # connected before the clock starts
        t0 = time.perf_counter()
        end = t0 + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                start = time.perf_counter()
                try:
                    await infer(next(next_body), timeout=30)
                    latencies.append(time.perf_counter() - start)
                except grpc.aio.AioRpcError:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies or [0.0]) * 1e6
    return {
        "requests": len(latencies) + errors,
        "errors": errors,
        "duration_us": wall * 1e6,
        **{f"p{q}_us": float(np.percentile(lat, q)) for q in (50, 95, 99)},
    }


def main(argv: list[str]) -> None:
    address, model, texts_file, concurrency, seconds = argv
    bodies = [infer_bytes(model, json.loads(line)) for line in Path(texts_file).read_text().splitlines() if line]
    print(json.dumps(asyncio.run(_run(address, bodies, int(concurrency), float(seconds)))))


if __name__ == "__main__":
    main(sys.argv[1:])
