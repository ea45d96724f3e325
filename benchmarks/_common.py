"""Helpers shared by the benchmark scripts (never imported by the package or its tests).

Everything here depends only on the standard library and numpy (scipy is imported lazily),
so the module can also be imported inside the separate upstream-causarray virtual
environment used by ``benchmarks/upstream.py``.

Contents
--------
peak_rss_mb
    Peak resident set size of this process so far (``ru_maxrss``), in MiB.
measure
    Context manager recording wall time and peak-RSS increase of a block.
write_result
    ``benchmarks/results/<name>.json`` (with machine info) plus a markdown table beside it.
save_npz_problem, load_npz_problem
    The ``.npz`` exchange format for a benchmark problem (Y, X, A, optional X_A and extras).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import resource
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO_ROOT = BENCH_DIR.parent

#: an absolute path inside a text: a leading ``/`` not glued to a word, two components
_ABS_PATH = re.compile(r"(?<![\w.~/:$-])/(?=[A-Za-z_])[\w.+@-]+(?:/[\w.+@-]*)+")
#: absolute paths that name no machine: scratch files, the system's own interfaces
_PORTABLE_ROOTS = ("/tmp/", "/proc/", "/dev/", "/usr/bin/")

_KIB_PER_MIB = 1024.0


# --------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident set size of the current process so far, in MiB.

    Returns
    -------
    float
        ``getrusage(RUSAGE_SELF).ru_maxrss`` converted from KiB (Linux) to MiB.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / _KIB_PER_MIB


def peak_rss_children_mb() -> float:
    """Largest peak RSS among waited-for child processes, in MiB (``RUSAGE_CHILDREN``)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / _KIB_PER_MIB


def current_rss_mb() -> float:
    """Current resident set size (``VmRSS`` of ``/proc/self/status``), in MiB.

    Falls back to :func:`peak_rss_mb` where ``/proc`` is unavailable.
    """
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) / _KIB_PER_MIB
    except OSError:
        pass
    return peak_rss_mb()


def hwm_rss_mb() -> float:
    """Peak resident set size of this process image (``VmHWM``), in MiB.

    Unlike ``ru_maxrss``, which Linux carries over ``fork`` and ``execve`` (a process
    spawned by a large parent reports at least the parent's RSS at the fork), ``VmHWM``
    belongs to the current address space only. Falls back to :func:`peak_rss_mb`.
    """
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / _KIB_PER_MIB
    except OSError:
        pass
    return peak_rss_mb()


@dataclass
class Measurement:
    """Wall time and memory of one measured block (filled in when the block exits).

    Attributes
    ----------
    wall_s : float
        Elapsed wall-clock time of the block (``time.perf_counter``).
    rss_start_mb : float
        Resident set size when the block started.
    peak_rss_mb : float
        Highest resident set size observed during the block: the maximum of the
        20 ms ``VmRSS`` samples and, when the process-wide ``ru_maxrss`` rose during
        the block, of that new high-water mark (which is exact).
    peak_rss_delta_mb : float
        ``peak_rss_mb - rss_start_mb``: extra memory the block needed at its peak.
    ru_maxrss_mb : float
        Process-wide ``ru_maxrss`` after the block.
    n_samples : int
        Number of ``VmRSS`` samples taken.
    """

    wall_s: float = math.nan
    rss_start_mb: float = math.nan
    peak_rss_mb: float = math.nan
    peak_rss_delta_mb: float = math.nan
    ru_maxrss_mb: float = math.nan
    n_samples: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Return the fields as a plain dict (``extra`` merged in)."""
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d


class _RssSampler(threading.Thread):
    """Background thread sampling ``VmRSS`` every ``interval_s`` seconds."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.interval_s = interval_s
        self.peak_mb = current_rss_mb()
        self.n_samples = 1
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        rss = current_rss_mb()
        self.n_samples += 1
        self.peak_mb = max(self.peak_mb, rss)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self._sample()


