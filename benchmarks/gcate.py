"""GCATE benchmark: our ``fit_gcate`` against causarray 0.1.1, side by side (time, peak
memory, latent recovery and objective reached).

Two shapes (``--shape small|tutorial|both``):

* ``small``: 2,000 controls + 15 perturbations x 300 cells (6,500 cells) x 2,000 genes,
  10 true confounders, fitted with r = 10;
* ``tutorial``: the seed tutorial's batch shape, 2,000 controls + 15 perturbations x 134
  cells (2,010 perturbed) x 8,563 genes, 10 true confounders, fitted with r = 30.

Both use ``simulate_screen(..., confounding=0.5)`` (the confounders' mean shifts with the
perturbation) and ``max_iters=30`` for both stages of both implementations. Genes
without any count are dropped; both sides get exactly the same dense ``Y, X = 1, A``
through one ``.npz`` file.

Each side runs in a fresh subprocess, so the wall time includes the cold start
(interpreter, imports, numba JIT for the original, data loading): it is measured from
the start of the process (``/proc/self/stat``) to the end of ``fit_gcate``. Peak RSS is
the kernel's high-water mark of that subprocess's own address space (``VmHWM``, read by
the subprocess at its end; ``wait4``'s ``ru_maxrss`` is also stored, but Linux carries it
over fork and exec, so it is at least the benchmark parent's RSS at the fork). The original runs in its
own virtual environment (``benchmarks/upstream.py``) with a fresh numba cache.

Recovery metrics, for each U estimate (n x r):

* ``r2_U``: share of the variance of each true factor explained by an OLS regression
  on ``[X | U_hat]``, averaged over the true factors;
* ``r2_shift``: share of the per-perturbation mean shift of the true U (treated mean
  minus control mean, all perturbations and factors) reproduced by the same regression's
  fitted values — the treatment-correlated confounding that the doubly robust step
  must adjust for;
* ``cancorr_mean``: mean canonical correlation between our U and the original's
  (centred); ``cancorr_top_r_true_mean``: the mean of the largest r_true of them (with
  r = 30 > r_true = 10 the remaining directions fit noise in both models);
  ``cancorr_resid_mean``: all of them after projecting both U on the orthogonal
  complement of ``[X | A]`` (the part both models estimate in the same way);
* ``profile_nll`` (``ours NLL`` / ``0.1.1 NLL``): the objective each U reaches on one
  yardstick -- the mean NB negative log-likelihood per entry of every gene's GLM on
  ``[X | U | A]`` fitted to convergence with the same size factors and NB sizes.

Usage::

    python benchmarks/gcate.py                          # small shape, both sides
    python benchmarks/gcate.py --shape both --upstream-timeout 2400
    python benchmarks/gcate.py --shape tutorial --skip-upstream

``--threads N`` sets the BLAS/OpenMP/numba thread count of both subprocesses (default:
inherited; on a shared 2-core machine one thread per process avoids oversubscription).

Results: ``benchmarks/results/gcate.json`` and ``gcate.md``, one entry per (shape,
threads) configuration; configurations not run in this invocation are kept from the
previous file (``--skip-upstream`` runs are kept apart from side-by-side ones).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from _common import (RESULTS_DIR, code_version, hwm_rss_mb, load_npz_problem, save_npz_problem,
                     write_result)

SCRATCH = BENCH_DIR / "scratch" / "gcate"

SHAPES: dict[str, dict[str, Any]] = {
    "small": {"sim": {"n_ctrl": 2000, "n_perts": 15, "cells_per_pert": 300, "n_genes": 2000, "r": 10,
                           "confounding": 0.5},
                  "r": 10, "max_iters": 30, "upstream_timeout": 3600.0},
    "tutorial": {"sim": {"n_ctrl": 2000, "n_perts": 15, "cells_per_pert": 134, "n_genes": 8563, "r": 10,
                              "confounding": 0.5},
                     "r": 30, "max_iters": 30, "upstream_timeout": 3600.0},
}


# ----------------------------------------------------------------------------------
# statistics of the latent factors
# ----------------------------------------------------------------------------------
def r2_on_span(U_true: np.ndarray, D: np.ndarray) -> np.ndarray:
    """Share of each column's variance of ``U_true`` explained by OLS on the columns of ``D``.

    Parameters
    ----------
    U_true : (n, r) true factors.
    D : (n, k) regressors (include the intercept).

    Returns
    -------
    ndarray (r,)
    """
    coef, *_ = np.linalg.lstsq(D, U_true, rcond=None)
    resid = U_true - D @ coef
    return 1.0 - resid.var(axis=0) / U_true.var(axis=0)


def shift_r2(U_true: np.ndarray, D: np.ndarray, A: np.ndarray) -> float:
    """Share of the per-perturbation mean shift of ``U_true`` reproduced by its fit on ``D``.

    The shift of perturbation k is the mean of ``U_true`` over its cells minus the mean
    over the control cells; the same is computed for the OLS fitted values of
    ``U_true`` on ``D``. Returns ``1 - ||shift_true - shift_fit||^2 / ||shift_true||^2``.
    """
    fitted = D @ np.linalg.lstsq(D, U_true, rcond=None)[0]
    ctrl = A.sum(axis=1) == 0
    cols = range(A.shape[1])
    s_true = np.array([U_true[A[:, k] == 1].mean(0) - U_true[ctrl].mean(0) for k in cols])
    s_fit = np.array([fitted[A[:, k] == 1].mean(0) - fitted[ctrl].mean(0) for k in cols])
    return float(1.0 - ((s_true - s_fit) ** 2).sum() / (s_true ** 2).sum())


def canonical_correlations(U1: np.ndarray, U2: np.ndarray, Z: np.ndarray | None = None
                           ) -> np.ndarray:
    """Canonical correlations between the column spaces of ``U1`` and ``U2``.

    Both are centred (or, when ``Z`` is given, residualised on ``Z``, which should contain
    the intercept) and orthonormalised; the canonical correlations are the singular
    values of ``Q1' Q2`` (``min(r1, r2)`` of them, descending).
    """
    def resid(U: np.ndarray) -> np.ndarray:
        if Z is None:
            return U - U.mean(axis=0)
        return U - Z @ np.linalg.lstsq(Z, U, rcond=None)[0]

    def basis(U: np.ndarray) -> np.ndarray:
        u, s, _ = np.linalg.svd(U, full_matrices=False)
        return u[:, s > s[0] * 1e-10]

    Q1, Q2 = basis(resid(U1)), basis(resid(U2))
    return np.clip(np.linalg.svd(Q1.T @ Q2, compute_uv=False), 0.0, 1.0)


def profile_nll(npz: Path, X: np.ndarray, A: np.ndarray, U_list: list[np.ndarray]) -> list[float]:
    """Mean NB negative log-likelihood per entry of the best GLM on ``[X | U | A]``, per U.

    One common yardstick for both implementations: for each U, every gene's GLM is fitted
    to convergence with the same size factors (median of ratios) and NB sizes (method of
    moments on ``[X | A]``), and the full NB likelihood (constants included) is evaluated.
    The factor model's objective at its optimum is exactly this profile at its U.
    """
    from causarray.glm import _iter_fitted_means, estimate_dispersion, fit_glm, nb_loglik
    from causarray.preprocessing import comp_size_factor

    Y = load_npz_problem(npz, dense=True)["Y"]
    log_s = np.log(comp_size_factor(Y))
    size = estimate_dispersion(Y, X, A, offset=log_s)
    alpha = 1.0 / size
    out = []
    for U in U_list:
        W = np.hstack([X, U])
        fit = fit_glm(Y, W, A, family="nb", size=size, offset=log_s, max_iter=100,
                      compute_se=False)
        total = sum(float(nb_loglik(y, mu, alpha[cols][None, :]).sum())
                    for cols, y, mu in _iter_fitted_means(Y, fit, W, A, log_s))
        out.append(-total / Y.size)
    return out


def recovery_metrics(U_hat: np.ndarray, U_true: np.ndarray, X: np.ndarray, A: np.ndarray
                     ) -> dict[str, float]:
    """``r2_U`` (mean over true factors), its minimum and ``r2_shift`` for one estimate."""
    D = np.hstack([X, U_hat])
    r2 = r2_on_span(U_true, D)
    return {"r2_U": float(r2.mean()), "r2_U_min": float(r2.min()),
            "r2_shift": shift_r2(U_true, D, A)}


# ----------------------------------------------------------------------------------
# our side: a fresh subprocess
# ----------------------------------------------------------------------------------
def _process_age_s() -> float | None:
    """Seconds since this process started (``/proc/self/stat`` start time vs uptime)."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _child_ours(args: argparse.Namespace) -> int:
    """Inside the fresh subprocess: load the problem, import causarray, fit, save U."""
    age0 = _process_age_s()
    pc0 = time.perf_counter()
    out = Path(args.out)
    res: dict[str, Any] = {"status": "running", "r": args.r, "max_iters": args.max_iters}
    code = 1
    try:
        t = time.perf_counter()
        prob = load_npz_problem(args.data, dense=True)
        res["t_load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        import causarray
        from causarray.gcate import fit_gcate
        res["t_import_s"] = time.perf_counter() - t
        res["version"] = causarray.__version__
        es = {"max_iters": args.max_iters}
        t = time.perf_counter()
        res_1, res_2 = fit_gcate(prob["Y"], prob["X"], prob["A"], args.r,
                                 kwargs_es_1=es, kwargs_es_2=es)
        res["t_gcate_s"] = time.perf_counter() - t
        np.save(out.with_name(out.stem + "_U.npy"), np.asarray(res_2["U"], float))
        res["gcate"] = {f"stage_{i}": {"n_iter": int(rr["n_iter"]),
                                       "func_val": float(rr["func_val"]),
                                       "hist": [float(h) for h in np.ravel(rr["hist"])]}
                        for i, rr in ((1, res_1), (2, res_2))}
        res["status"] = "ok"
        code = 0
    except MemoryError as exc:
        res.update(status="memory_error", error=str(exc))
        code = 3
    except Exception as exc:  # noqa: BLE001 - reported in the JSON
        res.update(status="error", error=f"{type(exc).__name__}: {exc}")
    finally:
        res["wall_s"] = None if age0 is None else age0 + time.perf_counter() - pc0
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        res["peak_hwm_mb"] = hwm_rss_mb()
        out.write_text(json.dumps(res, indent=2))
    return code


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def run_ours(npz: Path, r: int, max_iters: int, timeout: float | None = None,
             n_threads: int | None = None) -> dict[str, Any]:
    """Run our ``fit_gcate`` on ``npz`` in a fresh interpreter; return its JSON + wait4 RSS.

    ``n_threads`` sets the BLAS/OpenMP thread variables of the subprocess (default: inherit).
    """
    env = dict(os.environ)
    if n_threads is not None:
        env.update({k: str(int(n_threads)) for k in THREAD_VARS})
    out = npz.with_name(npz.stem + f"_ours_r{r}.json")
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_ours", "--data", str(npz),
           "--r", str(r), "--max-iters", str(max_iters), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env=env)
    timed_out = False
    while True:
        pid, wstatus, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if timeout is not None and time.perf_counter() - t0 > timeout:
            timed_out = True
            os.killpg(proc.pid, 9)
            pid, wstatus, rusage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(wstatus)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    res = json.loads(out.read_text()) if out.exists() else {"status": "error"}
    if timed_out:
        res.update(status="timeout", error=f"killed after {timeout:g} s")
    if res.get("status") != "ok":
        res["stderr_tail"] = stderr[-2000:]
    res.update(outer_wall_s=time.perf_counter() - t0, returncode=proc.returncode,
               peak_rss_mb_wait4=rusage.ru_maxrss / 1024.0,
               cpu_s=rusage.ru_utime + rusage.ru_stime,
               U_path=str(out.with_name(out.stem + "_U.npy")))
    return res


