"""Benchmark: positive and negative controls on the bundled real CRISPR screens
(do known knock-downs come out as effects, and fake perturbations as nothing?).

For each bundled screen (``causarray.datasets.load_dataset``) and each method this
measures what a biologist checks first:

* **hits** -- every perturbation whose own target is a measured gene (perturbation
  label == gene name, plus ``uns['enhancer_positive_controls']`` such as HS2 -> HBE1)
  is a positive control; a *hit* is ``effect < 0`` and ``padj < 0.05``.  Misses are
  listed with their effect (natural-log fold change), SE, padj and effect / naive,
  where the *naive* effect is ``log(mean(Y / L)[treated] / mean(Y / L)[control])`` with
  ``L`` the panel total of a cell;
* **discoveries** -- all (perturbation, gene) pairs with ``padj < 0.05``;
* **random fakes** -- ``n_fakes`` (5) fake perturbations cut at random from the control
  cells, in ``--fake-cuts`` (4) independent cuts (seeds 0, 1, ...) that are pooled, each of ``min(median perturbation size, n_ctrl / (2 n_fakes))``
  cells; the other control cells stay controls; the method runs on [fakes +
  remaining controls].  Reported: calls at ``padj < 0.05`` and the type-I rate at raw
  ``p < 0.05`` over all fake pairs;
* **guide fakes** -- where guide identities exist (``obsm['grna_counts']`` with
  ``uns['grna_names']`` / ``uns['grna_target']``, or ``obs['guide_id']``): each
  non-targeting guide with at least ``min_guide_cells`` cells is a fake perturbation
  against the cells of all other non-targeting guides (one run per guide); same
  metrics, summed over the guides.

Methods (``--methods``)
    ``nbglm``      per-gene NB GLM ``log mu = log L + X b + A c`` (intercept, observed
                   covariates, one-hot perturbations) by :func:`causarray.glm.fit_glm`
                   (method-of-moments NB size), Wald z, normal p-values, BH within each
                   perturbation.  Checked against statsmodels once per process.
    ``wilcoxon``   scanpy-style: ``log1p(CP10k)`` per cell, Mann-Whitney U per gene
                   (perturbation vs controls), BH within each perturbation; effect = naive.
    ``causarray``  the seed-style call on **all cells**: ``gcate_lfc_batch(Y, X, A, r,
                   W_A=X_A, batch_size=15, n_ctrl=None, max_cells=None)`` for each r of
                   ``--r`` (``auto``: r by :func:`causarray.tl.select_r`, the front
                   door's JIC selection, then the same all-cells call).
    ``tl``         the front door as it is: ``causarray.tl.lfc(adata, covariates=...)``
                   with its defaults (r = 'auto', ``n_ctrl`` / ``max_cells`` caps).
    ``upstream``   causarray 0.1.1 (fit_gcate + LFC, r = each integer of ``--r``) in its own
                   venv via ``benchmarks/upstream.py`` with a timeout per run; failures and
                   timeouts are recorded as a status.

Each (dataset, method, r) evaluation is :func:`evaluate`, importable for loops::

    import sys; sys.path.insert(0, "benchmarks")
    from real_data import evaluate
    row = evaluate("papalexi", "causarray", r=3)      # dict: hits, misses, fakes, ...

Run::

    PYTHONPATH=src .venv/bin/python benchmarks/real_data.py --methods nbglm wilcoxon
    PYTHONPATH=src .venv/bin/python benchmarks/real_data.py --datasets schraivogel papalexi \\
        --methods causarray --r 1 3 5
    PYTHONPATH=src .venv/bin/python benchmarks/real_data.py --quick   # schraivogel_ci, < 1 min

Results are *merged* into ``benchmarks/results/<out-name>.{json,md}`` (rows keyed by
dataset, method, r), so separate invocations add up to one table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, code_version, machine_info, to_jsonable

#: short name -> (bundled dataset name, obs covariates)
DATASETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "schraivogel": ("schraivogel2020_groundtruth", ()),
    "papalexi": ("papalexi2021", ("bio_rep",)),
    # Hill: z-scored, see load_screen (fit_gcate's singularity check is not scale-free:
    # the raw log transcriptome size, 9.6 +- 0.33, is nearly collinear with the intercept)
    "hill": ("hill2018", ("percent_mito", "log_n_umis_transcriptome", "cas9_count")),
    "schraivogel_ci": ("schraivogel2020_ci", ()),
}
METHODS = ("nbglm", "wilcoxon", "causarray", "tl", "upstream")
ALPHA = 0.05
FAKE_LABEL = "fake"
SCRATCH = Path(__file__).resolve().parent / "scratch" / "real_data"


# ======================================================================================
# data
# ======================================================================================
@dataclass
class Problem:
    """One screen to run a method on: an AnnData with labels, plus what the metrics need.

    Attributes
    ----------
    adata : anndata.AnnData
        Raw counts, ``obs[pert_col]`` labels (control label ``ctrl_label``), covariates.
    covariates : tuple of str
        ``obs`` columns adjusted for.
    pairs : list of (perturbation, gene)
        Positive-control pairs (empty for fake problems).
    """

    adata: Any
    covariates: tuple[str, ...]
    pairs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def pert_col(self) -> str:
        return str(self.adata.uns["pert_col"])

    @property
    def ctrl_label(self) -> str:
        return str(self.adata.uns["ctrl_label"])


_CACHE: dict[str, Any] = {}


def load_screen(dataset: str):
    """The bundled AnnData of ``dataset`` (short name), with derived covariates added."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)}")
    if dataset not in _CACHE:
        from causarray.datasets import load_dataset

        ad = load_dataset(DATASETS[dataset][0])
        ad.obs[ad.uns["pert_col"]] = ad.obs[ad.uns["pert_col"]].astype(str)
        if "n_umis_transcriptome" in ad.obs:
            ad.obs["log_n_umis_transcriptome"] = np.log(
                ad.obs["n_umis_transcriptome"].to_numpy(float))
        for c in DATASETS[dataset][1]:     # numeric covariates as z-scores (same model)
            col = ad.obs[c]
            if pd.api.types.is_numeric_dtype(col):
                v = col.to_numpy(float)
                ad.obs[c] = (v - v.mean()) / v.std()
        _CACHE[dataset] = ad
    return _CACHE[dataset]


