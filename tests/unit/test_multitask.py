"""Multi-task models: one router per task over shared experts, one head per task; the grouped dispatch shared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.modeling.artifacts import ModelFolderError, load_model, save_model
from service.modeling.classifier import ModelConfig, MoEClassifier, pad_batch
from service.modeling.moe import MoEFeedForward
from service.modeling.tokenizer import TextTokenizer

TOL = 1e-5
TASKS = {"topic": 3, "mood": 2}


def _model(**kw) -> MoEClassifier:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=100, num_labels=3, max_length=64, d_model=32, n_heads=4, d_ff=48, dropout=0.0, tasks=TASKS, **kw
    )
    model = MoEClassifier(cfg).eval()
    with torch.no_grad():  # routers apart enough that two tasks route the same text differently
        for layer in model.moe_layers:
            layer.router.weight.normal_(0, 1.0)
    return model


def _texts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(2, 100, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def _tasks(n: int) -> torch.Tensor:
    return torch.tensor([i % 2 for i in range(n)])


@pytest.mark.parametrize("kw", [{}, {"moe_every": 2, "n_layers": 4}, {"n_layers": 3, "task_routed_layers": 1}])
def test_a_text_s_answer_is_independent_of_the_other_tasks_in_its_batch(kw: dict) -> None:
    model = _model(**kw)
    seqs, tasks = _texts(12), _tasks(12)
    with torch.no_grad():
        alone = torch.cat([model(*pad_batch([s]), tasks[i : i + 1]).logits for i, s in enumerate(seqs)])
        together = model(*pad_batch(seqs), tasks).logits
        perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
        shuffled = model(*pad_batch([seqs[i] for i in perm]), tasks[perm]).logits[perm.argsort()]
    torch.testing.assert_close(together, alone, atol=TOL, rtol=TOL)
    torch.testing.assert_close(shuffled, alone, atol=TOL, rtol=TOL)
    # Each task's logits are its head's width; the padding column of a 2-label task takes no probability.
    assert torch.isinf(alone[tasks == 1, 2]).all() and torch.isfinite(alone[tasks == 0]).all()
    assert torch.allclose(alone[tasks == 1].softmax(1)[:, :2].sum(1), torch.ones(6))


def test_each_task_is_routed_by_its_own_router() -> None:
    """In the whole model: a text's tokens, at every task-routed layer, get the logits of their task's rows."""
    model = _model()
    seq = _texts(1)[0]
    inputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, args, _o: inputs.append(args[0])) for m in model.moe_layers]
    with torch.no_grad():
        outs = [model(*pad_batch([seq]), torch.tensor([t])) for t in range(2)]
    for h in hooks:
        h.remove()
    e = model.config.num_experts
    for t, out in enumerate(outs):
        for li, (layer, r) in enumerate(zip(model.moe_layers, out.routing, strict=True)):
            x = inputs[t * len(model.moe_layers) + li]
            own = x @ layer.router.weight[t * e : (t + 1) * e].T
            torch.testing.assert_close(r.logits, own, atol=TOL, rtol=TOL)
    # The same text, two tasks: different routers, different routing (with these far-apart routers).
    assert not torch.equal(outs[0].routing[0].expert_ids, outs[1].routing[0].expert_ids)


def test_task_routed_layer_matches_per_task_routing_and_reference() -> None:
    """The mixed-task routing is each task's router on its own tokens; the grouped output is the plain maths."""
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 24, num_experts=4, top_k=2, num_tasks=3).eval()
    x = torch.randn(40, 16)
    task = torch.randint(0, 3, (40,))
    with torch.no_grad():
        y, r = layer(x, task)
        for t in range(3):
            rows = (task == t).nonzero().squeeze(1)
            own = x[rows] @ layer.router.weight[4 * t : 4 * t + 4].T
            torch.testing.assert_close(r.logits[rows], own, atol=TOL, rtol=TOL)
        torch.testing.assert_close(y, layer.reference_forward(x, token_task=task), atol=TOL, rtol=TOL)
    with pytest.raises(ValueError, match="needs its task id"):
        layer(x)