# ----------------------------------------------------------------------------------
# one shape
# ----------------------------------------------------------------------------------
def make_problem(shape: str, seed: int) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """Simulate the shape, drop empty genes, save ``.npz``; return (path, X, A, U_true)."""
    from causarray.simulate import design_from_simulation, simulate_screen

    cfg = SHAPES[shape]
    ad = simulate_screen(**cfg["sim"], random_state=seed)
    Y, X, A = design_from_simulation(ad)
    Y = Y[:, Y.sum(axis=0) > 0]
    U_true = np.asarray(ad.obsm["U_true"], float)
    npz = save_npz_problem(SCRATCH / f"{shape}_seed{seed}.npz", Y, X, A, U_true=U_true)
    return npz, X, A, U_true


def _side_summary(res: dict[str, Any]) -> dict[str, Any]:
    keep = ("status", "wall_s", "t_load_s", "t_import_s", "t_gcate_s", "peak_hwm_mb", "peak_rss_mb",
            "peak_rss_mb_wait4", "outer_wall_s", "cpu_s", "error", "version", "upstream_version")
    out = {k: res.get(k) for k in keep if k in res}
    g = res.get("gcate") or {}
    for st in ("stage_1", "stage_2"):
        if st in g:
            out[f"{st}_n_iter"] = g[st].get("n_iter")
    return out


