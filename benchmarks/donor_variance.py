"""Donor-route variance study: which standard error makes the donor tests exact (benchmarks only).

The donor route (``tl.lfc(condition_key=..., donor_key=...)``) tests each gene with the
delete-one-donor jackknife, moderated across genes (``donor_variance='jackknife'``).  The
plain jackknife was conservative at 10 donors per arm (null z variance ~0.8), which cost
power; the mean-leverage correction that replaced it left studies with a confounding
donor trait at FDR ~q.  This script measures, on the data of ``benchmarks/case_control.py``
(``causarray.simulate.simulate_case_control``, scenarios ``null`` / ``sparse`` /
``confounded``, other seeds by default), what each candidate standard error gives from
the *same* fits (``n`` donors, ``k`` outcome-model columns: intercept, covariates, r
factors, condition):

``jackknife``    ``(n - 1)/n sum_d (tau_(d) - mean)^2`` on ``n - 1 - covariates`` df (the
                 default before 2026-12-07);
``leverage``     ``(1 - k/n) sum_d (tau_(d) - mean)^2`` on ``n - k`` df (every donor at
                 the mean leverage; the default on 2026-12-07);
``weighted``     Wu's (1986) weighted jackknife ``sum_d (1 - h_d)(tau_(d) - tau)^2`` with
                 each donor's leverage ``h_d`` in the outcome design (HC2 for a
                 regression), on ``n - k`` df;
``weighted_bm``  the same on Bell and McCaffrey's degrees of freedom, fewer when a few
                 donors carry the estimate, and moderated on the log-scale df (the
                 default since 2026-12-07, second change);
``influence``    the influence-function (sandwich) variance of the full fit;

each raw (t on its df) and moderated (:func:`causarray.inference.moderated_variances`, as
the route does).  The replicates are read through one hook: a wrapper around
``causarray.pseudobulk.jackknife_tests`` that keeps its inputs.

Scores per scenario and variant (means over seeds): ``null_z_var``, the variance of the
null genes' statistics mapped to normal quantiles through their t reference (1 when the
test is exact); ``type1`` at p < 0.05 on null genes; ``FDR`` (mean FDP) and ``power`` at
BH q = 0.05.  ``confounding_left`` (per scenario): the slope of the null genes' ``tau``
on the genes' true trait loadings over the true case-control difference in the trait
(``t ~ [1, sex, age, case]``): the share of the confounding bias the factor adjustment
leaves (0: all removed).

Usage::

    python benchmarks/donor_variance.py                      # ~5 min on 2 cores
    python benchmarks/donor_variance.py --donors 10 --seeds 4

Writes ``benchmarks/results/<--name>.{json,md}`` (default ``donor_variance``).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import pandas as pd

from _common import write_result
from case_control import bh   # the same scoring rule (NaN counts as p = 1)

SCENARIOS = {"null": {"shuffle_labels": True}, "sparse": {},
             "confounded": {"trait_confounding": 2.0}}
FDR = 0.05


def run_route(adata) -> dict:
    """The donor route on ``adata``; returns the jackknife's inputs and the settings."""
    import causarray as ca
    import causarray.pseudobulk as pb_module

    kept: dict = {}
    original = pb_module.jackknife_tests

    def keep(results, replicates, design, moderate=True):
        kept.update(results=results.copy(), replicates=replicates.copy(),
                    design=np.array(design, dtype=float))
        return original(results, replicates, design, moderate)

    pb_module.jackknife_tests = keep
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ca.tl.lfc(adata, condition_key="condition", control_condition="control",
                      donor_key="donor", covariates=["sex", "age"], r="auto", verbose=False)
    finally:
        pb_module.jackknife_tests = original
    kept["r"] = int(adata.uns["causarray"]["settings"]["r"])
    return kept


def variances(kept: dict) -> dict[str, tuple[np.ndarray, float, float]]:
    """Each candidate variance of every row with its t degrees of freedom, raw and for
    the moderation."""
    from causarray.pseudobulk import jackknife_variance, residual_maker

    res, reps = kept["results"], kept["replicates"]
    n = reps.shape[0]
    M, k = residual_maker(kept["design"])
    n_covariates = k - 2 - kept["r"]                  # k = 1 + covariates + r + 1 condition
    spread = np.sum((reps - reps.mean(axis=0)) ** 2, axis=0)
    weighted, df_bm, df_log = jackknife_variance(res, reps, kept["design"])
    old = float(n - 1 - n_covariates)
    return {"jackknife": ((n - 1) / n * spread, old, old),
            "leverage": ((1 - k / n) * spread, float(n - k), float(n - k)),
            "weighted": (weighted, float(n - k), float(n - k)),
            "weighted_bm": (weighted, float(np.nanmax(df_bm)), float(np.nanmax(df_log))),
            "influence": (res["std"].to_numpy(float) ** 2, old, old)}


