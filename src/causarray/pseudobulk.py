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
   uncertainty of the donors' latent factors.
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


def jackknife_tests(results: pd.DataFrame, replicates: np.ndarray,
                    n_params: int, moderate: bool = True) -> pd.DataFrame:
    """The result table with delete-one-donor jackknife standard errors and tests.

    ``replicates`` (n_donors x rows) holds ``tau`` of each row with one donor left out
    (the same model, r fixed); ``n_params`` is ``k``, the outcome model's columns
    (intercept, covariate columns, factors, conditions).  The variance is Wu's (1986)
    weighted jackknife with every donor at the mean leverage ``k/n``::

        Var_J = (1 - k/n) sum_i (tau_(i) - mean)^2        on n - k degrees of freedom

    For a regression-adjusted estimate the plain jackknife behaves like HC3
    (``e_i^2 / (1 - h_i)^2``) and overstates the variance by about ``1/(1 - k/n)``;
    the weights ``1 - h_i`` make it HC2, unbiased under homoscedasticity
    (docs/math.md#case-control).  With ``moderate`` the variances of each treatment's
    genes are moderated by empirical Bayes around a trend in the log mean expression
    (:func:`causarray.inference.moderated_variances`, limma's ``squeezeVar``), and the
    statistic ``tau / std`` is referred to a t with the posterior degrees of freedom
    (``df``); with few donors a gene's own jackknife variance is noisy, and the genes'
    variances share their scale.  BH by family as :func:`causarray.inference.family_bh`,
    the empirical-null columns recomputed from the new statistics per treatment.  A row
    that some replicate could not estimate is not tested (``tested`` False,
    ``estimable`` as the full fit left it).  The influence-function standard error is
    kept as ``std_influence``, the jackknife's own as ``std_jackknife``.
    """
    from .inference import empirical_null_adjust, family_bh, moderated_variances, t_pvalues

    n = replicates.shape[0]
    ok = np.isfinite(replicates).all(axis=0)        # a gene untested in a replicate: NaN
    var = np.full(replicates.shape[1], np.nan)
    reps = replicates[:, ok]
    var[ok] = max(1.0 - n_params / n, 1.0 / n) * np.sum((reps - reps.mean(axis=0)) ** 2,
                                                        axis=0)
    out = results.copy()
    out["std_influence"] = out["std"]
    tested = out["estimable"].to_numpy(bool) & np.isfinite(var) & (var > 0)
    df0 = float(max(n - n_params, 1))
    trt = out["trt"].astype(str).to_numpy() if "trt" in out else np.zeros(len(out), object)
    var = np.where(tested, var, np.nan)
    out["std_jackknife"] = np.sqrt(var)
    df = np.where(tested, df0, np.nan)
    if moderate:
        level = np.zeros(len(out))         # a flat trend without the arm means
        if {"mean_control", "mean_treated"} <= set(out.columns):
            level = np.log(0.5 * (out["mean_control"].to_numpy(float)
                                  + out["mean_treated"].to_numpy(float)) + 1e-8)
        for t in np.unique(trt):
            rows = trt == t
            post, dfs, _ = moderated_variances(var[rows], df0, level[rows])
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
