"""Donor pseudobulk for case-control studies (docs/math.md#case-control).

Cells of one donor are not independent replicates: they share the donor's genotype,
environment, sampling and processing, so a test that treats cells as units counts every
donor-to-donor difference hundreds of times and calls hundreds of genes on labels
shuffled across donors (Squair et al. 2021).  The unit of a case-control comparison is
the donor.  This module:

1. checks the design (:func:`donor_table`): every donor in exactly one condition, at
   least two donors per arm, donor-level covariates constant within each donor;
2. sums each donor's raw counts (per group, e.g. cell type, when asked) into one
   pseudobulk sample (:func:`aggregate_counts`), streamed in row blocks for counts on
   disk;
3. returns an AnnData of donors (:func:`pseudobulk`) that the label route of
   :func:`causarray.tl.lfc` analyses like any screen, the condition as the treatment;
4. replaces the influence-function standard errors by the delete-one-donor jackknife
   (:func:`jackknife_tests`): with tens of donors the sandwich variance of the doubly
   robust estimate is too small in the tails, and the jackknife also carries the
   uncertainty of the donors' latent factors.  It is Wu's leverage-weighted jackknife
   (:func:`weighted_jackknife_terms`) on Bell and McCaffrey's degrees of freedom
   (:func:`satterthwaite_df`).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._validation import (
    check_donor_covariates_constant,
    check_donor_design,
    check_label_occurs,
    check_obs_column,
    check_obs_columns,
)


def donor_table(obs: pd.DataFrame, condition_key: str, control_condition: Any,
                donor_key: str, covariates: Sequence[str] = ()) -> pd.DataFrame:
    """One row per donor: its condition, number of cells and donor-level covariates.

    Raises ``ValueError`` for a missing key or control value, a donor in both
    conditions, fewer than two donors in an arm, or a covariate that varies within a
    donor.
    """
    check_obs_column("condition_key", condition_key, obs)
    check_obs_column("donor_key", donor_key, obs)
    check_obs_columns(obs, list(covariates))
    cond = obs[condition_key].astype(str)
    check_label_occurs("control_condition", control_condition, cond.to_numpy(), condition_key)
    donor = obs[donor_key].astype(str)
    per_donor = pd.DataFrame({"donor": donor.to_numpy(), "condition": cond.to_numpy()})
    n_cond = per_donor.groupby("donor", sort=True)["condition"].nunique()
    first = per_donor.groupby("donor", sort=True)["condition"].first()
    check_donor_design(n_cond, first, str(control_condition), donor_key, condition_key)
    table = pd.DataFrame({condition_key: first,
                          "n_cells": per_donor.groupby("donor", sort=True).size()})
    for cov in covariates:
        vals = pd.DataFrame({"donor": donor.to_numpy(), "v": obs[cov].to_numpy()})
        check_donor_covariates_constant(vals.groupby("donor")["v"].nunique(dropna=False),
                                        cov, donor_key)
        table[cov] = vals.groupby("donor", sort=True)["v"].first()
    table.index.name = donor_key
    return table


def aggregate_counts(counts: Any, codes: np.ndarray, n_groups: int) -> sp.csr_matrix:
    """Sum the rows of ``counts`` (dense, sparse, or on-disk with ``row_blocks``) by
    ``codes`` (one per row, ``-1`` = left out): an ``n_groups x genes`` CSR matrix."""
    def indicator(c: np.ndarray) -> sp.csr_matrix:
        keep = np.flatnonzero(c >= 0)
        return sp.csr_matrix((np.ones(keep.size), (c[keep], keep)),
                             shape=(n_groups, c.size))

    if hasattr(counts, "row_blocks"):
        out = sp.csr_matrix((n_groups, counts.shape[1]))
        for a, b, block in counts.row_blocks(raw=True):
            out = out + indicator(codes[a:b]) @ sp.csr_matrix(block)
        return sp.csr_matrix(out)
    M = counts if sp.issparse(counts) else sp.csr_matrix(np.asarray(counts))
    return sp.csr_matrix(indicator(codes) @ M)


def residual_maker(design: np.ndarray) -> tuple[np.ndarray, int]:
    """``M = I - H`` of the donors' outcome design and its rank ``k``.

    ``H = Z (Z'Z)^+ Z'`` is the hat matrix of the least-squares fit on ``design`` (``Z``,
    donors x columns); its diagonal holds the donors' leverages ``h_i``, and ``M`` maps
    the outcomes to the residuals.
    """
    Z = np.asarray(design, dtype=float)
    Q, s, _ = np.linalg.svd(Z, full_matrices=False)
    k = int(np.sum(s > s.max() * max(Z.shape) * np.finfo(float).eps)) if s.size else 0
    Q = Q[:, :k]
    return np.eye(Z.shape[0]) - Q @ Q.T, k


def weighted_jackknife_terms(replicates: np.ndarray, estimate: np.ndarray,
                             leverage: np.ndarray) -> np.ndarray:
    """Each donor's term of Wu's (1986) weighted delete-one jackknife variance.

    ``(1 - h_i) (tau_(i) - tau)^2`` for donor ``i`` (rows) and every estimate (columns):
    ``replicates`` holds ``tau_(i)``, the estimate with donor ``i`` left out,
    ``estimate`` the full-sample ``tau``, ``leverage`` the donors' ``h_i``.  For a
    least-squares coefficient ``tau_(i) - tau = -a_i e_i / (1 - h_i)``, so the sum over
    donors is HC2, ``sum_i a_i^2 e_i^2 / (1 - h_i)``, unbiased under homoscedasticity;
    the plain jackknife (no weights) is about HC3 and overstates the variance.
    """
    weight = np.clip(1.0 - np.asarray(leverage, dtype=float), 0.0, 1.0)
    return weight[:, None] * (replicates - np.asarray(estimate, dtype=float)[None, :]) ** 2


def donor_weights(terms: np.ndarray, M: np.ndarray,
                  scale: np.ndarray | None = None) -> np.ndarray:
    """The weights ``D_i`` of the donors in a weighted jackknife variance.

    Model: ``tau - E tau = sum_i a_i eps_i`` with independent ``eps_i ~ N(0, s^2)``, so
    the variance estimate is the quadratic form ``eps' M D M eps`` with
    ``D = diag(a_i^2 / (1 - h_i))`` and ``M = I - H`` (:func:`residual_maker`), and
    donor ``i``'s term of :func:`weighted_jackknife_terms` has expectation
    ``D_i M_ii s_g^2`` for gene ``g``.  ``D`` (up to a common factor) is the mean over
    the genes (columns of ``terms``) of ``terms / scale``, divided by ``M_ii``;
    ``scale`` (one per gene, default 1) is proportional to ``s_g^2`` and hardly depends
    on the gene's own terms, e.g. a smooth trend of many genes' variances in their
    expression.  Dividing each gene by its own total instead would shrink the large
    terms with their totals and spread the weights too evenly.  Genes with a non-finite
    term or scale are left out; without any, every donor weighs alike.
    """
    n = M.shape[0]
    scale = np.ones(terms.shape[1]) if scale is None else np.asarray(scale, dtype=float)
    use = np.isfinite(terms).all(axis=0) & np.isfinite(scale) & (scale > 0)
    if not use.any():
        return np.ones(n)
    c = np.mean(terms[:, use] / scale[use], axis=1)
    m_ii = np.diag(M)
    return np.where(m_ii > 1e-12, c / np.maximum(m_ii, 1e-12), 0.0)


def satterthwaite_df(D: np.ndarray, M: np.ndarray, k: int) -> float:
    """Bell and McCaffrey's (2002) degrees of freedom of the weighted jackknife variance
    ``eps' M D M eps`` (:func:`donor_weights`): its first two moments matched to a
    scaled chi-square::

        df = tr(D M)^2 / tr(D M D M) = (sum_i D_i M_ii)^2 / sum_ij D_i D_j M_ij^2

    ``n - k`` when the donors weigh alike, falling towards 1 as a few donors carry the
    estimate; clipped to ``[1, n - k]``.  This is the t reference of the unmoderated
    statistic.
    """
    m_ii = np.diag(M)
    denom = float(D @ (M ** 2) @ D)
    top = max(M.shape[0] - k, 1)
    return float(np.clip((D @ m_ii) ** 2 / denom, 1.0, top)) if denom > 0 else float(top)


#: Draws of the weighted chi-square in :func:`log_scale_df` (fixed seed: deterministic).
LOG_DF_DRAWS = 1 << 15


def log_scale_df(D: np.ndarray, M: np.ndarray, k: int) -> float:
    """Degrees of freedom ``d`` with ``Var log(chi2_d / d) = Var log V`` for the weighted
    jackknife variance ``V = eps' M D M eps`` (:func:`donor_weights`).

    ``V`` is ``sum_j lambda_j chi2_1`` with ``lambda`` the eigenvalues of
    ``D^1/2 M D^1/2``; ``Var log V`` comes from :data:`LOG_DF_DRAWS` draws (seed 0) and
    ``d = 2 trigamma^-1(Var log V)``, clipped to ``[1, n - k]``.  The empirical-Bayes
    moderation works on log variances (its prior's ``d0`` is their dispersion less
    ``trigamma(d/2)``, its trend is debiased by ``digamma(d/2) - log(d/2)``), so it needs
    the df that matches them.  Satterthwaite's df (:func:`satterthwaite_df`) matches the
    variance of ``V`` instead; when one donor's weight dominates it understates the
    df on the log scale, since the other donors' terms keep ``V`` away from 0: on a
    null study whose design gave 4.2 Satterthwaite df the log-scale df was 5.5, and
    with 4.2 the sampling part exceeded the genes' whole dispersion, which sent ``d0``
    to infinity and every gene's variance to the trend.
    """
    from .inference import trigamma_inverse

    root = np.sqrt(np.maximum(D, 0.0))
    lam = np.linalg.eigvalsh(root[:, None] * M * root[None, :])
    top = max(M.shape[0] - k, 1)
    if lam.size == 0 or not lam.max() > 0:
        return float(top)
    lam = lam[lam > lam.max() * 1e-10]
    draws = np.random.default_rng(0).chisquare(1.0, (LOG_DF_DRAWS, lam.size)) @ lam
    spread = float(np.var(np.log(draws)))
    return float(np.clip(2.0 * trigamma_inverse(spread), 1.0, top))


def _mean_level(results: pd.DataFrame) -> np.ndarray:
    """Each row's log mean expression over the two arms (zeros without the arm means:
    a flat trend)."""
    if {"mean_control", "mean_treated"} <= set(results.columns):
        return np.log(0.5 * (results["mean_control"].to_numpy(float)
                             + results["mean_treated"].to_numpy(float)) + 1e-8)
    return np.zeros(len(results))


def _treatments(results: pd.DataFrame) -> np.ndarray:
    return results["trt"].astype(str).to_numpy() if "trt" in results \
        else np.zeros(len(results), object)


def jackknife_variance(results: pd.DataFrame, replicates: np.ndarray, design: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Wu's weighted delete-one-donor jackknife variance of every row and its degrees
    of freedom.

    ``replicates`` (n_donors x rows) holds ``tau`` of each row with one donor left out
    (the same model, r fixed); ``design`` (n_donors x k) is the donors' outcome design:
    intercept, covariate columns, the full fit's factors U and the conditions.  With
    the donors' leverages ``h_i`` in that design (:func:`weighted_jackknife_terms`)::

        Var_J = sum_i (1 - h_i) (tau_(i) - tau)^2

    For a regression-adjusted estimate the plain jackknife behaves like HC3
    (``e_i^2 / (1 - h_i)^2``) and overstates the variance; the weights make it HC2,
    unbiased under homoscedasticity (docs/math.md#case-control).  Per treatment, the
    donors' weights (:func:`donor_weights`, the genes scaled by the trend of their
    variances in their log mean expression) give two degrees of freedom: Bell and
    McCaffrey's (:func:`satterthwaite_df`), the t reference of the unmoderated
    statistic, and the log-scale df (:func:`log_scale_df`) that the moderation needs.
    Both are ``n - k`` when the donors weigh alike and fewer when a few donors carry
    the estimate (a latent trait that nearly separates the arms puts its extreme
    donors there).

    Returns ``(variance, df, df_log)`` per row, NaN for a row that is not estimable,
    that some replicate could not estimate, or whose variance is 0.
    """
    from .inference import log_variance_trend

    M, k = residual_maker(design)
    tau = results["tau"].to_numpy(float)
    ok = np.isfinite(replicates).all(axis=0) & np.isfinite(tau)
    terms = np.full(replicates.shape, np.nan)
    terms[:, ok] = weighted_jackknife_terms(replicates[:, ok], tau[ok], 1.0 - np.diag(M))
    var = terms.sum(axis=0)
    tested = results["estimable"].to_numpy(bool) & np.isfinite(var) & (var > 0)
    var = np.where(tested, var, np.nan)
    df, df_log = np.full(len(results), np.nan), np.full(len(results), np.nan)
    trt, level = _treatments(results), _mean_level(results)
    for t in np.unique(trt):
        use = (trt == t) & tested
        trend = log_variance_trend(var[use], level[use])    # the genes' scale
        D = donor_weights(terms[:, use], M, np.exp(trend) if np.isfinite(trend).any()
                          else None)
        df[use], df_log[use] = satterthwaite_df(D, M, k), log_scale_df(D, M, k)
    return var, df, df_log


