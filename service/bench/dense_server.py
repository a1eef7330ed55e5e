"""The dense yardstick served: a yardstick graph (service/bench/dense_yardstick.py: ORT's fused ONNX graph or
OpenVINO's int8 IR, told apart by the file) behind the small batching FastAPI server a user would write without this
project: requests queue, one worker thread takes up to 64 of them, or whatever came within 5 ms, tokenizes, pads and
runs them as one batch.

Started by `python -m service.bench.dense_server GRAPH TOKENIZER MAX_LENGTH PORT THREADS`; the bench drives it with
the same wrk load and bodies (`{"inputs": text}`) as moe-serve.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any

import numpy as np
from fastapi import FastAPI

from service.bench.served import yardstick_app

MAX_BATCH, MAX_WAIT_S = 64, 0.005


def _take_batch(q: queue.Queue) -> list[tuple[str, Future]]:
    """The first waiting request, then whatever else arrives within MAX_WAIT_S, up to MAX_BATCH."""
    batch = [q.get()]
    deadline = time.monotonic() + MAX_WAIT_S
    while len(batch) < MAX_BATCH:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            batch.append(q.get(timeout=left))
        except queue.Empty:
            break
    return batch


def _worker(q: queue.Queue, graph: Any, tokenizer: Any, max_length: int) -> None:
    while True:
        batch = _take_batch(q)
        try:
            seqs = [e.ids for e in tokenizer.encode_batch([t for t, _ in batch], max_length)]
            logits = graph.forward(seqs)
            for (_, fut), row in zip(batch, logits, strict=True):
                fut.set_result(row)
        except Exception as exc:  # answer every request of a failed batch, keep serving
            for _, fut in batch:
                fut.set_exception(exc)


def dense_app(graph_path: str, tokenizer_path: str, max_length: int, threads: int) -> FastAPI:
    from service.bench.dense_yardstick import load_graph
    from service.modeling.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.from_file(tokenizer_path)
    graph = load_graph(graph_path, tokenizer.pad_id, threads)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_worker, args=(q, graph, tokenizer, max_length), daemon=True).start()

    async def answer(texts: list[str]) -> list[dict]:
        futures: list[Future] = [Future() for _ in texts]
        for t, f in zip(texts, futures, strict=True):
            q.put((t, f))
        rows = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        return [_prediction(row) for row in rows]

    return yardstick_app(answer)


def _prediction(logits: np.ndarray) -> dict:
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return {"label": int(p.argmax()), "score": float(p.max())}


if __name__ == "__main__" and len(sys.argv) == 6:
    import uvicorn

    graph_arg, tok_arg, max_len_arg, port_arg, threads_arg = sys.argv[1:]
    uvicorn.run(
        dense_app(graph_arg, tok_arg, int(max_len_arg), int(threads_arg)),
        host="127.0.0.1",
        port=int(port_arg),
        log_level="warning",
        access_log=False,
    )