def test_experts_run_once_per_batch_over_every_task_s_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grouped dispatch kept: in a mixed batch each expert is one GEMM pair over all tasks' tokens routed to it."""
    model = _model()
    calls: list[tuple[int, int]] = []
    original = MoEFeedForward.expert_mlp

    def counted(self: MoEFeedForward, e: int, rows: torch.Tensor) -> torch.Tensor:
        calls.append((id(self), e))
        return original(self, e, rows)

    monkeypatch.setattr(MoEFeedForward, "expert_mlp", counted)
    with torch.no_grad():
        model(*pad_batch(_texts(10)), _tasks(10))
    assert len(calls) == len(set(calls))  # no (layer, expert) pair ran twice
    assert len(calls) <= len(model.moe_layers) * model.config.num_experts


def test_task_routed_layers_option_picks_the_top_moe_layers() -> None:
    cfg = ModelConfig(vocab_size=50, num_labels=3, n_layers=4, tasks=TASKS, task_routed_layers=1)
    assert cfg.task_routed() == [False, False, False, True]
    assert ModelConfig(vocab_size=50, num_labels=3, n_layers=4, moe_every=2, tasks=TASKS).task_routed() == [
        False,
        True,
        False,
        True,
    ]
    model = MoEClassifier(cfg)
    assert [m.num_tasks for m in model.moe_layers] == [1, 1, 1, 2]
    # A one-task model keeps one router everywhere.
    assert ModelConfig(vocab_size=50, num_labels=3, n_layers=2).task_routed() == [False, False]


def test_multi_task_model_needs_task_ids_and_checks_them() -> None:
    model = _model()
    batch = pad_batch(_texts(2))
    with pytest.raises(ValueError, match="needs one task id per text"):
        model(*batch)
    with pytest.raises(ValueError, match=r"task ids must be in \[0, 2\)"):
        model(*batch, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="num_labels must be the widest"):
        ModelConfig(vocab_size=10, num_labels=2, tasks=TASKS)
    with pytest.raises(ValueError, match="task names"):
        ModelConfig(vocab_size=10, num_labels=3, tasks={"a.b": 3})


def test_routing_losses_per_task_router_in_training() -> None:
    model = _model()
    model.train()
    out = model(*pad_batch(_texts(8)), _tasks(8))
    assert out.aux_loss.item() > 0 and out.z_loss.item() > 0
    assert out.token_task is not None and out.token_task.shape[0] == out.routing[0].expert_ids.shape[0]
    out.logits[torch.isfinite(out.logits)].sum().backward()  # the -inf padding takes no gradient
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_multi_task_folder_round_trip(tmp_path: Path) -> None:
    model = _model()
    tok = TextTokenizer.train(["the cat sat on the mat", "stocks fell sharply today"] * 10, vocab_size=100)
    labels = {"topic": ["a", "b", "c"], "mood": ["neg", "pos"]}
    save_model(tmp_path / "m", model, tok, labels, {"dataset": "x"}, temperature={"topic": 1.5, "mood": 0.8})
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw["tasks"]["mood"] == {"labels": ["neg", "pos"], "temperature": 0.8} and "id2label" not in raw
    bundle = load_model(tmp_path / "m")
    assert [(t.name, t.labels, t.temperature) for t in bundle.folder.tasks] == [
        ("topic", ("a", "b", "c"), 1.5),
        ("mood", ("neg", "pos"), 0.8),
    ]
    assert sorted(k for k in bundle.model.state_dict() if "head" in k) == [
        "heads.mood.bias",
        "heads.mood.weight",
        "heads.topic.bias",
        "heads.topic.weight",
    ]
    seqs, tasks = _texts(6), _tasks(6)
    with torch.no_grad():
        assert torch.equal(model(*pad_batch(seqs), tasks).logits, bundle.model(*pad_batch(seqs), tasks).logits)
    raw["tasks"]["mood"]["labels"] = ["neg"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelFolderError, match="task 'mood' needs a list of its 2 label names"):
        load_model(tmp_path / "m")


