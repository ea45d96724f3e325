"""Accuracy report: causarray against Wilcoxon, naive and oracle NB GLMs and causarray 0.1.1.

Simulations (``causarray.simulate.simulate_screen``; the confounders' mean shifts with
the perturbation, ``confounding=0.5``):

* *confounded*: 5% of genes affected per perturbation (plus the knocked-down target);
* *null*: no effects at all (``null=True``).

Full mode: 2,000 controls + 15 perturbations x 300 cells, 2,000 genes, 10 confounders,
3 confounded + 2 null seeds. ``--quick``: 600 controls + 5 x 150 cells, 600 genes,
5 confounders, one seed of each.

Methods, all on the same capped counts of ``prep_causarray_data`` (genes without counts
dropped):

``causarray``
    ``fit_gcate(Y, X, A, r)`` with the true r (both stages ``max_iters=30``,
    ``rel_tol=2e-4``), then ``LFC(Y, [X|U], A, [X_A|U], offset=log size factors of
    res_2['kwargs_glm']['size_factor'])``; X_A = [1 | standardised log2 library size].
``causarray 0.1.1``
    the same two calls of the original package from PyPI, in its own venv
    (``benchmarks/upstream.py``, task 'both').
``NB GLM (naive)``
    per-gene NB GLM on [X | A] with log size-factor offsets (``comp_size_factor``),
    Wald z = coef / se, normal p-values, BH per perturbation.
``NB GLM (true U)``
    the same on [X | U_true | A] (simulations only): the oracle of the confounders.
``NB GLM (true U, s, NB size)``
    the same with the simulator's true size factors as offsets and its true NB sizes:
    the full oracle. (Median-of-ratios size factors estimated from a sparse panel absorb
    part of each perturbation's confounder shift, which biases every gene of that
    perturbation; the method-of-moments NB size is biased upwards at low counts, which
    makes Wald tests anti-conservative.)
``Wilcoxon``
    rank-sum test per gene (``scipy.stats.mannwhitneyu(..., axis=0)``) of each
    perturbation's cells against the controls on size-factor-normalised counts, BH per
    perturbation; the effect estimate is the log ratio of the normalised means (floored
    at 0.01).

Metrics per simulated screen, pooled over all (perturbation, gene) pairs: empirical FDR
and power at padj < q for q = 0.05 and 0.1 (truth: ``varm['true_lfc'] != 0``; untested
pairs count as not rejected), Pearson correlation of the estimated log fold change with
the true one over the non-null pairs, the Kolmogorov-Smirnov statistic of the null
pairs' p-values against U(0, 1); on null screens the share of all pairs with
padj < 0.05.

Real data (``causarray.datasets``): Schraivogel 2020 TAP-seq ground truth (13 promoter
targets: own gene tau < 0 and padj < 0.05; HS2 enhancer -> HBE1), Papalexi 2021
ECCITE-seq (STAT1 and JAK2 own gene, with ``bio_rep`` as covariate) and a negative
control (10 fake perturbations of 300 cells cut at random from the Schraivogel
non-targeting cells, against the remaining non-targeting cells: discoveries at
padj < 0.05). causarray uses r = 2 on the real data (``--real-r``).

Usage::

    python benchmarks/accuracy.py --quick                 # a few minutes
    python benchmarks/accuracy.py                         # full (an hour or more)
    python benchmarks/accuracy.py --skip-upstream --no-real
    python benchmarks/accuracy.py --resume --rerun causarray   # after a change of our code

Results: ``benchmarks/results/accuracy.{md,json,png}`` (``accuracy_quick.*`` with
``--quick``). Per-dataset method results are cached in ``benchmarks/scratch/accuracy``
(simulations per mode, real data shared by both modes), each with the git revision it
was computed with; ``--resume`` reuses them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from _common import RESULTS_DIR, code_version, save_npz_problem, to_jsonable, write_result

SCRATCH = BENCH_DIR / "scratch" / "accuracy"
QS = (0.05, 0.1)
OURS, UPSTREAM, NAIVE, ORACLE, ORACLE_S, WILCOXON = (
    "causarray", "causarray 0.1.1", "NB GLM (naive)", "NB GLM (true U)",
    "NB GLM (true U, s, NB size)", "Wilcoxon")
METHODS = (OURS, UPSTREAM, NAIVE, ORACLE, ORACLE_S, WILCOXON)
SIM_ONLY = (ORACLE, ORACLE_S)
ES = {"max_iters": 30, "rel_tol": 2e-4}

MODES: dict[str, dict[str, Any]] = {
    "full": {"sim": {"n_ctrl": 2000, "n_perts": 15, "cells_per_pert": 300, "n_genes": 2000, "r": 10,
                          "confounding": 0.5},
                 "seeds": (1, 2, 3), "null_seeds": (101, 102)},
    "quick": {"sim": {"n_ctrl": 600, "n_perts": 5, "cells_per_pert": 150, "n_genes": 600, "r": 5,
                           "confounding": 0.5},
                  "seeds": (1,), "null_seeds": (101,)},
}


# ----------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------
def fdr_power(padj: np.ndarray, nonnull: np.ndarray, q: float) -> dict[str, float]:
    """Empirical FDR (V / max(R, 1)) and power (true rejections / non-nulls) at padj < q.

    NaN adjusted p-values (untested pairs) count as not rejected.
    """
    rej = np.nan_to_num(padj, nan=1.0) < q
    n_rej = int(rej.sum())
    false = int((rej & ~nonnull).sum())
    n_nonnull = int(nonnull.sum())
    return {"fdr": false / max(n_rej, 1),
            "power": float((rej & nonnull).sum() / n_nonnull) if n_nonnull else float("nan"),
            "n_rej": n_rej}


def ks_uniform(p: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance of the finite p-values from U(0, 1)."""
    from scipy import stats

    p = p[np.isfinite(p)]
    return float(stats.kstest(p, "uniform").statistic) if p.size else float("nan")


