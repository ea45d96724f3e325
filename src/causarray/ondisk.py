"""Counts that stay on disk: row-block reads of an ``.h5ad`` count matrix.

A whole screen (310k cells x 8.5k genes for the essential K562 screen, about 13 GB
as float64 CSR) need not be in memory: the batch pipeline only ever fits one batch
(its perturbed cells plus the control pool).  :class:`H5Counts` is a lazily-read
cells x genes count matrix backed by an HDF5 group of an ``.h5ad`` file (CSR stored as
``data`` / ``indices`` / ``indptr``, or a dense 2-D dataset).  Reading a set of rows
sorts them, coalesces them into contiguous runs (small gaps are read and discarded)
and returns a ``scipy.sparse.csr_matrix`` (dense for dense storage); sparse is never
densified here.

:func:`open_screen` is the on-disk twin of ``from_anndata`` followed by
``prep_causarray_data``: from the file it builds ``(Y, A, X, X_A)`` where ``Y`` is an
:class:`H5Counts` that applies, on every read, the same rounding of non-integer
counts and the same count cap ``q`` as ``prep_causarray_data``.  The whole-screen
statistics (input validation, empty cells, per-gene maxima for ``q``, library sizes
of the capped counts for ``X_A``, row / column sums for the cache fingerprint) come
from one streamed pass over row blocks (:func:`scan_counts`; a second one only when
empty cells are dropped), so the peak memory is one block, not the matrix, and the
file is read once before the first batch.  The results of the batch pipeline are
identical to those of the same screen read into memory.

An :class:`H5Counts` pickles as its file path, group key and read settings only (no
open file handle, no data), so an executor's worker can receive a :class:`RowRef`
(the matrix plus the batch's row numbers) and read its batch itself.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._validation import (
    check_cells_nonempty,
    check_counts_scan,
    check_file,
    check_h5_dense,
    check_h5_key,
    check_h5_row_major,
    check_h5_sparse,
    check_has_perturbed,
    check_layer,
    check_x_present,
)

__all__ = ["H5Counts", "RowRef", "is_file_input", "open_screen", "scan_counts"]

#: Target number of stored entries per streamed row block (about 64 MB of float64 + index).
BLOCK_NNZ = 1 << 23
#: Gaps of at most this many stored entries between two needed runs of rows are read
#: and discarded instead of issuing a separate HDF5 read.
GAP_NNZ = 1 << 14

# per-process cache of indptr arrays (key: path, group, mtime, size)
_INDPTR_CACHE: dict[tuple, np.ndarray] = {}


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), int(st.st_mtime_ns), int(st.st_size))


def _group_kind(node: Any) -> tuple[str, tuple[int, int]]:
    """('csr' | 'csc' | 'dense', shape) of an h5py group or dataset holding a matrix."""
    import h5py

    if isinstance(node, h5py.Dataset):
        check_h5_dense(node)
        return "dense", (int(node.shape[0]), int(node.shape[1]))
    attrs = node.attrs
    enc = attrs.get("encoding-type", attrs.get("h5sparse_format", ""))
    enc = enc.decode() if isinstance(enc, bytes) else str(enc)
    shape = attrs.get("shape", attrs.get("h5sparse_shape"))
    check_h5_sparse(node, shape)
    kind = "csc" if enc.startswith("csc") else "csr"
    return kind, (int(shape[0]), int(shape[1]))


@dataclass
class H5Counts:
    """A cells x genes count matrix read lazily from an HDF5 / ``.h5ad`` file.

    Parameters
    ----------
    path : str
        The file.  Every process that reads rows opens it itself (a shared path on a
        cluster).
    key : str
        HDF5 path of the matrix: ``'X'`` or ``'layers/<name>'``.
    cap : float, optional
        Count cap q applied on read, ``y -> min(y, q)`` (``prep_causarray_data``).
    rint : bool
        Round stored values to the nearest integer on read (non-integer counts).
    row_map : ndarray of int, optional
        Logical row i is file row ``row_map[i]`` (cells left out, e.g. empty ones).
    gene_names : ndarray of str, optional
    stats : dict, optional
        Whole-screen statistics of the streamed passes (``col_sums``, ``row_sums``,
        ``digest``) of the logical (capped, kept) matrix.
    """

    path: str
    key: str = "X"
    cap: float | None = None
    rint: bool = False
    row_map: np.ndarray | None = None
    gene_names: np.ndarray | None = None
    stats: dict = field(default_factory=dict)
    n_reads: int = 0                 # HDF5 reads issued by this object (diagnostics)
    rows_read: int = 0               # rows returned by read_rows / blocks

    def __post_init__(self) -> None:
        import h5py

        # absolute: a job carries this path to workers that may run in another directory
        self.path = os.path.abspath(os.fspath(self.path))
        with h5py.File(self.path, "r") as f:
            check_h5_key(f, self.path, self.key)
            self.format, self.file_shape = _group_kind(f[self.key])
            node = f[self.key]
            dt = node["data"].dtype if self.format != "dense" else node.dtype
        check_h5_row_major(self.format, self.path, self.key)
        self.dtype = np.dtype(dt)
        if self.row_map is not None:
            self.row_map = np.asarray(self.row_map, dtype=np.int64)

    # ------------------------------------------------------------------ basics
    @property
    def shape(self) -> tuple[int, int]:
        n = self.file_shape[0] if self.row_map is None else int(self.row_map.size)
        return (n, self.file_shape[1])

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (f"H5Counts({self.path!r}, key={self.key!r}, shape={self.shape}, "
                f"format={self.format!r}, cap={self.cap})")

    def __getstate__(self) -> dict:
        # no open handles and no whole-screen arrays travel to a worker
        state = dict(self.__dict__)
        state["stats"] = {k: v for k, v in self.stats.items() if k == "digest"}
        return state

    def _file_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.row_map is None else self.row_map[rows]

    def _indptr(self, f) -> np.ndarray:
        key = _file_key(self.path) + (self.key,)
        ip = _INDPTR_CACHE.get(key)
        if ip is None:
            ip = np.asarray(f[self.key]["indptr"][...], dtype=np.int64)
            _INDPTR_CACHE.clear()        # one screen at a time per process
            _INDPTR_CACHE[key] = ip
        return ip

    def _transform(self, values: np.ndarray) -> np.ndarray:
        if self.rint and values.dtype.kind == "f":
            np.rint(values, out=values)
        if self.cap is not None:
            np.minimum(values, values.dtype.type(self.cap), out=values)
        return values

    # ------------------------------------------------------------------ reads
    def _read_sorted_file_rows(self, f, frows: np.ndarray, raw: bool = False):
        """Rows ``frows`` (sorted, unique file rows) as CSR / dense."""
        p = self.file_shape[1]
        node = f[self.key]
        if frows.size == 0:
            return sp.csr_matrix((0, p), dtype=self.dtype) if self.format == "csr" else \
                np.zeros((0, p), dtype=self.dtype)
        # contiguous runs of needed rows
        breaks = np.flatnonzero(np.diff(frows) != 1) + 1
        starts = frows[np.r_[0, breaks]]
        stops = frows[np.r_[breaks - 1, frows.size - 1]] + 1
        if self.format == "dense":
            blocks = []
            for a, b in zip(starts, stops):
                blocks.append(np.asarray(node[int(a):int(b)]))
                self.n_reads += 1
            out = np.vstack(blocks)
            return out if raw else self._transform(out)
        ip = self._indptr(f)
        # coalesce runs separated by small gaps into one read
        lo, hi = ip[starts], ip[stops]
        merged: list[list[int]] = []
        for a, b, s, e in zip(starts, stops, lo, hi):
            if merged and s - merged[-1][3] <= GAP_NNZ:
                merged[-1][1], merged[-1][3] = int(b), int(e)
            else:
                merged.append([int(a), int(b), int(s), int(e)])
        data_parts, ind_parts = [], []
        dset_d, dset_i = node["data"], node["indices"]
        for a, b, s, e in merged:
            d = dset_d[s:e]
            ind = dset_i[s:e]
            self.n_reads += 1
            # keep only the needed rows of this read
            need = frows[(frows >= a) & (frows < b)]
            if need.size == b - a:
                data_parts.append(d)
                ind_parts.append(ind)
            else:
                seg_lo, seg_hi = ip[need] - s, ip[need + 1] - s
                keep = np.concatenate([np.arange(x, y) for x, y in zip(seg_lo, seg_hi)]) \
                    if need.size else np.zeros(0, np.int64)
                data_parts.append(d[keep])
                ind_parts.append(ind[keep])
        data = np.concatenate(data_parts)
        indices = np.concatenate(ind_parts)
        counts = ip[frows + 1] - ip[frows]
        indptr = np.zeros(frows.size + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        idx_dtype = np.int32 if max(indptr[-1], p) < np.iinfo(np.int32).max else np.int64
        data = data if raw else self._transform(data)
        return sp.csr_matrix((data, indices.astype(idx_dtype, copy=False),
                              indptr.astype(idx_dtype, copy=False)), shape=(frows.size, p))

    def read_rows(self, rows: Any) -> Any:
        """Logical rows ``rows`` (any order, repeats allowed) as CSR (dense storage: ndarray).

        The needed file rows are sorted, coalesced into contiguous runs and read run
        by run; the block is then put in the requested order.
        """
        import h5py

        rows = self._as_rows(rows)
        frows = self._file_rows(rows)
        uniq, inverse = np.unique(frows, return_inverse=True)
        with h5py.File(self.path, "r") as f:
            block = self._read_sorted_file_rows(f, uniq)
        self.rows_read += int(uniq.size)
        if uniq.size == frows.size and np.array_equal(uniq, frows):
            return block
        return block[inverse]

    def _as_rows(self, rows: Any) -> np.ndarray:
        n = self.shape[0]
        if isinstance(rows, slice):
            return np.arange(n)[rows]
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (n,):
                raise IndexError(f"boolean row mask of shape {rows.shape} for {n} rows")
            return np.flatnonzero(rows)
        rows = rows.astype(np.int64, copy=False).ravel()
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        return np.where(rows < 0, rows + n, rows)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError("H5Counts takes [rows] or [rows, cols]")
            return self.read_rows(key[0])[:, key[1]]
        if isinstance(key, (int, np.integer)):
            return self.read_rows([int(key)])
        return self.read_rows(key)

    def row_blocks(self, block_nnz: int | None = None, raw: bool = False):
        """Yield ``(start, stop, block)`` over the logical rows in order, streamed.

        Blocks hold about ``block_nnz`` stored entries (dense: entries).  ``raw``
        skips the rounding and the cap.
        """
        import h5py

        block_nnz = BLOCK_NNZ if block_nnz is None else int(block_nnz)
        n, p = self.shape
        with h5py.File(self.path, "r") as f:
            if self.format == "csr":
                ip = self._indptr(f)
                nnz_row = np.diff(ip) if self.row_map is None else \
                    ip[self.row_map + 1] - ip[self.row_map]
                cum = np.concatenate([[0], np.cumsum(nnz_row)])
            else:
                cum = np.arange(n + 1, dtype=np.int64) * p
            start = 0
            while start < n:
                stop = int(np.searchsorted(cum, cum[start] + block_nnz, side="right")) - 1
                stop = min(n, max(stop, start + 1))
                rows = np.arange(start, stop)
                block = self._read_sorted_file_rows(f, self._file_rows(rows), raw=raw)
                self.rows_read += int(rows.size)
                yield start, stop, block
                start = stop

    def sum(self, axis: int | None = None, dtype: Any = None) -> Any:
        """Row (axis=1) or column (axis=0) sums of the capped counts, from the streamed pass."""
        if axis == 0 and "col_sums" in self.stats:
            return self.stats["col_sums"].copy()
        if axis == 1 and "row_sums" in self.stats:
            return self.stats["row_sums"].copy()
        from ._validation import col_sums, row_sums

        n, p = self.shape
        cs, rs = np.zeros(p), np.zeros(n)
        for a, b, block in self.row_blocks():
            cs += col_sums(block)
            rs[a:b] = row_sums(block)
        if axis == 0:
            return cs
        if axis == 1:
            return rs
        return float(rs.sum())

    def ref(self, rows: np.ndarray) -> RowRef:
        """A small picklable reference to some logical rows (file rows inside)."""
        rows = self._as_rows(rows)
        base = H5Counts.__new__(H5Counts)
        base.__dict__.update(self.__dict__)
        base.row_map, base.stats = None, {}
        base.gene_names = None
        return RowRef(base, np.asarray(self._file_rows(rows), dtype=np.int64))

    def content_digest(self) -> str:
        """Digest of the logical matrix computed in the streamed pass of :func:`open_screen`."""
        if "digest" not in self.stats:
            self.stats.update(_digest_pass(self))
        return self.stats["digest"]


@dataclass
class RowRef:
    """Rows of an on-disk matrix, to be read by whichever process fits the batch."""

    source: H5Counts
    rows: np.ndarray            # file rows

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.rows.size), self.source.file_shape[1])

    def read(self) -> Any:
        return self.source.read_rows(self.rows)


# ----------------------------------------------------------------------------------
# streamed passes
# ----------------------------------------------------------------------------------
@dataclass
class CountScan:
    """Result of the validation pass over the stored values (see :func:`scan_counts`)."""

    n_bad: int
    n_neg: int
    vmin: float
    n_frac: int
    row_sums: np.ndarray       # raw row sums (float64)
    gene_max: np.ndarray       # per-gene maxima (float64, implicit zeros included)
    dtype: np.dtype
    capped: _CappedSums | None = None   # what the digest of the capped counts needs


class _CappedSums:
    """The capped counts' row and column sums and sample rows, taken in the scan.

    The cap q = round(99.9th percentile of the per-gene maxima of the rounded counts) is
    known only after the last block, but it is at least the same percentile of the
    maxima seen so far, which only grow: an entry at or below that running bound is
    never capped.  So the scan sums the rounded counts and keeps the few entries above
    the bound; :meth:`finish` subtracts their excess over q (``min(y, q) = y - (y - q)+``).
    Counts are integers, so the float64 sums are exact and equal, bit for bit, the sums
    of a second pass over the capped counts.  The rows sampled by the digest are kept
    raw and capped in :meth:`finish`.
    """

    def __init__(self, n: int, p: int, floating: bool):
        self.rs, self.cs, self.floating = np.zeros(n), np.zeros(p), floating
        self.sample = np.unique(np.linspace(0, n - 1, _n_sample_rows()).astype(int))
        self.rows: list[np.ndarray] = []       # raw sample rows, in order
        self.big = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
        self.bound = -np.inf

    def add(self, a: int, b: int, block: Any, gene_max: np.ndarray) -> None:
        """Account for the raw rows ``a:b`` (``gene_max``: maxima so far, this block in)."""
        from ._validation import col_sums, row_sums
        from .preprocessing import CAP_PERCENTILE

        mine = self.sample[(self.sample >= a) & (self.sample < b)] - a
        if mine.size:
            self.rows.append(block[mine])
        if sp.issparse(block):
            vals = np.rint(block.data) if self.floating else block.data
            rounded = sp.csr_matrix((vals, block.indices, block.indptr), shape=block.shape)
        else:
            rounded = np.rint(block) if self.floating else np.asarray(block)
            vals = rounded.ravel()
        self.rs[a:b] = row_sums(rounded)
        self.cs += col_sums(rounded)
        gmax = np.rint(gene_max) if self.floating else gene_max
        self.bound = float(np.round(np.percentile(gmax, CAP_PERCENTILE)))
        idx = np.flatnonzero(vals > self.bound)           # the few entries q may cap
        if sp.issparse(block):
            r, c = np.searchsorted(block.indptr, idx, side="right") - 1, block.indices[idx]
        else:
            r, c = np.divmod(idx, rounded.shape[1])
        r0, c0, v0 = self.big
        keep = v0 > self.bound
        self.big = (np.concatenate([r0[keep], r.astype(np.int64) + a]),
                    np.concatenate([c0[keep], c.astype(np.int64)]),
                    np.concatenate([v0[keep], vals[idx].astype(np.float64)]))

    def finish(self, M: H5Counts) -> dict:
        """``col_sums``, ``row_sums`` and ``digest`` of ``M`` (capped at ``M.cap``)."""
        rows, cols, vals = self.big
        excess = np.maximum(vals - M.cap, 0.0)
        rs = self.rs - np.bincount(rows, excess, minlength=self.rs.size)
        cs = self.cs - np.bincount(cols, excess, minlength=self.cs.size)
        sample = sp.vstack(self.rows, format="csr") if self.rows and \
            sp.issparse(self.rows[0]) else np.vstack(self.rows)
        if sp.issparse(sample):
            sample = sp.csr_matrix((M._transform(sample.data.copy()), sample.indices,
                                    sample.indptr), shape=sample.shape).toarray()
        else:
            sample = M._transform(np.array(sample))
        return dict(col_sums=cs, row_sums=rs, digest=_digest(M.shape, cs, rs, sample))


def _n_sample_rows() -> int:
    from .cache import _N_SAMPLE_ROWS

    return _N_SAMPLE_ROWS


_SCAN_CACHE: dict[tuple, CountScan] = {}


def scan_counts(M: H5Counts) -> CountScan:
    """One streamed pass over the raw stored values of ``M`` (all file rows).

    Counts NaN/inf, negative and non-integer entries and accumulates the raw row sums
    and the per-gene maxima, and what the digest of the capped counts needs
    (:class:`_CappedSums`), so that :func:`open_screen` reads the counts once.  Cached
    per process by (file, modification time, group).
    """
    from ._validation import row_sums

    key = _file_key(M.path) + (M.key,)
    if key in _SCAN_CACHE:
        return _SCAN_CACHE[key]
    raw = H5Counts(M.path, M.key)
    n, p = raw.shape
    n_bad = n_neg = n_frac = 0
    vmin = np.inf
    rs = np.zeros(n)
    gmax = np.zeros(p)
    floating = raw.dtype.kind == "f"
    capped = _CappedSums(n, p, floating) if raw.dtype.kind in "biuf" and n else None
    for a, b, block in raw.row_blocks(raw=True):
        vals = block.data if sp.issparse(block) else np.asarray(block).ravel()
        if floating:
            finite = np.isfinite(vals)
            nb = int(vals.size - np.count_nonzero(finite))
            n_bad += nb
            if nb:
                continue
            n_frac += int(np.count_nonzero(vals != np.rint(vals)))
        if vals.size:
            n_neg += int(np.count_nonzero(vals < 0))
            vmin = min(vmin, float(vals.min()))
        rs[a:b] = row_sums(block)
        if sp.issparse(block):
            if block.nnz:
                np.maximum.at(gmax, block.indices, vals.astype(np.float64))
        elif block.size:
            np.maximum(gmax, block.max(axis=0).astype(np.float64), out=gmax)
        if capped is not None and not n_neg:
            capped.add(a, b, block, gmax)
    scan = CountScan(n_bad, n_neg, float(vmin if np.isfinite(vmin) else 0.0), n_frac, rs,
                     gmax, raw.dtype, None if n_bad or n_neg else capped)
    _SCAN_CACHE.clear()
    _SCAN_CACHE[key] = scan
    return scan


def _digest_pass(M: H5Counts) -> dict:
    """A streamed pass over the logical (rounded, capped) matrix.

    Needed when the scan's sums do not apply (empty cells left out, or statistics of an
    :class:`H5Counts` built by hand).

    Row and column sums (float64) and the cache digest with the recipe of
    :func:`causarray.cache.content_digest` (shape, rounded sums, up to 16 evenly
    spaced rows, taken from the blocks as they stream by: no read besides the pass).
    """
    from ._validation import col_sums, row_sums
    from .cache import _N_SAMPLE_ROWS

    n, p = M.shape
    cs, rs = np.zeros(p), np.zeros(n)
    sample = np.unique(np.linspace(0, n - 1, _N_SAMPLE_ROWS).astype(int))
    rows = []
    for a, b, block in M.row_blocks():
        cs += col_sums(block)
        rs[a:b] = row_sums(block)
        mine = sample[(sample >= a) & (sample < b)] - a
        if mine.size:
            part = block[mine]
            rows.append(part.toarray() if sp.issparse(part) else np.asarray(part))
    block = np.vstack(rows) if rows else np.zeros((0, p))
    return dict(col_sums=cs, row_sums=rs, digest=_digest((n, p), cs, rs, block))


def _digest(shape: tuple[int, int], cs: np.ndarray, rs: np.ndarray, sample: Any) -> str:
    """The recipe of :func:`causarray.cache.content_digest`: shape, sums, sample rows."""
    import hashlib

    from .cache import _rounded_text

    h = hashlib.blake2b(digest_size=16)
    h.update(repr(tuple(int(x) for x in shape)).encode())
    h.update(_rounded_text(cs))
    h.update(_rounded_text(rs))
    h.update(np.ascontiguousarray(sample, dtype=np.float64).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------
def is_file_input(obj: Any) -> bool:
    """True for a path to an ``.h5ad``/HDF5 file or an AnnData opened with ``backed=``."""
    if isinstance(obj, (str, os.PathLike)):
        return True
    return bool(getattr(obj, "isbacked", False))


def _open_backed(source: Any):
    import anndata as ad

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        check_file(path)
        return ad.read_h5ad(path, backed="r")
    return source


def counts_key(layer: str | None) -> str:
    return "X" if layer is None else f"layers/{layer}"


def backed_counts(adata: Any, layer: str | None = None) -> H5Counts:
    """The count matrix of a backed AnnData (``X`` or ``layers[layer]``) as :class:`H5Counts`."""
    import h5py

    path = str(adata.filename)
    key = counts_key(layer)
    with h5py.File(path, "r") as f:
        if key not in f:
            if layer is not None:
                check_layer(layer, list(f["layers"].keys()) if "layers" in f else [])
            check_x_present(None)
    M = H5Counts(path, key)
    M.gene_names = np.asarray([str(g) for g in adata.var_names], dtype=object)
    return M


def _sparse_treatments(labels: np.ndarray, ctrl_label: str, index: Any) -> pd.DataFrame:
    """One-hot treatments (controls dropped, columns sorted) as a sparse-dtype DataFrame."""
    from .preprocessing import sparse_treatment_matrix

    return sparse_treatment_matrix(labels, ctrl_label, index)


def open_screen(source: Any, pert_col: str | None = None, ctrl_label: Any = None,
                covariates: Any = (), layer: str | None = None, *,
                drop_empty_cells: bool = False, sparse_treatments: bool = False,
                treatments: pd.DataFrame | None = None) -> tuple[H5Counts, pd.DataFrame,
                                                                 np.ndarray, np.ndarray]:
    """``(Y, A, X, X_A)`` of an on-disk screen, as ``from_anndata`` builds them in memory.

    Parameters
    ----------
    source : path of an ``.h5ad`` file or an AnnData opened with ``backed='r'``
    pert_col, ctrl_label, covariates, layer, drop_empty_cells
        As for :func:`causarray.preprocessing.from_anndata`.
    sparse_treatments : bool
        Return ``A`` as a sparse-dtype DataFrame (CSC inside) instead of a dense one:
        one stored entry per perturbed cell instead of n x a floats (5 GB for 310k cells
        x 2,021 perturbations).  :func:`causarray.batch.gcate_lfc_batch` keeps it sparse.
    treatments : sparse-dtype DataFrame, optional
        The treatment matrix instead of labels (as in ``from_anndata``; requires
        ``sparse_treatments``).

    Returns
    -------
    Y : H5Counts
        The counts, read lazily; rounded to integers and capped at
        q = round(99.9th percentile of the per-gene maxima) on every read, exactly as
        ``prep_causarray_data`` caps them; empty cells left out with
        ``drop_empty_cells``.
    A : DataFrame (one column per non-control label, sorted; index the kept cells)
    X : ``[1 | covariates]``
    X_A : ``[1 | covariates | standardised log2 library size of the capped counts]``

    Notes
    -----
    One streamed pass over row blocks (:func:`scan_counts`): validation, raw row sums,
    per-gene maxima, and the row and column sums (library sizes) and digest of the
    capped counts; a second pass only when empty cells are dropped.  The obs table and
    gene names are read into memory, the counts never are.
    """
    from ._validation import check_covariates, check_treatment, resolve_screen_keys
    from .preprocessing import (
        CAP_PERCENTILE,
        covariate_design,
        standardized_log2_library_size,
        treatment_matrix,
    )

    adata = _open_backed(source)
    M = backed_counts(adata, layer)
    if treatments is None:
        pert_col, ctrl_label, labels = resolve_screen_keys(adata, pert_col, ctrl_label)
        check_has_perturbed(bool(np.any(labels != ctrl_label)), pert_col, ctrl_label)
    A = None if sparse_treatments else \
        treatment_matrix(labels, ctrl_label, index=adata.obs_names)
    Xcov = covariate_design(adata.obs, covariates)
    scan = scan_counts(M)
    check_counts_scan(scan, "Y", non_integer="round")
    M.rint = bool(scan.n_frac)
    empty = scan.row_sums == 0
    if empty.any():
        if not drop_empty_cells:
            check_cells_nonempty(empty, adata.obs_names)
        warnings.warn(f"dropping {int(empty.sum())} cells with zero total count", UserWarning,
                      stacklevel=2)
        keep = ~empty
        M.row_map = np.flatnonzero(keep)
        obs_names = adata.obs_names[keep]
        if treatments is not None:
            treatments = treatments.iloc[M.row_map]
        else:
            labels = labels[keep]
        Xcov = Xcov.loc[keep]
        if A is not None:
            A = A.loc[keep]
            if (A.sum(axis=0) == 0).any():
                A = A.loc[:, A.sum(axis=0) > 0]
    else:
        obs_names = adata.obs_names
    if A is None:
        A = treatments if treatments is not None else \
            _sparse_treatments(labels, ctrl_label, obs_names)
    # the cap of prep_causarray_data: maxima of the rounded counts = rounded maxima
    gmax = np.rint(scan.gene_max) if M.rint else scan.gene_max
    M.cap = float(np.round(np.percentile(gmax, CAP_PERCENTILE)))
    # the capped counts' sums and digest: from the scan (one pass over the counts) unless
    # empty cells were left out, which moves the sampled rows (then a second pass)
    use_scan = scan.capped is not None and M.row_map is None
    M.stats.update(scan.capped.finish(M) if use_scan else _digest_pass(M))
    n = M.shape[0]
    lib = standardized_log2_library_size(sp.csr_matrix(M.stats["row_sums"][:, None]),
                                         list(A.index))
    if not sparse_treatments:
        A_vals, _ = check_treatment(A, (n, M.shape[1]), name="A", ref_name="Y")
        A = pd.DataFrame(A_vals, index=A.index, columns=A.columns)
    X0, _ = check_covariates(Xcov if Xcov.shape[1] else None, (n, M.shape[1]), name="X",
                             ref_name="Y")
    ones = np.ones((n, 1), dtype=np.float64)
    X = np.hstack([ones, X0])
    X_A = np.hstack([ones, np.column_stack([X0, lib])])
    return M, A, np.ascontiguousarray(X), np.ascontiguousarray(X_A)