def test_task_mix_by_size_and_temperature() -> None:
    import random

    from service.training.multitask import epoch_rows, task_quotas

    assert task_quotas([900, 100], 1.0) == [900, 100]  # by size
    assert task_quotas([900, 100], 1e6) == [500, 500]  # evenly
    q = task_quotas([900, 100], 2.0)  # sqrt: 30 : 10
    assert q == [750, 250]
    rows = epoch_rows([list(range(900)), list(range(900, 1000))], q, random.Random(0))
    assert len(rows) == 1000 and sum(r >= 900 for r in rows) == 250
    assert set(range(900, 1000)) <= set(rows)  # the small task's texts each come (250 draws cover its 100 twice)


def test_specialization_is_zero_for_shared_experts_and_one_bit_for_disjoint() -> None:
    import numpy as np

    from service.training.metrics import task_expert_shares, task_specialization

    same = task_expert_shares({"a": [np.array([[3, 1, 0, 0]])], "b": [np.array([[6, 2, 0, 0]])]})
    assert same[0] == {"a": [0.75, 0.25, 0.0, 0.0], "b": [0.75, 0.25, 0.0, 0.0]}
    assert task_specialization(same)[0]["mutual_information_bits"] == 0.0
    apart = task_expert_shares({"a": [np.array([[5, 5, 0, 0]])], "b": [np.array([[0, 0, 1, 1]])]})
    assert task_specialization(apart)[0] == {"layer": 0, "mutual_information_bits": 1.0, "share_of_max": 1.0}


