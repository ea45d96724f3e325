"""Summaries of a result table: discoveries per perturbation, top perturbations, top hits.

Numbers only, no figures and no HTML: :mod:`causarray.pl` draws them
(:func:`causarray.pl.discoveries`) and :mod:`causarray.report` writes them into the
HTML report; both import them from here (the report re-exports them as
``report.discovery_counts``, ...).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ._validation import check_table_columns

__all__ = ["discovery_counts", "discovery_summary", "top_hits", "top_perturbations"]


def _trt(results: pd.DataFrame) -> pd.Series:
    if "trt" in results.columns:
        return results["trt"].astype(str)
    return pd.Series("treatment", index=results.index)


def discovery_summary(results: pd.DataFrame, alpha: float = 0.05,
                      padj_col: str = "padj") -> dict[str, Any]:
    """Counts of discoveries at ``padj_col < alpha`` (the seed tutorial's §5.1 summary).

    Parameters
    ----------
    results : pandas.DataFrame
        Result table (``gene_names``, ``padj``, optionally ``trt``).
    alpha : float
    padj_col : str

    Returns
    -------
    dict
        ``n_tests`` (rows with a p-value), ``n_rows``, ``n_significant`` (gene x
        perturbation pairs), ``n_perturbations``, ``n_perturbations_with_hit``,
        ``n_genes``, ``n_genes_affected``, ``n_significant_emp_null`` (with the
        empirical-null adjusted p-values, when present).
    """
    padj = results[padj_col].to_numpy(dtype=float)
    sig = padj < alpha
    trt = _trt(results)
    out = dict(
        alpha=alpha, padj_col=padj_col, n_rows=int(len(results)),
        n_tests=int(np.isfinite(results["pvalue"].to_numpy(dtype=float)).sum())
        if "pvalue" in results.columns else int(np.isfinite(padj).sum()),
        n_significant=int(sig.sum()),
        n_perturbations=int(trt.nunique()),
        n_perturbations_with_hit=int(trt[sig].nunique()),
        n_genes=int(results["gene_names"].nunique()),
        n_genes_affected=int(results.loc[sig, "gene_names"].nunique()),
    )
    if "padj_emp_null_adj" in results.columns:
        out["n_significant_emp_null"] = int(
            (results["padj_emp_null_adj"].to_numpy(dtype=float) < alpha).sum())
    return out


def discovery_counts(results: pd.DataFrame, alpha: float = 0.05,
                     padj_col: str = "padj") -> pd.Series:
    """Number of discoveries (``padj_col < alpha``) per perturbation, largest first.

    The table behind :func:`causarray.pl.discoveries`. Perturbations without a discovery
    are included with 0; ties are in name order.

    Parameters
    ----------
    results : pandas.DataFrame
        Result table (``padj_col``, optionally ``trt``).
    alpha : float
        Discovery threshold.
    padj_col : str
        Adjusted p-value column (``'padj'`` or ``'padj_emp_null_adj'``).

    Returns
    -------
    pandas.Series
        ``n_discoveries`` indexed by perturbation (``trt``; a single unnamed treatment
        is ``'treatment'``).
    """
    check_table_columns(results, [padj_col])
    trt = _trt(results)
    sig = results[padj_col].to_numpy(dtype=float) < alpha
    counts = pd.Series(sig.astype(int), index=results.index).groupby(trt.to_numpy()).sum()
    counts.index.name = "trt"
    counts.name = "n_discoveries"
    return counts.sort_values(ascending=False, kind="mergesort")


def top_perturbations(results: pd.DataFrame, alpha: float = 0.05, padj_col: str = "padj",
                      top_n: int = 20) -> pd.DataFrame:
    """Perturbations ranked by their number of discoveries.

    Returns
    -------
    pandas.DataFrame
        Columns ``trt, n_discoveries, n_down, n_up, n_tested, median_log2fc_hits``
        (+ ``n_treated`` when the results carry it), ``top_n`` rows.
    """
    trt = _trt(results)
    sig = results[padj_col].to_numpy(dtype=float) < alpha
    eff = results["log2fc"].to_numpy(dtype=float) if "log2fc" in results.columns else \
        results["tau"].to_numpy(dtype=float) / np.log(2)
    tested = np.isfinite(results["pvalue"].to_numpy(dtype=float)) if "pvalue" in \
        results.columns else np.isfinite(results[padj_col].to_numpy(dtype=float))
    frame = pd.DataFrame(dict(trt=trt.to_numpy(), sig=sig, down=sig & (eff < 0),
                              up=sig & (eff > 0), tested=tested,
                              eff_hit=np.where(sig, eff, np.nan)))
    g = frame.groupby("trt", sort=False)
    table = pd.DataFrame(dict(
        n_discoveries=g["sig"].sum().astype(int), n_down=g["down"].sum().astype(int),
        n_up=g["up"].sum().astype(int), n_tested=g["tested"].sum().astype(int),
        median_log2fc_hits=g["eff_hit"].median(),
    ))
    for col in ("n_treated", "n_control"):        # cells used per perturbation
        if col in results.columns:
            table[col] = results.groupby(trt.to_numpy(), sort=False)[col].max()
    own = _own_target(trt, results["gene_names"]).to_numpy()
    if np.any(own == True):  # noqa: E712 - object array of True / False / NaN
        is_own = np.asarray(own == True, dtype=bool)  # noqa: E712
        own_eff = pd.Series(np.where(is_own, eff, np.nan)).groupby(trt.to_numpy(),
                                                                   sort=False).max()
        own_sig = pd.Series(is_own & sig).groupby(trt.to_numpy(), sort=False).any()
        names = {str(g) for g in results["gene_names"].unique()}
        table["on_target_log2fc"] = own_eff
        table["on_target_hit"] = [bool(own_sig.get(t, False)) if str(t) in names else np.nan
                                  for t in table.index]
    table = table.sort_values(["n_discoveries", "n_tested"], ascending=False, kind="mergesort")
    return table.head(int(top_n)).reset_index(names="trt")


def _own_target(trt: pd.Series, genes: pd.Series) -> pd.Series:
    """True where the gene is the perturbation's own target; NaN where the perturbation
    does not name a measured gene (e.g. a non-targeting guide or a promoter)."""
    measured = {str(g) for g in genes.unique()}
    names = trt.astype(str)
    out = pd.Series(names.to_numpy() == genes.astype(str).to_numpy(), index=trt.index,
                    dtype=object)
    out[~names.isin(measured)] = np.nan
    return out


def top_hits(results: pd.DataFrame, alpha: float = 0.05, padj_col: str = "padj",
             top_n: int = 50) -> pd.DataFrame:
    """The discoveries themselves: most significant gene x perturbation pairs.

    Parameters
    ----------
    results : pandas.DataFrame
        Result table (``gene_names``, ``padj``, ``log2fc`` or ``tau``, optionally ``trt``,
        ``n_treated``, ``n_control``).
    alpha, padj_col : discovery threshold and column.
    top_n : int
        Rows returned (smallest ``padj`` first, ties by the larger absolute effect).

    Returns
    -------
    pandas.DataFrame
        ``gene, perturbation, log2fc, padj`` (+ ``n_treated, n_control``: the cells
        behind the estimate, when the results carry them) and ``on_target`` (True when
        the gene is the perturbation's own target; empty when the perturbation names no
        measured gene).
    """
    eff = results["log2fc"].to_numpy(dtype=float) if "log2fc" in results.columns else \
        results["tau"].to_numpy(dtype=float) / np.log(2)
    padj = results[padj_col].to_numpy(dtype=float)
    sig = padj < alpha
    trt = _trt(results)
    table = pd.DataFrame({"gene": results["gene_names"].astype(str).to_numpy(),
                          "perturbation": trt.to_numpy(), "log2fc": eff, padj_col: padj})
    for col in ("n_treated", "n_control"):
        if col in results.columns:
            table[col] = results[col].to_numpy()
    table["on_target"] = _own_target(trt, results["gene_names"]).to_numpy()
    table = table[sig].assign(_abs=np.abs(eff[sig]))
    table = table.sort_values([padj_col, "_abs"], ascending=[True, False], kind="mergesort")
    return table.drop(columns="_abs").head(int(top_n)).reset_index(drop=True)
