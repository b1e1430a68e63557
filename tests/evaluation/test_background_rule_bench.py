"""`bench.science.background_rule`'s hand-written AUC (numpy has none, and scikit-learn is not a dependency)."""

import numpy as np

from bench.science.background_rule import object_auc


def pairwise_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """The definition: over every (object, background) pair, 1 when the object scores higher, 1/2 on a tie."""
    pos, neg = score[positive][:, None], score[~positive][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def test_object_auc_is_the_pairwise_probability_with_ties_counted_half():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 5, 400).astype(np.float32)  # many ties
    positive = rng.random(400) < 0.3 + 0.1 * score  # objects score higher on average
    assert abs(object_auc(score, positive) - pairwise_auc(score, positive)) < 1e-12
    assert 0.6 < object_auc(score, positive) < 1.0
    assert object_auc(np.ones(10), np.arange(10) < 4) == 0.5
    assert object_auc(np.arange(10.0), np.arange(10) >= 6) == 1.0
    assert object_auc(-np.arange(10.0), np.arange(10) >= 6) == 0.0
