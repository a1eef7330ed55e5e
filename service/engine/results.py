"""What classifying returns, in plain numpy: the API, the IPC wire and the engine all speak these types."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.backends.base import LayerRouting


@dataclass
class TextResult:
    # [num_labels], already divided by the model's temperature; multi-task: [tasks asked, widest task's labels],
    # a row per task in the order asked, each divided by its task's temperature and padded with -inf
    logits: np.ndarray
    n_tokens: int  # how many tokens the model read (every window's, overlaps included)
    truncated: bool  # some of the text's tokens were read by no window
    routing: list[LayerRouting] | None = None  # this text's tokens only, window after window
    tokens: list[str] | None = None  # the token strings, with routing only
    windows: int = 1  # the windows the text was read in (service/modeling/windows.py)
    window_tokens: list[int] | None = None  # with routing: each window's tokens, to split routing and tokens


@dataclass
class ClassifyResult:
    results: list[TextResult]
    tokenization_s: float
    queue_s: float  # longest wait of any of the request's texts
    inference_s: float  # summed forward time of the batches the request's texts ran in
    tasks: list[int] | None = None  # multi-task: the task id of each row of every text's logits
