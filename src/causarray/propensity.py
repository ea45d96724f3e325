"""Propensity scores for one-vs-shared-controls comparisons
(docs/math.md#propensity-scores).

For treatment k the population is I_k = controls (all-zero rows of ``A``) ∪ cells
with ``A_ik = 1`` (or ``mask[:, k]`` when a mask is given).  Over the eligible cells of
each training fold an L2-penalised logistic regression of ``A_k`` on the design
``W_A`` is fitted and ``P(A_k = 1 | W_A)`` is predicted for every cell of the test
fold (every cell when there are no folds).

Notes
-----
* The model has **no separate intercept** (``fit_intercept=False``): ``W_A`` carries
  the intercept column, which is therefore penalised like every other coefficient.
* The L2 penalty is **not invariant to the scale of the columns** of ``W_A``.  The
  latent factors U have an arbitrary scale, so multiplying U by a constant changes
  the scores (a larger scale means a weaker effective penalty); C matters as well
  (docs/math.md#propensity-scores).  Nothing is standardised here; standardise ``W_A`` yourself if
  you want a scale-free penalty.
* ``class_weight=None`` gives calibrated scores (the default).  ``'balanced'`` (the
  0.0.9 default) centres the scores near 0.5 whatever the prevalence, which makes the
  inverse weights of rare treatments far too small; use it only to reproduce old
  results.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from tqdm.auto import tqdm

from ._validation import (
    check_arms,
    check_auto_clip_arms,
    check_clipped_scores,
    check_fold_count,
    check_fold_ids,
    check_fold_range,
    check_positive_number,
    check_ps_clip_auto,
    check_ps_clip_bounds,
)
from ._validation import check_class_weight as _check_class_weight
from ._validation import check_ps_design as _design_matrix
from ._validation import check_ps_mask as _check_mask
from ._validation import check_ps_treatments as _treatment_matrix

logger = logging.getLogger("causarray")

AUTO_CLIP_MAX = 0.01  # 'auto' bounds: min(0.01, prevalence / 10) from each side


def eligible_cells(A: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Boolean n x a matrix of the cells in each treatment's comparison.

    Parameters
    ----------
    A : numpy.ndarray
        n x a 0/1 treatment matrix; a control cell has an all-zero row.
    mask : numpy.ndarray, optional
        n x a boolean matrix; when given it *is* the answer.

    Returns
    -------
    numpy.ndarray
        ``controls | (A[:, k] == 1)`` per column k, or ``mask``.
    """
    if mask is not None:
        return mask
    control = ~np.any(A != 0, axis=1)
    return control[:, None] | (A == 1)


# ----------------------------------------------------------------------------------
# folds
# ----------------------------------------------------------------------------------
def make_folds(n: int, K: int, random_state: int | None = 0) -> np.ndarray:
    """Fold ids for K-fold cross-fitting with shuffling (docs/math.md#cross-fitting).

    Parameters
    ----------
    n : int
        Number of cells.
    K : int
        Number of folds; ``K >= n`` gives leave-one-out; ``K = 1`` one fold.
    random_state : int or None
        Seed of the shuffle.

    Returns
    -------
    numpy.ndarray
        Integer fold id in ``0 .. min(K, n) - 1`` for each cell.
    """
    check_fold_count(K)
    K = min(int(K), n)
    folds = np.zeros(n, dtype=int)
    if K == 1:
        return folds
    splitter = KFold(n_splits=K, shuffle=True, random_state=random_state)
    for f, (_, test) in enumerate(splitter.split(np.zeros((n, 1)))):
        folds[test] = f
    return folds


# ----------------------------------------------------------------------------------
# fitting
# ----------------------------------------------------------------------------------
def _degenerate_score(y: np.ndarray, class_weight: Any) -> float:
    """Score for a constant design: (class-weighted) prevalence, or 0.5 if balanced."""
    if class_weight == "balanced":
        return 0.5
    n1 = float(np.sum(y == 1))
    n0 = float(y.size - n1)
    if isinstance(class_weight, dict):
        w0, w1 = float(class_weight.get(0, 1.0)), float(class_weight.get(1, 1.0))
        return w1 * n1 / (w1 * n1 + w0 * n0)
    return n1 / (n1 + n0)


