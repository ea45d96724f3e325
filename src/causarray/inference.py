"""Multiple testing for the doubly robust log-fold changes (docs/math.md#multiple-testing).

Array in, array out: every function here works on the statistics of **one**
treatment (the family of tests is that treatment's genes) and knows nothing about
genes, cells or data frames.

* :func:`t_pvalues` – two-sided p-values from Student t (per-entry df) or N(0, 1).
* :func:`bh_adjust` – Benjamini–Hochberg adjusted p-values over the non-NaN entries.
* :func:`empirical_null_adjust` – location–scale empirical null (median, 1.4826·MAD).
* :func:`fdx_control` – FDX control: multiplier-bootstrap step-down FWER procedure
  followed by augmentation.
* :func:`multiple_testing` – all of the above for one treatment, as output columns.
* :func:`moderated_variances` – empirical-Bayes variances with a mean trend (limma's).

A NaN statistic means "test not performed" (a filtered gene); it gives NaN p-values,
is left out of every family and is never rejected.

FDX scaling
-----------
For influence values ``eta`` (n x p) the statistic of gene j is
``stat_j = tau_j / std_j`` with ``std_j^2 ≈ Var(eta_j) / n``.  The multiplier
bootstrap mimics its null distribution with

    z_bj = sum_i (eta_ij - mean_j eta) g_i / (n std_j),   g ~ N(0, I_n),

which has conditional variance ``Var(eta_j) / (n std_j^2) ≈ 1``.  The original
implementation used ``z_bj = sum_i eta_ij g_i / std_j`` (no centring, no 1/n), whose
standard deviation is ≈ n; its critical values are inflated by ≈ n and FDX never
rejects (docs/math.md#fdx-control).  That statistic is still reachable through
``legacy_fdx_scaling=True`` for reproduction only (the same name as in :func:`causarray.LFC`;
``legacy_scaling`` is its deprecated alias).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ._compat import renamed_keyword
from ._validation import as_float_array as _as_float_array
from ._validation import (
    check_1d,
    check_df,
    check_df_shape,
    check_eta_finite,
    check_fdx_needs,
    check_pvalues,
    check_same_shape,
)
from ._validation import check_fdx_inputs as _check_fdx_inputs

logger = logging.getLogger("causarray")

MAD_CONSISTENCY = 1.4826
FDX_MIN_STD = 1e-8
_BOOTSTRAP_CHUNK_FLOATS = 2**21  # working floats per bootstrap chunk (16 MiB)


# ----------------------------------------------------------------------------------
# p-values
# ----------------------------------------------------------------------------------


def t_pvalues(stat: Any, df: Any = None) -> np.ndarray:
    """Two-sided p-values ``2 P(T > |stat|)``.

    Parameters
    ----------
    stat : array_like
        Test statistics (any shape). NaN entries give NaN p-values.
    df : None, float or array_like, optional
        Degrees of freedom of the Student t reference, broadcastable to ``stat``
        (per-entry df). ``None`` or ``inf`` entries use the standard normal; NaN
        entries give NaN p-values.

    Returns
    -------
    numpy.ndarray
        p-values with the shape of ``stat`` (after broadcasting with ``df``).

    Raises
    ------
    ValueError
        If a degree of freedom is not positive.
    """
    stat = _as_float_array(stat, "stat")
    abs_stat = np.abs(stat)
    if df is None:
        return 2.0 * stats.norm.sf(abs_stat)
    df = _as_float_array(df, "df")
    check_df(df)
    abs_stat, df = np.broadcast_arrays(abs_stat, df)
    normal = np.isinf(df)
    safe_df = np.where(normal | np.isnan(df), 1.0, df)
    p = np.where(normal, 2.0 * stats.norm.sf(abs_stat), 2.0 * stats.t.sf(abs_stat, safe_df))
    p = np.where(np.isnan(df), np.nan, p)
    return np.minimum(p, 1.0)


def bh_adjust(pvalues: Any) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values over the non-NaN entries.

    The family is the set of non-NaN entries (m of them); NaN entries stay NaN.
    Equal to ``statsmodels.stats.multitest.multipletests(p, method='fdr_bh')[1]``
    on the non-NaN entries.

    Parameters
    ----------
    pvalues : array_like
        p-values in [0, 1] (any shape), NaN for tests not performed.

    Returns
    -------
    numpy.ndarray
        Adjusted p-values, same shape, ``min(1, min_{k >= rank} m p_(k) / k)``.

    Raises
    ------
    ValueError
        If a non-NaN entry lies outside [0, 1].
    """
    p = _as_float_array(pvalues, "pvalues")
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    vals = p[ok]
    if vals.size == 0:
        return out
    check_pvalues(vals)
    m = vals.size
    order = np.argsort(vals, kind="mergesort")
    scaled = vals[order] * m / np.arange(1, m + 1)
    adj_sorted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    adj = np.empty(m)
    adj[order] = adj_sorted
    out[ok] = adj
    return out


