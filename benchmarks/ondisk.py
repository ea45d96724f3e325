"""On-disk front door: peak RSS of ``causarray run FILE.h5ad``, before and after, and the
time per batch from disk against in memory (issue 13).

Two measurements on an essential-shaped ``.h5ad`` written by ``benchmarks/batch.py
--config essential --cells N --generate-only`` (CSR, int32 counts, ~148 cells per
perturbation, never dense):

``cli``
    ``causarray run FILE.h5ad --out DIR --r R --max-iters I --calibration off -q`` in a
    fresh process for each source tree given with ``--src LABEL=PATH`` (e.g. the
    package before and after a change), limited to the first ``--max-batches`` batches
    of the plan by replacing ``causarray.batch.plan_batches`` with its first K entries
    (the CLI itself has no such option).  Everything else runs as in a full run: the
    streamed validation and count passes, the batch layout, the propensity models of
    every perturbation, the figures and ``report.html``.  Reports the process's
    ``VmHWM`` (the run is serial: one process), wall time and the output's row count.
    The runs have one BLAS thread unless ``--cli-threads N`` is given.

``batches``
    ``gcate_lfc_batch`` on the first ``--max-batches`` batches of the essential plan
    (``r``, ``batch_size=15``, ``n_ctrl=2000``, every treated cell, ``blas_threads=1``),
    from the file (``Y`` = the path: each batch reads its rows) and in memory (the
    same file read by ``anndata.read_h5ad`` and ``from_anndata``: CSR counts), the two
    modes alternated ``--rounds`` times in one process (disk, memory, disk, memory, ...)
    so that both see the same machine load; the load average is recorded before each
    call.  Time per batch = building its job (in memory: slicing its rows out of the
    CSR matrix) + fitting it (from disk: reading its rows first), in wall and in CPU
    seconds (one BLAS thread: CPU time is the batch's work, which the machine's load
    does not inflate).  The results of the two modes are compared exactly.

``python ../shared/bench/ref_pass.py`` (the shared folder beside the repository; a
float32 gradient pass over a tutorial batch) is timed just before, so that times can be
read in passes.

Usage::

    python benchmarks/batch.py --config essential --cells 60000 \\
        --data /tmp/ess60k.h5ad --generate-only --name ondisk_generate
    python benchmarks/ondisk.py --data /tmp/ess60k.h5ad --max-batches 2 \\
        --src before=/tmp/causarray_before/src --src after=src
Results: ``benchmarks/results/<name>.json`` (+ ``.md``), default name ``ondisk_vs_memory``.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hwm_rss_mb, write_result

PERT_COL, CTRL = "perturbation", "non-targeting"
REF_PASS = Path(__file__).resolve().parents[2] / "shared" / "bench" / "ref_pass.py"


def _limit_batches(k: int) -> None:
    import causarray.batch as bm

    full_plan = bm.plan_batches
    bm.plan_batches = lambda *a, **kw: full_plan(*a, **kw)[:k]     # first K of the plan


# ----------------------------------------------------------------------------------
# children
# ----------------------------------------------------------------------------------
def cli_child(args) -> int:
    """``causarray run`` in this process (source tree first on sys.path)."""
    sys.path.insert(0, str(Path(args.src).resolve()))
    import causarray
    from causarray.cli import main

    _limit_batches(args.max_batches)
    argv = ["run", args.data, "--out", args.outdir, "--r", str(args.r), "--max-iters",
            str(args.max_iters), "--calibration", "off", "--overwrite", "-q"]
    t0 = time.perf_counter()
    rc = main(argv)
    wall = time.perf_counter() - t0
    out = dict(src=str(Path(causarray.__file__).resolve().parent), returncode=rc,
               command="causarray " + " ".join(argv), wall_s=round(wall, 1),
               vmhwm_mb=round(hwm_rss_mb(), 1))
    res = Path(args.outdir) / "results.parquet"
    if res.exists():
        import pandas as pd

        out["result_rows"] = len(pd.read_parquet(res, columns=["trt"]))
    Path(args.json).write_text(json.dumps(out))
    return 0


def batches_child(args) -> int:
    """Alternate disk / memory runs of the same first K batches in one process."""
    import anndata as ad
    import pandas as pd

    import causarray.batch as bm
    from causarray.preprocessing import from_anndata

    _limit_batches(args.max_batches)
    times: dict[int, dict] = {}
    make, run = bm._make_job, bm._run_batch

    def timed_make(data, plan, **kw):
        t0, c0 = time.perf_counter(), time.process_time()
        job = make(data, plan, **kw)
        times[plan.batch] = dict(make_s=time.perf_counter() - t0,
                                 make_cpu_s=time.process_time() - c0,
                                 n_cells=int(plan.cell_idx.size))
        return job

    def timed_run(job):
        t0, c0 = time.perf_counter(), time.process_time()
        res = run(job)
        times[job.batch]["fit_s"] = time.perf_counter() - t0
        times[job.batch]["fit_cpu_s"] = time.process_time() - c0
        times[job.batch]["read_s"] = float(res.get("t_read", 0.0))
        return res

    bm._make_job, bm._run_batch = timed_make, timed_run
    es = dict(rel_tol=2e-4, max_iters=args.max_iters)
    kw = dict(r=args.r, batch_size=15, n_ctrl=2000, max_cells=None, family="nb",
              random_state=0, blas_threads=1,
              gcate_kwargs=dict(kwargs_es_1=dict(es), kwargs_es_2=dict(es)))
    t0 = time.perf_counter()
    mem = ad.read_h5ad(args.data)
    Y, A, X, X_A = from_anndata(mem, PERT_COL, CTRL, sparse_treatments=True)
    genes = list(mem.var_names)
    del mem
    Y = pd.DataFrame.sparse.from_spmatrix(Y, columns=genes)
    load_s = time.perf_counter() - t0
    calls, frames = [], {}
    for i in range(args.rounds):
        for mode in ("disk", "memory"):
            times.clear()
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            if mode == "disk":
                df = bm.gcate_lfc_batch(args.data, pert_col=PERT_COL, ctrl_label=CTRL, **kw)
            else:
                df = bm.gcate_lfc_batch(Y, X, A, W_A=X_A, **kw)
            wall = time.perf_counter() - t0
            per = [dict(batch=b, **{k: round(v, 3) if isinstance(v, float) else v
                                    for k, v in t.items()},
                        batch_s=round(t["make_s"] + t["fit_s"], 3),
                        batch_cpu_s=round(t["make_cpu_s"] + t["fit_cpu_s"], 3))
                   for b, t in sorted(times.items())]
            calls.append(dict(round=i, mode=mode, load_avg_1min=round(load, 2),
                              wall_s=round(wall, 2),
                              outside_batches_s=round(wall - sum(p["batch_s"] for p in per), 2),
                              batches=per))
            frames.setdefault(mode, df)
            print(json.dumps(calls[-1]), flush=True)
    try:
        pd.testing.assert_frame_equal(frames["disk"], frames["memory"], check_exact=True)
        identical = True
    except AssertionError:
        identical = False
    Path(args.json).write_text(json.dumps(dict(calls=calls, identical=identical,
                                               in_memory_load_s=round(load_s, 1),
                                               vmhwm_mb=round(hwm_rss_mb(), 1))))
    return 0


# ----------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------
def _ref_pass() -> float | None:
    if not REF_PASS.exists():
        return None
    out = subprocess.run([sys.executable, str(REF_PASS)], capture_output=True, text=True, check=False)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _child(cmd: list[str], env_src: str | None, timeout: float, threads: int = 1) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    n = str(threads)
    env = dict(os.environ, OMP_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, MKL_NUM_THREADS=n)
    if env_src:
        env["PYTHONPATH"] = str(Path(env_src).resolve())
    proc = subprocess.run(cmd + ["--json", out], env=env, timeout=timeout, check=False)
    if proc.returncode != 0:
        return dict(status="failed", returncode=proc.returncode)
    res = json.loads(Path(out).read_text())
    os.unlink(out)
    return res


def _summary_batches(res: dict) -> dict:
    """Mean time per batch per mode and the disk / memory ratio, per batch and overall."""
    by_mode: dict[str, dict[int, list[float]]] = {}
    for call in res["calls"]:
        for b in call["batches"]:
            by_mode.setdefault(call["mode"], {}).setdefault(b["batch"], []).append(b["batch_s"])
    disk, memory = by_mode.get("disk", {}), by_mode.get("memory", {})
    per_batch = {b: round(float(np.mean(disk[b]) / np.mean(memory[b])), 3)
                 for b in sorted(disk) if b in memory}
    all_d = [v for b in disk.values() for v in b]
    all_m = [v for b in memory.values() for v in b]
    # paired by round and batch: each disk batch over the memory batch run right after it
    pairs, cpu_pairs = [], []
    calls = res["calls"]
    for c_d, c_m in zip(calls[0::2], calls[1::2]):
        for bd, bmm in zip(c_d["batches"], c_m["batches"]):
            pairs.append(bd["batch_s"] / bmm["batch_s"])
            if "batch_cpu_s" in bd:
                cpu_pairs.append(bd["batch_cpu_s"] / bmm["batch_cpu_s"])
    cpu = {m: [b["batch_cpu_s"] for c in calls if c["mode"] == m for b in c["batches"]
               if "batch_cpu_s" in b] for m in ("disk", "memory")}
    return dict(mean_batch_s_disk=round(float(np.mean(all_d)), 2),
                mean_batch_s_memory=round(float(np.mean(all_m)), 2),
                ratio_disk_over_memory=round(float(np.mean(all_d) / np.mean(all_m)), 3),
                ratio_per_batch=per_batch,
                paired_ratios=[round(v, 3) for v in pairs],
                # CPU seconds of the (single-threaded) batch: what the machine's load
                # does not inflate; the disk read's waiting shows in the wall times only
                ratio_cpu_disk_over_memory=(round(float(np.mean(cpu["disk"])
                                                        / np.mean(cpu["memory"])), 3)
                                            if cpu["disk"] and cpu["memory"] else None),
                paired_cpu_ratios=[round(v, 3) for v in cpu_pairs],
                mean_read_s_disk=round(float(np.mean(
                    [b["read_s"] for c in calls if c["mode"] == "disk" for b in c["batches"]])), 3),
                mean_make_s_memory=round(float(np.mean(
                    [b["make_s"] for c in calls if c["mode"] == "memory" for b in c["batches"]])), 3))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("_cli")
    c.add_argument("--src", required=True)
    c.add_argument("--outdir", required=True)
    b = sub.add_parser("_batches")
    for p in (c, b):
        p.add_argument("--data", required=True)
        p.add_argument("--max-batches", type=int, default=2)
        p.add_argument("--r", type=int, default=30)
        p.add_argument("--max-iters", type=int, default=30)
        p.add_argument("--json", required=True)
    b.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--data", help="essential-shaped .h5ad (benchmarks/batch.py "
                                   "--config essential --generate-only)")
    ap.add_argument("--src", action="append", default=[], metavar="LABEL=PATH",
                    help="source tree (the folder holding causarray/) of a CLI run; repeat")
    ap.add_argument("--max-batches", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="disk/memory alternations")
    ap.add_argument("--r", type=int, default=30)
    ap.add_argument("--max-iters", type=int, default=30)
    ap.add_argument("--cli-threads", type=int, default=1,
                    help="BLAS threads (OMP_NUM_THREADS) of each CLI run (default 1)")
    ap.add_argument("--skip-cli", action="store_true")
    ap.add_argument("--skip-batches", action="store_true")
    ap.add_argument("--batches-src", default="src",
                    help="source tree of the disk/memory timing (default src)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--name", default="ondisk_vs_memory")
    args = ap.parse_args()
    if args.cmd == "_cli":
        return cli_child(args)
    if args.cmd == "_batches":
        return batches_child(args)
    if not args.data:
        ap.error("--data is required")
    data = str(Path(args.data).resolve())
    common = ["--data", data, "--max-batches", str(args.max_batches), "--r", str(args.r),
              "--max-iters", str(args.max_iters)]
    result: dict = dict(data=data, file_mb=round(Path(data).stat().st_size / 2**20, 1),
                        max_batches=args.max_batches, r=args.r, max_iters=args.max_iters,
                        command="python benchmarks/ondisk.py " + " ".join(sys.argv[1:]))
    import h5py

    with h5py.File(data, "r") as f:
        result["shape"] = [int(v) for v in f["X"].attrs["shape"]]
        result["nnz"] = int(f["X"]["indptr"][-1])
        labels = f["obs"][PERT_COL]
        cats = labels["categories"][...] if isinstance(labels, h5py.Group) else None
    if cats is not None:
        result["n_perturbations"] = int(len(cats) - 1)
    result["ref_pass_s"] = _ref_pass()
    rows = []
    if not args.skip_cli:
        for spec in args.src:
            label, _, path = spec.partition("=")
            with tempfile.TemporaryDirectory(prefix="ondisk_cli_") as outdir:
                load = os.getloadavg()[0]
                res = _child([sys.executable, __file__, "_cli", "--src", path, "--outdir",
                              outdir] + common, path, args.timeout, args.cli_threads)
            res.update(label=label, load_avg_1min=round(load, 2), threads=args.cli_threads)
            rows.append(res)
            print(json.dumps(res), flush=True)
    result["rows"] = rows
    if not args.skip_batches:
        res = _child([sys.executable, __file__, "_batches", "--rounds", str(args.rounds)]
                     + common, args.batches_src, args.timeout)
        result["disk_vs_memory"] = res
        if "calls" in res:
            result["disk_vs_memory_summary"] = _summary_batches(res)
            print(json.dumps(result["disk_vs_memory_summary"]), flush=True)
    write_result(args.name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
