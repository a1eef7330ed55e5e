"""What a model's own evaluation says of its experts: per MoE layer, the share of assignments each expert got on the
validation split (routing_profile.json, the reference drift is measured against) and, per true class, the share of
that class's assignments each expert got on the test split (eval.json's expert_by_class).

Built once when a model is loaded, as plain JSON: it crosses the model-process boundary with the model's description
and is served as is by GET /v1/models/{model}/experts (the routing explorer's class profile).
"""

from __future__ import annotations

from typing import Any

TOP_CLASSES = 3  # classes named per expert: enough to say what an expert is for, short enough for a tooltip


def _layer_shares(layers: Any, moe_layers: int) -> list[Any] | None:
    """The per-layer entries of a profile or report, or None when absent or made for another layout."""
    if not isinstance(layers, list) or len(layers) != moe_layers:
        return None
    return layers


def _top_classes(class_share: dict[str, list[float]], expert: int) -> list[dict[str, Any]]:
    ranked = sorted(class_share.items(), key=lambda kv: -kv[1][expert])
    return [{"label": label, "share": shares[expert]} for label, shares in ranked[:TOP_CLASSES] if shares[expert] > 0]


def expert_profile(
    report: dict[str, Any] | None, profile: dict[str, Any] | None, moe_layers: int, num_experts: int
) -> dict[str, Any] | None:
    """`report`: eval.json, `profile`: routing_profile.json (either may be None). None when neither describes this
    model's experts (a folder not evaluated yet, or files written for another layout)."""
    training = _layer_shares((profile or {}).get("layers"), moe_layers)
    by_class = _layer_shares((report or {}).get("expert_by_class"), moe_layers)
    if training is not None and any(len(layer["share"]) != num_experts for layer in training):
        training = None
    if by_class is not None and any(len(s) != num_experts for layer in by_class for s in layer["share"].values()):
        by_class = None
    if training is None and by_class is None:
        return None
    layers = []
    for i in range(moe_layers):
        share = training[i]["share"] if training else None
        class_share = by_class[i]["share"] if by_class else None
        experts = [
            {
                "expert": e,
                "training_share": share[e] if share else None,
                "top_classes": _top_classes(class_share, e) if class_share else [],
            }
            for e in range(num_experts)
        ]
        layers.append({"layer": i, "training_share": share, "class_share": class_share, "experts": experts})
    return {
        "training_split": profile.get("split") if training else None,
        "evaluation_split": report.get("split") if by_class and report else None,
        "layers": layers,
    }