@contextmanager
def measure(interval_s: float = 0.02) -> Iterator[Measurement]:
    """Measure wall time and peak resident memory of a ``with`` block.

    Parameters
    ----------
    interval_s : float
        Sampling period of the background ``VmRSS`` sampler (default 20 ms).

    Yields
    ------
    Measurement
        Filled in when the block exits (also when it raises). Extra entries may be
        put into ``m.extra`` inside the block.

    Examples
    --------
    >>> with measure() as m:
    ...     x = np.ones((1000, 1000))
    >>> m.wall_s > 0 and m.peak_rss_delta_mb >= 0
    True
    """
    m = Measurement()
    ru_before = peak_rss_mb()
    m.rss_start_mb = current_rss_mb()
    sampler = _RssSampler(interval_s)
    sampler.start()
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        m.wall_s = time.perf_counter() - t0
        sampler.stop()
        ru_after = peak_rss_mb()
        peak = sampler.peak_mb
        if ru_after > ru_before:  # a new process-wide high-water mark was set inside the block
            peak = max(peak, ru_after)
        m.peak_rss_mb = peak
        m.peak_rss_delta_mb = max(0.0, peak - m.rss_start_mb)
        m.ru_maxrss_mb = ru_after
        m.n_samples = sampler.n_samples


# --------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------
def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_info() -> dict:
    """Describe the machine and the numerical stack the benchmark ran on."""
    try:
        n_usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n_usable = os.cpu_count()
    try:
        mem_total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        mem_total_gb = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_count_usable": n_usable,
        "mem_total_gb": None if mem_total_gb is None else round(mem_total_gb, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": _package_version("scipy"),
        "causarray": _package_version("causarray"),
        "threads_env": {
            k: os.environ[k]
            for k in (
                "OMP_NUM_THREADS",
                "OPENBLAS_NUM_THREADS",
                "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS",
            )
            if k in os.environ
        },
    }


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, paths and non-finite floats into strict-JSON values."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def _fmt_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        s = json.dumps(v)
        return s if len(s) <= 60 else s[:57] + "..."
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[Mapping[str, Any]]) -> str:
    """Render a list of flat dicts as a GitHub markdown table (columns in first-seen order)."""
    cols: list[str] = []
    for row in rows:
        for k in row:
            if k not in cols:
                cols.append(k)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt_cell(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _result_markdown(name: str, result: Mapping[str, Any], machine: Mapping[str, Any]) -> str:
    rows = result.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, Mapping) for r in rows):
        table = markdown_table(rows)
        scalars = {
            k: v for k, v in result.items() if k != "rows" and not isinstance(v, (dict, list))
        }
    else:
        table = ""
        scalars = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
    parts = [f"# {name}", ""]
    if scalars:
        parts += [markdown_table([{"key": k, "value": v} for k, v in scalars.items()]), ""]
    if table:
        parts += [table, ""]
    parts.append(
        f"_{machine['date']}; {machine['cpu_count_usable']} usable CPUs; python {machine['python']}, "
        f"numpy {machine['numpy']}, scipy {machine['scipy']}_"
    )
    return "\n".join(parts) + "\n"


def portable_path(path: str) -> str:
    """``path`` as recorded in results: relative to the repository unless under /tmp.

    A checkout's files become ``src/causarray``, another checkout beside it
    ``../wt_base/src``; data outside the repository keep a path relative to it, which
    says where they were without naming the machine (say how to make them in the
    result's command or in docs/benchmarks.md).
    """
    if not path.startswith("/") or path.startswith(_PORTABLE_ROOTS):
        return path
    return os.path.relpath(path, REPO_ROOT)


def portable(value: Any) -> Any:
    """``value`` with every absolute path inside its strings made :func:`portable_path`."""
    if isinstance(value, str):
        return _ABS_PATH.sub(lambda m: portable_path(m.group(0)), value)
    if isinstance(value, Mapping):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    return value


