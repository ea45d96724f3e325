"""Side-by-side harness against the original causarray 0.1.1 from PyPI (benchmarks only).

The original package is installed in its own virtual environment
(``benchmarks/.venv-upstream``, git-ignored) and is only ever run in a subprocess, so
it never meets our package. Nothing in ``src/`` or ``tests/`` imports this file.

Parent side (our environment, standard library only at import time)
    ``ensure_upstream_venv(path)``  create the venv, ``pip install causarray==0.1.1`` and
    record the exact versions in ``benchmarks/results/upstream_env.txt``.
    ``run_upstream(npz_path, task, r, ...) -> dict``  run one fit in a subprocess with
    a timeout and an optional address-space cap; failures come back as a status,
    never as an exception.

Child side (inside the upstream venv)::

    python benchmarks/upstream.py run --data X.npz --task gcate|lfc|both --r R \\
        --out result.json [--max-iters 30]

loads ``Y, X, A[, X_A, U, size_factor]`` (see ``_common.save_npz_problem``), calls the
upstream ``fit_gcate(Y, X, A, r, kwargs_es_1=..., kwargs_es_2=...)`` and/or
``LFC(Y, [X|U], A, [X_A|U], offset=log(size_factor))`` and writes ``result.json`` with
``wall_s`` measured from process start (imports and numba JIT included), peak RSS, and
paths of ``result_U.npy`` / ``result_size_factor.npy`` / ``result_lfc.csv.gz``.

Other commands: ``install [--force]`` (runs :func:`ensure_upstream_venv`) and
``smoke`` (a tiny random problem end to end).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

UPSTREAM_VERSION = "0.1.1"
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_VENV = "benchmarks/.venv-upstream"
ENV_RECORD = BENCH_DIR / "results" / "upstream_env.txt"
TASKS = ("gcate", "lfc", "both")
_MARKER = f".installed-causarray-{UPSTREAM_VERSION}"
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
_MEMORY_MARKERS = (
    "MemoryError",
    "std::bad_alloc",
    "Cannot allocate memory",
    "Unable to allocate",
    "out of memory",
    "OutOfMemory",
)


# ======================================================================================
# parent side
# ======================================================================================
def _resolve(path: str | os.PathLike) -> Path:
    """Resolve a relative path against the repository root (not the working directory)."""
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def upstream_python(path: str | os.PathLike = DEFAULT_VENV) -> Path:
    """Path of the interpreter of the upstream venv (which may not exist yet)."""
    return _resolve(path) / "bin" / "python"


def _read_pins(record: Path) -> list[str]:
    """``name==version`` lines of a previous environment record."""
    if not record.exists():
        return []
    return [
        ln.strip()
        for ln in record.read_text().splitlines()
        if ln.strip() and not ln.startswith("#") and "==" in ln
    ]


def _tail(text: str, n: int = 3000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def ensure_upstream_venv(
    path: str | os.PathLike = DEFAULT_VENV,
    *,
    python: str | os.PathLike | None = None,
    pinned: bool = True,
    force: bool = False,
    record: str | os.PathLike | None = ENV_RECORD,
    timeout: float = 1800.0,
) -> Path:
    """Create (once) a separate venv holding causarray 0.1.1 from PyPI.

    Parameters
    ----------
    path : path-like
        Venv directory; relative paths are taken from the repository root.
    python : path-like, optional
        Interpreter that creates the venv (default: the running one).
    pinned : bool
        If a previous record exists, install with its ``name==version`` lines as pip
        constraints, so that reruns get the same dependency versions.
    force : bool
        Delete and recreate an existing venv.
    record : path-like or None
        Where to write the exact installed versions (``pip freeze --all``) and the install
        time; ``None`` writes nothing.
    timeout : float
        Seconds allowed for venv creation plus installation.

    Returns
    -------
    Path
        The venv's ``bin/python``.

    Raises
    ------
    RuntimeError
        If venv creation or ``pip install`` fails (the message has pip's output tail).
    """
    venv = _resolve(path)
    py = venv / "bin" / "python"
    marker = venv / _MARKER
    if marker.exists() and py.exists() and not force:
        return py
    if venv.exists():
        shutil.rmtree(venv)
    record_path = _resolve(record) if record is not None else None
    pins = _read_pins(record_path) if (pinned and record_path is not None) else []

    t0 = time.perf_counter()
    base = str(python) if python is not None else sys.executable
    proc = subprocess.run(
        [base, "-m", "venv", str(venv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"creating venv {venv} failed:\n{_tail(proc.stderr + proc.stdout)}")
    cmd = [
        str(py),
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        f"causarray=={UPSTREAM_VERSION}",
    ]
    if pins:
        constraints = venv / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        cmd += ["-c", str(constraints)]
    env = _clean_env()
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=max(1.0, timeout - (time.perf_counter() - t0)),
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"pip install causarray=={UPSTREAM_VERSION} failed:\n{_tail(proc.stderr + proc.stdout)}"
        )
    install_s = time.perf_counter() - t0

    freeze = subprocess.run(
        [str(py), "-m", "pip", "freeze", "--all", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    pyver = subprocess.run(
        [str(py), "-c", "import sys; print(sys.version.split()[0])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if record_path is not None:
        from _common import portable_path

        record_path.parent.mkdir(parents=True, exist_ok=True)
        header = [
            f"# Environment of the original causarray {UPSTREAM_VERSION} (PyPI) used by benchmarks/upstream.py",
            "# written by ensure_upstream_venv(); the lines below are `pip freeze --all` of that venv",
            f"# date: {_dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec='seconds')}",
            f"# python: {pyver} (venv created by {portable_path(str(base))})",
            f"# platform: {platform.platform()}",
            f"# install_s: {install_s:.1f} (venv creation + pip install, downloads included)",
            f"# pinned_to_previous_record: {bool(pins)}",
        ]
        record_path.write_text("\n".join(header) + "\n" + freeze)
    marker.write_text(f"install_s={install_s:.1f}\n")
    return py


def _clean_env(n_threads: int | None = None) -> dict[str, str]:
    """Environment for the upstream subprocess: no PYTHONPATH/venv leakage from ours."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    env["PYTHONUNBUFFERED"] = "1"
    if n_threads is not None:
        for k in _THREAD_VARS:
            env[k] = str(int(n_threads))
    return env


def _default_out(npz_path: Path, task: str, r: int) -> Path:
    return npz_path.with_name(f"{npz_path.stem}_upstream_{task}_r{r}.json")


def _side_paths(out: Path) -> dict[str, Path]:
    stem = out.with_suffix("")
    return {
        "U": stem.with_name(stem.name + "_U.npy"),
        "size_factor": stem.with_name(stem.name + "_size_factor.npy"),
        "lfc": stem.with_name(stem.name + "_lfc.csv.gz"),
        "log": stem.with_name(stem.name + ".log"),
    }


def run_upstream(
    npz_path: str | os.PathLike,
    task: str,
    r: int,
    *,
    out: str | os.PathLike | None = None,
    max_iters: int = 30,
    rel_tol: float | None = None,
    seed: int = 0,
    gcate_kwargs: dict | None = None,
    lfc_kwargs: dict | None = None,
    timeout: float | None = None,
    rlimit_as_mb: float | None = None,
    n_threads: int | None = None,
    numba_cache: str = "fresh",
    venv: str | os.PathLike = DEFAULT_VENV,
    ensure: bool = True,
) -> dict[str, Any]:
    """Run the original causarray on a saved problem in a subprocess.

    Parameters
    ----------
    npz_path : path-like
        Problem written by ``_common.save_npz_problem`` (``Y``, ``X``, ``A``, optional
        ``X_A``; for ``task='lfc'`` optional ``U`` and ``size_factor``).
    task : {'gcate', 'lfc', 'both'}
        What to run. ``'lfc'`` alone uses ``U`` from the file if present (else ``W = X``)
        and ``size_factor`` from the file if present (else upstream ``comp_size_factor``).
    r : int
        Number of latent factors for ``fit_gcate``.
    out : path-like, optional
        Result JSON (default: beside the ``.npz``). Side files ``<stem>_U.npy``,
        ``<stem>_size_factor.npy``, ``<stem>_lfc.csv.gz`` and the subprocess log
        ``<stem>.log`` go beside it.
    max_iters : int
        ``max_iters`` of both early stoppers (``kwargs_es_1``/``kwargs_es_2``).
    rel_tol : float, optional
        ``rel_tol`` of both early stoppers (upstream default when None).
    seed : int
        Passed to upstream ``reset_random_seeds`` before fitting.
    gcate_kwargs, lfc_kwargs : dict, optional
        Extra JSON-able keyword arguments for upstream ``fit_gcate`` / ``LFC``.
    timeout : float, optional
        Seconds before the subprocess (and its process group) is killed.
    rlimit_as_mb : float, optional
        ``RLIMIT_AS`` (address-space) cap for the subprocess, in MiB, applied after the
        imports (the result reports ``vm_size_at_cap_mb``, the address space already in
        use then; numba, LLVM and BLAS threads reserve far more address space than they
        keep resident, so the cap must exceed it). Allocations beyond the cap come back
        as status 'memory_error'. Combine with ``timeout``: a native library that
        retries failed allocations can spin instead of failing.
    n_threads : int, optional
        Sets OMP/OPENBLAS/MKL/NUMBA_NUM_THREADS in the subprocess.
    numba_cache : {'fresh', 'default'}
        ``'fresh'`` points ``NUMBA_CACHE_DIR`` at an empty temporary directory so the
        timing includes a true JIT cold start; ``'default'`` reuses numba's caches.
    venv : path-like
        Upstream venv directory.
    ensure : bool
        Create the venv if it is missing (otherwise a missing venv is a ValueError).

    Returns
    -------
    dict
        The child's JSON (see module docstring) plus ``status`` ('ok', 'timeout',
        'memory_error', 'error'), ``returncode``, ``signal``, ``outer_wall_s`` (spawn to
        exit), ``peak_rss_mb_wait4`` (kernel-reported peak RSS of the child and its
        descendants; available even when the child was killed), ``json_path``,
        ``log_path`` and, unless ok, ``log_tail``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if int(r) < 0:
        raise ValueError(f"r must be a non-negative integer, got {r!r}")
    if numba_cache not in ("fresh", "default"):
        raise ValueError(f"numba_cache must be 'fresh' or 'default', got {numba_cache!r}")
    npz = Path(npz_path).resolve()
    if not npz.exists():
        raise ValueError(f"problem file {npz} does not exist")
    out_path = Path(out).resolve() if out is not None else _default_out(npz, task, int(r))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    side = _side_paths(out_path)
    for p in (out_path, side["U"], side["size_factor"], side["lfc"]):
        p.unlink(missing_ok=True)

    if ensure:
        py = ensure_upstream_venv(venv)
    else:
        py = upstream_python(venv)
        if not py.exists():
            raise ValueError(
                f"upstream venv {py.parent.parent} does not exist; call ensure_upstream_venv()"
            )

    cmd = [
        str(py),
        str(Path(__file__).resolve()),
        "run",
        "--data",
        str(npz),
        "--task",
        task,
        "--r",
        str(int(r)),
        "--out",
        str(out_path),
        "--max-iters",
        str(int(max_iters)),
        "--seed",
        str(int(seed)),
    ]
    if rel_tol is not None:
        cmd += ["--rel-tol", repr(float(rel_tol))]
    if gcate_kwargs:
        cmd += ["--gcate-kwargs", json.dumps(gcate_kwargs)]
    if lfc_kwargs:
        cmd += ["--lfc-kwargs", json.dumps(lfc_kwargs)]
    if rlimit_as_mb is not None:
        cmd += ["--rlimit-as-mb", repr(float(rlimit_as_mb))]

    env = _clean_env(n_threads)
    cache_dir = None
    if numba_cache == "fresh":
        cache_dir = tempfile.mkdtemp(prefix="numba-cache-upstream-")
        env["NUMBA_CACHE_DIR"] = cache_dir

    timed_out = False
    t0 = time.perf_counter()
    try:
        with open(side["log"], "wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(out_path.parent),
                start_new_session=True,
            )
            while True:
                pid, wstatus, rusage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if timeout is not None and time.perf_counter() - t0 > timeout:
                    timed_out = True
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # the group we created with the child
                    except ProcessLookupError:
                        pass
                    pid, wstatus, rusage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.05)
        outer_wall = time.perf_counter() - t0
        returncode = os.waitstatus_to_exitcode(wstatus)
        proc.returncode = returncode  # reaped by wait4 above; keep Popen from waiting again
    finally:
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)

    log_text = side["log"].read_text(errors="replace") if side["log"].exists() else ""
    result: dict[str, Any] = {}
    if out_path.exists():
        try:
            result = json.loads(out_path.read_text())
        except json.JSONDecodeError as exc:
            result = {"status": "error", "error": f"unreadable result JSON: {exc}"}
    sig = -returncode if returncode < 0 else None
    if timed_out:
        result["status"] = "timeout"
        result["error"] = f"killed after the {timeout:g} s timeout"
    elif not result:
        if any(m in log_text for m in _MEMORY_MARKERS):
            result = {"status": "memory_error", "error": "out of memory (see log_tail)"}
        elif sig == signal.SIGKILL:
            result = {
                "status": "memory_error",
                "error": "killed by SIGKILL (most likely the kernel's out-of-memory killer)",
            }
        else:
            result = {
                "status": "error",
                "error": f"subprocess exited with {returncode} and wrote no result",
            }
    result.update(
        returncode=returncode,
        signal=sig,
        outer_wall_s=outer_wall,
        peak_rss_mb_wait4=rusage.ru_maxrss / 1024.0,
        json_path=str(out_path),
        log_path=str(side["log"]),
        timeout_s=timeout,
        rlimit_as_mb=rlimit_as_mb,
        n_threads=n_threads,
        numba_cache=numba_cache,
    )
    if result.get("status") != "ok":
        result["log_tail"] = _tail(log_text)
    return result


# ======================================================================================
# child side (runs inside the upstream venv)
# ======================================================================================
def _process_age_s() -> float | None:
    """Seconds since this process started (``/proc/self/stat`` starttime vs ``/proc/uptime``)."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5); fields after ')' start at field 3
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _vm_size_mb() -> float | None:
    """Current virtual address-space size (``VmSize``) of this process, in MiB."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmSize:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _apply_as_cap(cap_mb: float) -> dict[str, Any]:
    """Set ``RLIMIT_AS`` after the imports, once BLAS has allocated its thread buffers.

    OpenBLAS retries a failed buffer allocation forever, so a cap applied before numpy,
    scipy and the upstream package are loaded can hang the process instead of raising
    MemoryError. Applying it here caps the fit itself.
    """
    import numpy as np
    import scipy.linalg

    a = np.ones((256, 256))
    scipy.linalg.cho_factor(a @ a.T + 256 * np.eye(256))
    before = _vm_size_mb()
    cap = int(cap_mb * 1024 * 1024)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return {"vm_size_at_cap_mb": before, "rlimit_as_mb": cap_mb}


def _is_upstream_interpreter() -> bool:
    """True if ``import causarray`` here would give causarray 0.1.1 outside this repository."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    try:
        if version("causarray") != UPSTREAM_VERSION:
            return False
    except PackageNotFoundError:
        return False
    spec = importlib.util.find_spec("causarray")
    return (
        spec is not None
        and spec.origin is not None
        and REPO_ROOT / "src" not in Path(spec.origin).parents
    )


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False, default=str) + "\n")
    os.replace(tmp, path)