def bench_shape(shape: str, seed: int, skip_upstream: bool, upstream_timeout: float | None,
                upstream_mem_cap_mb: float | None, n_threads: int | None = None
                ) -> dict[str, Any]:
    """Run both sides on one shape and compute timing ratios and recovery metrics."""
    from upstream import run_upstream

    cfg = SHAPES[shape]
    npz, X, A, U_true = make_problem(shape, seed)
    n = X.shape[0]
    p = int(np.load(npz)["Y"].shape[1])
    entry: dict[str, Any] = {
        "shape": shape, "n_cells": n, "n_genes": p, "n_perts": A.shape[1],
        "r_true": cfg["sim"]["r"], "r": cfg["r"], "max_iters": cfg["max_iters"],
        "confounding": cfg["sim"]["confounding"], "seed": seed,
        "blas_threads": "default" if n_threads is None else int(n_threads),
    }
    load0 = os.getloadavg()[0]
    ours = run_ours(npz, cfg["r"], cfg["max_iters"], n_threads=n_threads)
    entry["ours"] = _side_summary(ours)
    entry["ours"]["loadavg_1min_before_after"] = [load0, os.getloadavg()[0]]
    U_ours = np.load(ours["U_path"]) if ours.get("status") == "ok" else None
    if U_ours is not None:
        entry["ours"].update(recovery_metrics(U_ours, U_true, X, A))

    if skip_upstream:
        entry["upstream"] = {"status": "skipped"}
        return entry
    timeout = upstream_timeout if upstream_timeout is not None else cfg["upstream_timeout"]
    load0 = os.getloadavg()[0]
    up = run_upstream(npz, "gcate", cfg["r"], max_iters=cfg["max_iters"], timeout=timeout,
                      rlimit_as_mb=upstream_mem_cap_mb, numba_cache="fresh", n_threads=n_threads)
    entry["upstream"] = _side_summary(up)
    entry["upstream"]["loadavg_1min_before_after"] = [load0, os.getloadavg()[0]]
    entry["upstream"]["timeout_s"] = timeout
    if up.get("status") != "ok":
        entry["upstream"]["log_tail"] = (up.get("log_tail") or "")[-1500:]
        return entry
    U_up = np.load(up["U_path"])
    entry["upstream"].update(recovery_metrics(U_up, U_true, X, A))
    if U_ours is not None:
        Z = np.hstack([X, A])
        cc = canonical_correlations(U_ours, U_up)
        entry["cancorr_mean"] = float(cc.mean())
        entry["cancorr_top_r_true_mean"] = float(cc[: cfg["sim"]["r"]].mean())
        entry["cancorr_resid_mean"] = float(canonical_correlations(U_ours, U_up, Z).mean())
        entry["speedup_wall"] = up["wall_s"] / ours["wall_s"]
        entry["speedup_gcate_only"] = up["t_gcate_s"] / ours["t_gcate_s"]
        entry["memory_ratio"] = _peak_mb(ours) / _peak_mb(up)
        nll = profile_nll(npz, X, A, [U_ours, U_up])
        entry["ours"]["profile_nll"], entry["upstream"]["profile_nll"] = nll
    return entry