def write_result(
    name: str, result: Mapping[str, Any], results_dir: str | os.PathLike | None = None
) -> Path:
    """Write ``<results_dir>/<name>.json`` (pretty, with machine info) and ``<name>.md`` beside it.

    Parameters
    ----------
    name : str
        File stem, e.g. ``"gcate_scaling"``.
    result : mapping
        JSON-able content (numpy values are converted). If it holds ``"rows"``, a list of
        flat dicts, the markdown file shows them as a table; other scalar entries are shown
        as a key/value table.
    results_dir : path-like, optional
        Defaults to ``benchmarks/results``.

    Returns
    -------
    Path
        Path of the JSON file.

    Notes
    -----
    Paths are recorded relative to the repository (:func:`portable`), so that the
    committed results name no folder of the machine they ran on
    (``tests/test_no_machine_paths.py``).
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"result name must be a plain file stem, got {name!r}")
    out_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    result = portable(to_jsonable(dict(result)))
    payload = {"name": name, **result, "machine": machine}
    json_path = out_dir / f"{name}.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, json_path)
    (out_dir / f"{name}.md").write_text(_result_markdown(name, result, machine))
    return json_path


# --------------------------------------------------------------------------------------
# problem exchange format
# --------------------------------------------------------------------------------------
_RESERVED = {"Y", "X", "A", "X_A", "Y_data", "Y_indices", "Y_indptr", "Y_shape", "Y_format"}


def save_npz_problem(
    path: str | os.PathLike,
    Y: Any,
    X: Any,
    A: Any,
    X_A: Any = None,
    *,
    compress: bool = True,
    **extra: Any,
) -> Path:
    """Save a benchmark problem to ``.npz`` for the side-by-side runs.

    Parameters
    ----------
    path : path-like
        Output file (``.npz`` is appended by numpy if missing).
    Y : array-like or scipy.sparse matrix, shape (n, p)
        Counts. Dense counts are stored as ``Y``; sparse ones as CSR parts
        ``Y_data``, ``Y_indices``, ``Y_indptr``, ``Y_shape``. Integer-valued data are
        stored as int32 (or int64 if needed) to keep files small.
    X : array-like, shape (n, d)
        Covariates including the intercept column.
    A : array-like, shape (n, a)
        0/1 treatment matrix.
    X_A : array-like, shape (n, d_A), optional
        Covariates for the propensity model.
    compress : bool
        Use ``np.savez_compressed`` (default) or plain ``np.savez``.
    **extra : array-like
        Further arrays stored under their names, e.g. ``U`` (n x r latent factors) or
        ``size_factor`` (n,), which ``upstream.py run --task lfc`` picks up.

    Returns
    -------
    Path
        The written file.
    """
    bad = _RESERVED.intersection(extra)
    if bad:
        raise ValueError(f"extra array names clash with reserved names: {sorted(bad)}")
    arrays: dict[str, np.ndarray] = {}
    n = Y.shape[0]
    if hasattr(Y, "tocsr"):  # scipy.sparse
        Yc = Y.tocsr(copy=True)
        Yc.sum_duplicates()
        arrays.update(
            Y_data=_compact_counts(np.asarray(Yc.data)),
            Y_indices=np.asarray(Yc.indices),
            Y_indptr=np.asarray(Yc.indptr),
            Y_shape=np.asarray(Yc.shape, dtype=np.int64),
        )
    else:
        Yd = np.asarray(Y)
        if Yd.ndim != 2:
            raise ValueError(f"Y must be 2-dimensional (cells x genes), got shape {Yd.shape}")
        arrays["Y"] = _compact_counts(Yd)
    for key, val in (("X", X), ("A", A), ("X_A", X_A)):
        if val is None:
            continue
        arr = np.asarray(val, dtype=np.float64)
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.shape[0] != n:
            raise ValueError(f"{key} has {arr.shape[0]} rows but Y has {n} cells")
        arrays[key] = arr
    for key, val in extra.items():
        arrays[key] = np.asarray(val)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compress else np.savez)(path, **arrays)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def _compact_counts(values: np.ndarray) -> np.ndarray:
    """Store integer-valued counts as int32/int64, anything else as float64."""
    v = np.asarray(values)
    if v.dtype.kind in "iu":
        return v.astype(np.int64 if v.size and v.max() > np.iinfo(np.int32).max else np.int32)
    v = v.astype(np.float64, copy=False)
    if v.size and np.all(np.isfinite(v)) and np.all(v == np.round(v)):
        big = np.abs(v).max() > np.iinfo(np.int32).max
        return v.astype(np.int64 if big else np.int32)
    return v


def load_npz_problem(path: str | os.PathLike, dense: bool = True) -> dict[str, Any]:
    """Load a problem written by :func:`save_npz_problem`.

    Parameters
    ----------
    path : path-like
        The ``.npz`` file.
    dense : bool
        Return ``Y`` as a dense float64 array (default); otherwise a sparse ``Y``
        stays a ``scipy.sparse.csr_matrix`` of float64.

    Returns
    -------
    dict
        ``Y``, ``X``, ``A``, ``X_A`` (None if absent) and any extra arrays.
    """
    loaded = np.load(path, allow_pickle=False)
    if not hasattr(loaded, "files"):  # np.load returns a plain ndarray for .npy files
        raise ValueError(f"{path} is a single .npy array, not a benchmark problem .npz")
    with loaded as z:
        files = set(z.files)
        missing = {"X", "A"} - files
        if missing or not (
            {"Y"} <= files or {"Y_data", "Y_indices", "Y_indptr", "Y_shape"} <= files
        ):
            raise ValueError(
                f"{path} is not a benchmark problem: missing {sorted(missing) or ['Y']}"
            )
        out: dict[str, Any] = {}
        if "Y" in files:
            out["Y"] = z["Y"].astype(np.float64)
        else:
            shape = tuple(int(s) for s in z["Y_shape"])
            data = z["Y_data"].astype(np.float64)
            if dense:
                Yd = np.zeros(shape, dtype=np.float64)
                indptr, indices = z["Y_indptr"], z["Y_indices"]
                rows = np.repeat(np.arange(shape[0]), np.diff(indptr))
                Yd[rows, indices] = data
                out["Y"] = Yd
            else:
                import scipy.sparse as sp

                out["Y"] = sp.csr_matrix((data, z["Y_indices"], z["Y_indptr"]), shape=shape)
        out["X"] = z["X"].astype(np.float64)
        out["A"] = z["A"].astype(np.float64)
        out["X_A"] = z["X_A"].astype(np.float64) if "X_A" in files else None
        for key in files - _RESERVED:
            out[key] = z[key]
    return out


def code_version() -> dict:
    """Git commit of the working tree and the package files modified since (if any)."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=BENCH_DIR.parent, capture_output=True,
                                  text=True, timeout=30, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [ln.split(None, 1)[-1] for ln in git("status", "--porcelain", "--", "src").splitlines()]
    return {"git_rev": git("rev-parse", "--short", "HEAD") or None, "src_modified": dirty}