@pytest.mark.parametrize("routed", [None, 1, 0])
def test_several_tasks_of_one_text_share_the_bottom_layers(routed: int | None) -> None:
    """forward_rows runs the shared bottom once per text and gives the logits of the texts repeated per task."""
    from service.backends.base import task_rows

    model = _model(n_layers=3, task_routed_layers=routed)
    seqs = _texts(5)
    asked = [[0, 1], [1], [1, 0], [0], [0, 1]]
    with torch.no_grad():
        row_text, row_task = (torch.tensor(r) for r in task_rows(asked))
        logits = model.forward_rows(*pad_batch(seqs), row_text, row_task).logits
        repeated = [seqs[i] for i, ts in enumerate(asked) for _ in ts]
        tasks = torch.tensor([t for ts in asked for t in ts])
        expected = model(*pad_batch(repeated), tasks).logits
    assert row_text.tolist() == [0, 0, 1, 2, 2, 3, 4, 4]
    torch.testing.assert_close(logits, expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("routed", [None, 1])
def test_rows_route_as_the_texts_repeated_per_task(routed: int | None) -> None:
    """forward_rows' routing (shared layers copied into each row) and its per-task expert counts are those of
    `forward` on the texts repeated once per row."""
    import numpy as np

    from service.backends.torch_backend import run_model

    model = _model(n_layers=3, task_routed_layers=routed)
    seqs, asked = _texts(4), [[1, 0], [0], [1], [0, 1]]
    out = run_model(model, seqs, 0, "cpu", True, asked)
    repeated = [seqs[i] for i, ts in enumerate(asked) for _ in ts]
    tasks = torch.tensor([t for ts in asked for t in ts])
    with torch.no_grad():
        ref = model(*pad_batch(repeated), tasks)
    np.testing.assert_allclose(out.logits, ref.logits.numpy(), atol=TOL, rtol=TOL)
    for got, want in zip(out.routing or [], ref.routing, strict=True):
        np.testing.assert_array_equal(got.expert_ids, want.expert_ids.numpy())
    token_task = ref.token_task.numpy()
    for t in range(2):
        mine = [np.bincount(r.expert_ids[token_task == t].numpy().reshape(-1), minlength=8) for r in ref.routing]
        np.testing.assert_array_equal(out.task_expert_counts[t], np.stack(mine))
    np.testing.assert_array_equal(out.task_expert_counts.sum(0), out.expert_counts)


@pytest.mark.parametrize("tasks", [None, [[0], [2]], [[0, 0], [1]], [[], [1]], [[0]]])
def test_a_multi_task_batch_names_valid_tasks_for_every_text(tasks: list[list[int]] | None) -> None:
    from service.backends.torch_backend import run_model

    with pytest.raises(ValueError, match="task"):
        run_model(_model(n_layers=2), _texts(2), 0, "cpu", False, tasks)


def test_a_single_task_model_takes_no_tasks() -> None:
    from service.backends.torch_backend import run_model

    torch.manual_seed(0)
    model = MoEClassifier(ModelConfig(vocab_size=100, num_labels=3, max_length=64, d_model=32, n_heads=4, d_ff=48))
    with pytest.raises(ValueError, match="single-task"):
        run_model(model.eval(), _texts(2), 0, "cpu", False, [[0], [0]])


def test_task_views_of_a_model_and_of_a_backend_answer_one_task() -> None:
    """TaskModel runs as a one-task model (run_model takes it without task ids); TaskBackend asks a multi-task
    backend for one task on every text: the same logits, cut to that task's labels, and that task's record."""
    import numpy as np

    from service.backends.base import Backend, BatchOutput, ModelInfo, TaskLabels
    from service.backends.torch_backend import run_model
    from service.modeling.task_view import TaskBackend, TaskModel

    model = _model(n_layers=2)
    tasks = {"topic": TaskLabels(["a", "b", "c"]), "mood": TaskLabels(["neg", "pos"], 0.5)}

    class Rows(Backend):
        kind, device, tokenizer = "torch", "cpu", None
        info = ModelInfo("m", Path("m"), [], 64, 8, 2, 2, 2, {}, tasks=tasks)

        def forward(self, sequences, return_routing=False, tasks=None) -> BatchOutput:  # type: ignore[no-untyped-def]
            return run_model(model, sequences, 0, "cpu", return_routing, tasks)

    seqs = _texts(5)
    view = TaskBackend(Rows(), "mood")
    got = view.forward(seqs, return_routing=True)
    alone = run_model(TaskModel(model, 1), seqs, 0, "cpu", True)
    asked = run_model(model, seqs, 0, "cpu", True, [[1]] * 5)
    assert got.logits.shape == alone.logits.shape == (5, 2) and alone.task_expert_counts is None
    np.testing.assert_allclose(got.logits, asked.logits[:, :2], atol=TOL, rtol=0)
    np.testing.assert_allclose(alone.logits, asked.logits[:, :2], atol=TOL, rtol=0)
    np.testing.assert_array_equal(got.expert_counts, alone.expert_counts)
    assert (view.info.labels, view.info.temperature, view.info.tasks) == (["neg", "pos"], 0.5, {})
    with pytest.raises(ValueError, match="no task 'spam'"):
        TaskBackend(Rows(), "spam")


def test_masked_dense_route_answers_each_task_as_grouped() -> None:
    """Routing (each task's router) is done before dispatch, so the small-batch masked route serves a mixed-task
    batch with the grouped route's logits and routing."""
    model = _model()
    batch = (*pad_batch(_texts(6)), _tasks(6))
    with torch.no_grad():
        grouped = model(*batch)
        model.use_masked_dense(10**6)
        masked = model(*batch)
    torch.testing.assert_close(masked.logits, grouped.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(masked.routing, grouped.routing, strict=True):
        assert torch.equal(a.expert_ids, b.expert_ids)
