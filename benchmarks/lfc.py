"""Benchmark: ``causarray.LFC`` at the seed tutorial's batch shape, stage by stage.

Problem: one batch of the tutorial's ``gcate_lfc_batch`` run -- 2,000 controls + 15
perturbations x 134 cells (4,010 cells) x 8,563 genes (genes without counts dropped),
simulated by ``simulate_screen(..., r=10, confounding=0.5, random_state=0)``.  The
confounders are the true U (10 columns) plus 20 standard-normal noise columns, so the
design has the tutorial's r = 30 without running GCATE: ``W = [1 | U]`` (31 columns),
``W_A = [1 | standardised log library size | U]``, offsets = log median-of-ratios size
factors, all other arguments at the defaults ``gcate_lfc_batch`` uses.  ``--quick``:
500 controls + 5 x 60 cells x 1,000 genes.

Runs, in one process on the same data (timings on a shared machine are noisy; only
side-by-side numbers are comparable):

* ``baseline``: ``causarray/dr.py`` of git revision ``--baseline-rev`` (the code before
  the speed-up), loaded as a module beside the current package;
* ``cold``: the current ``LFC``;
* ``warm``: the current ``LFC`` with ``outcome_init`` = the coefficients of the same
  GLM fitted at the batch pipeline's shared dispersion (what GCATE hands over in
  ``gcate_lfc_batch``; not timed as part of LFC).

Per run: wall time, the time of each stage (cProfile cumulative times), the increase of
peak RSS during the call, and the Newton steps of the outcome GLM's three IRLS runs
(Poisson, NB at the first MoM dispersion, final NB; mean and max over genes).  Also the
max absolute differences of ``tau``, ``std``, ``stat`` and ``pvalue`` between the runs
and, for cold vs warm, how many tested pairs moved and whether the discoveries agree.
Writes ``benchmarks/results/lfc.json`` and ``lfc.md`` (``lfc_quick.*`` with ``--quick``);
rows of other ``--threads`` settings already in the file are kept.

Usage::

    .venv/bin/python benchmarks/lfc.py               # tutorial shape (a few minutes)
    .venv/bin/python benchmarks/lfc.py --quick
    .venv/bin/python benchmarks/lfc.py --no-baseline --threads 1
"""
from __future__ import annotations

import argparse
import cProfile
import importlib.util
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, code_version, measure, peak_rss_mb, write_result

BASELINE_REV = "97e362e"      # last commit before the LFC speed-up

# stage -> function names whose cumulative time it is (minus the listed sub-stages)
STAGES = {
    "propensity": ("fit_propensity",),
    "outcome_glm": ("fit_glm",),
    "information": ("outcome_information", "_chunk_information"),
    "aipw_variance": ("_treatment_estimand", "_aipw_estimands"),
    "fit_outcome_model": ("fit_outcome_model",),
}


def make_problem(quick: bool, random_state: int = 0):
    """Counts, W = [1 | U30], W_A, A and log size factors of one tutorial batch."""
    from causarray.preprocessing import comp_size_factor
    from causarray.simulate import design_from_simulation, simulate_screen

    shape = (dict(n_ctrl=500, n_perts=5, cells_per_pert=60, n_genes=1000) if quick else
             dict(n_ctrl=2000, n_perts=15, cells_per_pert=134, n_genes=8563))
    ad = simulate_screen(r=10, confounding=0.5, random_state=random_state, **shape)
    Y, X, A = design_from_simulation(ad)
    Y = Y[:, Y.sum(axis=0) > 0]
    rng = np.random.default_rng(random_state + 1)
    U_true = np.asarray(ad.obsm["U_true"])
    U = np.hstack([U_true, rng.normal(size=(Y.shape[0], 30 - U_true.shape[1]))])
    lib = np.log(Y.sum(axis=1))
    W = np.hstack([X, U])
    W_A = np.column_stack([X, (lib - lib.mean()) / lib.std(ddof=1), U])
    log_s = np.log(comp_size_factor(Y))
    return dict(Y=Y, W=W, W_A=W_A, A=A, log_s=log_s, shape=shape)


