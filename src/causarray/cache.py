"""Crash-safe on-disk store of finished batches for :func:`causarray.gcate_lfc_batch`.

Layout
------
The user passes one path, e.g. ``'replogle_results.h5'``.

* While a run is in progress, every finished batch is committed as its own HDF5 file
  ``<path>.parts/batch_NNNN.h5``.  A commit writes a temporary file in the same
  folder, flushes it to disk and renames it over the final name with
  :func:`os.replace` (atomic on POSIX and Windows), so a run killed at any moment
  (SIGKILL included) leaves every batch file either absent or complete.  Committing
  a batch never rewrites the others, so the cost of a commit does not grow with the
  number of batches.
* When every batch is done the batches are consolidated, again through a temporary
  file and :func:`os.replace`, into the single file ``<path>``, and ``<path>.parts``
  is removed.  A later call with the same arguments reads ``<path>`` and fits nothing.

Every file carries the run's *fingerprint* (a SHA-256 over the data digests and all
settings, see :func:`fingerprint`).  A store whose fingerprint differs from the
current run's is never mixed in: :class:`BatchCache` raises ``ValueError`` naming
the settings that differ.  Every batch record carries a SHA-256 checksum of its
contents; a truncated or corrupt file or record is reported with a ``RuntimeWarning``
and its batches are recomputed.

HDF5 layout of one batch record (group ``batch_NNNN``): attributes ``batch``,
``n_rows``, ``columns`` (JSON list of ``[name, kind, dtype]``), ``info`` (JSON),
``sha256``; datasets ``frame/cK`` for numeric columns, ``frame/cK_codes`` and
``frame/cK_levels`` for text columns, and ``arrays/<name>`` for extra arrays.
File attributes: ``format``, ``format_version``, ``fingerprint``,
``fingerprint_items`` (JSON), ``causarray_version``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._validation import check_cache_batches, check_cache_format, check_cache_path
from ._version import __version__

logger = logging.getLogger("causarray")

FORMAT = "causarray-batch-cache"
#: 2: result rows carry ``tested`` beside ``estimable`` (a cache of version 1 lacks it)
FORMAT_VERSION = 2
_BATCH_RE = re.compile(r"^batch_(\d{4,})$")
_PART_RE = re.compile(r"^batch_(\d{4,})\.h5$")
_TMP_RE = re.compile(r"\.tmp-(\d+)-[0-9a-f]+$")
_N_SAMPLE_ROWS = 16


# ----------------------------------------------------------------------------------
# fingerprints
# ----------------------------------------------------------------------------------
def _rounded_text(v: np.ndarray) -> bytes:
    """Layout-independent text of float sums (9 significant digits)."""
    return ",".join(f"{x:.9g}" for x in np.asarray(v, dtype=np.float64).ravel()).encode()


def content_digest(M: Any) -> str:
    """Cheap content digest of a matrix (dense, sparse, DataFrame or 1-D array).

    Hashes the shape, the float64 row and column sums (rounded to 9 significant
    digits, so the memory layout does not matter) and the exact values of up to 16
    evenly spaced rows.  One pass over the data; no copy of the whole matrix.

    Parameters
    ----------
    M : ndarray, scipy.sparse matrix, pandas.DataFrame / Series or None

    Returns
    -------
    str
        Hex digest (32 characters), or ``'none'`` for ``None``.
    """
    if M is None:
        return "none"
    h = hashlib.blake2b(digest_size=16)
    if isinstance(M, (pd.DataFrame, pd.Series)):
        if isinstance(M, pd.DataFrame):
            h.update(json.dumps([str(c) for c in M.columns]).encode())
        M = M.to_numpy()
    if sp.issparse(M):
        M = M.tocsr()
    else:
        M = np.asarray(M)
        if M.dtype == object:
            h.update(json.dumps([str(x) for x in M.ravel()]).encode())
            return h.hexdigest()
    if M.ndim == 1:
        M = M.reshape(-1, 1)
    h.update(repr(tuple(M.shape)).encode())
    if M.size:
        h.update(_rounded_text(np.asarray(M.sum(axis=0, dtype=np.float64)).ravel()))
        h.update(_rounded_text(np.asarray(M.sum(axis=1, dtype=np.float64)).ravel()))
        rows = np.unique(np.linspace(0, M.shape[0] - 1, _N_SAMPLE_ROWS).astype(int))
        block = M[rows]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        h.update(np.ascontiguousarray(block, dtype=np.float64).tobytes())
    return h.hexdigest()


def canonical(obj: Any) -> Any:
    """A JSON-able, order-independent description of a setting (arrays are digested)."""
    if isinstance(obj, Mapping):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, (np.ndarray, pd.DataFrame, pd.Series)) or sp.issparse(obj):
        return {"array": list(np.shape(obj)), "digest": content_digest(obj)}
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return repr(float(obj))
    if obj is None or isinstance(obj, str):
        return obj
    return repr(obj)


def fingerprint(items: Mapping[str, Any]) -> tuple[str, dict]:
    """SHA-256 fingerprint of a run's data digests and settings.

    Parameters
    ----------
    items : mapping
        Everything the results depend on; arrays are replaced by their
        :func:`content_digest`, other values by a canonical JSON form.

    Returns
    -------
    (hex digest, canonical description) : tuple[str, dict]
    """
    desc = canonical(dict(items))
    desc["cache_format_version"] = FORMAT_VERSION
    text = json.dumps(desc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest(), desc


# ----------------------------------------------------------------------------------
# batch records
# ----------------------------------------------------------------------------------
@dataclass
class BatchRecord:
    """What is stored for one finished batch.

    Attributes
    ----------
    frame : DataFrame or None
        The batch's result rows (numeric, boolean and text columns); None in a record
        loaded without frames (:meth:`BatchCache.load`).
    arrays : dict of ndarray
        Extra numeric arrays (e.g. the control rows of U for warm starts).
    info : dict
        JSON-able scalars (timings, cell counts).
    """

    frame: pd.DataFrame | None
    arrays: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def _column_kind(s: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(s.dtype) or pd.api.types.is_numeric_dtype(s.dtype):
        if isinstance(s.dtype, np.dtype):
            return "num"
        raise TypeError(f"column {s.name!r} has extension dtype {s.dtype}; "
                        "only numpy numeric, bool and text columns can be cached")
    if s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
        return "text"
    raise TypeError(f"column {s.name!r} has dtype {s.dtype}, which cannot be cached")


def _encode_text(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes, levels = pd.factorize(values, use_na_sentinel=True)
    return codes.astype(np.int64), np.asarray([str(v) for v in levels], dtype=object)


def _decode_text(codes: np.ndarray, levels: np.ndarray) -> np.ndarray:
    lv = np.append(np.asarray(levels, dtype=object), None)   # code -1 -> None
    return lv[codes]


def _checksum(columns: list, data: list, arrays: Mapping[str, np.ndarray], info: Mapping) -> str:
    """SHA-256 over the canonical content of a record."""
    h = hashlib.sha256()
    h.update(json.dumps(columns).encode())
    for item in data:
        if isinstance(item, tuple):            # text column: (codes, levels)
            codes, levels = item
            h.update(np.ascontiguousarray(codes).tobytes())
            h.update("\x00".join(levels).encode("utf-8", "surrogatepass"))
        else:
            h.update(str(item.dtype).encode())
            h.update(np.ascontiguousarray(item).tobytes())
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{arr.dtype}|{arr.shape}".encode())
        h.update(arr.tobytes())
    h.update(json.dumps(info, sort_keys=True).encode())
    return h.hexdigest()


def _record_parts(rec: BatchRecord):
    frame = rec.frame
    columns, data = [], []
    for name in frame.columns:
        s = frame[name]
        kind = _column_kind(s)
        if kind == "num":
            arr = s.to_numpy()
            columns.append([str(name), "num", str(arr.dtype)])
            data.append(arr)
        else:
            columns.append([str(name), "text", "object"])
            data.append(_encode_text(s.to_numpy(dtype=object)))
    arrays = {str(k): np.asarray(v) for k, v in rec.arrays.items()}
    info = json.loads(json.dumps(rec.info))
    return columns, data, arrays, info


def write_record(group, batch: int, rec: BatchRecord) -> None:
    """Write one batch record into an open h5py group."""
    import h5py

    columns, data, arrays, info = _record_parts(rec)
    g = group.create_group(f"batch_{batch:04d}")
    fr = g.create_group("frame")
    for k, item in enumerate(data):
        if isinstance(item, tuple):
            codes, levels = item
            fr.create_dataset(f"c{k}_codes", data=codes)
            fr.create_dataset(f"c{k}_levels", data=levels.astype(object),
                              dtype=h5py.string_dtype("utf-8"))
        else:
            fr.create_dataset(f"c{k}", data=item)
    ar = g.create_group("arrays")
    for name, arr in arrays.items():
        ar.create_dataset(name, data=arr)
    g.attrs["batch"] = int(batch)
    g.attrs["n_rows"] = len(rec.frame)
    g.attrs["columns"] = json.dumps(columns)
    g.attrs["info"] = json.dumps(info, sort_keys=True)
    g.attrs["sha256"] = _checksum(columns, data, arrays, info)


def read_record(g) -> BatchRecord:
    """Read and verify one batch record; ``ValueError`` if its checksum does not match."""
    columns = json.loads(g.attrs["columns"])
    info = json.loads(g.attrs["info"])
    n_rows = int(g.attrs["n_rows"])
    fr = g["frame"]
    data, out = [], {}
    for k, (name, kind, dtype) in enumerate(columns):
        if kind == "text":
            codes = fr[f"c{k}_codes"][()]
            levels = np.asarray(fr[f"c{k}_levels"].asstr()[()], dtype=object)
            data.append((codes, levels))
            out[name] = _decode_text(codes, levels)
        else:
            arr = fr[f"c{k}"][()]
            if str(arr.dtype) != dtype:
                raise ValueError(f"column {name!r} has dtype {arr.dtype}, expected {dtype}")
            data.append(arr)
            out[name] = arr
        if len(out[name]) != n_rows:
            raise ValueError(f"column {name!r} has {len(out[name])} rows, expected {n_rows}")
    arrays = {name: ds[()] for name, ds in g["arrays"].items()}
    if _checksum(columns, data, arrays, info) != g.attrs["sha256"]:
        raise ValueError("checksum mismatch")
    frame = pd.DataFrame(out, columns=[c[0] for c in columns])
    return BatchRecord(frame=frame, arrays=arrays, info=info)


# ----------------------------------------------------------------------------------
# atomic file operations
# ----------------------------------------------------------------------------------
def _h5_open(path, mode: str):
    import h5py

    try:
        return h5py.File(path, mode, locking=False)
    except TypeError:  # pragma: no cover - h5py without the locking argument
        return h5py.File(path, mode)


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover - e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_h5_write(path: Path, write: Callable[[Any], None]) -> None:
    """Create ``path`` atomically: write a temporary file, fsync it, ``os.replace`` it.

    A crash at any point leaves either the previous ``path`` (or none) or the complete
    new one; at worst a stale ``<path>.tmp-<pid>-<hex>`` file, removed by the next
    :class:`BatchCache` that finds its process gone.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with _h5_open(tmp, "w") as f:
            write(f)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_path(path.parent, directory=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - exists, owned by someone else
        return True
    return True


def _remove_stale_tmp(folder: Path, prefix: str) -> None:
    if not folder.is_dir():
        return
    for f in folder.iterdir():
        if not f.name.startswith(prefix):
            continue
        m = _TMP_RE.search(f.name)
        if m and not _pid_alive(int(m.group(1))):
            try:
                f.unlink()
                logger.info("removed stale temporary cache file %s", f)
            except OSError:  # pragma: no cover
                pass


# ----------------------------------------------------------------------------------
# the store
# ----------------------------------------------------------------------------------
class BatchCache:
    """Crash-safe store of finished batches with a run fingerprint.

    Parameters
    ----------
    path : str or os.PathLike
        The user-visible cache file (e.g. ``'replogle_results.h5'``).  Batches are
        committed under ``<path>.parts/`` during the run and consolidated into
        ``path`` at the end (see the module docstring).
    fingerprint : str
        The current run's fingerprint (:func:`fingerprint`).
    items : dict, optional
        The canonical description behind the fingerprint; stored with the cache and
        used to name the differing settings when a cache does not match.
    """

    def __init__(self, path, fingerprint: str, items: Mapping | None = None):
        self.path = Path(os.fspath(path))
        check_cache_path(self.path)
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        self.fingerprint = fingerprint
        self.items = dict(items or {})
        self._where: dict[int, Path] = {}      # batch -> the file that holds it

    # -- helpers ---------------------------------------------------------------------
    def _mismatch(self, where: Path, stored: str | None, stored_items: dict) -> ValueError:
        diff = sorted(k for k in set(stored_items) | set(self.items)
                      if stored_items.get(k) != self.items.get(k))
        what = f" (differs in: {', '.join(diff)})" if diff else ""
        extra = f" and {str(self.parts_dir)!r}" if self.parts_dir.exists() else ""
        return ValueError(
            f"the cache at {str(where)!r} was written with different data or settings{what}; "
            f"delete {str(self.path)!r}{extra} to start fresh, or pass a new cache_path")

    def _check_file_attrs(self, f, where: Path) -> None:
        if f.attrs.get("format") != FORMAT:
            raise OSError("not a causarray batch cache")
        stored = f.attrs.get("fingerprint")
        if stored != self.fingerprint:
            try:
                stored_items = json.loads(f.attrs.get("fingerprint_items", "{}"))
            except (TypeError, ValueError):
                stored_items = {}
            raise self._mismatch(where, stored, stored_items)

    def _write_attrs(self, f) -> None:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["fingerprint"] = self.fingerprint
        f.attrs["fingerprint_items"] = json.dumps(self.items, sort_keys=True)
        f.attrs["causarray_version"] = __version__

    def _corrupt(self, where: Path, detail: str) -> None:
        warnings.warn(f"cache file {str(where)!r} is truncated or corrupt ({detail}); "
                      "its batches are not trusted and will be recomputed",
                      RuntimeWarning, stacklevel=4)

    def _read_file(self, where: Path, only: int | None = None,
                   frames: bool = True) -> dict[int, BatchRecord]:
        """Verified records of one file; corrupt records are skipped with a warning.
        With ``frames=False`` each record's frame is dropped once verified (read it again
        with :meth:`read_batch`), so that one frame at a time is in memory."""
        out: dict[int, BatchRecord] = {}
        try:
            f = _h5_open(where, "r")
        except OSError as e:
            self._corrupt(where, f"cannot be opened: {type(e).__name__}")
            return out
        with f:
            try:
                self._check_file_attrs(f, where)
            except (OSError, KeyError, RuntimeError) as e:
                self._corrupt(where, str(e))
                return out
            for name in list(f.keys()):
                m = _BATCH_RE.match(name)
                if not m:
                    continue
                b = int(m.group(1))
                if only is not None and b != only:
                    continue
                try:
                    rec = read_record(f[name])
                except Exception as e:  # noqa: BLE001 - any read failure means "do not trust"
                    self._corrupt(where, f"batch {b}: {e}")
                    continue
                if not frames:
                    rec.frame = None
                out[b] = rec
                self._where.setdefault(b, where)
        return out

    # -- public API ------------------------------------------------------------------
    def load(self, frames: bool = True) -> dict[int, BatchRecord]:
        """All verified finished batches, from ``path`` and ``<path>.parts``.

        With ``frames=False`` the records come without their frames (``frame`` is None):
        every record is still read and verified, one at a time, and :meth:`read_batch`
        reads a frame back when it is needed, so a screen's results are never all in
        memory at once.

        Raises
        ------
        ValueError
            A file in the store has a different fingerprint.
        """
        _remove_stale_tmp(self.path.parent, self.path.name + ".tmp-")
        _remove_stale_tmp(self.parts_dir, "batch_")
        records: dict[int, BatchRecord] = {}
        self._consolidated: set[int] = set()
        self._where = {}
        if self.path.exists():
            records.update(self._read_file(self.path, frames=frames))
            self._consolidated = set(records)
        if self.parts_dir.is_dir():
            for f in sorted(self.parts_dir.iterdir()):
                m = _PART_RE.match(f.name)
                if not m:
                    continue
                b = int(m.group(1))
                got = self._read_file(f, only=b, frames=frames)
                if b not in got:
                    try:                     # untrusted: remove so it is rewritten cleanly
                        f.unlink()
                    except OSError:  # pragma: no cover
                        pass
                    continue
                records.setdefault(b, got[b])
        return records

    def read_batch(self, batch: int) -> BatchRecord:
        """The verified record of one finished batch, read from where it is stored."""
        where = self._where.get(batch)
        if where is None:
            raise KeyError(f"batch {batch} is not in the cache")
        got = self._read_file(where, only=batch)
        if batch not in got:
            raise RuntimeError(f"batch {batch} of {str(where)!r} could not be read back")
        return got[batch]

    def needs_finalize(self, batches) -> bool:
        """True unless ``path`` already holds exactly ``batches`` (verified) and no parts."""
        return self.parts_dir.exists() or set(batches) != getattr(self, "_consolidated", set())

    def commit(self, batch: int, record: BatchRecord) -> None:
        """Atomically commit one finished batch to ``<path>.parts/batch_NNNN.h5``."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)

        def write(f):
            self._write_attrs(f)
            write_record(f, batch, record)

        atomic_h5_write(self.parts_dir / f"batch_{batch:04d}.h5", write)
        self._where[batch] = self.parts_dir / f"batch_{batch:04d}.h5"

    def finalize(self, records: Mapping[int, BatchRecord]) -> None:
        """Consolidate all batches into ``path`` (atomically), then drop ``<path>.parts``.

        A record without its frame (``frame`` None, see :meth:`load`) is read back from
        where it is stored, one at a time."""
        def write(f):
            self._write_attrs(f)
            f.attrs["n_batches"] = len(records)
            for b in sorted(records):
                rec = records[b] if records[b].frame is not None else self.read_batch(b)
                write_record(f, b, rec)
                del rec

        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_h5_write(self.path, write)
        if self.parts_dir.is_dir():
            for f in self.parts_dir.iterdir():
                if _PART_RE.match(f.name) or _TMP_RE.search(f.name):
                    try:
                        f.unlink()
                    except OSError:  # pragma: no cover
                        pass
            try:
                self.parts_dir.rmdir()
            except OSError:  # pragma: no cover - something else lives there
                logger.warning("could not remove %s", self.parts_dir)
        self._where = {b: self.path for b in records}
        self._consolidated = set(records)

    def clear(self) -> None:
        """Delete ``path`` and ``<path>.parts`` (used by callers that start fresh)."""
        if self.path.exists():
            self.path.unlink()
        if self.parts_dir.is_dir():
            shutil.rmtree(self.parts_dir)


def read_cache(path) -> pd.DataFrame:
    """Read the result table of a finished (consolidated) cache file.

    No fingerprint is checked (use :func:`causarray.gcate_lfc_batch` with the same
    arguments for that); every record's checksum is.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`causarray.gcate_lfc_batch`.

    Returns
    -------
    DataFrame
        All batches, in batch order (verified against their checksums).
    """
    with _h5_open(path, "r") as f:
        check_cache_format(f.attrs.get("format") == FORMAT, path)
        names = sorted((n for n in f.keys() if _BATCH_RE.match(n)),
                       key=lambda n: int(_BATCH_RE.match(n).group(1)))
        frames = [read_record(f[n]).frame for n in names]
    check_cache_batches(len(frames), path)
    return pd.concat(frames, ignore_index=True)