def _finite_or_none(x: Any) -> Any:
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return None
    return xf if math.isfinite(xf) else None


def _gcate_summary(res: dict) -> dict:
    hist = [_finite_or_none(h) for h in res.get("hist", [])]
    return {
        "n_iter": int(res["n_iter"]) if "n_iter" in res else None,
        "func_val": _finite_or_none(res.get("func_val")),
        "hist": hist,
        "total_gene_updates": res.get("total_gene_updates"),
        "total_cell_updates": res.get("total_cell_updates"),
    }


def _child_run(args: argparse.Namespace) -> int:
    age0 = _process_age_s()
    pc0 = time.perf_counter()

    def wall() -> float | None:
        return None if age0 is None else age0 + (time.perf_counter() - pc0)

    out = Path(args.out).resolve()
    side = _side_paths(out)
    result: dict[str, Any] = {
        "status": "running",
        "task": args.task,
        "r": args.r,
        "max_iters": args.max_iters,
        "rel_tol": args.rel_tol,
        "seed": args.seed,
        "data": str(Path(args.data).resolve()),
        "python": platform.python_version(),
        "process_age_at_main_s": age0,
        "reexec": os.environ.get("_CAUSARRAY_UPSTREAM_REEXEC") == "1",
    }
    code = 1
    try:
        sys.path.insert(0, str(BENCH_DIR))
        import numpy as np
        from _common import load_npz_problem

        t = time.perf_counter()
        prob = load_npz_problem(args.data, dense=True)
        result["t_load_s"] = time.perf_counter() - t
        Y, X, A, X_A = prob["Y"], prob["X"], prob["A"], prob["X_A"]
        n, p = Y.shape
        d, a = X.shape[1], A.shape[1]
        result.update(n=n, p=p, d=d, a=a, d_A=None if X_A is None else X_A.shape[1])

        t = time.perf_counter()
        import causarray  # the upstream package, from the venv's site-packages

        result["t_import_s"] = time.perf_counter() - t
        result["upstream_version"] = getattr(
            getattr(causarray, "__about__", None), "__version__", None
        )
        result["upstream_file"] = causarray.__file__
        result["numpy"] = np.__version__
        causarray.reset_random_seeds(args.seed)
        if args.rlimit_as_mb is not None:
            result.update(_apply_as_cap(args.rlimit_as_mb))

        U = None
        size_factor = None
        if args.task in ("gcate", "both"):
            es = {"max_iters": args.max_iters}
            if args.rel_tol is not None:
                es["rel_tol"] = args.rel_tol
            kw = json.loads(args.gcate_kwargs) if args.gcate_kwargs else {}
            kw["kwargs_es_1"] = {**es, **kw.get("kwargs_es_1", {})}
            kw["kwargs_es_2"] = {**es, **kw.get("kwargs_es_2", {})}
            result["gcate_call"] = {k: v for k, v in kw.items()}
            t = time.perf_counter()
            res_1, res_2 = causarray.fit_gcate(Y, X, A, args.r, **kw)
            result["t_gcate_s"] = time.perf_counter() - t
            U = np.asarray(
                res_2["U"] if "U" in res_2 else res_2["X_U"][:, d + a :], dtype=np.float64
            )
            size_factor = np.asarray(res_2["kwargs_glm"]["size_factor"], dtype=np.float64).ravel()
            result["gcate"] = {"stage_1": _gcate_summary(res_1), "stage_2": _gcate_summary(res_2)}
            np.save(side["U"], U)
            np.save(side["size_factor"], size_factor)
            result["U_path"] = str(side["U"])
            result["size_factor_path"] = str(side["size_factor"])
            result["U_shape"] = list(U.shape)

        if args.task in ("lfc", "both"):
            if U is None and "U" in prob:
                U = np.asarray(prob["U"], dtype=np.float64).reshape(n, -1)
            if size_factor is not None:
                sf_source = "fit_gcate"
            elif "size_factor" in prob:
                size_factor, sf_source = (
                    np.asarray(prob["size_factor"], dtype=np.float64).ravel(),
                    "npz",
                )
            else:
                size_factor, sf_source = (
                    np.asarray(causarray.comp_size_factor(Y), dtype=np.float64).ravel(),
                    "upstream comp_size_factor",
                )
            base_A = X if X_A is None else X_A
            W = X if U is None else np.hstack([X, U])
            W_A = base_A if U is None else np.hstack([base_A, U])
            kw = json.loads(args.lfc_kwargs) if args.lfc_kwargs else {}
            result["lfc_call"] = {
                "W": "X" if U is None else "X|U",
                "W_A": ("X" if X_A is None else "X_A") + ("" if U is None else "|U"),
                "offset": f"log(size_factor from {sf_source})",
                **kw,
            }
            with np.errstate(divide="ignore"):
                offset = np.log(size_factor)
            t = time.perf_counter()
            df_res, _estimation = causarray.LFC(Y, W, A, W_A, offset=offset, **kw)
            result["t_lfc_s"] = time.perf_counter() - t
            df_res.to_csv(side["lfc"], index=False)
            result["lfc_path"] = str(side["lfc"])
            result["lfc"] = {
                "n_rows": len(df_res),
                "columns": [str(c) for c in df_res.columns],
                "n_rej": int(np.asarray(df_res["rej"], dtype=bool).sum())
                if "rej" in df_res
                else None,
                "n_estimable": int(np.asarray(df_res["estimable"], dtype=bool).sum())
                if "estimable" in df_res
                else None,
            }
        result["status"] = "ok"
        code = 0
    except MemoryError as exc:
        result.update(
            status="memory_error", error=f"MemoryError: {exc}", traceback=traceback.format_exc()
        )
        code = 3
    except Exception as exc:  # noqa: BLE001 - reported in the JSON, never raised to the caller
        result.update(
            status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()
        )
        code = 1
    finally:
        self_ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        child_ru = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
        result.update(
            wall_s=wall(),
            peak_hwm_mb=_vm_hwm_mb(),
            peak_rss_mb=self_ru,
            peak_rss_children_mb=child_ru,
            peak_rss_total_mb=self_ru + child_ru,
        )
        _write_json_atomic(out, result)
    return code