def positive_pairs(adata) -> list[tuple[str, str]]:
    """(perturbation, gene) pairs whose gene should go down: own targets + enhancers."""
    labels = set(adata.obs[adata.uns["pert_col"]].astype(str))
    genes = {str(g) for g in adata.var_names}
    pairs = [(t, t) for t in sorted(labels) if t in genes and t != adata.uns["ctrl_label"]]
    enh = adata.uns.get("enhancer_positive_controls") or {}
    for trt, targets in enh.items():
        for g in np.atleast_1d(np.asarray(targets)).tolist():
            if str(trt) in labels and str(g) in genes:
                pairs.append((str(trt), str(g)))
    return pairs


def real_problem(dataset: str) -> Problem:
    ad = load_screen(dataset)
    return Problem(ad, DATASETS[dataset][1], positive_pairs(ad))


def _ctrl_index(ad) -> np.ndarray:
    return np.flatnonzero(ad.obs[ad.uns["pert_col"]].astype(str).to_numpy()
                          == str(ad.uns["ctrl_label"]))


def _relabelled(ad, cells: np.ndarray, labels: np.ndarray):
    """A copy of ``ad[cells]`` with new perturbation labels (genes without counts dropped)."""
    sub = ad[cells].copy()
    sub.obs[sub.uns["pert_col"]] = pd.Categorical(labels).astype(str)
    keep = np.asarray(sub.X.sum(axis=0)).ravel() > 0
    if not keep.all():
        sub = sub[:, keep].copy()
    full = np.asarray(sub.X.sum(axis=1)).ravel() > 0
    if not full.all():
        sub = sub[full].copy()
    return sub


