"""Benchmark: the count-GLM engine against a per-gene statsmodels loop.

Problem (the tutorial batch's design at a smaller size): 4,000 cells x 2,000 genes simulated by ``causarray.simulate``,
design = intercept + 15 one-hot perturbations,
offsets = log size factors (docs/math.md#size-factors),
NB GLM with the dispersion estimated by the recipe of docs/math.md#nb-dispersion:
Poisson fit -> method-of-moments alpha -> NB fit -> MoM alpha -> final NB fit.

* **ours**: ``causarray.glm.fit_glm(Y, X, A, family='nb', size=None, offset=...)``
  on the sparse counts (as the pipeline holds them).
* **statsmodels**: for each gene, ``sm.GLM(..., Poisson)`` -> MoM -> ``sm.GLM(...,
  NegativeBinomial(alpha))`` -> MoM -> ``sm.GLM(..., NegativeBinomial(alpha))``, the same
  recipe with every fit run to statsmodels' own convergence.  BLAS is limited to one
  thread inside the loop (its fastest setting for these small per-gene problems; on a
  shared machine more threads made it several times slower).  By default the loop runs
  on an evenly spaced subsample of genes and its time is extrapolated linearly to all
  genes (``--sm-genes 0`` runs all of them).

Also timed: the dense-covariate path used inside GCATE and the LFC outcome model,
``fit_glm(Y, [1 | U30], A15, size=fixed)`` on 4,000 cells x ``--gcate-genes`` genes.

Reported: wall and CPU time, peak RSS increase during the fit (and as a multiple of the
dense float64 count matrix), max |coefficient difference| and max relative size
difference over genes converged in both.  Writes ``benchmarks/results/glm.json`` and
``glm.md``.

Run::

    .venv/bin/python benchmarks/glm.py               # default: 200-gene statsmodels sample
    .venv/bin/python benchmarks/glm.py --sm-genes 0  # full statsmodels loop (minutes)
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import measure, write_result


def make_problem(n_genes: int, random_state: int = 0):
    """Counts (CSR), intercept, one-hot A (15 perturbations), log size factors, true U."""
    from causarray.preprocessing import comp_size_factor
    from causarray.simulate import simulate_screen

    adata = simulate_screen(n_ctrl=1000, n_perts=15, cells_per_pert=200, n_genes=n_genes,
                            r=5, random_state=random_state)
    Y = adata.X.tocsr().astype(np.float64)
    labels = adata.obs[adata.uns["pert_col"]].to_numpy()
    A = np.stack([(labels == k).astype(float) for k in adata.uns["perturbations"]], axis=1)
    X = np.ones((Y.shape[0], 1))
    log_s = np.log(comp_size_factor(Y))
    return Y, X, A, log_s, np.asarray(adata.obsm["U_true"]), np.asarray(adata.var["size_true"])


def mom_alpha(y: np.ndarray, mu: np.ndarray, dof: int) -> float:
    """MoM alpha for one gene, clipped to [1e-8, 100], non-finite -> 1e-8.

    See docs/math.md#nb-dispersion.
    """
    a = np.sum(((y - mu) ** 2 - y) / np.maximum(mu * mu, 1e-10)) / max(dof, 1)
    a = float(np.clip(a, 1e-8, 1e6)) if np.isfinite(a) else 1e-8
    return float(np.clip(a, 1e-8, 100.0))


def statsmodels_gene(y: np.ndarray, D: np.ndarray, offset: np.ndarray):
    """The dispersion recipe with statsmodels for one gene: (params, alpha, converged)."""
    import statsmodels.api as sm

    dof = D.shape[0] - D.shape[1]
    pois = sm.GLM(y, D, family=sm.families.Poisson(), offset=offset).fit()
    a0 = mom_alpha(y, pois.mu, dof)
    nb1 = sm.GLM(y, D, family=sm.families.NegativeBinomial(alpha=a0), offset=offset).fit(
        start_params=pois.params)
    a1 = mom_alpha(y, nb1.mu, dof)
    nb2 = sm.GLM(y, D, family=sm.families.NegativeBinomial(alpha=a1), offset=offset).fit(
        start_params=nb1.params)
    return nb2.params, a1, bool(nb2.converged)


def run_statsmodels(Y, X, A, log_s, genes: np.ndarray):
    from threadpoolctl import threadpool_limits

    D = np.hstack([X, A])
    coef = np.full((genes.size, D.shape[1]), np.nan)
    alpha = np.full(genes.size, np.nan)
    conv = np.zeros(genes.size, bool)
    Yc = Y[:, genes].toarray()
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(genes.size):
            y = Yc[:, i]
            if not y.any():
                continue
            try:
                coef[i], alpha[i], conv[i] = statsmodels_gene(y, D, log_s)
            except Exception:  # noqa: BLE001 - a failed gene is reported as unconverged
                conv[i] = False
    return coef, alpha, conv


def timed_fit(fit_glm, args, kwargs, repeats: int, threads: int | None):
    """Median wall / CPU time and the largest peak-RSS increase of ``repeats`` fits.

    ``threads``: BLAS thread limit during the fits (None = library default).
    """
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    walls, cpus, peaks = [], [], []
    fit = None
    limit = nullcontext() if threads is None else threadpool_limits(threads, user_api="blas")
    with limit:
        for _ in range(repeats):
            c0 = time.process_time()
            with measure() as m:
                fit = fit_glm(*args, **kwargs)
            cpus.append(time.process_time() - c0)
            walls.append(m.wall_s)
            peaks.append(m.peak_rss_delta_mb)
    return fit, {"blas_threads": "default" if threads is None else threads,
                 "wall_s": float(np.median(walls)), "wall_min_s": min(walls),
                 "cpu_s": float(np.median(cpus)), "peak_rss_delta_mb": max(peaks)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--sm-genes", type=int, default=200,
                    help="genes in the statsmodels loop (0 = all), time extrapolated")
    ap.add_argument("--gcate-genes", type=int, default=8563,
                    help="genes for the dense [1 | U30] + A15 timing (0 = skip)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = ap.parse_args(argv)

    from causarray.glm import fit_glm

    Y, X, A, log_s, _, _ = make_problem(args.genes)
    n, p = Y.shape
    dense_mb = n * p * 8 / 2**20
    rows = []

    # ---- ours (NB, estimated dispersion) ----------------------------------------
    ours = {}
    for threads in (None, 1):
        fit, row = timed_fit(fit_glm, (Y, X, A), {"family": "nb", "offset": log_s},
                             args.repeats, threads)
        ours[threads] = row
        rows.append({"method": "causarray fit_glm (sparse Y)", "genes": p, **row,
                     "peak_over_dense_Y": row["peak_rss_delta_mb"] / dense_mb,
                     "converged": float(fit.converged.mean()),
                     "mean_iter": float(fit.n_iter.mean())})
    ours_wall = min(r["wall_s"] for r in ours.values())
    ours_cpu = ours[1]["cpu_s"]
    peak = max(r["peak_rss_delta_mb"] for r in ours.values())

    # ---- statsmodels loop ----------------------------------------------------------
    k = p if args.sm_genes <= 0 else min(args.sm_genes, p)
    genes = np.unique(np.linspace(0, p - 1, k).round().astype(int))
    c0 = time.process_time()
    with measure() as m:
        sm_coef, sm_alpha, sm_conv = run_statsmodels(Y, X, A, log_s, genes)
    sm_cpu = time.process_time() - c0
    scale = p / genes.size
    sm_wall_full = m.wall_s * scale
    rows.append({
        "method": "statsmodels per-gene loop", "genes": int(genes.size), "blas_threads": 1,
        "wall_s": m.wall_s, "cpu_s": sm_cpu, "wall_extrapolated_s": sm_wall_full,
        "cpu_extrapolated_s": sm_cpu * scale, "peak_rss_delta_mb": m.peak_rss_delta_mb,
        "converged": float(sm_conv.mean()),
    })

    ok = sm_conv & fit.converged[genes] & np.all(np.isfinite(sm_coef), axis=1)
    ours_coef = fit.coef[genes]
    # coefficients pinned at the bound (a group without counts) diverge in statsmodels
    free = ok[:, None] & (ours_coef > -29.0)
    diff = np.abs(ours_coef - sm_coef)[free]
    rel = (diff / np.maximum(np.abs(sm_coef[free]), 1.0))
    size_rel = np.abs(fit.size[genes] * sm_alpha - 1.0)[ok]

    # ---- dense path used inside GCATE ----------------------------------------------
    gcate = {}
    if args.gcate_genes > 0:
        Yg, Xg, Ag, log_sg, U_true, size_true = make_problem(args.gcate_genes, random_state=1)
        rng = np.random.default_rng(0)
        U = np.hstack([U_true, rng.normal(size=(Yg.shape[0], 30 - U_true.shape[1]))])
        W = np.hstack([Xg, U])
        dense_g = Yg.shape[0] * Yg.shape[1] * 8 / 2**20
        for compute_se, threads in ((True, 1), (False, 1), (False, None)):
            fg, row = timed_fit(fit_glm, (Yg, W, Ag),
                                {"family": "nb", "size": size_true, "offset": log_sg,
                                 "compute_se": compute_se}, 1, threads)
            rows.append({"method": f"fit_glm [1|U30] + A15, fixed size, se={compute_se}",
                         "genes": Yg.shape[1], **row,
                         "peak_over_dense_Y": row["peak_rss_delta_mb"] / dense_g,
                         "converged": float(fg.converged.mean()),
                         "mean_iter": float(fg.n_iter.mean())})
        gcate = {"gcate_cells": Yg.shape[0], "gcate_genes": Yg.shape[1]}
        del Yg, fg

    result = dict(
        problem=f"{n} cells x {p} genes, intercept + {A.shape[1]} one-hot perturbations, "
                "NB with MoM dispersion (docs/math.md), offsets = log size factors",
        speedup_wall=sm_wall_full / ours_wall,
        speedup_cpu=(sm_cpu * scale) / ours_cpu,
        statsmodels_genes_timed=int(genes.size),
        statsmodels_extrapolated=bool(genes.size < p),
        max_abs_coef_diff=float(diff.max()) if diff.size else None,
        max_rel_coef_diff=float(rel.max()) if rel.size else None,
        max_rel_size_diff=float(size_rel.max()) if size_rel.size else None,
        genes_compared=int(ok.sum()),
        dense_Y_mb=dense_mb,
        peak_rss_over_dense_Y=peak / dense_mb,
        command="python benchmarks/glm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **gcate,
        rows=rows,
    )
    try:
        from threadpoolctl import threadpool_info

        result["blas"] = [{k: v for k, v in d.items() if k in ("internal_api", "num_threads",
                                                                  "version")}
                          for d in threadpool_info()]
    except ImportError:  # pragma: no cover
        pass
    path = write_result("glm", result, args.out)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    for r in rows:
        print(r)
    print({k: v for k, v in result.items() if k not in ("rows", "blas")})
    return result


if __name__ == "__main__":
    main()