def _peak_mb(res: dict[str, Any]) -> float:
    """The subprocess's own peak RSS: ``VmHWM`` when it reported it, else ``wait4``'s maxrss
    (which Linux inflates to at least the parent's RSS at the fork)."""
    return res.get("peak_hwm_mb") or res.get("peak_rss_mb_wait4")


def _row(entry: dict[str, Any]) -> dict[str, Any]:
    o, u = entry.get("ours", {}), entry.get("upstream", {})
    return {
        "shape": entry["shape"],
        "cells x genes": f"{entry['n_cells']} x {entry['n_genes']}",
        "r": entry["r"],
        "BLAS threads": entry.get("blas_threads", "default"),
        "ours wall s": o.get("wall_s"),
        "0.1.1 wall s": u.get("wall_s") if u.get("status") == "ok" else u.get("status"),
        "speed-up": entry.get("speedup_wall"),
        "ours fit s": o.get("t_gcate_s"),
        "0.1.1 fit s": u.get("t_gcate_s"),
        "ours peak MiB": _peak_mb(o) if o.get("status") == "ok" else None,
        "0.1.1 peak MiB": _peak_mb(u) if u.get("status") == "ok" else None,
        "mem ratio": entry.get("memory_ratio"),
        "ours R2 U": o.get("r2_U"),
        "0.1.1 R2 U": u.get("r2_U"),
        "ours R2 shift": o.get("r2_shift"),
        "0.1.1 R2 shift": u.get("r2_shift"),
        "cancorr": entry.get("cancorr_mean"),
        "cancorr (first r_true)": entry.get("cancorr_top_r_true_mean"),
        "cancorr (resid. on X,A)": entry.get("cancorr_resid_mean"),
        "ours NLL": o.get("profile_nll"),
        "0.1.1 NLL": u.get("profile_nll"),
    }


