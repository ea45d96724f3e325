"""Propensity-score sensitivity analysis on cached nuisances (the Replogle refit).

Mirrors causarray 0.1.1's Replogle propensity tutorial (its
``cache_propensity_batch.py``): the outcome model -- the expensive part of a batch --
does not depend on the propensity design, so each batch's counterfactual predictions
are kept and ``LFC`` is re-run under several propensity specifications without
refitting it.  0.1.1 regenerated one focal batch by hand; here
``gcate_lfc_batch(..., cache_path=..., save_nuisances=True)`` writes every batch's
nuisances beside the result cache (``results.nuisances.h5``, see
:mod:`causarray.nuisances`) and :func:`causarray.load_nuisances` reads one back.

Steps, on a simulated screen (:func:`causarray.simulate_screen`; no network):

1. ``gcate_lfc_batch`` with a cache and ``save_nuisances=True``;
2. for the focal batch: rebuild its cells, ``W = [X | U]``, ``W_A = [X_A | U]`` and
   re-estimate with the stored ``Y_hat`` and propensity scores (the baseline);
3. a propensity grid: out-of-fold logistic scores (K = 5) with ``C`` = 1, 0.1, 0.01,
   the ``'ensemble'`` model (forest + logistic), a wider clip (0.05, 0.95), and the
   ``select_propensity_factors`` / ``refit_propensity_scores`` refit of poorly
   supported perturbations; for each: ``summarize_propensity_scores`` and ``LFC`` with
   ``Y_hat=`` (discoveries, SE ratio and LFC agreement against the baseline).

Usage::

    python examples/replogle_propensity_refit.py --small     # CI size, ~30 s
    python examples/replogle_propensity_refit.py --full      # 2 batches of 15 perturbations

Outputs in the working directory: ``results.h5`` (+ ``results.nuisances.h5``),
``propensity_summary.csv`` (diagnostics per setting and perturbation) and
``propensity_tuning.csv`` (one row per setting and perturbation of the focal batch).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

# full: a Replogle-sized batch layout (15 perturbations per batch, 2,000 controls)
FULL = dict(n_ctrl=2000, n_perts=30, cells_per_pert=200, n_genes=2000, r=5, batch_size=15,
            max_iters=20, focal=1)
SMALL = dict(n_ctrl=300, n_perts=8, cells_per_pert=60, n_genes=150, r=2, batch_size=4,
             max_iters=5, focal=1)
FDR = 0.05


def main(cfg: dict, workdir: Path, random_state: int = 0) -> None:
    import numpy as np
    import pandas as pd

    import causarray as ca

    t_start = time.perf_counter()
    adata = ca.simulate_screen(n_ctrl=cfg["n_ctrl"], n_perts=cfg["n_perts"],
                               cells_per_pert=cfg["cells_per_pert"], n_genes=cfg["n_genes"],
                               r=cfg["r"], random_state=random_state)
    names = list(adata.uns["perturbations"])
    labels = adata.obs[adata.uns["pert_col"]].astype(str)
    A = pd.get_dummies(labels).drop(columns=[adata.uns["ctrl_label"]])[names].astype(float)
    Y, A, X, X_A = ca.prep_causarray_data(adata.X, A)
    print(f"Screen: {Y.shape[0]:,} cells x {Y.shape[1]:,} genes, {A.shape[1]} perturbations")

    # 1. the batch pipeline, keeping the nuisances ---------------------------------
    cache = workdir / "results.h5"
    es = dict(max_iters=cfg["max_iters"])
    t0 = time.perf_counter()
    df = ca.gcate_lfc_batch(Y, X, A, cfg["r"], W_A=X_A,
                            batch_size=cfg["batch_size"], n_ctrl=cfg["n_ctrl"],
                            cache_path=cache, save_nuisances=True,
                            gcate_kwargs=dict(kwargs_es_1=es, kwargs_es_2=es))
    print(f"gcate_lfc_batch: {time.perf_counter() - t0:.1f} s, {df.shape[0]:,} rows; "
          f"nuisances in {ca.nuisances.nuisance_path(cache)} "
          f"({os.path.getsize(ca.nuisances.nuisance_path(cache)) / 1e6:.1f} MB)")

    # 2. the focal batch from its stored nuisances ----------------------------------
    b = cfg["focal"]
    nu = ca.load_nuisances(cache, b)
    rows = nu["cell_idx"]
    Yd = Y.toarray() if hasattr(Y, "toarray") else np.asarray(Y)
    gene_idx = [int(g.rsplit("_", 1)[-1]) for g in nu["gene_names"]]   # 'gene_<column>'
    Yb = pd.DataFrame(Yd[np.ix_(rows, gene_idx)], columns=nu["gene_names"])
    cols = [list(A.columns).index(t) for t in nu["pert_names"]]
    Ab = pd.DataFrame(A.to_numpy()[np.ix_(rows, cols)], columns=nu["pert_names"])
    W = np.hstack([X[rows], nu["U"]])
    W_A = np.hstack([X_A[rows], nu["U"]])
    Y_hat = nu["Y_hat"].astype(float)
    kw = dict(offset=nu["offset"], Y_hat=Y_hat, shift_variance=nu["shift_variance"],
              recenter_genes=nu["recenter_genes"])
    base, _ = ca.LFC(Yb, W, Ab, W_A, pi_hat=nu["pi_hat_raw"].astype(float), **kw)
    print(f"Focal batch {b}: {Yb.shape[0]:,} cells x {Yb.shape[1]:,} genes, "
          f"perturbations {nu['pert_names']}")

    # 3. the propensity grid --------------------------------------------------------
    cov = ["intercept", "log_libsize"] + [f"U{k + 1}" for k in range(nu["U"].shape[1])]
    settings = [("stored (in-sample, calibrated)", nu["pi_hat_raw"].astype(float), "auto")]
    for C in (1.0, 0.1, 0.01):
        settings.append((f"OOF logistic C={C:g}",
                         ca.estimate_propensity_scores(Ab, W_A, K=5, C=C,
                                                       random_state=random_state), "auto"))
    settings.append(("OOF logistic C=1, clip (0.05, 0.95)", settings[1][1], (0.05, 0.95)))
    settings.append(("ensemble (forest + logistic)",
                     ca.estimate_propensity_scores(Ab, W_A, ps_model="ensemble",
                                                   random_state=random_state), "auto"))
    drop, _ = ca.select_propensity_factors(Ab, W_A, candidates=cov[2:], covariate_names=cov,
                                           pi_hat=nu["pi_hat_raw"].astype(float))
    refit, _ = ca.refit_propensity_scores(Ab, W_A, drop, pi_hat=nu["pi_hat_raw"].astype(float),
                                          covariate_names=cov)
    print(f"select_propensity_factors drops: {drop}")
    settings.append((f"refit ({len(drop)} perturbations, select_propensity_factors)",
                     refit, "auto"))

    summaries, tuning = [], []
    ref = base.set_index(["trt", "gene_names"])
    for label, pi, clip in settings:
        t0 = time.perf_counter()
        res, est = ca.LFC(Yb, W, Ab, W_A, pi_hat=pi, ps_clip=clip, **kw)
        summ = ca.summarize_propensity_scores(Ab, est["pi_hat"], clip_bounds=None)
        summaries.append(summ.assign(setting=label))
        cur = res.set_index(["trt", "gene_names"])
        for t in nu["pert_names"]:
            c, r0 = cur.loc[t], ref.loc[t]
            ok = np.isfinite(c["std"]) & np.isfinite(r0["std"])
            tuning.append(dict(
                setting=label, treatment=t,
                discoveries=int((c["padj"] < FDR).sum()),
                baseline_discoveries=int((r0["padj"] < FDR).sum()),
                median_std_ratio=float(np.median(c["std"][ok] / r0["std"][ok])),
                tau_pearson_vs_baseline=float(np.corrcoef(c["tau"][ok], r0["tau"][ok])[0, 1]),
                seconds=round(time.perf_counter() - t0, 2)))
    tuning = pd.DataFrame(tuning)
    pd.concat(summaries).to_csv(workdir / "propensity_summary.csv", index=False)
    tuning.to_csv(workdir / "propensity_tuning.csv", index=False)
    print(tuning.groupby("setting", sort=False)[["discoveries", "median_std_ratio",
                                                 "tau_pearson_vs_baseline"]]
          .agg({"discoveries": "sum", "median_std_ratio": "median",
                "tau_pearson_vs_baseline": "min"}).to_string())
    print(f"Settings evaluated: {len(settings)}")
    print(f"Total wall time: {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="CI size (default)")
    size.add_argument("--full", action="store_true", help="Replogle-sized batches")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    mode = "full" if args.full else "small"
    wd = Path(args.workdir or f"replogle_propensity_refit_{mode}")
    os.makedirs(wd, exist_ok=True)
    main(FULL if args.full else SMALL, wd)
