"""CUDA checks: run where a GPU exists, skipped elsewhere (CI has none). The backend on a trained model is in
tests/integration/test_cuda.py."""

from __future__ import annotations

import pytest
import torch

from service.modeling.moe import MoEFeedForward

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


def test_grouped_matches_reference_on_cuda() -> None:
    torch.manual_seed(0)
    layer = MoEFeedForward(64, 128, 8, 2).cuda().eval()
    x = torch.randn(1000, 64, device="cuda")
    with torch.no_grad():
        r = layer.route(x)
        torch.testing.assert_close(layer.grouped_forward(x, r), layer.reference_forward(x, r), atol=1e-4, rtol=1e-4)
