"""Tests for causarray.propensity: logistic scores, folds, clipping."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from causarray.propensity import (
    clip_bounds,
    clip_propensity,
    estimate_propensity_scores,
    fit_propensity,
    make_folds,
)


def screen(seed: int = 0, n: int = 600, prevalences=(0.05, 0.15, 0.3)):
    """One-hot A (controls = all-zero rows) depending on two confounders, W_A = [1 | U]."""
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((n, 2))
    a = len(prevalences)
    A = np.zeros((n, a))
    group = np.full(n, -1)
    u = rng.uniform(size=n)
    edges = np.cumsum(prevalences)
    shift = 1.0 / (1.0 + np.exp(-(U[:, 0] - 0.5 * U[:, 1])))  # assignment depends on U
    for k in range(a):
        lo = edges[k - 1] if k else 0.0
        sel = (group == -1) & (u * (0.5 + shift) >= lo) & (u * (0.5 + shift) < edges[k])
        group[sel] = k
        A[sel, k] = 1.0
    W = np.column_stack([np.ones(n), U])
    return A, W


def direct_fit(A, W, k, train, test, class_weight=None, C=1.0):
    model = LogisticRegression(C=C, fit_intercept=False, solver="lbfgs",
                               class_weight=class_weight, random_state=0, max_iter=1000)
    model.fit(W[train], A[train, k])
    return model.predict_proba(W[test])[:, 1]


@pytest.mark.parametrize("class_weight", [None, "balanced", {0: 1.0, 1: 3.0}])
def test_scores_agree_with_direct_sklearn_fit(class_weight):
    A, W = screen(1)
    pi = fit_propensity(A, W, class_weight=class_weight)
    assert pi.shape == A.shape
    control = A.sum(axis=1) == 0
    everyone = np.ones(len(A), dtype=bool)
    for k in range(A.shape[1]):
        elig = control | (A[:, k] == 1)
        np.testing.assert_allclose(pi[:, k], direct_fit(A, W, k, elig, everyone, class_weight),
                                   rtol=1e-6, atol=1e-9)


def test_calibrated_scores_track_prevalence_balanced_do_not():
    A, W = screen(2)
    control = A.sum(axis=1) == 0
    calib = fit_propensity(A, W)
    bal = fit_propensity(A, W, class_weight="balanced")
    for k in range(A.shape[1]):
        elig = control | (A[:, k] == 1)
        prev = A[elig, k].mean()
        assert abs(calib[elig, k].mean() - prev) < 0.02
        assert abs(bal[elig, k].mean() - 0.5) < 0.1


def test_intercept_only_design_gives_prevalence():
    A, _ = screen(3)
    ones = np.ones((len(A), 1))
    control = A.sum(axis=1) == 0
    pi = fit_propensity(A, ones)
    for k in range(A.shape[1]):
        elig = control | (A[:, k] == 1)
        np.testing.assert_allclose(pi[:, k], A[elig, k].mean())
    np.testing.assert_allclose(fit_propensity(A, ones, class_weight="balanced"), 0.5)
    elig0 = control | (A[:, 0] == 1)
    n1 = A[elig0, 0].sum()
    n0 = elig0.sum() - n1
    pw = fit_propensity(A, ones, class_weight={0: 1.0, 1: 2.0})[:, 0]
    np.testing.assert_allclose(pw, 2 * n1 / (2 * n1 + n0))


def test_mask_replaces_eligible_cells():
    A, W = screen(4)
    n = len(A)
    rng = np.random.default_rng(0)
    mask = (A.sum(axis=1, keepdims=True) == 0) | (A == 1)
    mask &= rng.uniform(size=A.shape) < 0.7  # drop ~30% of each comparison
    pi_mask = fit_propensity(A, W, mask=mask)
    pi = fit_propensity(A, W)
    for k in range(A.shape[1]):
        np.testing.assert_allclose(pi_mask[:, k],
                                   direct_fit(A, W, k, mask[:, k], np.ones(n, bool)),
                                   rtol=1e-6, atol=1e-9)
    assert not np.allclose(pi_mask, pi)
    with pytest.raises(ValueError, match=r"mask has shape \(600, 2\), expected"):
        fit_propensity(A, W, mask=mask[:, :2])


def test_fold_scores_are_out_of_fold():
    A, W = screen(5)
    n = len(A)
    folds = make_folds(n, 3, random_state=7)
    assert set(np.unique(folds)) == {0, 1, 2}
    np.testing.assert_array_equal(folds, make_folds(n, 3, random_state=7))
    pi = fit_propensity(A, W, folds=folds)
    control = A.sum(axis=1) == 0
    for k in range(A.shape[1]):
        elig = control | (A[:, k] == 1)
        for f in range(3):
            test = folds == f
            np.testing.assert_allclose(pi[test, k], direct_fit(A, W, k, elig & ~test, test),
                                       rtol=1e-6, atol=1e-9)
    # relabelling cells of fold 0 leaves fold 0's own scores unchanged
    A2 = A.copy()
    in0 = np.flatnonzero(folds == 0)
    A2[in0[:20]] = 0.0
    pi2 = fit_propensity(A2, W, folds=folds)
    np.testing.assert_allclose(pi2[folds == 0], pi[folds == 0])
    assert not np.allclose(pi2[folds == 1], pi[folds == 1])
    # estimate_propensity_scores with K folds uses make_folds(n, K, random_state)
    np.testing.assert_allclose(estimate_propensity_scores(A, W, K=3, random_state=7), pi)


def test_make_folds_leave_one_out():
    folds = make_folds(5, 10)
    assert sorted(folds.tolist()) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(make_folds(7, 1), np.zeros(7, dtype=int))


def test_error_names_treatment_without_a_class():
    A, W = screen(6)
    df = pd.DataFrame(A, columns=["GATA1", "TP53", "MYC"])
    df["EMPTY"] = 0.0
    with pytest.raises(ValueError, match="treatment 'EMPTY' has no treated cells"):
        fit_propensity(df, W)
    # a fold whose complement has no treated cell
    A1 = np.zeros((40, 1))
    A1[:3, 0] = 1
    folds = np.r_[np.zeros(3, int), np.ones(37, int)]
    msg = "treatment '0' has no treated cells in the training set of fold 0"
    with pytest.raises(ValueError, match=msg):
        fit_propensity(A1, np.ones((40, 1)), folds=folds)
    mask = np.zeros((40, 1), bool)
    mask[:3] = True
    with pytest.raises(ValueError, match="treatment '0' has no control cells"):
        fit_propensity(A1, np.ones((40, 1)), mask=mask)


def test_input_errors():
    A, W = screen(7, n=100)
    with pytest.raises(ValueError, match="A must be binary"):
        fit_propensity(A * 2, W)
    with pytest.raises(ValueError, match="W_A must be an n x d matrix with n = 100"):
        fit_propensity(A, W[:50])
    W_nan = W.copy()
    W_nan[0, 1] = np.nan
    with pytest.raises(ValueError, match="W_A must be finite"):
        fit_propensity(A, W_nan)
    with pytest.raises(ValueError, match="class_weight must be None, 'balanced' or a dict"):
        fit_propensity(A, W, class_weight="auto")
    with pytest.raises(ValueError, match="folds must have one id per cell"):
        fit_propensity(A, W, folds=np.zeros(10))
    with pytest.raises(ValueError, match="K must be an integer between 1 and n = 100"):
        estimate_propensity_scores(A, W, K=0)
    with pytest.raises(ValueError, match="K must be an integer between 1 and n = 100"):
        estimate_propensity_scores(A, W, K=101)


def test_auto_clip_bounds_are_prevalence_aware():
    n_ctrl = 1000
    A = np.zeros((n_ctrl + 5 + 100 + 600, 3))
    A[n_ctrl:n_ctrl + 5, 0] = 1  # prevalence 5/1005
    A[n_ctrl + 5:n_ctrl + 105, 1] = 1  # 100/1100: lower = 0.0091 < 0.01
    A[n_ctrl + 105:, 2] = 1  # 600/1600
    lower, upper = clip_bounds(A)
    prev = np.array([5 / 1005, 100 / 1100, 600 / 1600])
    np.testing.assert_allclose(lower, [prev[0] / 10, prev[1] / 10, 0.01])
    np.testing.assert_allclose(upper, [0.99, 0.99, 0.99])
    # a treatment that dominates its comparison gets the upper bound from (1 - prevalence)
    B = np.zeros((1030, 1))
    B[30:, 0] = 1  # prevalence 1000/1030
    lo, up = clip_bounds(B)
    np.testing.assert_allclose(up, 1 - (30 / 1030) / 10)
    np.testing.assert_allclose(lo, 0.01)
    # a mask changes the prevalence
    mask = np.ones_like(A, dtype=bool)
    lo_m, _ = clip_bounds(A, mask=mask)
    np.testing.assert_allclose(lo_m[0], 5 / A.shape[0] / 10)


def test_clip_bounds_pair_and_none():
    A = np.zeros((10, 2))
    A[:3, 0] = 1
    A[3:5, 1] = 1
    lo, up = clip_bounds(A, ps_clip=(0.01, 0.99))
    np.testing.assert_array_equal(lo, [0.01, 0.01])
    np.testing.assert_array_equal(up, [0.99, 0.99])
    lo, up = clip_bounds(A, ps_clip=([0.01, 0.05], 0.9))
    np.testing.assert_array_equal(lo, [0.01, 0.05])
    lo, up = clip_bounds(A, ps_clip=None)
    np.testing.assert_array_equal(lo, [0, 0])
    np.testing.assert_array_equal(up, [1, 1])
    with pytest.raises(ValueError, match="0 <= lower < upper <= 1"):
        clip_bounds(A, ps_clip=(0.6, 0.4))
    with pytest.raises(ValueError, match="ps_clip must be 'auto'"):
        clip_bounds(A, ps_clip="fixed")
    with pytest.raises(TypeError, match="ps_clip must be 'auto'"):
        clip_bounds(A, ps_clip=0.01)
    with pytest.raises(ValueError, match="arrays of length 2"):
        clip_bounds(A, ps_clip=([0.01, 0.02, 0.03], 0.9))


def test_clip_propensity():
    pi = np.array([[0.001, 0.5], [0.999, 0.2], [0.3, 0.0001]])
    out = clip_propensity(pi, np.array([0.01, 0.001]), np.array([0.99, 0.9]))
    np.testing.assert_allclose(out, [[0.01, 0.5], [0.99, 0.2], [0.3, 0.001]])
    np.testing.assert_allclose(pi[0, 0], 0.001)  # input untouched
    with pytest.raises(ValueError, match=r"strictly inside \(0, 1\) after clipping"):
        clip_propensity(np.array([[0.0, 0.5]]), 0.0, 1.0)


def test_estimate_propensity_scores_clip_options():
    A, W = screen(8)
    raw = estimate_propensity_scores(A, W)
    np.testing.assert_allclose(raw, fit_propensity(A, W))
    lower, upper = clip_bounds(A)
    auto = estimate_propensity_scores(A, W, clip="auto")
    np.testing.assert_allclose(auto, np.clip(raw, lower, upper))
    fixed = estimate_propensity_scores(A, W, clip=(0.05, 0.95))
    assert fixed.min() >= 0.05 and fixed.max() <= 0.95
    assert raw.min() < 0.05  # the fixed pair did clip something


def test_penalty_is_not_scale_invariant():
    A, W = screen(9)
    W_big = W.copy()
    W_big[:, 1:] *= 10.0  # same information, different scale of the latent factors
    pi, pi_big = fit_propensity(A, W), fit_propensity(A, W_big)
    assert np.max(np.abs(pi - pi_big)) > 1e-4