# ----------------------------------------------------------------------------------
# empirical-Bayes variances
# ----------------------------------------------------------------------------------
#: Degree of the polynomial trend of the log variances in :func:`moderated_variances`.
MODERATION_DEGREE = 3
#: Fewer tested genes than this and the variances are left as they are.
MODERATION_MIN_GENES = 50


def trigamma_inverse(x: float) -> float:
    """y with trigamma(y) = x, by Newton's method on 1/trigamma (Smyth 2004, §6.2)."""
    from scipy.special import polygamma

    y = 0.5 + 1.0 / x
    for _ in range(50):
        tri = float(polygamma(1, y))
        step = tri * (1.0 - tri / x) / float(polygamma(2, y))
        y += step
        if -step / y < 1e-8:
            break
    return y


def log_variance_trend(var: Any, covariate: Any,
                       degree: int = MODERATION_DEGREE) -> np.ndarray:
    """Least-squares polynomial trend of ``log var`` in ``covariate`` (standardised),
    evaluated at every entry; NaN where ``var`` is not finite and positive or the
    covariate is not finite, and everywhere when fewer than ``degree + 3`` are."""
    var = np.asarray(var, dtype=float)
    x = np.asarray(covariate, dtype=float)
    out = np.full(var.shape, np.nan)
    ok = np.isfinite(var) & (var > 0) & np.isfinite(x)
    if ok.sum() < degree + 3:
        return out
    xs = (x[ok] - x[ok].mean()) / max(float(x[ok].std()), 1e-12)
    basis = np.vander(xs, degree + 1)
    coef, *_ = np.linalg.lstsq(basis, np.log(var[ok]), rcond=None)
    out[ok] = basis @ coef
    return out


def moderated_variances(var: Any, df: float, covariate: Any,
                        degree: int = MODERATION_DEGREE) -> tuple[np.ndarray, np.ndarray, float]:
    """Empirical-Bayes posterior variances of many genes (limma's ``squeezeVar`` with a
    trend; Smyth 2004, docs/math.md#case-control).

    Model: each gene's variance estimate is ``var_g ~ sigma_g² chi²_df / df`` and the
    true variances follow a scaled inverse chi-square prior with ``d0`` degrees of
    freedom around a trend ``s0²(x)`` in ``covariate`` (the log mean expression), whose
    log is a polynomial of degree ``degree``.  The log variances' trend is fitted by
    least squares; ``d0`` comes from their residual variance less the sampling part
    ``trigamma(df / 2)`` (``d0 = inf`` when nothing is left); the posterior variance is
    ``(d0 s0² + df var_g) / (d0 + df)`` on ``df + d0`` degrees of freedom (with
    ``d0 = inf``: the trend, on the pooled degrees of freedom).

    Returns ``(posterior variances, degrees of freedom, d0)`` per entry; entries with a
    non-finite or non-positive variance or covariate are returned as given with ``df``,
    and so is everything when fewer than ``MODERATION_MIN_GENES`` entries are usable
    (``d0 = 0``).
    """
    from scipy.special import digamma, polygamma

    var = np.asarray(var, dtype=float)
    x = np.asarray(covariate, dtype=float)
    post, dfs = var.copy(), np.full(var.shape, float(df))
    ok = np.isfinite(var) & (var > 0) & np.isfinite(x)
    n = int(ok.sum())
    if n < max(MODERATION_MIN_GENES, degree + 3):
        return post, dfs, 0.0
    z = np.log(var[ok])
    trend = log_variance_trend(var, x, degree)[ok]
    excess = float(np.sum((z - trend) ** 2) / (n - degree - 1) - polygamma(1, df / 2))
    d0 = np.inf if excess <= 0 else 2.0 * trigamma_inverse(excess)
    # E[log(var)] = log s0² + digamma(df/2) - log(df/2) - (digamma(d0/2) - log(d0/2))
    shift = digamma(df / 2) - np.log(df / 2)
    if np.isfinite(d0):
        shift -= digamma(d0 / 2) - np.log(d0 / 2)
    s0 = np.exp(trend - shift)
    if np.isinf(d0):
        post[ok], dfs[ok] = s0, float(df) * n
    else:
        post[ok] = (d0 * s0 + df * var[ok]) / (d0 + df)
        dfs[ok] = df + d0
    return post, dfs, float(d0)