# --------------------------------------------------------------------------------------
# memory-lean screen simulator
# --------------------------------------------------------------------------------------
def split_cells(n_treated: int, n_perts: int) -> np.ndarray:
    """Cells per perturbation: ``n_treated`` split as evenly as possible (larger first).

    Examples
    --------
    >>> split_cells(77865, 200)[[0, 64, 65, 199]].tolist()
    [390, 390, 389, 389]
    """
    if n_perts < 1 or n_treated < n_perts:
        raise ValueError(f"need n_perts >= 1 and n_treated >= n_perts, got {n_treated}, {n_perts}")
    return np.array([len(c) for c in np.array_split(np.arange(n_treated), n_perts)])


def iter_sparse_count_chunks(
    n_ctrl: int,
    cells_per_pert: Any,
    n_genes: int,
    r: int,
    *,
    n_perts: int | None = None,
    confounding: float = 1.0,
    effect_frac: float = 0.05,
    knockdown: float | None = None,
    random_state: int = 0,
    chunk: int = 2000,
):
    """The chunks of :func:`simulate_sparse_counts`, one at a time (same random stream).

    Yields
    ------
    (data int32, indices int32, nnz per row, group of all cells)
        CSR pieces of ``chunk`` consecutive cells; ``group`` (-1 controls, k
        perturbation k) is the same array in every item.  Writers (e.g. an ``.h5ad``
        built with h5py) append the pieces, so no more than one chunk is ever dense.
    """
    if np.ndim(cells_per_pert) == 0:
        if n_perts is None:
            raise ValueError("n_perts is required when cells_per_pert is an int")
        sizes = np.full(int(n_perts), int(cells_per_pert))
    else:
        sizes = np.asarray(cells_per_pert, dtype=int).ravel()
        if n_perts is not None and n_perts != sizes.size:
            raise ValueError(f"n_perts={n_perts} but {sizes.size} cells_per_pert entries")
    a = sizes.size
    if n_ctrl < 0 or a < 1 or np.any(sizes < 1) or n_genes < 1 or r < 0 or chunk < 1:
        raise ValueError("need n_ctrl >= 0, n_perts >= 1, cells_per_pert >= 1, n_genes >= 1, "
                         "r >= 0 and chunk >= 1")
    rng = np.random.default_rng(random_state)
    n = int(n_ctrl + sizes.sum())
    group = np.repeat(np.arange(-1, a), np.concatenate([[n_ctrl], sizes]))
    b = np.maximum(rng.normal(-1.0, 1.5, n_genes), -4.5)
    Gamma = rng.normal(0.0, 0.4, (n_genes, r))
    nb_size = np.exp(rng.uniform(np.log(2.0), np.log(20.0), n_genes))
    delta = rng.normal(0.0, confounding, (a, r))
    lfc = np.zeros((a, n_genes))
    n_eff = max(1, int(effect_frac * n_genes))
    for k in range(a):
        idx = rng.choice(n_genes, n_eff, replace=False)
        lfc[k, idx] = rng.uniform(0.5, 1.5, n_eff) * rng.choice([-1.0, 1.0], n_eff)
    if knockdown is not None:
        m = min(a, n_genes)
        b[:m] = np.maximum(b[:m], 0.5)
        lfc[np.arange(m), np.arange(m)] = -abs(knockdown)
    prob_den = nb_size[None, :]
    for start in range(0, n, chunk):
        g = group[start:start + chunk]
        U = rng.normal(size=(g.size, r))
        t = g >= 0
        U[t] += delta[g[t]]
        eta = rng.normal(0.0, 0.3, g.size)[:, None] + b[None, :] + U @ Gamma.T
        eta[t] += lfc[g[t]]
        np.clip(eta, -30, 12, out=eta)
        np.exp(eta, out=eta)                                        # eta is now the mean
        y = rng.negative_binomial(prob_den, prob_den / (prob_den + eta))
        del eta
        y[y.sum(axis=1) == 0, 0] = 1                                # no empty cells
        rows, cols = np.nonzero(y)
        vals = y[rows, cols].astype(np.int32)
        del y
        yield vals, cols.astype(np.int32), np.bincount(rows, minlength=g.size), group