def score(kept: dict, truth: np.ndarray) -> list[dict]:
    """Null calibration, FDR and power of every variant, raw and moderated."""
    from scipy import stats

    from causarray.inference import moderated_variances, t_pvalues

    res = kept["results"]
    tau = res["tau"].to_numpy(float)
    ok = np.isfinite(kept["replicates"]).all(axis=0) & res["estimable"].to_numpy(bool)
    level = np.log(0.5 * (res["mean_control"] + res["mean_treated"]).to_numpy(float) + 1e-8)
    rows = []
    for name, (var, df_raw, df_mod) in variances(kept).items():
        var = np.where(ok & (var > 0), var, np.nan)
        for moderated in (False, True):
            v, df = (moderated_variances(var, df_mod, level)[:2] if moderated
                     else (var, np.full(var.size, df_raw)))
            stat = tau / np.sqrt(v)
            p = t_pvalues(stat, df)
            null = (truth == 0) & np.isfinite(p)
            z = stats.norm.isf(stats.t.sf(np.abs(stat[null]), df[null]))
            disc = bh(p) < FDR
            rows.append(dict(variant=name, moderated=moderated,
                             null_z_var=float(np.mean(z ** 2)),
                             type1=float(np.mean(p[null] < 0.05)),
                             fdp=float((disc & (truth == 0)).sum() / max(disc.sum(), 1)),
                             power=float((disc & (truth != 0)).sum() / max((truth != 0).sum(), 1))))
    return rows


def confounding_left(adata, kept: dict, truth: np.ndarray) -> float:
    """Slope of the null genes' tau on the true trait loadings over the true trait shift."""
    trait = adata.uns["donor_trait"]
    obs = adata.obs.groupby("donor", observed=True)[["sex", "age"]].first()
    obs = obs.reindex(trait.index)
    design = np.column_stack([np.ones(len(trait)), (obs["sex"].astype(str) == "M"),
                              obs["age"].astype(float), trait["condition"] == "case"])
    delta = np.linalg.lstsq(design.astype(float), trait["trait"].to_numpy(float),
                            rcond=None)[0][-1]
    tau = kept["results"]["tau"].to_numpy(float)
    g = adata.var["trait_loading_true"].to_numpy(float)
    null = (truth == 0) & np.isfinite(tau)
    slope = np.polyfit(g[null], tau[null], 1)[0]
    return float(slope / delta) if abs(delta) > 1e-8 else float("nan")


def main(argv=None) -> None:
    from causarray.simulate import simulate_case_control

    args = parse_args(argv)
    t0 = time.perf_counter()
    load = " ".join(f"{v:.2f}" for v in __import__("os").getloadavg())
    rows = []
    for donors in args.donors:
        for scen, kw in SCENARIOS.items():
            per_seed, left = [], []
            n_seeds = args.seeds or (10 if donors <= 20 else 4)
            for seed in range(n_seeds):
                adata = simulate_case_control(
                    n_donors=(donors, donors), cells_per_donor=(100, 300), n_genes=args.genes,
                    random_state=1000 * donors + seed + args.seed_offset, **kw)
                kept = run_route(adata)
                genes = kept["results"]["gene_names"].astype(str)
                truth = adata.uns["true_lfc"].set_index("gene")["lfc"].reindex(genes) \
                    .fillna(0.0).to_numpy()
                per_seed += score(kept, truth)
                if scen != "null":
                    left.append(confounding_left(adata, kept, truth))
                print(donors, scen, seed, f"r={kept['r']}", flush=True, file=sys.stderr)
            table = pd.DataFrame(per_seed).groupby(["variant", "moderated"], sort=False).mean()
            for (variant, moderated), row in table.iterrows():
                rows.append(dict(donors_per_arm=donors, scenario=scen, variant=variant,
                                 moderated=bool(moderated), seeds=n_seeds,
                                 **{k: round(float(v), 4) for k, v in row.items()},
                                 confounding_left=round(float(np.mean(left)), 4) if left
                                 else None))
    result = dict(total_wall_s=round(time.perf_counter() - t0, 1), load_avg_start=load,
                  genes=args.genes, seed_offset=args.seed_offset, rows=rows)
    path = write_result(args.name, result, args.results_dir)
    print(path.with_suffix(".md").read_text())


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--donors", type=int, nargs="+", default=[10, 40],
                    help="donors per arm (default 10 40)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="seeds per scenario (default 10 at <= 20 donors per arm, else 4)")
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--seed-offset", type=int, default=500,
                    help="added to the simulation seeds (0: case_control.py's)")
    ap.add_argument("--name", default="donor_variance")
    ap.add_argument("--results-dir", default=None)
    return ap.parse_args(argv)


if __name__ == "__main__":
    main()
