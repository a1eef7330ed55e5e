"""The model process's entry point: one model folder's LocalEngine served by a ModelServer
(service/engine/model_server.py) on the address it is given.

The API process starts one per model folder (service/engine/remote.py), so that HTTP parsing and the engine's own
Python work run under two GILs instead of taking turns on one, and a model's batches never wait behind another
model's. It loads and warms its model, then binds and answers (a model that fails to load is reported in the
first answer); it exits 3 when its watchdog finds a batch running past worker_hang_s, and 0 when its parent
process is gone.

Run by the API process: `python -m service.engine.model_process ADDRESS` with the settings in
MOE_MODEL_PROCESS_SETTINGS (JSON).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import orjson

from service.config import Settings
from service.engine.local_engine import LocalEngine
from service.engine.model_server import ModelServer
from service.metrics import Metrics

log = logging.getLogger("moe_serve.model_process")
SETTINGS_ENV = "MOE_MODEL_PROCESS_SETTINGS"
# The engine yields the CPU to the API process when both want it: HTTP work is light and latency-bound (accepting,
# answering 429s and health checks under overload), the engine's is throughput work.
NICE = 5


def _exit_with_parent(parent: int) -> None:
    """An orphaned model process holds memory and maybe a GPU for nobody: leave when the API process is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def main(address: str) -> int:
    settings = Settings(**orjson.loads(os.environ[SETTINGS_ENV]))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
    os.nice(NICE)
    metrics = Metrics(http=False)
    engine = LocalEngine(settings, metrics, loop="external")  # the ModelServer runs the batches
    try:
        engine.load()
    except RuntimeError:
        pass  # its model failed: the reason is in engine.failed, for the API process to report (hello)
    except Exception as exc:
        log.critical("no model could be served: %s", exc)
        return 2

    def fatal(why: str) -> None:
        # A hung batch cannot be recovered in-process: exit, and the API process follows.
        logging.shutdown()
        os._exit(3)

    engine.watch(fatal)
    ModelServer(engine, metrics, address).run()
    engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