def _key(entry: dict[str, Any]) -> str:
    """Results are kept per (shape, BLAS threads, ours-only or side by side) configuration."""
    skipped = entry.get("upstream", {}).get("status") == "skipped"
    return f"{entry['shape']}|{entry.get('blas_threads', 'default')}|{'ours' if skipped else 'both'}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command")
    child = sub.add_parser("_ours", help=argparse.SUPPRESS)
    child.add_argument("--data", required=True)
    child.add_argument("--r", type=int, required=True)
    child.add_argument("--max-iters", type=int, default=30)
    child.add_argument("--out", required=True)
    ap.add_argument("--shape", choices=("small", "tutorial", "both"), default="small")
    ap.add_argument("--skip-upstream", action="store_true",
                    help="time only our fit_gcate (no causarray 0.1.1 run)")
    ap.add_argument("--upstream-timeout", type=float, default=None,
                    help="seconds before the 0.1.1 subprocess is killed (default 3600)")
    ap.add_argument("--upstream-mem-cap-mb", type=float, default=None,
                    help="RLIMIT_AS cap of the 0.1.1 subprocess in MiB (default none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS/OpenMP/numba threads of both subprocesses (default: inherit)")
    args = ap.parse_args(argv)
    if args.command == "_ours":
        return _child_ours(args)

    shapes = ["small", "tutorial"] if args.shape == "both" else [args.shape]
    json_path = RESULTS_DIR / "gcate.json"
    previous = {}
    if json_path.exists():
        try:
            previous = {_key(e): e for e in json.loads(json_path.read_text()).get("shapes", [])}
        except (json.JSONDecodeError, KeyError, TypeError):
            previous = {}
    for shape in shapes:
        print(f"[gcate] shape {shape} ...", flush=True)
        entry = bench_shape(shape, args.seed, args.skip_upstream, args.upstream_timeout,
                            args.upstream_mem_cap_mb, args.threads)
        entry["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
        entry["code"] = code_version()
        previous[_key(entry)] = entry
        print(json.dumps(_row(entry), indent=1, default=str), flush=True)
    entries = sorted(previous.values(), key=lambda e: (list(SHAPES).index(e["shape"]),
                                                      str(e.get("blas_threads", "default"))))
    write_result("gcate", {
        "description": "fit_gcate side by side with causarray 0.1.1; wall time from process "
                       "start (cold start included), peak RSS of each subprocess's own address "
                       "space (VmHWM); NLL = profiled mean NB NLL per entry of each U",
        "rows": [_row(e) for e in entries],
        "shapes": entries,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
