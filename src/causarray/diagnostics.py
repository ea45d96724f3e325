"""Diagnostics for the propensity model and for treatment–covariate association.

Definitions: docs/math.md#diagnostics.

Everything here is descriptive: nothing refits the outcome model or changes a
p-value of a result table.

* :func:`summarize_propensity_scores` — for each
  treatment k, the scores of its treated cells against those of the shared controls
  (cells of other treatments excluded): histogram overlap, AUC, Brier score, share of
  scores outside an overlap window or on the clipping bounds, and Kish effective
  sample sizes of the inverse-propensity weights.
* :func:`summarize_treatment_associations` —
  Spearman correlation and standardised mean difference between each treatment
  indicator and each covariate (observed covariates and/or estimated confounders),
  with Benjamini–Hochberg adjustment over a stated family.
* :func:`align_test_mask` — attach a treatment x gene boolean mask to the rows of a
  result table by label.

:func:`estimate_propensity_scores` is re-exported from :mod:`causarray.propensity`.
The figures of these tables are drawn by :mod:`causarray.pl` (:func:`causarray.pl.propensity`,
:func:`causarray.pl.treatment_associations`); 0.1.1's ``plot_propensity_scores`` and
``plot_treatment_associations`` are still importable from here: they are
:mod:`causarray.pl`'s functions, attached to this module by :mod:`causarray._aliases`
(this module imports nothing above it).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ._validation import (
    check_has_label_controls,
    check_label_codes,
    check_one_label_per_cell,
    check_propensity_design,
    check_association_covariates,
    check_choice,
    check_has_controls,
    check_has_treated,
    check_mask_covers_results,
    check_mask_labels_given,
    check_mask_multiindex,
    check_names,
    check_results_column,
    check_scores,
    check_test_mask_shape,
    check_treatment_column,
    check_unique_result_rows,
    check_unit_bounds,
)
from ._validation import check_bool_mask as _as_bool
from ._validation import check_labels as _check_labels
from ._validation import check_unique_labels as _check_unique
from .inference import bh_adjust
from .propensity import _treatment_matrix, estimate_propensity_scores

logger = logging.getLogger("causarray")

__all__ = [
    "align_test_mask",
    "estimate_propensity_scores",
    "histogram_overlap",
    "kish_ess",
    "plot_propensity_scores",       # noqa: F822 - causarray.pl.*, attached by _aliases
    "plot_treatment_associations",  # noqa: F822 - causarray.pl.*, attached by _aliases
    "propensity_by_label",
    "standardized_mean_difference",
    "summarize_propensity_scores",
    "summarize_treatment_associations",
]


# ----------------------------------------------------------------------------------
# small statistics
# ----------------------------------------------------------------------------------
def histogram_overlap(x: np.ndarray, y: np.ndarray, bins: int = 40) -> float:
    """Overlap of two score distributions: sum over bins of the smaller bin share.

    Parameters
    ----------
    x, y : numpy.ndarray
        Scores in [0, 1].
    bins : int
        Number of equal-width bins on [0, 1].

    Returns
    -------
    float
        ``sum_b min(h_x[b], h_y[b])`` with each histogram normalised to sum 1;
        1 for identical histograms, 0 for disjoint ones, NaN if an input is empty.
    """
    if len(x) == 0 or len(y) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, int(bins) + 1)
    hx, _ = np.histogram(np.clip(x, 0.0, 1.0), bins=edges)
    hy, _ = np.histogram(np.clip(y, 0.0, 1.0), bins=edges)
    return float(np.minimum(hx / hx.sum(), hy / hy.sum()).sum())


def kish_ess(w: np.ndarray) -> float:
    """Kish effective sample size ``(sum w)^2 / sum w^2`` of non-negative weights.

    Parameters
    ----------
    w : numpy.ndarray
        Weights.

    Returns
    -------
    float
        Effective sample size (NaN for an empty or all-zero weight vector).
    """
    w = np.asarray(w, dtype=float)
    ss = float(np.sum(w * w))
    if w.size == 0 or ss == 0:
        return float("nan")
    return float(np.sum(w) ** 2 / ss)


def _auc(scores_treated: np.ndarray, scores_control: np.ndarray) -> float:
    """Mann–Whitney AUC: P(score_T > score_C) + P(tie) / 2."""
    from scipy.stats import rankdata

    n1, n0 = scores_treated.size, scores_control.size
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([scores_treated, scores_control]))
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def standardized_mean_difference(z_treated: np.ndarray, z_control: np.ndarray) -> float:
    """``(mean_T - mean_C) / sqrt((s_C^2 + s_T^2) / 2)`` with sample variances (ddof=1).

    Returns NaN if an arm has fewer than 2 cells or the pooled SD is 0.
    """
    if z_treated.size < 2 or z_control.size < 2:
        return float("nan")
    sd = np.sqrt((np.var(z_control, ddof=1) + np.var(z_treated, ddof=1)) / 2.0)
    if not np.isfinite(sd) or sd == 0:
        return float("nan")
    return float((np.mean(z_treated) - np.mean(z_control)) / sd)


# ----------------------------------------------------------------------------------
# propensity scores
# ----------------------------------------------------------------------------------
def _scores_matrix(pi_hat: Any, shape: tuple[int, int]) -> np.ndarray:
    pi = np.asarray(pi_hat.to_numpy() if hasattr(pi_hat, "to_numpy") else pi_hat, dtype=float)
    if pi.ndim == 1:
        pi = pi[:, None]
    check_scores(pi, shape)
    return pi


def _names(given: Sequence[Any] | None, default: list[str], what: str,
           unique: bool = True) -> list[str]:
    names = default if given is None else [str(t) for t in given]
    check_names(names, len(default), what, unique)
    return names


def _summary_row(name: str, p1: np.ndarray, p0: np.ndarray, overlap_bounds: tuple[float, float],
                 clip_bounds: tuple[float, float] | None, bins: int) -> dict:
    """One row of :func:`summarize_propensity_scores` from the scores of one comparison.

    ``p1``: scores of the treated cells, ``p0``: scores of the control cells (the
    population is their union).
    """
    lo, hi = overlap_bounds
    pop = np.concatenate([p1, p0])
    y = np.concatenate([np.ones(p1.size), np.zeros(p0.size)])
    if clip_bounds is None:
        at_clip = float("nan")
    else:
        at_clip = float(np.mean((pop <= clip_bounds[0]) | (pop >= clip_bounds[1])))
    with np.errstate(divide="ignore"):
        ess1 = kish_ess(1.0 / p1)
        ess0 = kish_ess(1.0 / (1.0 - p0))
    q01, q50, q99 = np.quantile(pop, [0.01, 0.5, 0.99])
    return dict(
        treatment=name, n_treated=int(p1.size), n_control=int(p0.size),
        prevalence=p1.size / pop.size,
        overlap_ratio=histogram_overlap(p1, p0, bins),
        auc=_auc(p1, p0), brier_score=float(np.mean((pop - y) ** 2)),
        outside_overlap_fraction=float(np.mean((pop < lo) | (pop > hi))),
        clipped_fraction=at_clip,
        ess_treated=ess1, ess_control=ess0,
        ess_treated_fraction=ess1 / p1.size, ess_control_fraction=ess0 / p0.size,
        score_q01=float(q01), score_median=float(q50), score_q99=float(q99),
    )


def summarize_propensity_scores(
    A: Any,
    pi_hat: Any,
    treatment_names: Sequence[Any] | None = None,
    overlap_bounds: tuple[float, float] = (0.05, 0.95),
    clip_bounds: tuple[float, float] | None = (0.01, 0.99),
    bins: int = 40,
) -> pd.DataFrame:
    """Overlap, calibration and effective sample sizes of propensity scores per treatment.

    For treatment k the comparison population is the shared controls (all-zero rows
    of ``A``) and the cells with ``A_k = 1``; cells of other treatments are excluded.

    Parameters
    ----------
    A : array_like or DataFrame
        n x a 0/1 treatment matrix (DataFrame columns name the treatments).
    pi_hat : array_like
        n x a propensity scores ``P(A_k = 1 | W_A)``.
    treatment_names : sequence, optional
        Names of the a treatments (default: DataFrame columns or ``0 .. a-1``).
    overlap_bounds : (float, float)
        Window of "good overlap"; ``outside_overlap_fraction`` is the share of the
        population's scores outside it.
    clip_bounds : (float, float) or None
        Clipping bounds; ``clipped_fraction`` is the share of scores at or beyond
        them (NaN when None).
    bins : int
        Number of equal-width bins on [0, 1] for the histogram overlap.

    Returns
    -------
    pandas.DataFrame
        One row per treatment with columns ``treatment, n_treated, n_control,
        prevalence, overlap_ratio, auc, brier_score, outside_overlap_fraction,
        clipped_fraction, ess_treated, ess_control, ess_treated_fraction,
        ess_control_fraction, score_q01, score_median, score_q99`` (0.1.1's names).
        ``ess_*`` are Kish effective sample sizes of the weights ``1/pi`` (treated)
        and ``1/(1-pi)`` (controls); the score quantiles are over the population.

    Raises
    ------
    ValueError
        If ``A`` has no control rows, a treatment has no treated cell, or the shapes
        disagree.
    """
    A_arr, default_names = _treatment_matrix(A)
    n, a = A_arr.shape
    names = _names(treatment_names, default_names, "treatment_names")
    pi = _scores_matrix(pi_hat, (n, a))
    lo, hi = check_unit_bounds("overlap_bounds", overlap_bounds)
    if clip_bounds is not None:
        check_unit_bounds("clip_bounds", clip_bounds)
    control = ~np.any(A_arr != 0, axis=1)
    check_has_controls(control)
    rows = []
    for k, name in enumerate(names):
        treated = A_arr[:, k] == 1
        check_has_treated(treated, name)
        rows.append(_summary_row(name, pi[treated, k], pi[control, k], overlap_bounds,
                                 clip_bounds, bins))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------
# propensity per perturbation label, streamed (no cells x perturbations array)
# ----------------------------------------------------------------------------------
@dataclass
class LabelPropensity:
    """Propensity models of every perturbation against the shared controls.

    Attributes
    ----------
    summary : pandas.DataFrame
        :func:`summarize_propensity_scores` of the fitted scores (one row per
        perturbation, over the cells of its comparison: its own cells and the controls).
    coef : pandas.DataFrame
        Perturbations x design columns: ``P(A_k = 1 | w) = expit(w' coef_k)``, so the
        score of any cell can be recomputed from its design row.  A perturbation whose
        design is constant over its comparison (score = prevalence) gets that
        prevalence's logit on the first constant non-zero column.
    table : ndarray or None
        Cells x perturbations scores of every cell (``keep_table=True`` only).
    """

    summary: pd.DataFrame
    coef: pd.DataFrame
    table: np.ndarray | None = None


def treatment_codes(A: Any) -> np.ndarray:
    """Per-cell perturbation index of a one-hot treatment matrix (-1: control).

    Parameters
    ----------
    A : scipy.sparse matrix, sparse-dtype DataFrame or array, shape (n, a)
        0/1 treatments with at most one perturbation per cell.

    Returns
    -------
    ndarray of int64, shape (n,)

    Raises
    ------
    ValueError
        A cell carries more than one perturbation.
    """
    import scipy.sparse as sp

    if isinstance(A, pd.DataFrame):
        A = A.sparse.to_coo() if A.shape[1] and all(
            isinstance(dt, pd.SparseDtype) for dt in A.dtypes) else A.to_numpy()
    A = sp.csc_matrix(A)
    A.eliminate_zeros()
    per_cell = np.bincount(A.indices, minlength=A.shape[0])
    check_one_label_per_cell(per_cell)
    codes = np.full(A.shape[0], -1, dtype=np.int64)
    codes[A.indices] = np.repeat(np.arange(A.shape[1]), np.diff(A.indptr))
    return codes


def _coefficients(model: Any, W_train: np.ndarray, prevalence: float) -> np.ndarray:
    d = W_train.shape[1]
    if model is not None:
        return np.asarray(model.coef_, dtype=float).ravel()
    coef = np.zeros(d)
    nonzero = np.flatnonzero(W_train[0] != 0) if W_train.shape[0] else np.zeros(0, int)
    if nonzero.size and 0 < prevalence < 1:
        c = int(nonzero[0])
        coef[c] = np.log(prevalence / (1.0 - prevalence)) / W_train[0, c]
    else:
        coef[:] = np.nan
    return coef


def propensity_by_label(
    codes: Any,
    W_A: Any,
    treatment_names: Sequence[Any],
    *,
    random_state: int | None = 0,
    C: float = 1.0,
    max_iter: int = 1000,
    keep_table: bool = False,
    design_names: Sequence[str] | None = None,
    overlap_bounds: tuple[float, float] = (0.05, 0.95),
    clip_bounds: tuple[float, float] | None = (0.01, 0.99),
    bins: int = 40,
    verbose: bool = False,
) -> LabelPropensity:
    """Propensity scores and their overlap summary, one perturbation at a time.

    The same model as :func:`estimate_propensity_scores` with its defaults (K = 1,
    logistic, calibrated, no clipping): for perturbation k an L2-penalised logistic
    regression of ``1{label = k}`` on ``W_A`` over the controls and the cells of k.
    Only that comparison's rows are held at a time, so memory is O(n d + a d), not the
    n x a one-hot matrix and score table of :func:`estimate_propensity_scores` (5 GB
    each for 310k cells x 2,021 perturbations).  The summary equals
    ``summarize_propensity_scores(A, estimate_propensity_scores(A, W_A))``.

    Parameters
    ----------
    codes : array of int, shape (n,)
        Perturbation index of each cell (``0 .. a-1``), -1 for a control cell
        (:func:`treatment_codes`).
    W_A : array, shape (n, d)
        Propensity design including its intercept column.
    treatment_names : sequence of str, length a
    random_state, C, max_iter
        As for :func:`causarray.propensity.fit_propensity`.
    keep_table : bool
        Also return the n x a scores of every cell under every model.
    design_names : sequence of str, optional
        Column names of ``coef`` (default ``w0, w1, ...``).
    overlap_bounds, clip_bounds, bins
        As for :func:`summarize_propensity_scores`.
    verbose : bool
        Progress bar over perturbations.

    Returns
    -------
    LabelPropensity

    Raises
    ------
    ValueError
        No control cell, a perturbation without cells, codes out of range, shapes
        that disagree.
    """
    from tqdm.auto import tqdm

    from .propensity import _degenerate_score, logistic_model, model_scores

    codes = np.asarray(codes).ravel()
    names = [str(t) for t in treatment_names]
    a, n = len(names), codes.size
    W = np.asarray(W_A, dtype=float)
    check_label_codes(codes, a)
    if design_names is not None:
        cols = [str(c) for c in design_names]
    else:
        cols = [f"w{j}" for j in range(W.shape[1])] if W.ndim == 2 else []
    check_propensity_design(W, n, cols)
    ctrl = np.flatnonzero(codes == -1)
    check_has_label_controls(ctrl.size)
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(a), side="left")
    stops = np.searchsorted(codes[order], np.arange(a), side="right")
    table = np.empty((n, a)) if keep_table else None
    coef = np.empty((a, W.shape[1]))
    rows = []
    for k in tqdm(range(a), desc="propensity", disable=not verbose):
        treated = order[starts[k]:stops[k]]          # ascending (stable sort)
        check_has_treated(np.array([treated.size > 0]), names[k])
        pop = np.union1d(ctrl, treated)
        is_trt = codes[pop] == k
        y = is_trt.astype(int)
        W_pop = W[pop]
        model = logistic_model(W_pop, y, None, C, random_state, max_iter)
        prev = _degenerate_score(y, None)
        coef[k] = _coefficients(model, W_pop, prev)
        if keep_table:
            table[:, k] = np.full(n, prev) if model is None else model_scores(model, W)
            p1, p0 = table[treated, k], table[ctrl, k]
        else:
            s = np.full(pop.size, prev) if model is None else model_scores(model, W_pop)
            p1, p0 = s[is_trt], s[~is_trt]
        rows.append(_summary_row(names[k], p1, p0, overlap_bounds, clip_bounds, bins))
    return LabelPropensity(summary=pd.DataFrame(rows),
                           coef=pd.DataFrame(coef, index=pd.Index(names, dtype=object),
                                             columns=cols),
                           table=table)


# ----------------------------------------------------------------------------------
# treatment vs covariate association
# ----------------------------------------------------------------------------------
def summarize_treatment_associations(
    A: Any,
    Z: Any,
    treatment_names: Sequence[Any] | None = None,
    covariate_names: Sequence[Any] | None = None,
    covariate_types: Sequence[str] | str | None = None,
    bh_scope: str = "global",
) -> pd.DataFrame:
    """Association of each treatment indicator with each covariate (purely diagnostic).

    For treatment k and covariate j, over the controls and the cells treated with k:
    the Spearman correlation between ``Z_j`` and ``A_k`` with its p-value, and the
    standardised mean difference of ``Z_j`` between treated and control cells.

    Parameters
    ----------
    A : array_like or DataFrame
        n x a 0/1 treatment matrix.
    Z : array_like or DataFrame
        n x m covariates: observed covariates and/or estimated latent factors.
    treatment_names, covariate_names : sequence, optional
        Labels (default: DataFrame columns, else ``0 .. a-1`` / ``Z0 .. Z{m-1}``).
    covariate_types : str or sequence of str, optional
        A type per covariate (e.g. ``'observed'``, ``'latent'``) copied to the output;
        default ``'covariate'``.
    bh_scope : {'global', 'per_treatment'}
        The family for the Benjamini–Hochberg adjustment: all finite p-values of the
        table, or those of one treatment.

    Returns
    -------
    pandas.DataFrame
        One row per (treatment, covariate), treatments outermost, with columns
        ``treatment, covariate, covariate_type, n_treated, n_control, constant,
        spearman_rho, pvalue, padj, n_tests_in_family, standardized_mean_difference``.
        ``constant`` marks a covariate that is constant over the population (its
        ρ, p-value and padj are NaN).
    """
    from scipy.stats import spearmanr

    check_choice("bh_scope", bh_scope, ("global", "per_treatment"))
    A_arr, default_t = _treatment_matrix(A)
    n, a = A_arr.shape
    t_names = _names(treatment_names, default_t, "treatment_names")
    if isinstance(Z, pd.DataFrame):
        default_z = [str(c) for c in Z.columns]
        Z_arr = Z.to_numpy(dtype=float)
    else:
        Z_arr = np.asarray(Z, dtype=float)
        if Z_arr.ndim == 1:
            Z_arr = Z_arr[:, None]
        default_z = [f"Z{j}" for j in range(Z_arr.shape[1])] if Z_arr.ndim == 2 else []
    check_association_covariates(Z_arr, n)
    m = Z_arr.shape[1]
    z_names = _names(covariate_names, default_z, "covariate_names")
    if covariate_types is None or isinstance(covariate_types, str):
        z_types = [covariate_types or "covariate"] * m
    else:
        z_types = _names(covariate_types, ["covariate"] * m, "covariate_types", unique=False)
    control = ~np.any(A_arr != 0, axis=1)
    check_has_controls(control)

    rows = []
    for k in range(a):
        treated = A_arr[:, k] == 1
        check_has_treated(treated, t_names[k])
        pop = control | treated
        ind = A_arr[pop, k]
        for j in range(m):
            z = Z_arr[pop, j]
            constant = bool(np.ptp(z) == 0)
            if constant:
                rho, pval = float("nan"), float("nan")
            else:
                res = spearmanr(z, ind)
                rho, pval = float(res[0]), float(res[1])
            rows.append(dict(
                treatment=t_names[k], covariate=z_names[j], covariate_type=z_types[j],
                n_treated=int(treated.sum()), n_control=int(control.sum()), constant=constant,
                spearman_rho=rho, pvalue=pval,
                standardized_mean_difference=standardized_mean_difference(
                    Z_arr[treated, j], Z_arr[control, j]),
            ))
    out = pd.DataFrame(rows)
    out["padj"] = np.nan
    out["n_tests_in_family"] = 0
    groups = [np.arange(len(out))] if bh_scope == "global" else \
        [np.flatnonzero(out["treatment"].to_numpy() == t) for t in t_names]
    for idx in groups:
        pv = out["pvalue"].to_numpy()[idx]
        out.loc[out.index[idx], "padj"] = bh_adjust(pv)
        out.loc[out.index[idx], "n_tests_in_family"] = int(np.sum(~np.isnan(pv)))
    cols = ["treatment", "covariate", "covariate_type", "n_treated", "n_control", "constant",
            "spearman_rho", "pvalue", "padj", "n_tests_in_family",
            "standardized_mean_difference"]
    return out[cols]


# ----------------------------------------------------------------------------------
# test masks
# ----------------------------------------------------------------------------------


def align_test_mask(
    results: pd.DataFrame,
    test_mask: Any,
    treatment_names: Sequence[Any] | None = None,
    gene_names: Sequence[Any] | None = None,
    treatment_col: str = "trt",
    gene_col: str = "gene_names",
) -> np.ndarray:
    """A treatment x gene boolean mask aligned to the rows of a result table.

    Labels are compared as strings. Only annotates: the result table (and its
    p-values) is never modified.

    Parameters
    ----------
    results : pandas.DataFrame
        Result table with a gene column and, for several treatments, a treatment
        column. Without a treatment column the mask must hold a single treatment.
    test_mask : array_like, DataFrame or Series
        * an a x p array with ``treatment_names`` and ``gene_names``;
        * a DataFrame with treatments as index and genes as columns;
        * a boolean Series indexed by a 2-level (treatment, gene) MultiIndex.
    treatment_names, gene_names : sequence, optional
        Labels of an array mask.
    treatment_col, gene_col : str
        Columns of ``results`` holding the labels.

    Returns
    -------
    numpy.ndarray of bool, shape (len(results),)

    Raises
    ------
    TypeError
        If the mask is not boolean.
    ValueError
        Missing label arguments, wrong shapes, duplicated labels, None/NaN labels,
        duplicated (treatment, gene) rows in ``results``, or a result row whose
        (treatment, gene) pair is not in the mask.
    """
    check_results_column(results, gene_col)
    if isinstance(test_mask, pd.Series):
        check_mask_multiindex(test_mask)
        vals = _as_bool(test_mask.to_numpy())
        _check_labels(test_mask.index.get_level_values(0), "test_mask treatment")
        _check_labels(test_mask.index.get_level_values(1), "test_mask gene")
        keys = [f"{t}\x00{g}" for t, g in test_mask.index]
        t_labels = list(dict.fromkeys(str(t) for t in test_mask.index.get_level_values(0)))
        _check_unique(keys, "(treatment, gene)")
        lookup = pd.Series(vals, index=keys)
    else:
        if isinstance(test_mask, pd.DataFrame):
            _check_labels(test_mask.index, "test_mask treatment")
            _check_labels(test_mask.columns, "test_mask gene")
            t_labels = [str(t) for t in test_mask.index]
            g_labels = [str(g) for g in test_mask.columns]
            vals = _as_bool(test_mask.to_numpy())
        else:
            check_mask_labels_given(treatment_names, gene_names)
            vals = _as_bool(test_mask)
            _check_labels(treatment_names, "treatment_names")
            _check_labels(gene_names, "gene_names")
            if vals.ndim == 1:
                vals = vals[None, :]
            t_labels = [str(t) for t in treatment_names]
            g_labels = [str(g) for g in gene_names]
            check_test_mask_shape(vals, len(t_labels), len(g_labels))
        _check_unique(t_labels, "treatment")
        _check_unique(g_labels, "gene")
        keys = [f"{t}\x00{g}" for t in t_labels for g in g_labels]
        lookup = pd.Series(vals.ravel(), index=keys)

    _check_labels(results[gene_col], f"results[{gene_col!r}]")
    genes = results[gene_col].astype(str).to_numpy()
    check_treatment_column(results, treatment_col, len(t_labels))
    if treatment_col in results.columns:
        _check_labels(results[treatment_col], f"results[{treatment_col!r}]")
        trts = results[treatment_col].astype(str).to_numpy()
    else:
        trts = np.full(len(results), t_labels[0], dtype=object)
    row_keys = [f"{t}\x00{g}" for t, g in zip(trts, genes)]
    check_unique_result_rows(row_keys)
    out = lookup.reindex(row_keys)
    check_mask_covers_results(out, trts, genes)
    return out.to_numpy(dtype=bool)