# ----------------------------------------------------------------------------------
# empirical null
# ----------------------------------------------------------------------------------
def empirical_null(stat: Any) -> tuple[float, float]:
    """Location and normal-consistent scale of the non-NaN statistics.

    Parameters
    ----------
    stat : array_like
        Test statistics; NaN entries are ignored.

    Returns
    -------
    (float, float)
        ``median(stat)`` and ``1.4826 * median(|stat - median(stat)|)``; both NaN
        when no statistic is finite.
    """
    s = _as_float_array(stat, "stat")
    s = s[np.isfinite(s)]
    if s.size == 0:
        return float("nan"), float("nan")
    loc = float(np.median(s))
    scale = MAD_CONSISTENCY * float(np.median(np.abs(s - loc)))
    return loc, scale


def empirical_null_adjust(stat: Any, df: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """p-values against a location–scale empirical null (docs/math.md#empirical-null).

    ``stat* = (stat - m) / sigma`` with ``m`` the median and ``sigma`` 1.4826 times
    the median absolute deviation of the non-NaN statistics; p-values from the same
    reference distribution (same per-entry ``df``) and BH over them.

    Parameters
    ----------
    stat : array_like
        Test statistics of one treatment; NaN marks tests not performed.
    df : None, float or array_like, optional
        Degrees of freedom as in :func:`t_pvalues`.

    Returns
    -------
    pvalue_adj, padj_adj : numpy.ndarray
        Empirical-null p-values and their BH adjustment. Both are entirely NaN
        when ``sigma`` is 0 or undefined (e.g. all statistics equal).
    """
    s = _as_float_array(stat, "stat")
    loc, scale = empirical_null(s)
    if not (np.isfinite(scale) and scale > 0):
        logger.debug("empirical null: MAD is %s; adjusted p-values set to NaN", scale)
        nan = np.full(np.broadcast_shapes(s.shape, np.shape(df)) if df is not None else s.shape,
                      np.nan)
        return nan, nan.copy()
    p_adj = t_pvalues((s - loc) / scale, df)
    return p_adj, bh_adjust(p_adj)


# ----------------------------------------------------------------------------------
# FDX control
# ----------------------------------------------------------------------------------


def bootstrap_abs_z(
    eta: np.ndarray,
    std: np.ndarray,
    n: int,
    genes: np.ndarray,
    B: int = 1000,
    random_state: int | None = 0,
    legacy_fdx_scaling: bool = False,
    chunk_floats: int = _BOOTSTRAP_CHUNK_FLOATS,
    *,
    legacy_scaling: bool | None = None,
) -> np.ndarray:
    """Multiplier-bootstrap statistics ``|z_bj|`` for the selected genes.

    ``z_bj = sum_i (eta_ij - mean_j eta) g_i / (n std_j)`` with ``g_b ~ N(0, I_n)``
    (unit variance when ``std_j^2 = Var(eta_j)/n``), or, with ``legacy_fdx_scaling``,
    the original's ``sum_i eta_ij g_i / std_j``.

    The multipliers are drawn in chunks of at most ceil(B / 8) rows whose working
    arrays hold at most ``chunk_floats`` floats each, so that peak memory stays
    close to the B x m result; no centred copy of ``eta`` is formed (the centring
    uses ``sum_i g_i``). Chunking does not change the random stream.

    Parameters
    ----------
    eta : numpy.ndarray
        Influence values, n_cells x p.
    std : numpy.ndarray
        Standard errors of the statistics, (p,).
    n : int
        Number of cells behind the estimate (the divisor of the unit-variance form).
    genes : numpy.ndarray
        Integer indices of the m genes whose columns are returned, in that order.
    B : int
        Number of bootstrap draws.
    random_state : int or None
        Seed of ``numpy.random.default_rng``.
    legacy_fdx_scaling : bool
        Use the original mis-scaled statistic (docs/math.md#fdx-control).
    chunk_floats : int
        Working-memory budget (floats) per chunk.
    legacy_scaling : bool, optional
        Deprecated alias of ``legacy_fdx_scaling`` (FutureWarning).

    Returns
    -------
    numpy.ndarray
        ``|z|`` of shape B x m.
    """
    legacy = renamed_keyword(legacy_fdx_scaling, legacy_scaling, "legacy_scaling",
                             "legacy_fdx_scaling")
    n_cells = eta.shape[0]
    rng = np.random.default_rng(random_state)
    scale = 1.0 / std[genes] if legacy else 1.0 / (float(n) * std[genes])
    eta_mean = None if legacy else eta.mean(axis=0)
    out = np.empty((B, genes.size))
    # chunk rows: a bounded working set, and at most 1/8 of the B x m result
    rows = max(1, min(-(-B // 8), int(chunk_floats) // max(n_cells, eta.shape[1], 1)))
    for start in range(0, B, rows):
        stop = min(B, start + rows)
        g = rng.standard_normal((stop - start, n_cells))
        z = g @ eta  # (rows x p); eta is never copied
        if eta_mean is not None:
            z -= np.outer(g.sum(axis=1), eta_mean)
        z = z[:, genes]
        z *= scale
        np.abs(z, out=out[start:stop])
    return out


def _lower_quantile_inplace(x: np.ndarray, q: float) -> np.ndarray:
    """Column-wise ``np.quantile(x, q, axis=0, method='lower')`` without a copy of x.

    ``x`` is partially sorted in place along axis 0.
    """
    kth = int(np.floor(q * (x.shape[0] - 1)))
    x.partition(kth, axis=0)
    return x[kth].copy()


def fdx_control(
    stat: Any,
    eta: Any,
    std: Any,
    n: int,
    alpha: float = 0.05,
    c: float = 0.1,
    B: int = 1000,
    random_state: int | None = 0,
    legacy_fdx_scaling: bool = False,
    tau: Any = None,
    min_diff: float = 0.1,
    *,
    legacy_scaling: bool | None = None,
) -> np.ndarray:
    """FDX control: P(FDP > c) <= alpha via step-down + augmentation
    (docs/math.md#fdx-control).

    1. Tested genes: finite ``stat`` and ``1e-8 <= std < inf``.
    2. Multiplier bootstrap ``|z_bj|`` (see :func:`bootstrap_abs_z`).
    3. Step-down FWER control: take the remaining tested gene with the largest
       ``|stat|``; ``q`` = (1 - alpha) quantile (lower interpolation) over b of
       ``max_j |z_bj|`` over the remaining genes; reject it and continue while
       ``|stat| >= q`` and ``q > 0``.
    4. Genes with ``std < 1e-8`` and ``|tau| > min_diff`` are also rejected (only
       when ``tau`` is given).
    5. Augmentation: with k rejections, also reject the ``floor(c k / (1 - c))``
       non-rejected tested genes with the largest ``|stat|`` (ties at the cut are
       all added).

    Parameters
    ----------
    stat : array_like
        Statistics ``tau / std`` of one treatment, (p,); NaN = not tested.
    eta : array_like
        Influence values of the cells behind the estimate, n_cells x p.
    std : array_like
        Standard errors, (p,); ``inf`` for filtered genes.
    n : int
        Number of cells behind the estimate (usually ``eta.shape[0]``).
    alpha : float
        Level of the FDX guarantee P(FDP > c) <= alpha.
    c : float
        Tolerated false discovery proportion, in [0, 1).
    B : int
        Bootstrap draws.
    random_state : int or None
        Seed of the multipliers.
    legacy_fdx_scaling : bool
        Reproduce the original's mis-scaled bootstrap (rejects essentially nothing).
    tau : array_like, optional
        Effect estimates, (p,); needed only for rule 4.
    min_diff : float
        Threshold of rule 4.
    legacy_scaling : bool, optional
        Deprecated alias of ``legacy_fdx_scaling`` (FutureWarning).

    Returns
    -------
    numpy.ndarray
        0/1 integer array, (p,): 1 = rejected.
    """
    stat = _as_float_array(stat, "stat")
    std = _as_float_array(std, "std")
    eta = np.asarray(eta)
    if eta.dtype != np.float64:
        eta = eta.astype(np.float64)
    _check_fdx_inputs(stat, eta, std, n, alpha, c, B)
    legacy = renamed_keyword(legacy_fdx_scaling, legacy_scaling, "legacy_scaling",
                             "legacy_fdx_scaling")
    p = stat.size
    rej = np.zeros(p, dtype=int)

    with np.errstate(invalid="ignore"):
        tested = np.isfinite(stat) & np.isfinite(std) & (std >= FDX_MIN_STD)
    finite_cols = np.isfinite(eta).all(axis=0)
    check_eta_finite(tested, finite_cols)
    if not finite_cols.all():  # untested genes may carry NaN influence values
        eta = np.where(finite_cols, eta, 0.0)
    abs_stat = np.where(tested, np.abs(np.nan_to_num(stat)), 0.0)
    genes = np.flatnonzero(tested)
    # descending |stat| (stable: ties keep gene order)
    genes = genes[np.argsort(-abs_stat[genes], kind="mergesort")]

    if genes.size:                                                          # steps 2-3
        crit = _step_down_critical_values(eta, std, n, genes, B, random_state, legacy, alpha)
        for s, j in enumerate(genes):
            q = crit[s]
            if q <= 0 or abs_stat[j] < q:
                break
            rej[j] = 1

    if tau is not None:                                                     # step 4
        tau = _as_float_array(tau, "tau")
        check_same_shape("tau", tau, stat.shape)
        with np.errstate(invalid="ignore"):
            tiny = (std < FDX_MIN_STD) & (np.abs(tau) > min_diff)
        rej[tiny] = 1
    _augment(rej, genes, abs_stat, c)                                       # step 5
    return rej


def _step_down_critical_values(eta: np.ndarray, std: np.ndarray, n: int, genes: np.ndarray,
                               B: int, random_state, legacy: bool,
                               alpha: float) -> np.ndarray:
    """Critical value of each step of the step-down: the (1 - alpha) lower quantile over
    the bootstrap draws of the max ``|z|`` over ``genes[s:]`` (``genes`` in descending
    ``|stat|`` order)."""
    # columns in ascending |stat| order, so that a running max gives, for
    # each step s, the max over the genes still remaining at that step
    absz = bootstrap_abs_z(eta, std, n, genes[::-1], B, random_state, legacy)
    np.maximum.accumulate(absz, axis=1, out=absz)
    return _lower_quantile_inplace(absz, 1.0 - alpha)[::-1]


def _augment(rej: np.ndarray, genes: np.ndarray, abs_stat: np.ndarray, c: float) -> None:
    """Augmentation (in place): with k rejections, also reject the
    ``floor(c k / (1 - c))`` non-rejected ``genes`` (descending ``|stat|`` order) with the
    largest ``|stat|``; ties at the cut are all added."""
    k = int(rej.sum())
    n_add = int(np.floor(c * k / (1.0 - c) + 1e-12))
    if n_add > 0:
        cand = genes[rej[genes] == 0]  # already in descending |stat| order
        if cand.size:
            cut = abs_stat[cand[min(n_add, cand.size) - 1]]
            rej[cand[abs_stat[cand] >= cut]] = 1


# ----------------------------------------------------------------------------------
# one treatment's output columns
# ----------------------------------------------------------------------------------
def multiple_testing(
    stat: Any,
    df: Any = None,
    eta: Any = None,
    std: Any = None,
    fdx: bool = False,
    *,
    tau: Any = None,
    n: int | None = None,
    fdx_alpha: float = 0.05,
    fdx_c: float = 0.1,
    fdx_B: int = 1000,
    random_state: int | None = 0,
    legacy_fdx_scaling: bool = False,
) -> dict[str, np.ndarray]:
    """p-values, BH, empirical null and FDX decisions for one treatment
    (docs/math.md#multiple-testing).

    Parameters
    ----------
    stat : array_like
        Statistics, (p,); NaN = test not performed.
    df : None, float or array_like
        Degrees of freedom of the t reference (None = normal).
    eta, std : array_like, optional
        Influence values (n_cells x p) and standard errors (p,); required when
        ``fdx`` is True.
    fdx : bool
        Compute FDX decisions; otherwise ``rej`` is all 0.
    tau : array_like, optional
        Effect estimates for FDX rule 4 (tiny std, large effect).
    n : int, optional
        Cells behind the estimate; default ``eta.shape[0]``.
    fdx_alpha, fdx_c, fdx_B, random_state, legacy_fdx_scaling
        Passed to :func:`fdx_control`.

    Returns
    -------
    dict
        ``pvalue``, ``padj``, ``pvalue_emp_null_adj``, ``padj_emp_null_adj`` (float
        arrays) and ``rej`` (0/1 int array), each of length p.
    """
    stat = _as_float_array(stat, "stat")
    check_1d(stat, "stat")
    pvalue = t_pvalues(stat, df)
    check_df_shape(pvalue, df, stat.shape)
    padj = bh_adjust(pvalue)
    p_emp, padj_emp = empirical_null_adjust(stat, df)
    if fdx:
        check_fdx_needs(eta, std)
        eta = np.asarray(eta)
        rej = fdx_control(
            stat, eta, std, eta.shape[0] if n is None else n, alpha=fdx_alpha, c=fdx_c,
            B=fdx_B, random_state=random_state, legacy_fdx_scaling=legacy_fdx_scaling, tau=tau,
        )
    else:
        rej = np.zeros(stat.size, dtype=int)
    return {
        "pvalue": pvalue,
        "padj": padj,
        "pvalue_emp_null_adj": p_emp,
        "padj_emp_null_adj": padj_emp,
        "rej": rej,
    }


# ----------------------------------------------------------------------------------
# on-target (cis) and trans hypothesis families
# ----------------------------------------------------------------------------------
def on_target_pairs(trt: Any, genes: Any, targets: str | dict | None) -> np.ndarray:
    """Which rows of a result table are on-target pairs (a perturbation and its target).

    Parameters
    ----------
    trt, genes : array_like
        The perturbation and gene of every row.
    targets : 'auto', None or dict
        As returned by :func:`causarray._validation.check_targets`: ``'auto'`` marks
        rows whose gene has the perturbation's label as its name; a dict maps each
        perturbation to its target gene(s); None marks no row.

    Returns
    -------
    numpy.ndarray
        Boolean, one entry per row.  Labels are compared as strings; the work is done
        on the distinct labels (a screen's table has millions of rows and a few
        thousand names).
    """
    t_codes, t_uniq = pd.factorize(np.asarray(trt, dtype=object))
    g_codes, g_uniq = pd.factorize(np.asarray(genes, dtype=object))
    if targets is None or t_codes.size == 0:
        return np.zeros(t_codes.size, dtype=bool)
    t_names = pd.Index([str(t) for t in t_uniq])
    g_names = pd.Index([str(g) for g in g_uniq])
    if targets == "auto":
        gene_as_trt = t_names.get_indexer(g_names)        # -1: no perturbation of that name
        mapped = gene_as_trt[g_codes]
        return (mapped >= 0) & (mapped == t_codes)
    allowed = np.zeros((len(t_names), len(g_names)), dtype=bool)
    for t, gs in targets.items():
        k = t_names.get_indexer([str(t)])[0]
        if k >= 0:
            cols = g_names.get_indexer([str(g) for g in gs])
            allowed[k, cols[cols >= 0]] = True
    return allowed[t_codes, g_codes]


def family_bh(pvalue: Any, trt: Any, on_target: Any) -> np.ndarray:
    """BH-adjusted p-values with on-target pairs as a family of their own.

    A perturbation's effect on its own target gene is a hypothesis of another kind
    than its effects elsewhere: it is expected (the knockdown is the design) and
    there is one such pair per perturbation.  Mixing it into the perturbation's
    genome-wide family lets the number of *other* discoveries decide whether the
    knockdown is called.  So, as SCEPTRE separates positive-control from discovery
    pairs, the families are (see ``docs/dr.md``):

    * on-target pairs: one family across the whole screen;
    * every other pair: one family per perturbation, as before.

    Each family is adjusted by :func:`bh_adjust`, so FDR is controlled at the level
    within each family (and at most twice the level over their union).

    Parameters
    ----------
    pvalue, trt, on_target : array_like
        p-values (NaN = not tested), perturbations and on-target flags of the rows.

    Returns
    -------
    numpy.ndarray
        Adjusted p-values, one per row.
    """
    pvalue = _as_float_array(pvalue, "pvalue")
    on_target = np.asarray(on_target, dtype=bool)
    out = np.full(pvalue.shape, np.nan)
    if on_target.any():
        out[on_target] = bh_adjust(pvalue[on_target])
    trans = ~on_target
    codes, _ = pd.factorize(np.asarray(trt, dtype=object)[trans])
    idx = np.flatnonzero(trans)
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    for rows in np.split(idx[order], bounds):
        if rows.size:
            out[rows] = bh_adjust(pvalue[rows])
    return out


def adjust_target_families(table: pd.DataFrame, targets: str | dict | None,
                           trans_adjusted: bool = False,
                           chunk_rows: int = 1 << 20) -> pd.DataFrame:
    """Set ``on_target`` and recompute ``padj`` of a screen's result table (columns
    ``trt``, ``gene_names``, ``pvalue``) by :func:`family_bh`, so that the on-target
    family spans every perturbation of the table (all batches).

    ``trans_adjusted=True`` says that every other pair's ``padj`` is already its
    per-perturbation BH with the same ``targets`` (each perturbation's rows come from
    one ``LFC`` call, as in :func:`causarray.gcate_lfc_batch`): only the on-target
    family is adjusted then.  The flags are computed ``chunk_rows`` rows at a time, so
    a screen's table (17 million rows) gains no full-length temporaries but two.
    """
    trt = table["trt"].to_numpy()
    genes = table["gene_names"].to_numpy()
    on_target = np.zeros(len(table), dtype=bool)
    for start in range(0, len(table), chunk_rows):
        stop = start + chunk_rows
        on_target[start:stop] = on_target_pairs(trt[start:stop], genes[start:stop], targets)
    table["on_target"] = on_target
    pvalue = table["pvalue"].to_numpy()
    if not trans_adjusted:
        table["padj"] = family_bh(pvalue, trt, on_target)
        return table
    padj = table["padj"].to_numpy(dtype=float, copy=True)
    if on_target.any():
        padj[on_target] = bh_adjust(pvalue[on_target])
    table["padj"] = padj
    return table