def effect_correlation(est: np.ndarray, truth: np.ndarray, nonnull: np.ndarray,
                       method: str = "pearson") -> float:
    """Correlation of estimated and true log fold changes over the non-null pairs.

    ``method='pearson'`` is sensitive to diverged estimates (an NB GLM coefficient runs to
    about -30 when a perturbation has no counts of a gene); ``'spearman'`` is not.
    """
    from scipy.stats import spearmanr

    ok = nonnull & np.isfinite(est)
    if ok.sum() < 3:
        return float("nan")
    if method == "spearman":
        return float(spearmanr(est[ok], truth[ok]).statistic)
    return float(np.corrcoef(est[ok], truth[ok])[0, 1])


def bh_per_row(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg within each row (perturbation) of an (a, p) array."""
    from causarray.inference import bh_adjust

    return np.vstack([bh_adjust(row) for row in p])


def log_mean_ratio(Yn: np.ndarray, treated: np.ndarray, ctrl: np.ndarray,
                   floor: float = 0.01) -> np.ndarray:
    """log(mean treated / mean control) of normalised counts, both means floored."""
    m1 = np.maximum(Yn[treated].mean(axis=0), floor)
    m0 = np.maximum(Yn[ctrl].mean(axis=0), floor)
    return np.log(m1 / m0)


# ----------------------------------------------------------------------------------
# methods: each returns dict(tau, pvalue, padj) as (a, p) arrays plus time_s
# ----------------------------------------------------------------------------------
def _dense(Y) -> np.ndarray:
    if isinstance(Y, pd.DataFrame):
        return Y.to_numpy(dtype=float)
    return Y.toarray().astype(float) if hasattr(Y, "toarray") else np.asarray(Y, float)


def method_ours(Y: np.ndarray, X: np.ndarray, A: np.ndarray, X_A: np.ndarray, r: int,
                **_: Any) -> dict[str, Any]:
    """causarray: fit_gcate (true r) then LFC(Y, [X|U], A, [X_A|U], offset=log sf)."""
    from causarray.dr import LFC
    from causarray.gcate import fit_gcate

    a, p = A.shape[1], Y.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, res_2 = fit_gcate(Y, X, A, r, kwargs_es_1=ES, kwargs_es_2=ES)
        U = res_2["U"]
        offset = np.log(res_2["kwargs_glm"]["size_factor"])
        df, _ = LFC(Y, np.hstack([X, U]), pd.DataFrame(A, columns=[f"T{k}" for k in range(a)]),
                    np.hstack([X_A, U]), offset=offset)
    return _from_frame(df, a, p)


def _from_frame(df: pd.DataFrame, a: int, p: int) -> dict[str, Any]:
    """(a, p) arrays of tau, pvalue, padj from a stacked LFC result table."""
    if len(df) != a * p:
        raise ValueError(f"LFC result has {len(df)} rows, expected {a} x {p}")
    return {k: df[k].to_numpy(dtype=float).reshape(a, p) for k in ("tau", "pvalue", "padj")}


def method_glm(Y: np.ndarray, X: np.ndarray, A: np.ndarray, size_factor: np.ndarray,
               U: np.ndarray | None = None, nb_size: np.ndarray | None = None,
               **_: Any) -> dict[str, Any]:
    """Per-gene NB GLM on [X | U | A] with log size-factor offsets; Wald z, normal p, BH.

    ``nb_size``: known NB sizes per gene (default: method-of-moments estimates).
    """
    from causarray.glm import fit_glm
    from causarray.inference import t_pvalues

    D = X if U is None else np.hstack([X, U])
    fit = fit_glm(Y, D, A, family="nb", size=nb_size, offset=np.log(size_factor))
    coef = fit.coef[:, D.shape[1]:].T
    se = fit.se[:, D.shape[1]:].T
    with np.errstate(divide="ignore", invalid="ignore"):
        z = coef / se
    z = np.where(np.isfinite(z), z, np.nan)
    pval = t_pvalues(z)
    return {"tau": coef, "pvalue": pval, "padj": bh_per_row(pval)}


def method_wilcoxon(Y: np.ndarray, A: np.ndarray, size_factor: np.ndarray,
                    **_: Any) -> dict[str, Any]:
    """Rank-sum test of each perturbation vs controls on size-factor-normalised counts."""
    from scipy.stats import mannwhitneyu

    Yn = Y / size_factor[:, None]
    ctrl = A.sum(axis=1) == 0
    taus, pvals = [], []
    for k in range(A.shape[1]):
        treated = A[:, k] == 1
        with np.errstate(divide="ignore", invalid="ignore"):
            res = mannwhitneyu(Yn[treated], Yn[ctrl], axis=0, alternative="two-sided")
        pvals.append(np.asarray(res.pvalue, float))
        taus.append(log_mean_ratio(Yn, treated, ctrl))
    pval = np.vstack(pvals)
    return {"tau": np.vstack(taus), "pvalue": pval, "padj": bh_per_row(pval)}


def method_upstream(Y, X: np.ndarray, A: np.ndarray, X_A: np.ndarray, r: int, tag: str,
                    timeout: float | None = None, **_: Any) -> dict[str, Any]:
    """causarray 0.1.1 (fit_gcate then LFC) in its own venv on the same data."""
    from upstream import run_upstream

    npz = save_npz_problem(SCRATCH / f"{tag}.npz", Y, X, A, X_A)
    res = run_upstream(npz, "both", r, max_iters=ES["max_iters"], rel_tol=ES["rel_tol"],
                       timeout=timeout)
    if res.get("status") != "ok":
        raise RuntimeError(f"upstream {res.get('status')}: {res.get('error')}; "
                           f"{(res.get('log_tail') or '')[-600:]}")
    df = pd.read_csv(res["lfc_path"])
    out = _from_frame(df, A.shape[1], Y.shape[1])
    out["upstream_wall_s"] = res.get("wall_s")
    out["upstream_peak_rss_mb"] = res.get("peak_rss_mb_wait4")
    return out


def run_method(name: str, fn: Callable[..., dict[str, Any]], **kw: Any) -> dict[str, Any]:
    """Call one method, timing it; failures come back as ``status`` instead of raising."""
    t0 = time.perf_counter()
    try:
        out = fn(**kw)
        out["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - recorded in the report
        out = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]}
    out["time_s"] = time.perf_counter() - t0
    print(f"    {name}: {out['status']} in {out['time_s']:.1f} s", flush=True)
    return out


def run_methods(Y, X, A, X_A, r: int, tag: str, methods: tuple[str, ...],
                U_true: np.ndarray | None = None, s_true: np.ndarray | None = None,
                size_true: np.ndarray | None = None, upstream_timeout: float | None = None
                ) -> dict[str, dict[str, Any]]:
    """Run the requested methods on one data set; returns name -> result dict."""
    from causarray.preprocessing import comp_size_factor

    Yd = _dense(Y)
    sf = comp_size_factor(Yd)
    out: dict[str, dict[str, Any]] = {}
    for name in methods:
        if name == OURS:
            out[name] = run_method(name, method_ours, Y=Yd, X=X, A=A, X_A=X_A, r=r)
        elif name == UPSTREAM:
            out[name] = run_method(name, method_upstream, Y=Y, X=X, A=A, X_A=X_A, r=r, tag=tag,
                                   timeout=upstream_timeout)
        elif name == NAIVE:
            out[name] = run_method(name, method_glm, Y=Yd, X=X, A=A, size_factor=sf)
        elif name == ORACLE and U_true is not None:
            out[name] = run_method(name, method_glm, Y=Yd, X=X, A=A, size_factor=sf, U=U_true)
        elif name == ORACLE_S and U_true is not None and s_true is not None:
            out[name] = run_method(name, method_glm, Y=Yd, X=X, A=A, size_factor=s_true,
                                   U=U_true, nb_size=size_true)
        elif name == WILCOXON:
            out[name] = run_method(name, method_wilcoxon, Y=Yd, A=A, size_factor=sf)
    return out


# ----------------------------------------------------------------------------------
# simulations
# ----------------------------------------------------------------------------------
def simulated_screen(sim: dict[str, Any], seed: int, null: bool) -> dict[str, Any]:
    """Simulate, prepare with ``prep_causarray_data`` and return arrays plus the truth."""
    from causarray.preprocessing import prep_causarray_data
    from causarray.simulate import design_from_simulation, simulate_screen

    ad = simulate_screen(**sim, null=null, random_state=seed)
    Y, _, A = design_from_simulation(ad)
    keep = Y.sum(axis=0) > 0
    Y, A, X, X_A = prep_causarray_data(Y[:, keep], A)
    truth = np.asarray(ad.varm["true_lfc"], float)[keep].T          # (a, p)
    return {"Y": np.asarray(Y, float), "A": np.asarray(A, float), "X": X, "X_A": X_A,
            "U_true": np.asarray(ad.obsm["U_true"], float), "truth": truth, "r": sim["r"],
            "s_true": ad.obs["size_factor_true"].to_numpy(dtype=float),
            "size_true": ad.var["size_true"].to_numpy(dtype=float)[keep]}


def simulation_metrics(res: dict[str, Any], truth: np.ndarray, null: bool) -> dict[str, Any]:
    """Metrics of one method on one simulated screen."""
    if res.get("status") != "ok":
        return {k: res.get(k) for k in ("status", "error", "time_s")}
    nonnull = truth != 0
    m: dict[str, Any] = {"status": "ok", "time_s": res["time_s"],
                         "ks_null": ks_uniform(res["pvalue"][~nonnull])}
    called = np.nan_to_num(res["padj"], nan=1.0) < 0.05
    m["share_padj_0.05"] = float(called.mean())
    m["n_padj_0.05"] = int(called.sum())
    if not null:
        for q in QS:
            fp = fdr_power(res["padj"], nonnull, q)
            m[f"fdr_{q}"], m[f"power_{q}"], m[f"n_rej_{q}"] = fp["fdr"], fp["power"], fp["n_rej"]
        m["tau_corr"] = effect_correlation(res["tau"], truth, nonnull)
        m["tau_spearman"] = effect_correlation(res["tau"], truth, nonnull, "spearman")
        m["n_tau_diverged"] = int((np.abs(res["tau"][nonnull]) >= 10).sum())
    for k in ("upstream_wall_s", "upstream_peak_rss_mb"):
        if k in res:
            m[k] = res[k]
    return m


# ----------------------------------------------------------------------------------
# real data
# ----------------------------------------------------------------------------------
def real_screen(name: str) -> dict[str, Any]:
    """(Y DataFrame, A, X, X_A) of a bundled screen through ``from_anndata``."""
    from causarray.datasets import load_dataset
    from causarray.preprocessing import from_anndata

    ad = load_dataset(name)
    cov = ("bio_rep",) if name == "papalexi2021" else ()
    Y, A, X, X_A = from_anndata(ad, covariates=cov, as_dataframe=True)
    return {"adata": ad, "Y": Y, "A": A, "X": X, "X_A": X_A}


def own_gene_effects(res: dict[str, Any], trts: list[str], genes: list[str],
                     pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """tau, padj and 'down' (tau < 0 and padj < 0.05) of (perturbation, gene) pairs."""
    out = {}
    for trt, gene in pairs:
        k, j = trts.index(trt), genes.index(gene)
        tau, padj = float(res["tau"][k, j]), float(res["padj"][k, j])
        out[f"{trt}->{gene}"] = {"tau": tau, "padj": padj,
                                 "down": bool(tau < 0 and np.nan_to_num(padj, nan=1.0) < 0.05)}
    return out


def positive_controls(name: str, methods: tuple[str, ...], r: int,
                      upstream_timeout: float | None, cache: Cache) -> dict[str, Any]:
    """Own-gene knock-down of the positive-control targets of one real screen."""
    data = real_screen(name)
    Y, A = data["Y"], data["A"]
    trts, genes = [str(c) for c in A.columns], [str(c) for c in Y.columns]
    targets = [g for g in data["adata"].uns["positive_control_genes"] if g in trts and g in genes]
    pairs = [(t, t) for t in targets]
    if name.startswith("schraivogel"):
        pairs.append(("HS2", "HBE1"))
    key_base = f"real|{name}|r{r}"
    todo = tuple(m for m in methods if m not in SIM_ONLY and cache.get(f"{key_base}|{m}") is None)
    print(f"  real {name}: {Y.shape[0]} cells x {Y.shape[1]} genes, {len(trts)} perturbations",
          flush=True)
    fresh = run_methods(Y, data["X"], A.to_numpy(float), data["X_A"], r, tag=f"real_{name}",
                        methods=todo, upstream_timeout=upstream_timeout)
    out = {}
    for m in methods:
        if m in SIM_ONLY:
            continue
        if m in fresh:
            res = fresh[m]
            if res["status"] == "ok":
                eff = own_gene_effects(res, trts, genes, pairs)
                own = {k: v for k, v in eff.items() if not k.startswith("HS2->")}
                entry = {"status": "ok", "time_s": res["time_s"], "pairs": eff,
                         "n_targets": len(own),
                         "n_targets_down": int(sum(v["down"] for v in own.values())),
                         "n_padj_0.05": int((np.nan_to_num(res["padj"], nan=1.0) < 0.05).sum()),
                         "n_pairs": int(res["padj"].size)}
            else:
                entry = {k: res.get(k) for k in ("status", "error", "time_s")}
            cache.put(f"{key_base}|{m}", entry)
        out[m] = cache.get(f"{key_base}|{m}")
    return {"targets": targets, "methods": out}


def negative_control(methods: tuple[str, ...], r: int, upstream_timeout: float | None,
                     cache: Cache, n_groups: int = 10, group_size: int = 300,
                     seed: int = 0) -> dict[str, Any]:
    """Fake perturbations cut at random from the Schraivogel non-targeting cells."""
    from causarray.datasets import load_dataset
    from causarray.preprocessing import prep_causarray_data

    ad = load_dataset("schraivogel2020_groundtruth")
    ctrl = np.flatnonzero(ad.obs[ad.uns["pert_col"]].astype(str).to_numpy()
                          == ad.uns["ctrl_label"])
    rng = np.random.default_rng(seed)
    pick = rng.permutation(ctrl)[: n_groups * group_size].reshape(n_groups, group_size)
    group = np.full(ad.n_obs, -1)
    for g in range(n_groups):
        group[pick[g]] = g
    Ysub = ad.X[ctrl]
    gsub = group[ctrl]
    A = np.zeros((ctrl.size, n_groups))
    A[gsub >= 0, gsub[gsub >= 0]] = 1.0
    Yd = pd.DataFrame(Ysub.toarray().astype(float), columns=[str(v) for v in ad.var_names])
    keep = Yd.sum(axis=0).to_numpy() > 0
    Y, A, X, X_A = prep_causarray_data(Yd.loc[:, keep], A)
    key_base = f"negctrl|r{r}|seed{seed}"
    todo = tuple(m for m in methods if m not in SIM_ONLY and cache.get(f"{key_base}|{m}") is None)
    print(f"  negative control: {Y.shape[0]} cells, {n_groups} fake groups of {group_size}",
          flush=True)
    fresh = run_methods(Y, X, np.asarray(A, float), X_A, r, tag="negative_control",
                        methods=todo, upstream_timeout=upstream_timeout)
    out = {}
    for m in methods:
        if m in SIM_ONLY:
            continue
        if m in fresh:
            res = fresh[m]
            if res["status"] == "ok":
                called = np.nan_to_num(res["padj"], nan=1.0) < 0.05
                entry = {"status": "ok", "time_s": res["time_s"],
                         "n_padj_0.05": int(called.sum()), "n_pairs": int(called.size),
                         "ks": ks_uniform(res["pvalue"].ravel())}
            else:
                entry = {k: res.get(k) for k in ("status", "error", "time_s")}
            cache.put(f"{key_base}|{m}", entry)
        out[m] = cache.get(f"{key_base}|{m}")
    return {"n_cells": int(Y.shape[0]), "n_genes": int(Y.shape[1]), "n_groups": n_groups,
            "group_size": group_size, "methods": out}


# ----------------------------------------------------------------------------------
# cache of per-dataset metrics (so a long run can be resumed)
# ----------------------------------------------------------------------------------
class Cache:
    """JSON file of metric dicts keyed by data set and method."""

    def __init__(self, path: Path, use: bool, stamp: dict[str, Any] | None = None) -> None:
        self.path = path
        self.stamp = stamp or {}
        self.data: dict[str, Any] = {}
        if use and path.exists():
            self.data = json.loads(path.read_text())
        elif path.exists():
            path.unlink()

    def get(self, key: str) -> Any:
        v = self.data.get(key)
        return v if v is None or v.get("status") == "ok" else None

    def drop_methods(self, methods) -> None:
        """Forget the cached results of ``methods`` (keys end in ``|method``)."""
        ends = tuple(f"|{m}" for m in methods)
        if ends:
            self.data = {k: v for k, v in self.data.items() if not k.endswith(ends)}

    def get_any(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.data[key] = to_jsonable({**value, "code": self.stamp,
                                      "date": time.strftime("%Y-%m-%d %H:%M:%S")})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def run_simulations(mode: str, methods: tuple[str, ...], upstream_timeout: float | None,
                    cache: Cache, seeds=None, null_seeds=None) -> dict[str, list]:
    """All simulated screens of a mode; returns {'confounded': [...], 'null': [...]}."""
    cfg = MODES[mode]
    out: dict[str, list] = {"confounded": [], "null": []}
    for kind, seed_list in (("confounded", seeds or cfg["seeds"]),
                            ("null", null_seeds or cfg["null_seeds"])):
        for seed in seed_list:
            null = kind == "null"
            key_base = f"sim|{mode}|{kind}|{seed}"
            todo = tuple(m for m in methods if cache.get(f"{key_base}|{m}") is None)
            print(f"  {kind} seed {seed}: {len(todo)} method(s) to run", flush=True)
            if todo:
                d = simulated_screen(cfg["sim"], seed, null)
                fresh = run_methods(d["Y"], d["X"], d["A"], d["X_A"], d["r"],
                                    tag=f"sim_{mode}_{kind}_{seed}", methods=todo,
                                    U_true=d["U_true"], s_true=d["s_true"],
                                    size_true=d["size_true"],
                                    upstream_timeout=upstream_timeout)
                for m, res in fresh.items():
                    cache.put(f"{key_base}|{m}", simulation_metrics(res, d["truth"], null))
            out[kind].append({"seed": seed, "methods": {
                m: cache.get_any(f"{key_base}|{m}") for m in methods}})
    return out


# ----------------------------------------------------------------------------------
# summary, figure, markdown
# ----------------------------------------------------------------------------------
def _mean_sd(vals: list[float]) -> tuple[float, float]:
    v = np.array([x for x in vals if x is not None and np.isfinite(x)], float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def summarise(sims: dict[str, list], methods: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per method: means (and SDs) over seeds of each metric."""
    rows = []
    for m in methods:
        conf = [s["methods"].get(m) for s in sims["confounded"]]
        conf = [c for c in conf if c and c.get("status") == "ok"]
        null = [s["methods"].get(m) for s in sims["null"]]
        null = [c for c in null if c and c.get("status") == "ok"]
        row: dict[str, Any] = {"method": m, "n_seeds": len(conf), "n_null_seeds": len(null)}
        for key in ("fdr_0.05", "power_0.05", "fdr_0.1", "power_0.1", "tau_corr",
                    "tau_spearman", "ks_null", "time_s"):
            row[key], row[key + "_sd"] = _mean_sd([c.get(key) for c in conf])
        row["null_share_padj_0.05"], row["null_share_padj_0.05_sd"] = _mean_sd(
            [c.get("share_padj_0.05") for c in null])
        row["null_ks"], row["null_ks_sd"] = _mean_sd([c.get("ks_null") for c in null])
        rows.append(row)
    return rows


def plot_summary(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """FDR and power bars (q = 0.05 and 0.1) per method, SD over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["n_seeds"] > 0]
    names = [r["method"] for r in rows]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, metric in zip(axes[:2], ("fdr", "power")):
        for i, (q, color) in enumerate(zip(QS, ("#4c72b0", "#dd8452"))):
            vals = [r[f"{metric}_{q}"] for r in rows]
            err = [r[f"{metric}_{q}_sd"] for r in rows]
            err = [e if np.isfinite(e) else 0.0 for e in err]
            ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, yerr=err, capsize=3, color=color,
                   label=f"q = {q}")
            if metric == "fdr":
                ax.axhline(q, color=color, ls="--", lw=1)
        ax.set_xticks(x, names, rotation=25, ha="right")
        ax.set_ylabel("empirical FDR" if metric == "fdr" else "power")
        ax.set_ylim(0, 1.15)
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.legend(frameon=False, loc="upper left", ncol=2)
    nrows = [r for r in rows if r["n_null_seeds"] > 0]
    ax = axes[2]
    xn = np.arange(len(nrows))
    shares = [100 * r["null_share_padj_0.05"] for r in nrows]
    ax.bar(xn, shares,
           yerr=[100 * np.nan_to_num(r["null_share_padj_0.05_sd"]) for r in nrows], capsize=3,
           color="#55a868")
    for xi, v in zip(xn, shares):
        ax.annotate(f"{v:.2f}%", (xi, v), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)
    ax.set_xticks(xn, [r["method"] for r in nrows], rotation=25, ha="right")
    ax.set_ylabel("% of pairs with padj < 0.05 (null screens)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _f(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown_report(result: dict[str, Any], fig_name: str) -> str:
    """Human-readable report of the JSON result."""
    cfg = result["config"]
    sim = cfg["sim"]
    L = [f"# Accuracy report ({cfg['mode']} mode)", "",
         (f"Simulated screens: {sim['n_ctrl']} controls + {sim['n_perts']} perturbations x "
         f"{sim['cells_per_pert']} cells, {sim['n_genes']} genes, {sim['r']} latent confounders "
         f"whose mean shifts with the perturbation (confounding = {sim['confounding']}); "
         f"confounded seeds {list(cfg['seeds'])}, null seeds {list(cfg['null_seeds'])}. "
         f"Means over seeds (SD in parentheses). FDR and power pool all (perturbation, gene) "
         f"pairs of a screen; BH is applied per perturbation."), "",
         f"![FDR and power]({fig_name})", "",
         ("| method | FDR q=0.05 | power q=0.05 | FDR q=0.1 | power q=0.1 | corr(tau, truth) "
         "| Spearman(tau, truth) | KS null p | null: % pairs padj<0.05 | null KS | time s |"),
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["summary"]:
        if r["n_seeds"] == 0 and r["n_null_seeds"] == 0:
            L.append(f"| {r['method']} | not run / failed | | | | | | | | | |")
            continue
        def with_sd(key: str, r: dict[str, Any] = r) -> str:
            sd = r.get(key + "_sd")
            ok = isinstance(sd, float) and np.isfinite(sd)
            return _f(r[key]) + (f" ({_f(sd)})" if ok else "")

        L.append("| " + " | ".join([
            r["method"], with_sd("fdr_0.05"), with_sd("power_0.05"), with_sd("fdr_0.1"),
            with_sd("power_0.1"),
            _f(r["tau_corr"]), _f(r["tau_spearman"]), _f(r["ks_null"]),
            _f(100 * r["null_share_padj_0.05"]
               if isinstance(r["null_share_padj_0.05"], float) else None, 2),
            _f(r["null_ks"]), _f(r["time_s"], 1)]) + " |")
    L += ["", ("corr(tau, truth): Pearson over the non-null pairs (natural-log effects); the "
          "NB GLMs' coefficients diverge (to about -30) for genes without counts under a "
          "perturbation, which drags their Pearson correlation down; Spearman is robust to that. "
          "KS null p: Kolmogorov-Smirnov distance of the null pairs' p-values from U(0, 1). "
          "Time: seconds per screen on a shared, loaded 2-core machine (causarray 0.1.1 "
          "includes its interpreter start and numba compilation).")]
    fails = []
    for kind in ("confounded", "null"):
        for s in result["simulations"][kind]:
            for m, v in s["methods"].items():
                if v and v.get("status") != "ok":
                    fails.append(f"- {kind} seed {s['seed']}, {m}: {v.get('status')} "
                                 f"({str(v.get('error'))[:200]})")
    if fails:
        L += ["", "Failed runs:", *fails]
    real = result.get("real")
    if real:
        L += ["", "## Real data", "",
              f"causarray and causarray 0.1.1 with r = {cfg['real_r']} latent factors.", ""]
        for name, title in (("schraivogel2020_groundtruth", ("Schraivogel 2020 (TAP-seq, "
                                                               "CRISPRi, K562)")),
                            ("papalexi2021", "Papalexi 2021 (ECCITE-seq, KO, THP-1)")):
            if name not in real:
                continue
            rr = real[name]
            L += [f"### {title}", "",
                  f"Targets that are also measured genes: {', '.join(rr['targets'])}.", "",
                  "| method | own gene down (tau<0, padj<0.05) | "
                  + ("HS2 -> HBE1 (tau, padj) | " if name.startswith("schraivogel") else "")
                  + ("STAT1 (tau, padj) | JAK2 (tau, padj) | " if name == "papalexi2021" else "")
                  + "pairs padj<0.05 |",
                  "|---|---|" + ("---|" if name.startswith("schraivogel") else "")
                  + ("---|---|" if name == "papalexi2021" else "") + "---|"]
            for m, v in rr["methods"].items():
                if not v or v.get("status") != "ok":
                    L.append(f"| {m} | {(v or {}).get('status', 'not run')}: "
                             f"{str((v or {}).get('error', ''))[:120]} |")
                    continue
                cells = [m, f"{v['n_targets_down']} / {v['n_targets']}"]
                wanted = (["HS2->HBE1"] if name.startswith("schraivogel")
                          else ["STAT1->STAT1", "JAK2->JAK2"])
                for key in wanted:
                    e = v["pairs"].get(key)
                    cells.append("–" if e is None else
                                 f"{e['tau']:.2f}, {e['padj']:.2g}{' (down)' if e['down'] else ''}")
                cells.append(f"{v['n_padj_0.05']} / {v['n_pairs']}")
                L.append("| " + " | ".join(cells) + " |")
            missed = {m: [k for k, e in v["pairs"].items() if not e["down"]]
                      for m, v in rr["methods"].items() if v and v.get("status") == "ok"}
            L += ["", "Pairs not called down: " + "; ".join(
                f"{m}: {', '.join(ks) if ks else 'none'}" for m, ks in missed.items()), ""]
        if "negative_control" in real:
            nc = real["negative_control"]
            L += ["### Negative control", "",
                  (f"{nc['n_groups']} fake perturbations of {nc['group_size']} cells cut at random "
                  f"from the Schraivogel non-targeting cells ({nc['n_cells']} cells, "
                  f"{nc['n_genes']} genes); the other non-targeting cells are the controls."), "",
                  "| method | discoveries padj<0.05 | KS of p-values |", "|---|---|---|"]
            for m, v in nc["methods"].items():
                if not v or v.get("status") != "ok":
                    L.append(f"| {m} | {(v or {}).get('status', 'not run')} | |")
                else:
                    L.append(f"| {m} | {v['n_padj_0.05']} / {v['n_pairs']} | {_f(v['ks'])} |")
    L += ["", (f"_Generated by `benchmarks/accuracy.py{' --quick' if cfg['mode'] == 'quick' else ''}`"
          f" on {time.strftime('%Y-%m-%d')}._"), ""]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small screens, one seed of each kind")
    ap.add_argument("--skip-upstream", action="store_true", help="do not run causarray 0.1.1")
    ap.add_argument("--no-real", action="store_true", help="simulations only")
    ap.add_argument("--no-sim", action="store_true", help="real data only")
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="confounded seeds")
    ap.add_argument("--null-seeds", type=int, nargs="*", default=None, help="null seeds")
    ap.add_argument("--real-r", type=int, default=2, help="r for the real screens")
    ap.add_argument("--upstream-timeout", type=float, default=3600.0,
                    help="seconds per causarray 0.1.1 run")
    ap.add_argument("--resume", action="store_true",
                    help="reuse per-dataset results cached by a previous (interrupted) run")
    ap.add_argument("--rerun", nargs="*", default=(), metavar="METHOD",
                    help="with --resume: methods whose cached results are dropped and "
                         "recomputed (e.g. --rerun causarray after a change of our code; "
                         "the other methods' cached results are reused)")
    args = ap.parse_args(argv)

    mode = "quick" if args.quick else "full"
    methods = tuple(m for m in METHODS if not (args.skip_upstream and m == UPSTREAM))
    SCRATCH.mkdir(parents=True, exist_ok=True)
    version = code_version()
    cache = Cache(SCRATCH / f"cache_{mode}.json", use=args.resume, stamp=version)
    real_cache = (Cache(SCRATCH / "cache_real.json", use=args.resume, stamp=version)
                  if not args.no_real else None)
    unknown = set(args.rerun) - set(METHODS)
    if unknown:
        ap.error(f"unknown method(s) for --rerun: {sorted(unknown)}; choose from {list(METHODS)}")
    for c in (cache, real_cache):
        if c is not None:
            c.drop_methods(args.rerun)
    cfg = MODES[mode]
    seeds = tuple(args.seeds) if args.seeds else cfg["seeds"]
    null_seeds = tuple(args.null_seeds) if args.null_seeds else cfg["null_seeds"]
    t0 = time.perf_counter()
    sims: dict[str, list] = {"confounded": [], "null": []}
    if not args.no_sim:
        print(f"[accuracy] simulations ({mode})", flush=True)
        sims = run_simulations(mode, methods, args.upstream_timeout, cache, seeds, null_seeds)
    real: dict[str, Any] = {}
    if not args.no_real:
        print("[accuracy] real data", flush=True)
        for name in ("schraivogel2020_groundtruth", "papalexi2021"):
            real[name] = positive_controls(name, methods, args.real_r, args.upstream_timeout,
                                           real_cache)
        real["negative_control"] = negative_control(methods, args.real_r,
                                                    args.upstream_timeout, real_cache)
    summary = summarise(sims, methods)
    stem = "accuracy_quick" if args.quick else "accuracy"
    result = {
        "config": {"mode": mode, "sim": cfg["sim"], "seeds": seeds, "null_seeds": null_seeds,
                   "methods": methods, "real_r": args.real_r, "gcate_early_stopping": ES,
                   "upstream_timeout_s": args.upstream_timeout,
                   "code_at_start": version},
        "rows": [{k: v for k, v in r.items() if not k.endswith("_sd")} for r in summary],
        "summary": summary, "simulations": sims, "real": real,
        "total_time_s": time.perf_counter() - t0,
    }
    write_result(stem, result)
    if any(r["n_seeds"] for r in summary):
        plot_summary(summary, RESULTS_DIR / f"{stem}.png",
                     f"{sim_title(cfg['sim'])}: mean over {len(seeds)} seed(s)")
    (RESULTS_DIR / f"{stem}.md").write_text(markdown_report(to_jsonable(result), f"{stem}.png"))
    print(f"[accuracy] done in {time.perf_counter() - t0:.0f} s -> {RESULTS_DIR / stem}.md",
          flush=True)
    return 0


def sim_title(sim: dict[str, Any]) -> str:
    """Short description of a simulation configuration for the figure title."""
    return (f"{sim['n_ctrl']} ctrl + {sim['n_perts']} x {sim['cells_per_pert']} cells, "
            f"{sim['n_genes']} genes, r = {sim['r']}")


if __name__ == "__main__":
    sys.exit(main())
