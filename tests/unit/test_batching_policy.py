"""The batching policy as a pure function, under Hypothesis: random queues of text lengths and budgets."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from service.engine.request_queue import WorkItem, cut_batch


def _items(lengths: list[int]) -> list[WorkItem]:
    return [WorkItem(None, i, [7] * n, False, float(i)) for i, n in enumerate(lengths)]  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 512), max_size=80),
    max_texts=st.integers(1, 64),
    max_tokens=st.integers(1, 20_000),
)
def test_cut_batch_properties(lengths: list[int], max_texts: int, max_tokens: int) -> None:
    items = _items(lengths)
    batch, rest = cut_batch(items, max_texts, max_tokens)
    if not items:
        assert batch == [] and rest == []
        return
    # Nothing lost, nothing twice; both parts keep arrival order.
    assert sorted(it.index for it in batch + rest) == list(range(len(items)))
    assert [it.index for it in batch] == sorted(it.index for it in batch)
    assert [it.index for it in rest] == sorted(it.index for it in rest)
    # The oldest always goes (no starvation), alone if it is over the budget by itself.
    assert batch[0] is items[0]
    assert len(batch) <= max_texts
    longest = max(len(it.ids) for it in batch)
    assert len(batch) == 1 or len(batch) * longest <= max_tokens
    # Greedy and length-aware: every text left out would break a limit if added (or is farther in length).
    if len(batch) < max_texts:
        for it in rest:
            grown = (len(batch) + 1) * max(longest, len(it.ids))
            lo, hi = min(len(b.ids) for b in batch), longest
            assert grown > max_tokens or not (lo <= len(it.ids) <= hi)
