"""High-MOI simulations: FDR and power of the default table over many seeds and designs.

Each configuration simulates ``simulate_highmoi_screen`` screens (4,000 cells x 200
genes x 20 targets x 2 guides + 6 non-targeting guides, MOI 6, r = 2, as
``tests/test_highmoi.py``, with the changes listed below), runs
``tl.lfc(adata, guides='obsm:grna_counts', r=2)`` with the defaults (``pairs='all'``: one
BH family of discovery pairs, one of positive controls) and scores every call at
padj < 0.05 against the simulation's truth.

* ``FDR``: false calls / calls in the discovery family, pooled over the seeds;
* ``mean_FDP`` (and its standard error over the seeds): the false discovery proportion
  of each seed (0 without calls) averaged, the FDR as BH defines it;
* ``power``: true pairs called / true pairs (both families);
* ``false on moved genes``: false calls on a gene that another target moves (the
  small-library effect of docs/math.md#high-moi, "Other targets' effects").

To compare two versions of the package, run the script once per version with its
``src`` first on ``PYTHONPATH`` and a ``--label`` each::

    PYTHONPATH=src .venv/bin/python benchmarks/highmoi_sims.py --label after
    PYTHONPATH=/path/to/old/src .venv/bin/python benchmarks/highmoi_sims.py --label before

Results: ``benchmarks/results/highmoi_sims_<label>.{json,md}``.  About 6 minutes per
version on 2 cores with the default 20 seeds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

#: the base design of tests/test_highmoi.py
BASE = dict(n_cells=4000, n_genes=200, n_targets=20, n_nt_guides=6, moi=6.0, r=2,
            effect_size=(0.1, 0.4), moi_confounding=0.5, moi_libsize=0.3)
#: name -> (simulation changes, tl.lfc changes)
CONFIGS = {
    "base": ({}, {}),
    "one batch": ({}, {"batch_size": 40}),
    "60 targets": ({"n_targets": 60, "n_nt_guides": 10, "effect_size": (0.2, 0.6)}, {}),
    "MOI 15": ({"moi": 15.0}, {}),
    "MOI 3, 3,000 cells": ({"moi": 3.0, "n_cells": 3000}, {}),
    "r = 3, strong confounding": ({"r": 3, "moi_confounding": 1.0,
                                   "effect_size": (0.2, 0.6)}, {}),
    "trans effects (5 % of genes)": ({"trans_frac": 0.05, "effect_size": (0.3, 1.0)}, {}),
    "complete null": ({"null_frac": 1.0}, {}),
}


def score(adata) -> dict:
    """Calls, false calls (discovery family), true pairs called, on the default table."""
    res = adata.uns["causarray"]["results"]
    truth = adata.uns["true_effects"]
    true_pairs = set(zip(truth["target"].astype(str), truth["gene"].astype(str)))
    moved = set(truth["gene"].astype(str))
    pairs = zip(res["trt"].astype(str), res["gene_names"].astype(str))
    is_true = np.array([pair in true_pairs for pair in pairs])
    on = res["on_target"].to_numpy(bool)
    called = (res["padj"] < 0.05).to_numpy()
    on_moved = res["gene_names"].astype(str).isin(moved).to_numpy()
    return dict(R=int((called & ~on).sum()), V=int((called & ~on & ~is_true).sum()),
                V_moved=int((called & ~on & ~is_true & on_moved).sum()),
                tp=int((called & is_true).sum()), n_true=len(true_pairs))


def run_config(sim: dict, lfc: dict, seeds: list[int]) -> dict:
    from causarray import tl
    from causarray.simulate import simulate_highmoi_screen

    tot = dict(R=0, V=0, V_moved=0, tp=0, n_true=0)
    fdp = []
    t0 = time.perf_counter()
    for seed in seeds:
        adata = simulate_highmoi_screen(random_state=seed, **{**BASE, **sim})
        tl.lfc(adata, guides="obsm:grna_counts", r=sim.get("r", 2), verbose=False, **lfc)
        one = score(adata)
        fdp.append(one["V"] / max(one["R"], 1))
        for key, val in one.items():
            tot[key] += val
    return dict(calls=tot["R"], false_calls=tot["V"], false_on_moved_genes=tot["V_moved"],
                FDR=round(tot["V"] / max(tot["R"], 1), 4),
                mean_FDP=round(float(np.mean(fdp)), 4),
                mean_FDP_se=round(float(np.std(fdp, ddof=1) / np.sqrt(len(fdp))), 4)
                if len(fdp) > 1 else None,
                power=round(tot["tp"] / tot["n_true"], 4) if tot["n_true"] else None,
                wall_s=round(time.perf_counter() - t0, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True, help="results name suffix, e.g. before/after")
    ap.add_argument("--seeds", type=int, default=20, help="seeds 0..N-1 per configuration")
    ap.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--lfc", default="{}", help="JSON of extra tl.lfc keywords for every "
                    "configuration, e.g. '{\"lfc_kwargs\": {\"variance_floor\": \"poisson\"}}'")
    args = ap.parse_args()
    extra = json.loads(args.lfc)
    import causarray

    rows = []
    for name in args.configs:
        sim, lfc = CONFIGS[name]
        row = dict(config=name, **run_config(sim, {**lfc, **extra}, list(range(args.seeds))))
        print(row, flush=True)
        rows.append(row)
    write_result(f"highmoi_sims_{args.label}", dict(
        label=args.label, seeds=args.seeds, base=BASE, lfc=extra, package=causarray.__file__,
        rows=rows))


if __name__ == "__main__":
    main()