def simulate_sparse_counts(
    n_ctrl: int,
    cells_per_pert: Any,
    n_genes: int,
    r: int,
    *,
    n_perts: int | None = None,
    confounding: float = 1.0,
    effect_frac: float = 0.05,
    knockdown: float | None = None,
    random_state: int = 0,
    chunk: int = 2000,
) -> tuple[Any, np.ndarray]:
    """NB counts of a CRISPR screen with latent confounders, built chunk by chunk as CSR.

    The model is that of ``causarray.simulate_screen`` (baseline log-means
    ``N(-1, 1.5)`` floored at -4.5, loadings ``N(0, 0.4)``, NB sizes log-uniform on
    [2, 20], log library sizes ``N(0, 0.3)``, a per-perturbation confounder shift
    ``N(0, confounding)``, effects of size U(0.5, 1.5) with random signs on
    ``effect_frac`` of the genes), but only ``chunk`` cells are dense at a time: the
    peak memory is about the final CSR matrix times 1.5 plus five ``chunk x n_genes``
    float64 blocks, never a dense cells x genes matrix.

    Parameters
    ----------
    n_ctrl : int
        Control cells (the first rows).
    cells_per_pert : int or sequence of int
        Cells of each perturbation (an int: the same for all ``n_perts``).
    n_genes, r : int
        Genes and true latent factors.
    n_perts : int, optional
        Number of perturbations; required when ``cells_per_pert`` is an int.
    confounding : float
        SD of the perturbations' confounder shifts.
    effect_frac : float
        Share of genes with a direct effect per perturbation (at least one gene).
    knockdown : float, optional
        If given, perturbation k lowers gene k (k < min(n_perts, n_genes)) by this
        log-fold amount and that gene's baseline log-mean is at least 0.5.
    random_state : int
        Seed of ``numpy.random.default_rng``.
    chunk : int
        Cells simulated densely at a time.

    Returns
    -------
    Y : scipy.sparse.csr_matrix of int32, shape (n, n_genes)
        Counts; every cell has at least one count.
    group : ndarray of int, shape (n,)
        -1 for controls, k for a cell of perturbation k.
    """
    import scipy.sparse as sp

    data_parts, index_parts, row_nnz = [], [], []
    group = None
    for data, indices, nnz, group in iter_sparse_count_chunks(
            n_ctrl, cells_per_pert, n_genes, r, n_perts=n_perts, confounding=confounding,
            effect_frac=effect_frac, knockdown=knockdown, random_state=random_state,
            chunk=chunk):
        data_parts.append(data)
        index_parts.append(indices)
        row_nnz.append(nnz)
    n = group.size
    # concatenate one array at a time so the peak is ~1.5x the result, not 2x
    data = np.concatenate(data_parts)
    data_parts.clear()
    indices = np.concatenate(index_parts)
    index_parts.clear()
    if data.size > np.iinfo(np.int32).max:
        raise ValueError("more than 2**31 non-zero counts; use a smaller screen")
    indptr = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.concatenate(row_nnz), out=indptr[1:])
    Y = sp.csr_matrix((data, indices, indptr), shape=(n, n_genes))
    Y.has_sorted_indices = True
    return Y, group