def jackknife_tests(results: pd.DataFrame, replicates: np.ndarray, design: np.ndarray,
                    moderate: bool = True) -> pd.DataFrame:
    """The result table with delete-one-donor jackknife standard errors and tests.

    The variance and degrees of freedom are :func:`jackknife_variance`'s (Wu's
    leverage-weighted jackknife on Bell and McCaffrey's df).  With ``moderate`` the
    variances of each treatment's genes are moderated by empirical Bayes around a trend
    in the log mean expression (:func:`causarray.inference.moderated_variances`,
    limma's ``squeezeVar``, on the log-scale df), and the statistic ``tau / std`` is
    referred to a t with the posterior degrees of freedom (``df``: the log-scale df plus
    the prior's ``d0``); with few donors a gene's own jackknife
    variance is noisy, and the genes' variances share their scale.  BH by family as
    :func:`causarray.inference.family_bh`, the empirical-null columns recomputed from
    the new statistics per treatment.  A row that some replicate could not estimate is
    not tested (``tested`` False, ``estimable`` as the full fit left it).  The
    influence-function standard error is kept as ``std_influence``, the jackknife's
    own as ``std_jackknife``.
    """
    from .inference import empirical_null_adjust, family_bh, moderated_variances, t_pvalues

    var, df, df_log = jackknife_variance(results, replicates, design)
    tested = np.isfinite(var)
    out = results.copy()
    out["std_influence"] = out["std"]
    out["std_jackknife"] = np.sqrt(var)
    trt, level = _treatments(out), _mean_level(out)
    if moderate:
        for t in np.unique(trt):
            rows = trt == t
            if not tested[rows].any():
                continue
            df_t = float(np.nanmax(df_log[rows]))           # one df per treatment
            post, dfs, d0 = moderated_variances(var[rows], df_t, level[rows])
            if d0 > 0:                 # 0: too few genes, left as they are (BM df)
                var[rows], df[rows] = post, np.where(tested[rows], dfs, np.nan)
    std = np.sqrt(var)
    stat = np.where(tested, out["tau"].to_numpy(float) / std, np.nan)
    out["std"], out["log2fc_se"], out["stat"] = std, std / np.log(2), stat
    out["pvalue"] = t_pvalues(stat, df)                  # NaN where untested
    out["tested"] = np.isfinite(out["pvalue"].to_numpy(float))
    out["df"] = df
    out["padj"] = family_bh(out["pvalue"].to_numpy(), trt, out["on_target"].to_numpy(bool))
    for t in np.unique(trt):
        rows = trt == t
        p_emp, q_emp = empirical_null_adjust(stat[rows], df[rows])
        out.loc[rows, "pvalue_emp_null_adj"] = p_emp
        out.loc[rows, "padj_emp_null_adj"] = q_emp
    return out


