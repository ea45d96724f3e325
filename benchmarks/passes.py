"""The seed tutorial's call on the 200-perturbation screen, timed in reference passes.

Wall seconds differ ~3x between machines and with load, so every timed call here is
divided by one run of ``../shared/bench/ref_pass.py`` (a float32 gradient pass of the
factor model over a tutorial batch) taken just before it, in the same conditions.

Calls (each in a fresh subprocess, after a fresh reference pass):

``seed``
    The tutorial's own call: ``gcate_lfc_batch(Y, X, A, r, W_A=X_A, batch_size=15,
    max_cells=2000, n_ctrl=2000, family='nb', cache_path=..., random_state=0,
    gcate_kwargs=dict(kwargs_es_1=dict(rel_tol=2e-4, max_iters=30), kwargs_es_2=...))``
    with ``Y`` a dense ``DataFrame`` as in the tutorial.
``all_cells``
    The same call with ``max_cells=None, n_ctrl=None``: every cell of the screen.

The screen is the tutorial's shape (79,865 cells x 8,563 genes, 200 perturbations),
simulated once by ``benchmarks/batch.py --config full --generate-only``::

    python benchmarks/batch.py --config full --data /tmp/screen_full.npz --generate-only
    python benchmarks/passes.py --data /tmp/screen_full.npz --calls seed all_cells

``--src LABEL=PATH`` (repeatable) runs every call once per source tree (``PATH`` first
on the child's ``PYTHONPATH``; e.g. a ``git worktree`` of the commit before a change
and ``src``), one after the other in the same run, so that before and after are timed
in the same conditions::

    git worktree add --detach /tmp/before <commit>
    python benchmarks/passes.py --data /tmp/screen_full.npz --calls seed all_cells \
        --src before=/tmp/before/src --src after=src --name passes_screen

Writes ``benchmarks/results/passes.{json,md}`` (``--name`` to change), with the load
average before and after each call.  Each row also splits the wall time with the batch
cache's per-batch timings: ``gcate_in_ref_passes`` (the batches' ``fit_gcate``, with
the dense copy of each batch's counts) and
``rest_in_ref_passes`` (everything else: reading the input, the shared dispersion, the
propensity and outcome models, the AIPW sums, the cache), i.e. what the call would
take if the factor model cost nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REF_PASS = HERE.parent.parent / "shared" / "bench" / "ref_pass.py"
R = 30
CALLS = {"seed": dict(max_cells=2000, n_ctrl=2000),
         "all_cells": dict(max_cells=None, n_ctrl=None)}


def ref_pass_seconds() -> float:
    """One run of ``ref_pass.py`` in a subprocess (its median of 5 passes, seconds)."""
    if not REF_PASS.exists():
        raise FileNotFoundError(f"reference pass script not found: {REF_PASS}")
    out = subprocess.run([sys.executable, str(REF_PASS)], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def child(data: str, call: str, out: str) -> int:
    """Run one call (in this process) and write its wall time and result shape."""
    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(HERE))
    from _common import hwm_rss_mb, load_npz_problem
    from batch import _cache_batch_info

    from causarray import gcate_lfc_batch

    prob = load_npz_problem(data, dense=True)
    Y = pd.DataFrame(prob["Y"], columns=[f"gene_{j}" for j in range(prob["Y"].shape[1])],
                     copy=False)
    A = pd.DataFrame(prob["A"], columns=[f"P{k:03d}" for k in range(prob["A"].shape[1])])
    X, X_A = prob["X"], prob["X_A"]
    del prob
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "replogle_results.h5")
        t0 = time.perf_counter()
        df = gcate_lfc_batch(Y, X, A, R, W_A=X_A, batch_size=15, family="nb",
                             cache_path=cache,
                             random_state=0, verbose=False,
                             gcate_kwargs=dict(kwargs_es_1=dict(rel_tol=2e-4, max_iters=30),
                                               kwargs_es_2=dict(rel_tol=2e-4, max_iters=30)),
                             **CALLS[call])
        wall = time.perf_counter() - t0
        batches = _cache_batch_info(cache)
    Path(out).write_text(json.dumps(dict(
        wall_s=round(wall, 1), n_batches=len(batches),
        gcate_s=round(sum(b["t_gcate"] - b.get("t_read", 0.0) for b in batches), 1),
        rows=int(len(df)), n_tested=int(df["estimable"].sum()),
        discoveries=int((np.nan_to_num(df["padj"].to_numpy(), nan=1.0) < 0.05).sum()),
        peak_rss_mb=round(hwm_rss_mb(), 1))))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help=".npz of the screen (see the module doc)")
    ap.add_argument("--calls", nargs="+", choices=sorted(CALLS), default=["seed", "all_cells"])
    ap.add_argument("--name", default="passes")
    ap.add_argument("--src", action="append", default=[], metavar="LABEL=PATH",
                    help="source tree(s) to time (default: the installed package)")
    ap.add_argument("--_child", nargs=2, metavar=("CALL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        return child(args.data, *args._child)
    sys.path.insert(0, str(HERE))
    from _common import code_version, write_result

    rows = []
    trees = [tuple(item.split("=", 1)) for item in args.src] or [("installed", "")]
    for call, (label, src) in ((c, t) for c in args.calls for t in trees):
        env = dict(os.environ)
        if src:
            env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve()),
                                                 env.get("PYTHONPATH", "")])
        load0 = [round(x, 2) for x in os.getloadavg()]
        ref = ref_pass_seconds()
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        subprocess.run([sys.executable, __file__, "--data", args.data, "--_child", call, out],
                       check=True, env=env)
        res = json.loads(Path(out).read_text())
        os.unlink(out)
        row = dict(call=call, src=label, **CALLS[call], ref_pass_s=ref, **res,
                   wall_in_ref_passes=round(res["wall_s"] / ref),
                   gcate_in_ref_passes=round(res["gcate_s"] / ref),
                   rest_in_ref_passes=round((res["wall_s"] - res["gcate_s"]) / ref),
                   loadavg_before=load0, loadavg_after=[round(x, 2) for x in os.getloadavg()])
        print(json.dumps(row), flush=True)
        rows.append(row)
        write_result(args.name, dict(data=args.data, r=R, code=code_version(), rows=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