def save_csr_problem(path: str | os.PathLike, Y: Any, X: Any, A: Any, X_A: Any = None) -> Path:
    """:func:`save_npz_problem` for a large integer CSR ``Y``, without copying it.

    Writes the same uncompressed format (``Y_data``, ``Y_indices``, ``Y_indptr``,
    ``Y_shape``, ``X``, ``A``, ``X_A``) straight from ``Y``'s arrays, so saving needs no
    memory beyond the small designs. ``Y`` must be a canonical CSR matrix (sorted
    indices, no duplicates) with integer data, e.g. from :func:`simulate_sparse_counts`
    followed by ``prep_causarray_data``.

    Returns
    -------
    Path
        The written file.
    """
    import scipy.sparse as sp

    if not sp.issparse(Y) or Y.format != "csr":
        raise TypeError(f"Y must be a scipy.sparse CSR matrix, got {type(Y).__name__}")
    if Y.data.dtype.kind not in "iu" or not Y.has_canonical_format:
        raise ValueError("Y must hold integer counts in canonical CSR format "
                         "(use save_npz_problem otherwise)")
    n = Y.shape[0]
    arrays: dict[str, np.ndarray] = dict(
        Y_data=Y.data, Y_indices=Y.indices, Y_indptr=Y.indptr,
        Y_shape=np.asarray(Y.shape, dtype=np.int64))
    for key, val in (("X", X), ("A", A), ("X_A", X_A)):
        if val is None:
            continue
        arr = np.asarray(val, dtype=np.float64)
        arr = arr[:, None] if arr.ndim == 1 else arr
        if arr.shape[0] != n:
            raise ValueError(f"{key} has {arr.shape[0]} rows but Y has {n} cells")
        arrays[key] = arr
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