def pseudobulk(adata: Any, condition_key: str, control_condition: Any, donor_key: str,
               covariates: Sequence[str] = (), layer: str | None = None,
               cells: np.ndarray | None = None):
    """The donors of ``adata`` (or of its rows ``cells``) as an AnnData of summed counts.

    ``obs``: the donor's condition, ``n_cells`` and donor-level ``covariates``;
    ``uns['pert_col']`` / ``uns['ctrl_label']`` name the condition and its control, so
    :func:`causarray.tl.lfc` runs on it as on a screen.
    """
    import anndata as ad

    obs = adata.obs if cells is None else adata.obs.iloc[cells]
    table = donor_table(obs, condition_key, control_condition, donor_key, covariates)
    code_of = {d: i for i, d in enumerate(table.index)}
    codes = np.full(adata.n_obs, -1, dtype=np.int64)
    rows = np.arange(adata.n_obs) if cells is None else np.asarray(cells)
    codes[rows] = [code_of[d] for d in obs[donor_key].astype(str)]
    from .preprocessing import _anndata_counts

    if getattr(adata, "isbacked", False):
        from .ondisk import backed_counts

        counts = backed_counts(adata, layer)
    else:
        counts = _anndata_counts(adata, layer)
    Y = aggregate_counts(counts, codes, len(table))
    Y.data = np.rint(Y.data)
    pb = ad.AnnData(X=Y.astype(np.int64), obs=table.astype({condition_key: str}),
                    var=pd.DataFrame(index=adata.var_names.copy()))
    pb.obs_names = pb.obs_names.astype(str)
    pb.uns.update(pert_col=condition_key, ctrl_label=str(control_condition))
    return pb