def load_baseline(rev: str):
    """``causarray/dr.py`` at git revision ``rev`` as module ``causarray._dr_baseline``."""
    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(["git", "show", f"{rev}:src/causarray/dr.py"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "dr_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("causarray._dr_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "causarray"
    spec.loader.exec_module(mod)
    return mod


class IterationLog:
    """Records the Newton steps of every IRLS run of the GLM engine (by run within a chunk)."""

    def __init__(self):
        from causarray.engine import irls as engine_irls

        self.glm = engine_irls
        self.runs: dict[int, list] = {}
        self._irls = getattr(engine_irls, "irls_chunk", None)
        self._chunk = getattr(engine_irls, "schur_chunk", None)
        self._i = 0

    def __enter__(self):
        if self._irls is None or self._chunk is None:
            return self
        log = self

        def chunk(*args, **kw):
            log._i = 0
            return log._chunk(*args, **kw)

        def irls(*args, **kw):
            out = log._irls(*args, **kw)
            skip = args[6] if len(args) > 6 else kw.get("skip")
            it = np.asarray(out[2])[~np.asarray(skip)]
            log.runs.setdefault(log._i, []).append(it)
            log._i += 1
            return out

        self.glm.schur_chunk, self.glm.irls_chunk = chunk, irls
        return self

    def __exit__(self, *exc):
        if self._irls is not None and self._chunk is not None:
            self.glm.schur_chunk, self.glm.irls_chunk = self._chunk, self._irls

    def summary(self) -> dict:
        names = {0: "poisson", 1: "nb_first", 2: "nb_final"}
        out = {}
        for i, its in sorted(self.runs.items()):
            it = np.concatenate(its) if its else np.zeros(0)
            key = names.get(i, f"run{i}") if len(self.runs) == 3 else f"run{i}"
            out[f"iters_{key}_mean"] = float(it.mean()) if it.size else None
            out[f"iters_{key}_max"] = int(it.max()) if it.size else None
        return out


def stage_times(prof: cProfile.Profile, module_file: str) -> dict:
    """Seconds per stage from the cumulative times of the stage functions."""
    stats = pstats.Stats(prof).stats
    cum: dict[str, float] = {}
    for (fname, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.items():
        if func in ("fit_glm", "fit_propensity") or fname == module_file:
            cum[func] = cum.get(func, 0.0) + ct
    get = lambda names: sum(cum.get(f, 0.0) for f in names)
    glm = get(STAGES["outcome_glm"])
    info = get(STAGES["information"])
    fom = get(STAGES["fit_outcome_model"])
    aipw = get(STAGES["aipw_variance"])
    total = cum.get("LFC", 0.0)
    if cum.get("_aipw_estimands"):          # current code: information inside the AIPW loop
        aipw -= info
        cf = fom - glm
    else:                                   # baseline: information inside fit_outcome_model
        cf = fom - glm - info
    prop = get(STAGES["propensity"])
    return {"propensity_s": prop, "outcome_glm_s": glm, "counterfactual_means_s": cf,
            "information_s": info, "aipw_variance_s": aipw,
            "tests_table_s": total - prop - fom - aipw - info * bool(cum.get("_aipw_estimands")),
            "total_s": total}


def run_lfc(module, data: dict, label: str, **kw) -> tuple[dict, object]:
    prof = cProfile.Profile()
    with IterationLog() as log, measure() as m, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        prof.enable()
        df, _ = module.LFC(data["Y"], data["W"], data["A"], data["W_A"], family="nb",
                           offset=data["log_s"], **kw)
        prof.disable()
    row = {"run": label, "wall_s": m.wall_s, **stage_times(prof, module.__file__),
           "peak_rss_delta_mb": m.peak_rss_delta_mb, **log.summary()}
    print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()},
          flush=True)
    return row, df


def max_diffs(d0, d1) -> dict:
    out = {}
    for col in ("tau", "std", "stat", "pvalue"):
        a, b = d0[col].to_numpy(), d1[col].to_numpy()
        both = np.isfinite(a) & np.isfinite(b)
        out[f"max_abs_diff_{col}"] = float(np.max(np.abs(a[both] - b[both]))) if both.any() else 0.0
        out[f"finite_pattern_equal_{col}"] = bool(np.array_equal(np.isfinite(a), np.isfinite(b)))
    out["tested_equal"] = bool(np.array_equal(d0["estimable"], d1["estimable"]))
    return out


def stat_tail(d0, d1) -> dict:
    """How many tested pairs moved their statistic by more than 1e-3 / 1e-2, and the
    agreement of the discoveries at padj < 0.05."""
    a, b = d0["stat"].to_numpy(), d1["stat"].to_numpy()
    both = np.isfinite(a) & np.isfinite(b)
    diff = np.abs(a[both] - b[both])
    return {"n_tested": int(both.sum()), "n_abs_diff_gt_1e-3": int((diff > 1e-3).sum()),
            "n_abs_diff_gt_1e-2": int((diff > 1e-2).sum()),
            "q999_abs_diff": float(np.quantile(diff, 0.999)) if diff.size else 0.0,
            "discoveries": [int((d0["padj"] < 0.05).sum()), int((d1["padj"] < 0.05).sum())],
            "same_discoveries": bool(np.array_equal(d0["padj"] < 0.05, d1["padj"] < 0.05))}


def previous_configs(name: str, config: str) -> tuple[list, list]:
    """Rows and differences of other thread configurations from an earlier result file."""
    path = RESULTS_DIR / f"{name}.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return [], []
    rows = [r for r in old.get("rows", []) if r.get("threads") not in (config, None)]
    diffs = old.get("differences", [])
    diffs = [d for d in diffs if isinstance(d, dict) and d.get("threads") not in (config, None)]
    return rows, diffs


def warm_start_coefficients(data: dict) -> tuple[np.ndarray, float]:
    """The GLM on [W | A] at the shared control-pool dispersion (what GCATE hands over)."""
    from causarray.batch import shared_dispersion
    from causarray.glm import fit_glm

    t0 = time.perf_counter()
    ctrl = np.flatnonzero(data["A"].sum(axis=1) == 0)
    disp = shared_dispersion(data["Y"], data["W"][:, :1], ctrl, offset=True)
    fit = fit_glm(data["Y"], data["W"], data["A"], family="nb", size=disp,
                  offset=data["log_s"], compute_se=False)
    return fit.coef, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small problem (seconds)")
    ap.add_argument("--baseline-rev", default=BASELINE_REV,
                    help=f"git revision of the baseline dr.py (default {BASELINE_REV})")
    ap.add_argument("--no-baseline", action="store_true", help="skip the baseline run")
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS threads (threadpoolctl; default: inherited)")
    args = ap.parse_args(argv)
    from causarray import dr

    limiter = None
    if args.threads:
        from threadpoolctl import threadpool_limits
        limiter = threadpool_limits(args.threads)

    t0 = time.perf_counter()
    data = make_problem(args.quick)
    n, p = data["Y"].shape
    print(f"problem {n} cells x {p} genes x {data['A'].shape[1]} treatments "
          f"({time.perf_counter() - t0:.1f}s), rss {peak_rss_mb():.0f} MiB", flush=True)
    rows, frames = [], {}
    if not args.no_baseline:
        base = load_baseline(args.baseline_rev)
        row, frames["baseline"] = run_lfc(base, data, f"baseline ({args.baseline_rev})")
        rows.append(row)
    row, frames["cold"] = run_lfc(dr, data, "cold")
    rows.append(row)
    init, t_init = warm_start_coefficients(data)
    row, frames["warm"] = run_lfc(dr, data, "warm (outcome_init)", outcome_init=init)
    rows.append(row)
    config = "inherited" if args.threads is None else str(args.threads)
    diffs = {"threads": config}
    if "baseline" in frames:
        diffs["baseline_vs_cold"] = max_diffs(frames["baseline"], frames["cold"])
    diffs["cold_vs_warm"] = max_diffs(frames["cold"], frames["warm"])
    diffs["cold_vs_warm_stat_tail"] = stat_tail(frames["cold"], frames["warm"])
    print(diffs, flush=True)
    for row in rows:
        row["threads"] = config
        row["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    name = "lfc_quick" if args.quick else "lfc"
    old_rows, old_diffs = previous_configs(name, config)
    result = {
        "problem": {**data["shape"], "n_cells": n, "n_genes": p, "r": 30, "r_true": 10},
        "warm_start_fit_s": t_init, "peak_rss_process_mb": peak_rss_mb(),
        "rows": old_rows + rows, "differences": old_diffs + [diffs], "code": code_version(),
    }
    for d in result["differences"]:      # flat copies, so that the markdown shows them
        for section, vals in d.items():
            if isinstance(vals, dict):
                for key, val in vals.items():
                    if not isinstance(val, (list, dict)):
                        result[f"threads={d['threads']} {section}.{key}"] = val
    write_result(name, result)
    if limiter is not None:
        limiter.unregister()
    return 0


if __name__ == "__main__":
    sys.exit(main())