def random_fake_problem(dataset: str, n_fakes: int = 5, seed: int = 0) -> Problem:
    """Control cells only: ``n_fakes`` random fake perturbations, the rest stay controls.

    Each fake has ``min(median real perturbation size, n_ctrl // (2 n_fakes))`` cells, so
    at least half of the control cells remain controls.
    """
    ad = load_screen(dataset)
    ctrl = _ctrl_index(ad)
    sizes = ad.obs[ad.uns["pert_col"]].value_counts().drop(ad.uns["ctrl_label"])
    size = int(min(np.median(sizes.to_numpy()), ctrl.size // (2 * n_fakes)))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(ctrl.size)
    labels = np.full(ctrl.size, str(ad.uns["ctrl_label"]), dtype=object)
    for k in range(n_fakes):
        labels[perm[k * size:(k + 1) * size]] = f"{FAKE_LABEL}{k}"
    return Problem(_relabelled(ad, ctrl, labels), DATASETS[dataset][1])


def guide_of_cells(ad) -> np.ndarray | None:
    """Guide name of every cell (top gRNA of ``obsm['grna_counts']``, else ``obs['guide_id']``)."""
    if "grna_counts" in ad.obsm and "grna_names" in ad.uns:
        G = ad.obsm["grna_counts"]
        G = G.tocsr() if hasattr(G, "tocsr") else np.asarray(G)
        top = np.asarray(G.argmax(axis=1)).ravel()
        return np.asarray(ad.uns["grna_names"]).astype(str)[top]
    if "guide_id" in ad.obs:
        return ad.obs["guide_id"].astype(str).to_numpy()
    return None


def guide_fake_problems(dataset: str, min_guide_cells: int = 20) -> list[tuple[str, Problem]]:
    """One problem per non-targeting guide: its cells ('fake') vs the other NT guides' cells."""
    ad = load_screen(dataset)
    guides = guide_of_cells(ad)
    if guides is None:
        return []
    ctrl = _ctrl_index(ad)
    g_ctrl = guides[ctrl]
    names, counts = np.unique(g_ctrl, return_counts=True)
    out = []
    for name, cnt in zip(names, counts):
        if cnt < min_guide_cells or ctrl.size - cnt < min_guide_cells:
            continue
        labels = np.where(g_ctrl == name, FAKE_LABEL, str(ad.uns["ctrl_label"])).astype(object)
        out.append((str(name), Problem(_relabelled(ad, ctrl, labels), DATASETS[dataset][1])))
    return out


def design(problem: Problem):
    """``(Y csr float, A DataFrame, X, X_A, log L)`` of a problem via ``from_anndata``."""
    import scipy.sparse as sp

    from causarray.preprocessing import from_anndata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Y, A, X, X_A = from_anndata(problem.adata, covariates=problem.covariates,
                                    as_dataframe=False, drop_empty_cells=True)
    Y = sp.csr_matrix(Y, dtype=np.float64)
    log_lib = np.log(np.asarray(Y.sum(axis=1)).ravel())
    return Y, A, np.asarray(X, float), np.asarray(X_A, float), log_lib


def naive_effects(Y, A: np.ndarray, log_lib: np.ndarray) -> np.ndarray:
    """(a, p) ``log(mean(Y/L)[treated] / mean(Y/L)[control])`` (NaN where a mean is 0)."""
    import scipy.sparse as sp

    Yn = sp.diags(np.exp(-log_lib)) @ Y
    ctrl = A.sum(axis=1) == 0
    m0 = np.asarray(Yn[ctrl].mean(axis=0)).ravel()
    out = np.empty((A.shape[1], Y.shape[1]))
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(A.shape[1]):
            m1 = np.asarray(Yn[A[:, k] == 1].mean(axis=0)).ravel()
            out[k] = np.log(m1 / m0)
    out[~np.isfinite(out)] = np.nan
    return out


# ======================================================================================
# methods: each returns dict(tau, se, pvalue, padj: (a, p) arrays, trts, genes, info)
# ======================================================================================
def _bh_rows(p: np.ndarray) -> np.ndarray:
    from causarray.inference import bh_adjust

    return np.vstack([bh_adjust(row) for row in p]) if p.size else p


def _normal_p(z: np.ndarray) -> np.ndarray:
    from scipy.stats import norm

    with np.errstate(invalid="ignore"):
        return 2.0 * norm.sf(np.abs(z))


_NBGLM_CHECKED = False


def check_nbglm_against_statsmodels(Y, X: np.ndarray, A: np.ndarray, log_lib: np.ndarray,
                                    fit, n_genes: int = 2) -> dict[str, float]:
    """Refit the ``n_genes`` highest-mean genes with statsmodels at the same NB size.

    Raises ``AssertionError`` when a perturbation coefficient or SE differs by more than
    ``1e-4 (1 + |coef|)`` / ``1e-3`` relative (fit_glm stops at a relative deviance
    change of 1e-8, i.e. coefficients to about 1e-4 of their SE).
    """
    import statsmodels.api as sm

    D = np.hstack([X, A])
    means = np.asarray(Y.mean(axis=0)).ravel()
    worst_coef = worst_se = 0.0
    d = X.shape[1]
    for j in np.argsort(means)[::-1][:n_genes]:
        y = np.asarray(Y[:, j].todense()).ravel()
        res = sm.GLM(y, D, family=sm.families.NegativeBinomial(alpha=1.0 / fit.size[j]),
                     offset=log_lib).fit(tol=1e-12, maxiter=200)
        c_ours, s_ours = fit.coef[j, d:], fit.se[j, d:]
        c_sm, s_sm = res.params[d:], res.bse[d:]
        ok = np.isfinite(s_ours)
        dc = np.max(np.abs(c_ours[ok] - c_sm[ok]) / (1 + np.abs(c_sm[ok])))
        ds = np.max(np.abs(s_ours[ok] - s_sm[ok]) / s_sm[ok])
        worst_coef, worst_se = max(worst_coef, dc), max(worst_se, ds)
    assert worst_coef < 1e-4 and worst_se < 1e-3, (
        f"NB GLM disagrees with statsmodels: coef {worst_coef:.2e}, se {worst_se:.2e}")
    return {"max_rel_coef_diff": float(worst_coef), "max_rel_se_diff": float(worst_se)}


def method_nbglm(problem: Problem, **_: Any) -> dict[str, Any]:
    """Per-gene NB GLM on [1 | covariates | one-hot A], offset log panel total, Wald, BH."""
    global _NBGLM_CHECKED
    from causarray.glm import fit_glm

    Y, A_df, X, _, log_lib = design(problem)
    A = A_df.to_numpy(float)
    fit = fit_glm(Y, X, A, family="nb", offset=log_lib)
    d = X.shape[1]
    tau, se = fit.coef[:, d:].T, fit.se[:, d:].T
    with np.errstate(divide="ignore", invalid="ignore"):
        z = tau / se
    z[~np.isfinite(z)] = np.nan
    p = _normal_p(z)
    info: dict[str, Any] = {"n_not_converged": int((~fit.converged).sum())}
    if not _NBGLM_CHECKED:
        info["statsmodels_check"] = check_nbglm_against_statsmodels(Y, X, A, log_lib, fit)
        _NBGLM_CHECKED = True
    return {"tau": tau, "se": se, "pvalue": p, "padj": _bh_rows(p),
            "trts": list(map(str, A_df.columns)),
            "genes": [str(g) for g in problem.adata.var_names], "info": info}


def method_wilcoxon(problem: Problem, **_: Any) -> dict[str, Any]:
    """log1p(CP10k) per cell, Mann-Whitney U per gene vs controls, BH; effect = naive."""
    import scipy.sparse as sp
    from scipy.stats import mannwhitneyu

    Y, A_df, _, _, log_lib = design(problem)
    A = A_df.to_numpy(float)
    L = np.log1p((sp.diags(1e4 * np.exp(-log_lib)) @ Y).toarray())
    ctrl = A.sum(axis=1) == 0
    pvals = []
    for k in range(A.shape[1]):
        with np.errstate(divide="ignore", invalid="ignore"):
            res = mannwhitneyu(L[A[:, k] == 1], L[ctrl], axis=0, alternative="two-sided")
        pvals.append(np.asarray(res.pvalue, float))
    p = np.vstack(pvals)
    tau = naive_effects(Y, A, log_lib)
    return {"tau": tau, "se": np.full_like(tau, np.nan), "pvalue": p, "padj": _bh_rows(p),
            "trts": list(map(str, A_df.columns)),
            "genes": [str(g) for g in problem.adata.var_names], "info": {}}


def _from_lfc_table(df: pd.DataFrame, trts: list[str], genes: list[str]) -> dict[str, Any]:
    """(a, p) arrays from a stacked LFC table (``trt``, ``gene_names`` columns)."""
    out = {}
    df = df.copy()
    df["trt"] = df["trt"].astype(str)
    df["gene_names"] = df["gene_names"].astype(str)
    idx = pd.MultiIndex.from_product([trts, genes])
    tab = df.set_index(["trt", "gene_names"]).reindex(idx)
    for key, col in (("tau", "tau"), ("se", "std"), ("pvalue", "pvalue"), ("padj", "padj")):
        out[key] = tab[col].to_numpy(float).reshape(len(trts), len(genes))
    est = tab["estimable"].fillna(False).to_numpy(bool) if "estimable" in tab else None
    out["estimable"] = None if est is None else est.reshape(len(trts), len(genes))
    extra = {}
    for c in ("n_treated", "n_control"):
        if c in tab:
            extra[c] = tab[c].to_numpy(float).reshape(len(trts), len(genes))
    out.update(extra)
    return out


def method_causarray(problem: Problem, r: int | str = 1, **_: Any) -> dict[str, Any]:
    """Seed-style ``gcate_lfc_batch`` on all cells (``n_ctrl=None, max_cells=None``).

    ``r='auto'``: r chosen by :func:`causarray.tl.select_r` (front-door JIC, defaults).
    ``r = 0`` (also when chosen): the front door's own r = 0 path, the doubly robust LFC
    on the observed design, with the same all-cells batch layout.
    """
    from causarray.batch import gcate_lfc_batch
    from causarray.tl import select_r

    Y, A_df, X, X_A, _ = design(problem)
    genes = [str(g) for g in problem.adata.var_names]
    trts = list(map(str, A_df.columns))
    info: dict[str, Any] = {}
    if r == "auto":
        t0 = time.perf_counter()
        r_used, df_r = select_r(Y, X, A_df.to_numpy(float))
        info.update(r_used=int(r_used), jic=df_r[["r", "JIC"]].round(5).to_dict("list"),
                    select_r_s=round(time.perf_counter() - t0, 2))
    else:
        r_used = int(r)
    info["r_used"] = int(r_used)
    Y_named = pd.DataFrame.sparse.from_spmatrix(Y, columns=genes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = gcate_lfc_batch(Y_named, X, A_df, r_used, W_A=X_A, batch_size=15,
                             n_ctrl=None, max_cells=None)
    out = _from_lfc_table(df, trts, genes)
    out.update(trts=trts, genes=genes, info=info)
    return out


def method_tl(problem: Problem, **_: Any) -> dict[str, Any]:
    """The front door with its defaults: ``causarray.tl.lfc(adata, covariates=...)``."""
    from causarray import get, tl

    ad = problem.adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl.lfc(ad, covariates=list(problem.covariates), propensity=False,
               drop_empty_cells=True)
    df = get.results(ad)
    st = ad.uns["causarray"]["settings"]
    trts = sorted(set(df["trt"].astype(str)))
    genes = [str(g) for g in ad.var_names]
    out = _from_lfc_table(df, trts, genes)
    out.update(trts=trts, genes=genes,
               info={"r_used": st.get("r"), "n_ctrl": st.get("n_ctrl"),
                     "max_cells": st.get("max_cells")})
    return out


def method_upstream(problem: Problem, r: int = 1, timeout: float = 900.0,
                    tag: str = "problem", **_: Any) -> dict[str, Any]:
    """causarray 0.1.1 (fit_gcate then LFC on [X | U]) in its own venv, one subprocess."""
    from _common import save_npz_problem
    from upstream import run_upstream

    if r == "auto":
        raise ValueError("upstream runs only at integer r")
    Y, A_df, X, X_A, _ = design(problem)
    genes = [str(g) for g in problem.adata.var_names]
    trts = list(map(str, A_df.columns))
    SCRATCH.mkdir(parents=True, exist_ok=True)
    npz = save_npz_problem(SCRATCH / f"{tag}.npz", Y, X, A_df.to_numpy(float), X_A)
    res = run_upstream(npz, "both", int(r), timeout=timeout, numba_cache="default", n_threads=1)
    if res.get("status") != "ok":
        raise RuntimeError(f"upstream {res.get('status')}: {res.get('error')}; "
                           f"{(res.get('log_tail') or '')[-400:]}")
    df = pd.read_csv(res["lfc_path"])
    a, p = len(trts), len(genes)
    if len(df) != a * p:
        raise RuntimeError(f"upstream LFC table has {len(df)} rows, expected {a * p}")
    if "trt" in df and not (pd.factorize(df["trt"])[0] == np.repeat(np.arange(a), p)).all():
        raise RuntimeError("upstream LFC table is not ordered treatment by treatment")
    out = {}
    for key, col in (("tau", "tau"), ("se", "std"), ("pvalue", "pvalue"), ("padj", "padj")):
        out[key] = (df[col].to_numpy(float).reshape(a, p) if col in df
                    else np.full((a, p), np.nan))
    if "estimable" in df:
        out["estimable"] = df["estimable"].astype(bool).to_numpy().reshape(a, p)
    out.update(trts=trts, genes=genes, info={"upstream_wall_s": res.get("wall_s")})
    return out


_METHOD_FN = {"nbglm": method_nbglm, "wilcoxon": method_wilcoxon, "causarray": method_causarray,
              "tl": method_tl, "upstream": method_upstream}


def run_method(method: str, problem: Problem, r: int | str | None = None,
               **kw: Any) -> dict[str, Any]:
    """Run one method on one problem, timed; errors come back as ``status``."""
    if method not in _METHOD_FN:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    t0 = time.perf_counter()
    try:
        out = _METHOD_FN[method](problem, r=r, **kw)
        out["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - recorded in the results
        out = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:1500]}
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


# ======================================================================================
# metrics
# ======================================================================================
def _f(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def min_ratio(pairs: list[dict[str, Any]], visible: float = -0.1) -> float | None:
    """Smallest effect / naive over pairs whose naive effect is below ``visible`` (a
    knock-down one can see; the ratio of two near-zero effects says nothing)."""
    ratios = [p["ratio"] for p in pairs
              if p["ratio"] is not None and p["naive"] is not None and p["naive"] < visible]
    return min(ratios) if ratios else None


def positive_control_metrics(res: dict[str, Any], problem: Problem) -> dict[str, Any]:
    """Hits over the problem's positive-control pairs; misses with effect, SE, padj, ratio."""
    Y, A_df, _, _, log_lib = design(problem)
    naive = naive_effects(Y, A_df.to_numpy(float), log_lib)
    ntrts = list(map(str, A_df.columns))
    ngenes = [str(g) for g in problem.adata.var_names]
    pairs, misses = [], []
    for trt, gene in problem.pairs:
        if trt not in res["trts"] or gene not in res["genes"]:
            continue
        k, j = res["trts"].index(trt), res["genes"].index(gene)
        tau, se = float(res["tau"][k, j]), float(res["se"][k, j])
        padj, pv = float(res["padj"][k, j]), float(res["pvalue"][k, j])
        nv = float(naive[ntrts.index(trt), ngenes.index(gene)])
        est = res.get("estimable")
        entry = {"pair": f"{trt}->{gene}", "effect": _f(tau), "se": _f(se), "pvalue": _f(pv),
                 "padj": _f(padj), "naive": _f(nv),
                 "ratio": _f(tau / nv) if nv != 0 and np.isfinite(nv) else None,
                 "estimable": None if est is None else bool(est[k, j]),
                 "hit": bool(np.isfinite(tau) and tau < 0 and np.isfinite(padj) and padj < ALPHA)}
        for c in ("n_treated", "n_control"):
            if c in res:
                entry[c] = _f(res[c][k, j])
        pairs.append(entry)
        if not entry["hit"]:
            misses.append(entry)
    return {"n_hits": int(sum(p["hit"] for p in pairs)), "n_pos": len(pairs),
            "min_ratio": min_ratio(pairs),
            "n_not_estimable": int(sum(p["estimable"] is False for p in pairs)),
            "pairs": pairs, "misses": misses}


def null_metrics(results: list[dict[str, Any]],
                 names: list[str] | None = None) -> dict[str, Any]:
    """Calls at padj < 0.05 and type-I at p < 0.05 over the fake pairs of several runs.

    ``names`` (one per run) adds ``calls_by_run``: name -> calls of that run.
    """
    p_all, calls, n_pairs, errors, by_run, t1_by_run = [], 0, 0, [], {}, {}
    for i, res in enumerate(results):
        if res["status"] != "ok":
            errors.append(res.get("error"))
            continue
        fake = [k for k, t in enumerate(res["trts"]) if t.startswith(FAKE_LABEL)]
        padj = res["padj"][fake]
        c = int(np.sum(np.nan_to_num(padj, nan=1.0) < ALPHA))
        calls += c
        pv = res["pvalue"][fake].ravel()
        if names is not None:
            by_run[names[i]] = c
            fin = np.isfinite(pv)
            t1_by_run[names[i]] = [int(np.sum(pv[fin] < ALPHA)), int(fin.sum())]
        n_pairs += padj.size
        p_all.append(pv)
    p = np.concatenate(p_all) if p_all else np.array([])
    ok = np.isfinite(p)
    return {"calls": calls if p_all else None, "n_pairs": n_pairs,
            "n_p_nan": int((~ok).sum()),
            "type1": float(np.mean(p[ok] < ALPHA)) if ok.any() else None,
            "n_runs": len(results), "errors": errors[:3],
            **({"calls_by_run": by_run, "type1_by_run": t1_by_run}
               if names is not None else {})}


# ======================================================================================
# evaluation
# ======================================================================================
def evaluate(dataset: str, method: str, r: int | str | None = None, *, real: bool = True,
             fakes: bool = True, guide_fakes: bool = True, n_fakes: int = 5, seed: int = 0,
             n_cuts: int = 4,
             min_guide_cells: int = 20, max_guides: int | None = None,
             upstream_timeout: float = 900.0, verbose: bool = True) -> dict[str, Any]:
    """Positive controls, discoveries and fake-perturbation calls of one method on one screen.

    Parameters
    ----------
    dataset : {'schraivogel', 'papalexi', 'hill', 'schraivogel_ci'}
    method : {'nbglm', 'wilcoxon', 'causarray', 'tl', 'upstream'}
    r : int or 'auto'
        Latent factors (``causarray``, ``upstream``); ignored by the other methods.
    real, fakes, guide_fakes : bool
        Run the real screen / the random / the non-targeting-guide fake perturbations
        (a part not run is absent from the returned dict).
    n_fakes, seed, n_cuts : random fakes: how many per cut, the seed of the first cut, and
        how many independent cuts (seeds ``seed .. seed + n_cuts - 1``) are pooled. One
        cut of 5 fakes on a 72-gene panel is 360 pairs, a binomial SE of 0.011 on a
        type-I rate of 0.05; four cuts halve it.
    min_guide_cells : guides with fewer control cells are not used as fakes.
    max_guides : use only the ``max_guides`` largest non-targeting guides (None: all).
    upstream_timeout : seconds per upstream subprocess.

    Returns
    -------
    dict
        ``dataset, method, r, status, wall_s`` (the real-screen run), ``hits``
        (:func:`positive_control_metrics`), ``discoveries``, ``fake_random`` and
        ``fake_guide`` (:func:`null_metrics`, with their own ``wall_s``), ``info``.
    """
    kw = {"timeout": upstream_timeout} if method == "upstream" else {}
    problem = real_problem(dataset)
    tag = f"{dataset}_{method}_r{r}"
    row: dict[str, Any] = {"dataset": dataset, "method": method,
                           "r": None if r is None else str(r)}
    if real:
        res = run_method(method, problem, r=r, tag=tag, **kw)
        row.update(status=res["status"], wall_s=res["wall_s"], error=res.get("error"),
                   info=res.get("info", {}))
        if res["status"] == "ok":
            row["hits"] = positive_control_metrics(res, problem)
            row["discoveries"] = int(np.sum(np.nan_to_num(res["padj"], nan=1.0) < ALPHA))
            row["n_pairs"] = int(res["padj"].size)
            row["n_pvalue_nan"] = int(np.isnan(res["pvalue"]).sum())
        if verbose:
            _print_progress(row, "real")
    if fakes:
        t0 = time.perf_counter()
        seeds = list(range(seed, seed + n_cuts))
        fres = [run_method(method, random_fake_problem(dataset, n_fakes, s), r=r,
                           tag=f"{tag}_fake{s}", **kw) for s in seeds]
        row["fake_random"] = {**null_metrics(fres, [f"cut{s}" for s in seeds]),
                              "wall_s": round(time.perf_counter() - t0, 2)}
        if verbose:
            _print_progress(row, "random fakes")
    if guide_fakes:
        probs = guide_fake_problems(dataset, min_guide_cells)
        if max_guides is not None:
            probs = sorted(probs, key=lambda gp: -int(
                (gp[1].adata.obs[gp[1].pert_col] == FAKE_LABEL).sum()))[:max_guides]
        if probs:
            t0 = time.perf_counter()
            gres = [run_method(method, pb, r=r, tag=f"{tag}_guide{i}", **kw)
                    for i, (_, pb) in enumerate(probs)]
            row["fake_guide"] = {**null_metrics(gres, [g for g, _ in probs]),
                                 "wall_s": round(time.perf_counter() - t0, 2)}
            if verbose:
                _print_progress(row, "guide fakes")
    return row


def _print_progress(row: dict[str, Any], stage: str) -> None:
    r = "" if row["r"] is None else f" r={row['r']}"
    msg = f"  [{row['dataset']} {row['method']}{r}] {stage}: "
    if stage == "real":
        if row["status"] != "ok":
            msg += f"{row['status']} ({row.get('error')}) in {row['wall_s']:.1f} s"
        else:
            h = row["hits"]
            msg += (f"hits {h['n_hits']}/{h['n_pos']}, discoveries {row['discoveries']}, "
                    f"{row['wall_s']:.1f} s")
    else:
        key = "fake_random" if stage == "random fakes" else "fake_guide"
        m = row[key]
        t1 = "-" if m["type1"] is None else f"{m['type1']:.3f}"
        msg += f"calls {m['calls']}, type-I {t1} ({m['n_pairs']} pairs), {m['wall_s']:.1f} s"
        if m["errors"]:
            msg += f", errors: {m['errors'][0]}"
    print(msg, flush=True)


# ======================================================================================
# summary and output
# ======================================================================================
def clean_guides(rows: list[dict[str, Any]], dataset: str) -> set[str] | None:
    """Non-targeting guides of ``dataset`` on which neither ``nbglm`` nor ``wilcoxon`` made a
    call (None unless both rows with guide fakes are present)."""
    sets = []
    for m in ("nbglm", "wilcoxon"):
        fg = next((r.get("fake_guide") for r in rows
                   if r["dataset"] == dataset and r["method"] == m), None)
        if not fg or not fg.get("calls_by_run"):
            return None
        sets.append({g for g, c in fg["calls_by_run"].items() if c == 0})
    return sets[0] & sets[1]


def summary_row(row: dict[str, Any], clean: set[str] | None = None) -> dict[str, Any]:
    """Flat table row of one evaluation (``clean``: guides for the 'clean guides' column)."""
    h = row.get("hits") or {}
    fr, fg = row.get("fake_random") or {}, row.get("fake_guide") or {}

    def t1(m):
        return None if m.get("type1") is None else round(m["type1"], 3)

    r_used = (row.get("info") or {}).get("r_used")
    return {
        "dataset": row["dataset"], "method": row["method"],
        "r": (row["r"] if r_used is None or str(r_used) == row["r"]
              else f"{row['r'] or 'auto'}->{r_used}"),
        "status": row.get("status", "not run"),
        "hits": f"{h['n_hits']}/{h['n_pos']}" if h else None,
        "min effect/naive (naive < -0.1)": (None if not h or min_ratio(h["pairs"]) is None
                                            else round(min_ratio(h["pairs"]), 2)),
        "pos. not estimable": h.get("n_not_estimable"),
        "discoveries": row.get("discoveries"),
        "fake calls random": fr.get("calls"), "type-I random": t1(fr),
        "NT guides": fg.get("n_runs"),
        "fake calls NT guide": fg.get("calls"), "type-I NT guide": t1(fg),
        "NT calls, clean guides": (None if clean is None or not fg.get("calls_by_run") else
                                   sum(c for g, c in fg["calls_by_run"].items() if g in clean)),
        "type-I NT guide, clean guides": _clean_type1(fg, clean),
        "NT guides with calls": " ".join(f"{_short(g)}:{c}" for g, c in
                                         (fg.get("calls_by_run") or {}).items() if c) or None,
        "wall s (real)": row.get("wall_s"),
        "wall s (fakes)": round((fr.get("wall_s") or 0) + (fg.get("wall_s") or 0), 1),
    }


def _clean_type1(fg: dict[str, Any], clean: set[str] | None) -> float | None:
    """Type-I at p < 0.05 over the guides in ``clean`` (None without per-guide counts)."""
    by = fg.get("type1_by_run")
    if clean is None or not by:
        return None
    hits = sum(v[0] for g, v in by.items() if g in clean)
    n = sum(v[1] for g, v in by.items() if g in clean)
    return round(hits / n, 3) if n else None


def _short(guide: str) -> str:
    """Last ``_``-separated token of a guide name (``..._non-targeting_00006`` -> ``00006``)."""
    return guide.rsplit("_", 1)[-1]


def src_version() -> dict[str, Any]:
    """:func:`_common.code_version` plus ``src_rev``, the last commit that changed ``src/``
    (benchmark-only commits leave it unchanged)."""
    import subprocess

    out = code_version()
    try:
        out["src_rev"] = subprocess.run(
            ["git", "log", "-1", "--format=%h", "--", "src"], cwd=Path(__file__).parent.parent,
            capture_output=True, text=True, timeout=30, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["src_rev"] = None
    return out


def _key(row: dict[str, Any]) -> str:
    return f"{row['dataset']}|{row['method']}|{row['r']}"


def _label(row: dict[str, Any]) -> str:
    r_used = (row.get("info") or {}).get("r_used")
    if row["r"] is None:
        return row["method"] if r_used is None else f"{row['method']} (r={r_used})"
    if row["r"] == "auto" and r_used is not None:
        return f"{row['method']} r=auto({r_used})"
    return f"{row['method']} r={row['r']}"


def _pair_tables(rows: list[dict[str, Any]], skip: tuple[str, ...] = ("hill",)) -> list[str]:
    """Per dataset: every positive-control pair's effect (SE) under every method."""
    out = []
    for ds in DATASETS:
        drows = [r for r in rows if r["dataset"] == ds and r.get("hits") and ds not in skip]
        if not drows:
            continue
        pairs = [p["pair"] for p in drows[0]["hits"]["pairs"]]
        naive = {p["pair"]: p["naive"] for p in drows[0]["hits"]["pairs"]}
        cols = [_label(r) for r in drows]
        out += [f"### {ds}", "", "| pair | naive | " + " | ".join(cols) + " |",
                "|---|---|" + "---|" * len(cols)]
        for pair in pairs:
            cells = []
            for r in drows:
                p = next((q for q in r["hits"]["pairs"] if q["pair"] == pair), None)
                if p is None or p["effect"] is None:
                    cells.append("")
                    continue
                se = "" if p["se"] is None else f" ({p['se']:.2g})"
                mark = "" if p["hit"] else " **miss**"
                if p.get("estimable") is False:
                    mark = " **not estimable**"
                cells.append(f"{p['effect']:.3g}{se}{mark}")
            nv = "" if naive[pair] is None else f"{naive[pair]:.3g}"
            out.append(f"| {pair} | {nv} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def _miss_lines(rows: list[dict[str, Any]], max_per_row: int = 6) -> list[str]:
    lines = [("| dataset | method | r | pair | effect | SE | padj | naive | effect / naive "
             "| estimable |"), "|---|---|---|---|---|---|---|---|---|---|"]
    n = 0

    def g(v, fmt="{:.3g}"):
        return "" if v is None else fmt.format(v)

    for row in rows:
        misses = (row.get("hits") or {}).get("misses", [])
        for m in misses[:max_per_row]:
            n += 1
            lines.append(f"| {row['dataset']} | {row['method']} | {row['r'] or ''} | {m['pair']} "
                         f"| {g(m['effect'])} | {g(m['se'])} | {g(m['padj'])} | {g(m['naive'])} "
                         f"| {g(m['ratio'], '{:.2f}')} "
                         f"| {'' if m['estimable'] is None else m['estimable']} |")
        if len(misses) > max_per_row:
            lines.append(f"| {row['dataset']} | {row['method']} | {row['r'] or ''} | "
                         f"... {len(misses) - max_per_row} more in the JSON | | | | | | |")
    return lines if n else ["(no misses)"]


def markdown(result: dict[str, Any]) -> str:
    from _common import markdown_table

    rows = result["rows"]
    cv = result["code_version"]
    revs = sorted({(r.get("code_version") or {}).get("src_rev")
                   or (r.get("code_version") or {}).get("git_rev") or "?" for r in rows})
    parts = [f"# Real screens: positive and negative controls ({result['label']})", "",
             f"Package source (`src/`) at `{'`, `'.join(revs)}` (last commit touching `src/`; "
             f"written at `{cv.get('git_rev')}`)"
             + (f" (modified: {', '.join(cv['src_modified'])})" if cv.get("src_modified") else "")
             + "; generated by `benchmarks/real_data.py` (see `docs/benchmarks.md`).", "",
             ("Hits: own target (or HS2 -> HBE1) down at padj < 0.05. Discoveries: pairs at "
             "padj < 0.05. Fake calls: pairs at padj < 0.05 among fake perturbations (random: "
             "5 fakes cut from control cells, pooled over independent cuts (JSON: per cut); "
             "NT guide: each non-targeting guide vs the "
             "others, summed). Type-I: share of fake pairs with raw p < 0.05. Effects are "
             "natural-log fold changes; naive = log ratio of library-size-normalised means."), "",
             ("NT calls, clean guides: the NT-guide fake calls restricted to the guides on which "
             "neither the NB GLM nor Wilcoxon made any call (guides with calls by those two "
             "are listed by their last name token in the next column: such guides shift genes "
             "under simple tests too, so they are not clean nulls); type-I NT guide, clean "
             "guides: the type-I rate over the same guides."),
             "", markdown_table([summary_row(r, clean_guides(rows, r["dataset"]))
                                 for r in rows]), "",
             "## Missed positive controls", "", *_miss_lines(rows), "",
             "## Positive controls: effect (SE) by method", "",
             ("Natural-log fold changes; Wilcoxon's effect is the naive ratio. Hill is left "
             "out here (27 pairs, mostly not detectable by any method; see the JSON)."), "",
             *_pair_tables(rows),
             "## Runs", ""]
    for row in rows:
        extra = {k: v for k, v in (row.get("info") or {}).items() if k != "jic"}
        cvr = row.get("code_version") or {}
        rev = cvr.get("src_rev") or cvr.get("git_rev")
        runs = (f"- {_key(row)}: {row.get('status', 'not run')}, {row.get('wall_s')} s, "
                f"load avg {row.get('loadavg')}, code `{rev}`, {row.get('date')}")
        if row.get("error"):
            runs += f", error: {row['error'][:300]}"
        if extra:
            runs += f", info: {json.dumps(to_jsonable(extra))[:300]}"
        for k in ("fake_random", "fake_guide"):
            if row.get(k, {}).get("errors"):
                runs += f", {k} errors: {row[k]['errors'][0][:200]}"
        parts.append(runs)
    m = result["machine"]
    parts += ["", (f"_{m['date']}; {m['cpu_count_usable']} usable CPUs; python {m['python']}, "
              f"numpy {m['numpy']}, scipy {m['scipy']}; threads {m['threads_env']}_"), ""]
    return "\n".join(parts)


def save(rows: list[dict[str, Any]], out_name: str, label: str) -> Path:
    """Merge ``rows`` into ``results/<out_name>.json`` (keyed by dataset|method|r) and
    rewrite the markdown beside it."""
    path = RESULTS_DIR / f"{out_name}.json"
    old: dict[str, Any] = {}
    if path.exists():
        try:
            old = {_key(r): r for r in json.loads(path.read_text()).get("rows", [])}
        except (json.JSONDecodeError, KeyError):
            old = {}
    for row in rows:     # parts not run this time (e.g. --no-real) keep their old values
        old[_key(row)] = {**old.get(_key(row), {}), **to_jsonable(row)}
    order = {d: i for i, d in enumerate(DATASETS)}
    morder = {m: i for i, m in enumerate(METHODS)}
    merged = sorted(old.values(), key=lambda r: (order.get(r["dataset"], 99),
                                                 morder.get(r["method"], 99), str(r["r"])))
    result = {"name": out_name, "label": label, "code_version": src_version(),
              "machine": machine_info(), "rows": merged}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(to_jsonable(result), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    (RESULTS_DIR / f"{out_name}.md").write_text(markdown(result))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--methods", nargs="+", default=["nbglm", "wilcoxon", "causarray"],
                    choices=METHODS)
    ap.add_argument("--r", nargs="+", default=["1", "3", "5"],
                    help="r values for causarray / upstream: integers and/or 'auto'")
    ap.add_argument("--quick", action="store_true",
                    help="schraivogel_ci only, r = 1, the 5 largest NT guides (< 1 min)")
    ap.add_argument("--no-real", action="store_true",
                    help="skip the real screens (fakes only; the rows' real-screen parts "
                         "stay as they are in the results file)")
    ap.add_argument("--no-fakes", action="store_true", help="skip the random fakes")
    ap.add_argument("--no-guide-fakes", action="store_true", help="skip the NT-guide fakes")
    ap.add_argument("--fake-cuts", type=int, default=4,
                    help="independent random cuts of 5 fakes each, pooled (default 4)")
    ap.add_argument("--max-guides", type=int, default=None,
                    help="use only the largest N non-targeting guides as fakes")
    ap.add_argument("--upstream-timeout", type=float, default=900.0,
                    help="seconds per causarray 0.1.1 subprocess")
    ap.add_argument("--out-name", default="real_data")
    ap.add_argument("--label", default="before the issue-14 statistical changes")
    args = ap.parse_args(argv)
    r_values: list[int | str] = []
    for v in args.r:
        if v == "auto":
            r_values.append("auto")
        else:
            try:
                r_values.append(int(v))
            except ValueError:
                ap.error(f"--r: {v!r} is neither an integer nor 'auto'")
    datasets, max_guides = args.datasets, args.max_guides
    if args.quick:
        datasets, r_values = ["schraivogel_ci"], [1]
        max_guides = 5 if max_guides is None else max_guides
        if args.out_name == "real_data":
            args.out_name = "real_data_quick"
    rows = []
    for ds in datasets:
        for method in args.methods:
            rs = r_values if method in ("causarray", "upstream") else [None]
            for r in rs:
                if method == "upstream" and r == "auto":
                    continue
                row = evaluate(ds, method, r, real=not args.no_real, fakes=not args.no_fakes,
                               guide_fakes=not args.no_guide_fakes, max_guides=max_guides,
                               n_cuts=args.fake_cuts, upstream_timeout=args.upstream_timeout)
                stamp = {"loadavg": [round(x, 2) for x in os.getloadavg()],
                         "code_version": src_version(),
                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
                for part in ("fake_random", "fake_guide"):
                    if part in row:
                        row[part].update(stamp)
                if not args.no_real:
                    row.update(stamp)
                rows.append(row)
                save([row], args.out_name, args.label)
    from _common import markdown_table

    print(markdown_table([summary_row(r) for r in rows]))
    print(f"results merged into {RESULTS_DIR / (args.out_name + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
