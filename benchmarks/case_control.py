"""Case-control benchmark: donor pseudobulk vs cell-level tests (benchmarks only).

Data: ``causarray.simulate.simulate_case_control`` (cells nested in donors, donor x gene
log-normal noise ``donor_sd``, an unrecorded donor trait that moves every gene, recorded
sex and age, NB counts).  Scenarios, each over ``--seeds`` seeds:

``null``        labels shuffled across donors after simulating a study with sparse
                effects: every case/control difference is donor noise (no true effect).
``sparse``      5% of genes with |log FC| in U(0.5, 1.0), disease independent of the trait.
``confounded``  as ``sparse`` with P(case) = logistic(2 t_d): disease confounded with the
                unrecorded donor trait t_d, whose gene loadings are N(0, 0.5^2).

Methods, side by side on the same data:

``causarray``   the donor route, in process: ``tl.lfc(adata, condition_key='condition',
                control_condition='control', donor_key='donor', covariates=['sex',
                'age'], r='auto')`` (assignment 'observational' by default); its own padj.
                Skipped, and recorded as missing, when ``tl.lfc`` has no ``condition_key``.
``wilcoxon``    cell level: Wilcoxon rank-sum (``scipy.stats.mannwhitneyu``, asymptotic,
                tie-corrected) of log1p(1e4 x counts / cell total), case vs control cells;
                BH over all genes (untestable genes get p = 1).
``nbglm``       cell level: per gene an NB2 GLM by maximum likelihood
                (``statsmodels.discrete.NegativeBinomial``, started from a Poisson GLM) on
                [1, case, centred log cell total]; Wald p of ``case``; BH.  SUBSAMPLED by
                default: ``--nbglm-genes 300`` fits 300 random genes (the same for every
                seed; ~90 ms a gene at 16,000 cells on 2 cores, 1,000 genes would take 90 s
                a run) and BH runs over them, so its discoveries per 1,000 and FDR / power
                are computed on that subset (``genes_scored`` in the table);
                ``--nbglm-genes 0`` fits all genes.
``pydeseq2``    donor pseudobulk (summed counts) with PyDESeq2, ``design='~ sex + age +
                condition'`` (age z-scored), contrast case vs control, default Cook's and
                independent filtering; run with ``--pydeseq2-python`` (the venv of
                ``benchmarks/envs/pydeseq2.sh``) in a subprocess that reads CSVs and writes
                a CSV (``--pydeseq2-worker``).  Skipped, and recorded, if that python is
                missing.

Scores at q = 0.05 (padj < 0.05, NaN = not discovered): discoveries per 1,000 genes on
every scenario (the headline on ``null``), FDR (mean false discovery proportion over the
seeds, 0 for no discovery; ``FDR_se`` its standard error over the seeds: with ~30
discoveries per seed one false call moves a seed's FDP by 0.03) and power (mean share of
truly affected genes discovered) on ``sparse`` and ``confounded``.  Each run records its wall time and the 1-minute load
average when it started.

Usage::

    python benchmarks/case_control.py                     # ~10 min on 2 cores
    python benchmarks/case_control.py --quick             # reduced size, ~2 min
    python benchmarks/case_control.py --donors 10 40 --cells 100 300 --genes 1000 --seeds 3

Writes ``benchmarks/results/<--name>.{json,md}`` (default ``case_control``; ``--quick``:
``case_control_quick``) with ``_common.write_result`` and prints the markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

FDR = 0.05
SCENARIOS = {
    "null": {"shuffle_labels": True},
    "sparse": {},
    "confounded": {"trait_confounding": 2.0},
}
METHODS = ("causarray", "wilcoxon", "nbglm", "pydeseq2")
DEFAULT_PYDESEQ2 = "/tmp/cc/venv-pydeseq2/bin/python"


# --------------------------------------------------------------------------------------
# PyDESeq2 worker (runs in the pydeseq2 venv: numpy, pandas and pydeseq2 only)
# --------------------------------------------------------------------------------------
def pydeseq2_worker(in_dir: str, out_csv: str, n_cpus: int) -> None:
    """Read ``counts.csv`` (donors x genes) and ``metadata.csv`` (donors: condition, sex,
    age) from ``in_dir``, run PyDESeq2 ``~ sex + age + condition`` and write
    ``gene,log2FoldChange,pvalue,padj`` to ``out_csv`` (plus ``<out_csv>.json`` timings)."""
    import importlib.metadata as md

    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.ds import DeseqStats

    t0 = time.perf_counter()
    counts = pd.read_csv(Path(in_dir) / "counts.csv", index_col=0)
    meta = pd.read_csv(Path(in_dir) / "metadata.csv", index_col=0)
    meta["age"] = (meta["age"] - meta["age"].mean()) / meta["age"].std()
    for col in ("condition", "sex"):
        meta[col] = meta[col].astype(str)
    keep = counts.sum(axis=0) > 0                       # all-zero genes: p = NaN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(counts=counts.loc[:, keep], metadata=meta,
                           design="~ sex + age + condition", n_cpus=n_cpus, quiet=True)
        dds.deseq2()
        ds = DeseqStats(dds, contrast=["condition", "case", "control"], n_cpus=n_cpus,
                        quiet=True)
        ds.summary()
    res = ds.results_df.reindex(counts.columns)
    res.index.name = "gene"
    res[["log2FoldChange", "pvalue", "padj"]].to_csv(out_csv)
    Path(out_csv + ".json").write_text(json.dumps(
        {"wall_s": time.perf_counter() - t0, "pydeseq2": md.version("pydeseq2")}))


# --------------------------------------------------------------------------------------
# methods (project .venv)
# --------------------------------------------------------------------------------------
def bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values; NaN p-values count as 1."""
    p = np.where(np.isfinite(p), p, 1.0)
    m = p.size
    order = np.argsort(p)
    adj = np.minimum.accumulate((p[order] * m / np.arange(1, m + 1))[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


def has_donor_route() -> bool:
    import inspect

    import causarray as ca

    return "condition_key" in inspect.signature(ca.tl.lfc).parameters


def run_causarray(adata, args) -> tuple[pd.Series, dict]:
    import causarray as ca

    ad = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ca.tl.lfc(ad, condition_key="condition", control_condition="control",
                  donor_key="donor", covariates=["sex", "age"], r=args.r,
                  random_state=0)
    st = ad.uns["causarray"]
    res = st["results"]
    padj = pd.Series(res["padj"].to_numpy(float), index=res["gene_names"].astype(str))
    settings = st.get("settings", {})
    return padj, {"r": settings.get("r"), "assignment": settings.get("assignment")}


def cell_level_inputs(adata) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense counts, case indicator (cells) and log cell totals."""
    Y = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    case = (adata.obs["condition"].astype(str) == "case").to_numpy()
    total = Y.sum(axis=1).astype(float)
    return Y, case, np.log(np.maximum(total, 1.0))


def run_wilcoxon(adata, args) -> tuple[pd.Series, dict]:
    from scipy.stats import mannwhitneyu

    Y, case, log_total = cell_level_inputs(adata)
    Z = np.log1p(Y * (1e4 / np.exp(log_total))[:, None])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = mannwhitneyu(Z[case], Z[~case], axis=0, method="asymptotic").pvalue
    return pd.Series(bh(np.asarray(p, float)), index=adata.var_names), {}


def nbglm_genes(adata, k: int | None) -> np.ndarray:
    """Indices of the genes the NB GLM fits: all, or ``k`` random ones (fixed seed)."""
    p = adata.n_vars
    if k is None or k >= p:
        return np.arange(p)
    return np.sort(np.random.default_rng(12345).choice(p, k, replace=False))


def run_nbglm(adata, args) -> tuple[pd.Series, dict]:
    import statsmodels.api as sm
    from statsmodels.discrete.discrete_model import NegativeBinomial

    Y, case, log_total = cell_level_inputs(adata)
    X = np.c_[np.ones(case.size), case.astype(float), log_total - log_total.mean()]
    genes = nbglm_genes(adata, args.nbglm_genes)
    p = np.full(genes.size, np.nan)
    failed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, j in enumerate(genes):
            y = Y[:, j]
            if y.sum() == 0:
                continue
            try:
                pois = sm.GLM(y, X, family=sm.families.Poisson()).fit()
                fit = NegativeBinomial(y, X, loglike_method="nb2").fit(
                    start_params=np.r_[pois.params, 0.5], method="newton", maxiter=100,
                    disp=0)
                p[i] = fit.pvalues[1]
            except Exception:   # noqa: BLE001 - a failed fit is recorded, p = 1
                failed += 1
    return (pd.Series(bh(p), index=adata.var_names[genes]),
            {"n_fitted": int(genes.size), "n_failed": failed})


def pseudobulk_tables(adata) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Donors x genes summed counts and the donors' condition, sex and age."""
    import scipy.sparse as sp

    codes = adata.obs["donor"].cat.codes.to_numpy()
    donors = adata.obs["donor"].cat.categories.astype(str)
    M = sp.csr_matrix((np.ones(codes.size), (codes, np.arange(codes.size))),
                      shape=(donors.size, codes.size))
    counts = pd.DataFrame(np.asarray((M @ adata.X).toarray()).astype(np.int64),
                          index=donors, columns=adata.var_names)
    meta = (adata.obs[["donor", "condition", "sex", "age"]].astype({"donor": str})
            .groupby("donor", observed=True).first().reindex(donors))
    for col in ("condition", "sex"):
        meta[col] = meta[col].astype(str)
    return counts, meta


def run_pydeseq2(adata, args) -> tuple[pd.Series, dict]:
    counts, meta = pseudobulk_tables(adata)
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        counts.to_csv(Path(tmp) / "counts.csv")
        meta.to_csv(Path(tmp) / "metadata.csv")
        out = str(Path(tmp) / "out.csv")
        proc = subprocess.run([args.pydeseq2_python, str(Path(__file__).resolve()),
                               "--pydeseq2-worker", tmp, out, "--threads", str(args.threads)],
                              check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pydeseq2 worker failed:\n{proc.stderr[-3000:]}")
        res = pd.read_csv(out, index_col=0)
        info = json.loads(Path(out + ".json").read_text())
    return (pd.Series(res["padj"].to_numpy(float), index=res.index.astype(str)),
            {"worker_wall_s": info["wall_s"], "pydeseq2": info["pydeseq2"]})


RUNNERS = {"causarray": run_causarray, "wilcoxon": run_wilcoxon, "nbglm": run_nbglm,
           "pydeseq2": run_pydeseq2}


# --------------------------------------------------------------------------------------
# scoring and the driver
# --------------------------------------------------------------------------------------
def score(padj: pd.Series, truth: pd.Series) -> dict:
    """Discoveries (padj < FDR), per 1,000 tested genes, FDP and power on the tested genes."""
    tested = truth.reindex(padj.index)
    hit = np.nan_to_num(padj.to_numpy(float), nan=1.0) < FDR
    true = tested.to_numpy() != 0
    n_hit = int(hit.sum())
    return {"n_genes": int(padj.size), "discoveries": n_hit,
            "disc_per_1000": 1000.0 * n_hit / max(padj.size, 1),
            "false_disc": int((hit & ~true).sum()),
            "fdp": float((hit & ~true).sum() / max(n_hit, 1)),
            "n_true": int(true.sum()),
            "power": float((hit & true).sum() / true.sum()) if true.any() else None}


def simulate(scenario: str, seed: int, args):
    from causarray.simulate import simulate_case_control

    return simulate_case_control(n_donors=(args.donors, args.donors),
                                 cells_per_donor=tuple(args.cells), n_genes=args.genes,
                                 random_state=1000 * args.donors + seed,
                                 **SCENARIOS[scenario])


def one_run(method: str, adata, truth: pd.Series, args) -> dict:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        padj, info = RUNNERS[method](adata, args)
    except Exception as exc:   # noqa: BLE001 - recorded in the results
        return {"status": f"failed: {type(exc).__name__}: {str(exc)[:300]}",
                "wall_s": time.perf_counter() - t0, "load_1min": load}
    row = {"status": "ok", "wall_s": time.perf_counter() - t0, "load_1min": load}
    row.update(score(padj, truth))
    row.update(info)
    return row


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (scenario, donors, method): means over the seeds."""
    df = pd.DataFrame(runs)
    rows = []
    for (scen, donors, method), g in df.groupby(["scenario", "donors_per_arm", "method"],
                                               sort=False):
        ok = g[g["status"] == "ok"]
        row = {"scenario": scen, "donors_per_arm": int(donors), "method": method,
               "seeds_ok": f"{len(ok)}/{len(g)}"}
        if len(ok):
            row.update({
                "genes_scored": int(ok["n_genes"].iloc[0]),
                "disc_per_1000": float(ok["disc_per_1000"].mean()),
                "disc_per_1000_max": float(ok["disc_per_1000"].max()),
                "FDR": None if scen == "null" else float(ok["fdp"].mean()),
                "FDR_se": None if scen == "null" or len(ok) < 2
                else float(ok["fdp"].std(ddof=1) / np.sqrt(len(ok))),
                "power": None if scen == "null" else float(ok["power"].mean()),
                "runs_with_false_disc": int((ok["false_disc"] > 0).sum()),
                "wall_s_mean": float(ok["wall_s"].mean()),
                "load_1min_mean": float(ok["load_1min"].mean())})
            if "r" in ok:
                row["r_chosen"] = ",".join(str(int(v)) for v in ok["r"].dropna()) or None
        else:
            row["note"] = str(g["status"].iloc[0])[:200]
        rows.append(row)
    return rows


def methods_available(args) -> tuple[list[str], dict]:
    skipped = {}
    methods = []
    for m in args.methods.split(","):
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {METHODS}")
        if m == "causarray" and not has_donor_route():
            skipped[m] = "causarray.tl.lfc has no condition_key (donor route missing)"
        elif m == "pydeseq2" and not Path(args.pydeseq2_python).exists():
            skipped[m] = (f"{args.pydeseq2_python} not found (run "
                          "benchmarks/envs/pydeseq2.sh)")
        else:
            methods.append(m)
    return methods, skipped


def main(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import markdown_table, write_result

    methods, skipped = methods_available(args)
    for m, why in skipped.items():
        print(f"skipping {m}: {why}", file=sys.stderr)
    t_all = time.perf_counter()
    load_start = os.getloadavg()
    runs = []
    for donors in args.donor_sizes:
        args.donors = donors
        for scen in args.scenarios.split(","):
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                adata = simulate(scen, seed, args)
                sim_s = time.perf_counter() - t0
                truth = adata.uns["true_lfc"].set_index("gene")["lfc"]
                for method in methods:
                    row = {"scenario": scen, "donors_per_arm": donors, "seed": seed,
                           "method": method, "n_cells": adata.n_obs, "simulate_s": sim_s}
                    row.update(one_run(method, adata, truth, args))
                    runs.append(row)
                    print(f"{scen:10s} donors={donors:3d} seed={seed} {method:9s} "
                          f"{row['status']:4.4s} disc={row.get('discoveries')} "
                          f"fdp={row.get('fdp', float('nan')):.3f} "
                          f"power={row.get('power')} {row['wall_s']:.1f}s "
                          f"load={row['load_1min']:.2f}", file=sys.stderr, flush=True)
    rows = summarise(runs)
    result = {
        "rows": rows, "runs": runs, "skipped": skipped,
        "settings": {"donors_per_arm": args.donor_sizes, "cells_per_donor": args.cells,
                     "n_genes": args.genes, "seeds": args.seeds, "scenarios": args.scenarios,
                     "r": args.r, "nbglm_genes": args.nbglm_genes, "fdr_level": FDR,
                     "threads": args.threads, "scenario_kwargs": SCENARIOS},
        "total_wall_s": time.perf_counter() - t_all,
        "load_avg_start": " ".join(f"{v:.2f}" for v in load_start),
        "load_avg_end": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "nbglm_subsampled": args.nbglm_genes is not None and args.nbglm_genes < args.genes,
        "donors_per_arm": " ".join(str(d) for d in args.donor_sizes),
        "cells_per_donor": f"{args.cells[0]}-{args.cells[1]}", "n_genes": args.genes,
        "seeds": args.seeds, "causarray_r": str(args.r),
        "pydeseq2": next((r["pydeseq2"] for r in runs if r.get("pydeseq2")), None),
        "skipped_methods": "; ".join(f"{k}: {v}" for k, v in skipped.items()) or None,
    }
    path = write_result(args.name, result, args.results_dir)
    print(markdown_table(rows))
    print(f"\nwrote {path}; total {result['total_wall_s']:.0f} s; load average "
          f"{result['load_avg_start']} -> {result['load_avg_end']}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pydeseq2-worker", nargs=2, metavar=("IN_DIR", "OUT_CSV"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true",
                    help="reduced size: 12 donors per arm, 60-150 cells, 400 genes, 2 seeds")
    ap.add_argument("--donors", type=int, nargs="+", default=None,
                    help="donors per arm (one or more sizes; default 10 40)")
    ap.add_argument("--cells", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                    help="cells per donor range (default 100 300)")
    ap.add_argument("--genes", type=int, default=None, help="genes (default 1000)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per scenario (default 3)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--r", default="auto", help="causarray's r (default 'auto')")
    ap.add_argument("--nbglm-genes", type=int, default=None,
                    help="fit the NB GLM on this many random genes only; 0: all (default "
                         "300, --quick: all)")
    ap.add_argument("--pydeseq2-python", default=DEFAULT_PYDESEQ2)
    ap.add_argument("--threads", type=int, default=2, help="PyDESeq2 n_cpus")
    ap.add_argument("--tmpdir", default=None, help="where the PyDESeq2 exchange files go")
    ap.add_argument("--name", default=None, help="result file stem")
    ap.add_argument("--results-dir", default=None,
                    help="where the result files go (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.pydeseq2_worker:
        return args
    quick = {"donors": [12], "cells": [60, 150], "genes": 400, "seeds": 2, "nbglm_genes": 0,
             "name": "case_control_quick"}
    full = {"donors": [10, 40], "cells": [100, 300], "genes": 1000, "seeds": 3,
            "nbglm_genes": 300, "name": "case_control"}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.donor_sizes = list(args.donors)
    if args.nbglm_genes == 0:
        args.nbglm_genes = None
    if args.r != "auto":
        args.r = int(args.r)
    return args


if __name__ == "__main__":
    _args = parse_args()
    if _args.pydeseq2_worker:
        pydeseq2_worker(*_args.pydeseq2_worker, n_cpus=_args.threads)
    else:
        main(_args)
