"""Temperature scaling and expected calibration error on synthetic data whose true calibration is known."""

from __future__ import annotations

import numpy as np
import pytest

from service.modeling.probabilities import softmax
from service.training.calibration import (
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
)


def _calibrated(n: int = 4000, c: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels drawn from softmax(z): softmax(z) is perfectly calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.5, (n, c))
    p = softmax(z)
    y = (rng.random((n, 1)) > p.cumsum(1)).sum(1)  # inverse-CDF sample of one label per row
    return z, np.minimum(y, c - 1)


@pytest.mark.parametrize("t_true", [0.5, 2.0, 4.0])
def test_fit_recovers_a_known_temperature(t_true: float) -> None:
    z, y = _calibrated()
    t = fit_temperature(z * t_true, y)  # the model's logits are z * T: dividing by T recovers z
    assert abs(t / t_true - 1) < 0.05, (t, t_true)
    assert nll(z * t_true, y, t) <= nll(z * t_true, y, 1.0)


def test_already_calibrated_gives_t_near_one() -> None:
    z, y = _calibrated()
    assert abs(fit_temperature(z, y) - 1) < 0.05


def test_fit_is_deterministic_and_stays_in_bracket() -> None:
    z, y = _calibrated(n=500)
    assert fit_temperature(z, y) == fit_temperature(z.copy(), y.copy())
    # Every label right: the NLL keeps falling as T shrinks, so the answer is the bracket's lower end.
    confident = np.eye(3)[[0, 1, 2, 0]] * 5.0
    assert fit_temperature(confident, np.array([0, 1, 2, 0]), bracket=(0.05, 20)) == pytest.approx(0.05, abs=1e-3)
    assert fit_temperature(np.zeros((4, 3)), np.array([0, 1, 2, 0])) == 1.0  # uniform rows: T changes nothing


def test_ece_small_when_calibrated_large_when_over_confident() -> None:
    z, y = _calibrated(n=20000)
    assert expected_calibration_error(softmax(z), y) < 0.02
    over = expected_calibration_error(softmax(z * 4), y)  # same ranking, far sharper probabilities
    assert over > 0.1
    assert expected_calibration_error(softmax(z * 4, temperature=fit_temperature(z * 4, y)), y) < 0.02


def test_reliability_bins_by_hand() -> None:
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.3, 0.7], [0.55, 0.45]])
    y = np.array([0, 1, 1, 0])
    rel = reliability_bins(probs, y, bins=10)
    assert rel.count.tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 1, 1]  # 0.55 | 0.7 | 0.9 (upper edge inclusive) | 0.95
    assert rel.accuracy[8] == 0.0 and rel.accuracy[9] == 1.0
    assert rel.confidence[9] == pytest.approx(0.95)
    # |1-.55| + |1-.7| + |0-.9| + |1-.95|, each bin holding one of the four texts
    assert rel.ece == pytest.approx((0.45 + 0.3 + 0.9 + 0.05) / 4)
    assert expected_calibration_error(probs, y, bins=10) == rel.ece


@pytest.mark.parametrize(
    ("scores", "y", "match"),
    [
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "non-empty"),
        (np.zeros((4, 1)), np.zeros(4, dtype=int), "at least 2"),
        (np.zeros(4), np.zeros(4, dtype=int), "non-empty"),
        (np.zeros((4, 3)), np.zeros(3, dtype=int), "shape"),
        (np.zeros((4, 3)), np.array([0, 1, 2, 3]), "0..2"),
        (np.zeros((2, 3)), np.array([0.0, 1.0]), "integers"),
        (np.array([[0.0, np.nan], [1.0, 0.0]]), np.array([0, 1]), "NaN"),
    ],
)
def test_bad_input_is_a_clear_error(scores: np.ndarray, y: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit_temperature(scores, y)
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(scores, y)
