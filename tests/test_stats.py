"""Bootstrap intervals, paired differences and baselines against closed forms
and scikit-learn, on synthetic predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from loralab import stats


def synthetic(n: int, accuracy: float, k: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    wrong = rng.random(n) > accuracy
    pred = np.where(wrong, (y + rng.integers(1, k, n)) % k, y)
    return y, pred


@pytest.mark.parametrize("k", [2, 3])
def test_scores_equal_scikit_learn(k):
    y, pred = synthetic(300, 0.7, k)
    got = {m: v[0] for m, v in stats.scores(stats.confusions(y, pred, k)).items()}
    avg = "binary" if k == 2 else "macro"
    p, r, f, _ = precision_recall_fscore_support(y, pred, average=avg, zero_division=0)
    assert got["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f))


def test_accuracy_interval_matches_the_binomial_interval():
    n = 400
    y, pred = synthetic(n, 0.8)
    acc = float(np.mean(y == pred))
    half = 1.96 * math.sqrt(acc * (1 - acc) / n)  # normal approximation of the binomial
    lo, hi = stats.classification_intervals(y, pred, 2, resamples=4000)["accuracy"]
    assert lo == pytest.approx(acc - half, abs=0.008)
    assert hi == pytest.approx(acc + half, abs=0.008)
    assert lo < acc < hi


def test_interval_is_seeded_and_narrows_with_more_rows():
    small = stats.classification_intervals(*synthetic(100, 0.8), 2)["f1"]
    assert small == stats.classification_intervals(*synthetic(100, 0.8), 2)["f1"]
    large = stats.classification_intervals(*synthetic(2000, 0.8), 2)["f1"]
    assert large[1] - large[0] < (small[1] - small[0]) / 2


def test_paired_difference_tells_noise_from_a_real_gap():
    y, a = synthetic(1000, 0.9, seed=1)
    _, b = synthetic(1000, 0.6, seed=2)
    real = stats.paired_difference(y, a, b, 2, "accuracy")
    assert real["verdict"] == "better" and real["interval"][0] > 0.2
    flipped = a.copy()
    flipped[:3] = 1 - flipped[:3]  # three rows apart: noise on 1,000
    noise = stats.paired_difference(y, flipped, a, 2, "accuracy")
    assert noise["verdict"] == "not distinguishable at this test size"
    assert noise["interval"][0] < 0 <= noise["interval"][1] or noise["interval"][1] <= 0
    assert stats.paired_difference(y, b, a, 2, "f1")["verdict"] == "worse"


def test_a_one_class_model_is_at_chance():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    always_positive = np.ones_like(y)
    base = stats.majority_baseline(y, 2)
    assert base["f1"] == pytest.approx(stats.scores(stats.confusions(y, always_positive, 2))
                                       ["f1"][0])
    interval = stats.classification_intervals(y, always_positive, 2)["f1"]
    assert stats.at_chance(interval, base["f1"])
    y2, good = synthetic(500, 0.95)
    good_interval = stats.classification_intervals(y2, good, 2)["f1"]
    assert not stats.at_chance(good_interval, stats.majority_baseline(y2, 2)["f1"])


def test_perplexity_interval_brackets_the_point():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 50, 200)
    losses = tokens * rng.normal(2.0, 0.3, 200)
    lo, hi = stats.perplexity_interval(losses, tokens)
    point = math.exp(losses.sum() / tokens.sum())
    assert lo < point < hi and hi / lo < 1.2