def logistic_model(
    W_train: np.ndarray,
    y_train: np.ndarray,
    class_weight: Any = None,
    C: float = 1.0,
    random_state: int | None = 0,
    max_iter: int = 1000,
) -> LogisticRegression | None:
    """The penalised logistic regression of :func:`fit_propensity` on one training set.

    ``P(y = 1 | w) = expit(w' beta)``, L2 penalty ``1 / (2C) |beta|^2`` on every
    coefficient, no separate intercept (``W_train`` carries it).  Returns None when every
    column of ``W_train`` is constant (the score is then the prevalence, see
    :func:`_degenerate_score`).
    """
    if np.all(np.ptp(W_train, axis=0) == 0):
        return None
    model = LogisticRegression(
        C=C, fit_intercept=False, solver="lbfgs", class_weight=class_weight,
        random_state=random_state, max_iter=max_iter,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(W_train, y_train)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logger.warning("propensity logistic regression did not converge in %d iterations",
                       max_iter)
    return model


def model_scores(model: LogisticRegression, W: np.ndarray) -> np.ndarray:
    """``P(y = 1 | w)`` of a fitted :func:`logistic_model` for the rows of ``W``."""
    return model.predict_proba(W)[:, list(model.classes_).index(1)]


def _fit_one(
    W_train: np.ndarray,
    y_train: np.ndarray,
    W_test: np.ndarray,
    class_weight: Any,
    C: float,
    random_state: int | None,
    max_iter: int,
) -> np.ndarray:
    """P(y = 1 | w) for the rows of W_test from one penalised logistic fit."""
    model = logistic_model(W_train, y_train, class_weight, C, random_state, max_iter)
    if model is None:
        return np.full(W_test.shape[0], _degenerate_score(y_train, class_weight))
    return model_scores(model, W_test)


def _fit_model(ps_model: str, W_train: np.ndarray, y_train: np.ndarray, W_test: np.ndarray,
               class_weight: Any, C: float, random_state: int | None,
               max_iter: int) -> np.ndarray:
    """Scores of one propensity model ('logistic', 'random_forest_cv' or 'ensemble')."""
    if ps_model == "logistic" or np.all(np.ptp(W_train, axis=0) == 0):
        return _fit_one(W_train, y_train, W_test, class_weight, C, random_state, max_iter)
    from .propensity_forest import fit_forest_scores

    forest = fit_forest_scores(W_train, y_train, W_test, class_weight, random_state)
    if ps_model == "random_forest_cv":
        return forest
    logit = _fit_one(W_train, y_train, W_test, class_weight, C, random_state, max_iter)
    return 0.5 * (forest + logit)


def fit_propensity(
    A: Any,
    W_A: Any,
    mask: Any = None,
    class_weight: Any = None,
    C: float = 1.0,
    folds: Any = None,
    random_state: int | None = 0,
    *,
    max_iter: int = 1000,
    verbose: bool = False,
    ps_model: str = "logistic",
) -> np.ndarray:
    """Raw (unclipped) propensity scores, one-vs-shared-controls (docs/math.md#propensity-scores).

    Parameters
    ----------
    A : array_like or DataFrame
        n x a 0/1 treatment matrix (controls have all-zero rows). DataFrame
        columns name the treatments in error messages.
    W_A : array_like
        n x d propensity design, **including** its intercept column. Not
        standardised: the L2 penalty depends on the scale of the columns.
    mask : array_like, optional
        n x a boolean; ``mask[:, k]`` replaces the eligible cells of treatment k.
    class_weight : None, 'balanced' or dict
        Passed to scikit-learn (None = calibrated scores).
    C : float
        Inverse L2 penalty strength.
    folds : array_like, optional
        n-vector of fold ids. For each fold the model is trained on the eligible
        cells outside it and predicts the cells inside it (out-of-fold scores).
        None: train on all eligible cells and predict every cell.
    random_state : int or None
        Passed to scikit-learn.
    max_iter : int
        lbfgs iteration limit (a warning is logged when it is reached).
    verbose : bool
        Progress bar over treatments.
    ps_model : 'logistic' (default), 'random_forest_cv' (out-of-bag-tuned forest) or
        'ensemble' (mean of the two), see :mod:`causarray.propensity_forest`.

    Returns
    -------
    numpy.ndarray
        n x a scores ``P(A_k = 1 | W_A)`` for every cell. When every column of the
        training design is constant over the eligible cells the score is the
        prevalence (class-weighted for a dict, 0.5 for 'balanced').

    Raises
    ------
    ValueError
        If a training fold has no treated or no control cell for a treatment
        (the message names the treatment and fold), or on malformed input.
    """
    from ._compat import check_ps_model

    check_ps_model(ps_model)
    A_arr, names = _treatment_matrix(A)
    n, a = A_arr.shape
    W = _design_matrix(W_A, n)
    mask_arr = _check_mask(mask, (n, a))
    _check_class_weight(class_weight)
    check_positive_number("C", C)
    if folds is None:
        fold_ids = np.zeros(n, dtype=int)
        single = True
    else:
        fold_ids = np.asarray(folds).ravel()
        check_fold_ids(fold_ids, folds, n)
        single = np.unique(fold_ids).size == 1
    elig = eligible_cells(A_arr, mask_arr)

    pi = np.empty((n, a))
    for k in tqdm(range(a), desc="propensity", disable=not verbose):
        for f in np.unique(fold_ids):
            test = fold_ids == f
            train = elig[:, k] if single else elig[:, k] & ~test
            y = A_arr[train, k]
            where = "" if single else f" in the training set of fold {np.asarray(f).item()}"
            check_arms(y, names[k], where)
            pi[test, k] = _fit_model(ps_model, W[train], y.astype(int), W[test],
                                     class_weight, C, random_state, max_iter)
    return pi


# ----------------------------------------------------------------------------------
# clipping
# ----------------------------------------------------------------------------------
def clip_bounds(
    A: Any, mask: Any = None, ps_clip: Any = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-treatment clipping bounds for the scores entering AIPW
    (docs/math.md#propensity-scores).

    Parameters
    ----------
    A : array_like or DataFrame
        n x a 0/1 treatment matrix.
    mask : array_like, optional
        n x a boolean eligibility matrix (as in :func:`fit_propensity`).
    ps_clip : 'auto', pair or None
        * ``'auto'``: with ``pbar_k`` the prevalence of ``A_k`` among the eligible
          cells, ``lower_k = min(0.01, pbar_k / 10)`` and
          ``upper_k = 1 - min(0.01, (1 - pbar_k) / 10)``.
        * ``(lower, upper)``: scalars or per-treatment arrays of length a, with
          ``0 <= lower < upper <= 1``.
        * ``None``: no clipping, returned as bounds (0, 1).

    Returns
    -------
    lower, upper : numpy.ndarray
        Arrays of shape (a,).
    """
    A_arr, names = _treatment_matrix(A)
    n, a = A_arr.shape
    if ps_clip is None:
        return np.zeros(a), np.ones(a)
    if isinstance(ps_clip, str):
        check_ps_clip_auto(ps_clip)
        elig = eligible_cells(A_arr, _check_mask(mask, (n, a)))
        n_elig = elig.sum(axis=0)
        n_trt = (elig & (A_arr == 1)).sum(axis=0)
        check_auto_clip_arms(n_trt, n_elig, names)
        pbar = n_trt / n_elig
        lower = np.minimum(AUTO_CLIP_MAX, pbar / 10.0)
        upper = 1.0 - np.minimum(AUTO_CLIP_MAX, (1.0 - pbar) / 10.0)
        return lower, upper
    return check_ps_clip_bounds(ps_clip, a)


def clip_propensity(pi: Any, lower: Any, upper: Any) -> np.ndarray:
    """Clip scores column-wise and check they lie strictly inside (0, 1).

    Parameters
    ----------
    pi : array_like
        n x a scores.
    lower, upper : float or array_like
        Bounds, scalars or of shape (a,).

    Returns
    -------
    numpy.ndarray
        Clipped copy of ``pi``.

    Raises
    ------
    ValueError
        If a clipped score is not finite or is 0 or 1.
    """
    p = np.asarray(pi, dtype=float)
    if p.ndim == 1:
        p = p[:, None]
    out = np.clip(p, np.asarray(lower, dtype=float), np.asarray(upper, dtype=float))
    check_clipped_scores(out)
    return out


# ----------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------
def estimate_propensity_scores(
    A: Any,
    X_A: Any,
    K: int = 1,
    ps_model: str = "logistic",
    mask: Any = None,
    clip: Any = None,
    random_state: int | None = 0,
    verbose: bool = False,
    class_weight: Any = None,
    C: float = 1.0,
) -> np.ndarray:
    """Propensity scores of each treatment against the shared controls.

    L2-penalised logistic regression without separate intercept (``X_A`` carries
    the intercept column) over controls ∪ treated-k cells (or ``mask[:, k]``);
    see :func:`fit_propensity`. The penalty is not invariant to the scale of the
    columns of ``X_A`` (notably latent factors of arbitrary scale).

    Parameters
    ----------
    A : array_like or DataFrame
        n x a 0/1 treatment matrix.
    X_A : array_like
        n x d propensity design including the intercept.
    K : int
        1: in-sample scores; K > 1: out-of-fold scores from shuffled K-fold splits
        seeded by ``random_state`` (K = n is leave-one-out).
    ps_model : 'logistic', 'random_forest_cv' or 'ensemble' (see :func:`fit_propensity`).
    mask : array_like, optional
        n x a boolean eligibility matrix.
    clip : None, 'auto' or (lower, upper)
        Clipping applied to the returned scores (see :func:`clip_bounds`);
        None returns raw scores.
    random_state : int or None
        Seed of the folds and of scikit-learn.
    verbose : bool
        Progress bar.
    class_weight : None, 'balanced' or dict
        None gives calibrated scores; 'balanced' reproduces causarray 0.0.9.
    C : float
        Inverse L2 penalty strength.

    Returns
    -------
    numpy.ndarray
        n x a scores.
    """
    from ._compat import check_clip

    check_clip(clip)
    A_arr, _ = _treatment_matrix(A)
    n = A_arr.shape[0]
    check_fold_range(K, n)
    folds = None if K == 1 else make_folds(n, int(K), random_state)
    A_named = A if hasattr(A, "columns") else A_arr
    pi = fit_propensity(A_named, X_A, mask=mask, class_weight=class_weight, C=C,
                        folds=folds, random_state=random_state, verbose=verbose,
                        ps_model=ps_model)
    if clip is not None:
        lower, upper = clip_bounds(A_named, mask=mask, ps_clip=clip)
        pi = clip_propensity(pi, lower, upper)
    return pi


__all__ = [
    "clip_bounds",
    "clip_propensity",
    "eligible_cells",
    "estimate_propensity_scores",
    "fit_propensity",
    "make_folds",
]