def _vm_hwm_mb() -> float | None:
    """``VmHWM`` of this process image in MiB: its own peak RSS.

    ``ru_maxrss`` is carried over fork and exec on Linux, so a child spawned by a large
    parent reports at least the parent's RSS; ``VmHWM`` belongs to this address space.
    """
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


# ======================================================================================
# smoke test and CLI
# ======================================================================================
def _smoke(args: argparse.Namespace) -> int:
    """Tiny random NB problem through ``run_upstream`` (task 'both'); prints the summary."""
    import numpy as np

    sys.path.insert(0, str(BENCH_DIR))
    from _common import save_npz_problem

    rng = np.random.default_rng(0)
    n, p, a, r = args.n, args.p, 3, args.r
    groups = rng.integers(0, a + 1, size=n)
    A = np.zeros((n, a))
    A[groups > 0, groups[groups > 0] - 1] = 1.0
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    U = rng.normal(size=(n, r))
    log_mu = (
        1.0
        + 0.2 * X[:, 1:] @ rng.normal(size=(1, p))
        + 0.3 * U @ rng.normal(size=(r, p))
        + A @ (rng.normal(size=(a, p)) * (rng.random((a, p)) < 0.1))
    )
    mu = np.exp(log_mu)
    Y = rng.negative_binomial(5, 5.0 / (5.0 + mu))
    work = Path(args.workdir).resolve()
    npz = save_npz_problem(work / "smoke_problem.npz", Y, X, A)
    res = run_upstream(npz, "both", r, max_iters=args.max_iters, timeout=args.timeout)
    keep = (
        "status",
        "wall_s",
        "outer_wall_s",
        "t_import_s",
        "t_gcate_s",
        "t_lfc_s",
        "peak_rss_mb",
        "peak_rss_mb_wait4",
        "U_shape",
        "U_path",
        "lfc_path",
        "lfc",
        "upstream_version",
        "error",
    )
    print(json.dumps({k: res.get(k) for k in keep}, indent=2, default=str))
    return 0 if res.get("status") == "ok" else 1


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="run upstream causarray on an .npz problem (inside the upstream venv)"
    )
    run.add_argument("--data", required=True, help=".npz from _common.save_npz_problem")
    run.add_argument("--task", required=True, choices=TASKS)
    run.add_argument("--r", required=True, type=int)
    run.add_argument("--out", required=True, help="result JSON")
    run.add_argument("--max-iters", type=int, default=30)
    run.add_argument("--rel-tol", type=float, default=None)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--gcate-kwargs", default=None, help="JSON dict of extra fit_gcate arguments")
    run.add_argument("--lfc-kwargs", default=None, help="JSON dict of extra LFC arguments")
    run.add_argument("--rlimit-as-mb", type=float, default=None, help="RLIMIT_AS cap in MiB")

    inst = sub.add_parser("install", help="create the upstream venv (ensure_upstream_venv)")
    inst.add_argument("--path", default=DEFAULT_VENV)
    inst.add_argument("--force", action="store_true")
    inst.add_argument(
        "--unpinned", action="store_true", help="ignore versions of a previous record"
    )

    smoke = sub.add_parser("smoke", help="tiny random problem end to end")
    smoke.add_argument("--n", type=int, default=300)
    smoke.add_argument("--p", type=int, default=200)
    smoke.add_argument("--r", type=int, default=2)
    smoke.add_argument("--max-iters", type=int, default=5)
    smoke.add_argument("--timeout", type=float, default=600.0)
    smoke.add_argument("--workdir", default=str(BENCH_DIR / "scratch"))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        if not _is_upstream_interpreter():
            py = upstream_python()
            if not py.exists() or os.environ.get("_CAUSARRAY_UPSTREAM_REEXEC") == "1":
                sys.stderr.write(
                    f"this interpreter has no causarray {UPSTREAM_VERSION}; run "
                    f"`python {Path(__file__).name} install` first\n"
                )
                return 2
            os.environ["_CAUSARRAY_UPSTREAM_REEXEC"] = "1"
            env = _clean_env()
            env["_CAUSARRAY_UPSTREAM_REEXEC"] = "1"
            rest = list(argv) if argv is not None else sys.argv[1:]
            os.execve(str(py), [str(py), str(Path(__file__).resolve()), *rest], env)
        return _child_run(args)
    if args.command == "install":
        py = ensure_upstream_venv(args.path, force=args.force, pinned=not args.unpinned)
        print(py)
        return 0
    return _smoke(args)


if __name__ == "__main__":
    sys.exit(main())
