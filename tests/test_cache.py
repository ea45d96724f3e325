"""Tests of the crash-safe batch store (causarray.cache)."""
from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from causarray.cache import (
    BatchCache,
    BatchRecord,
    atomic_h5_write,
    canonical,
    content_digest,
    fingerprint,
    read_cache,
)


def _frame(batch: int, n: int = 12, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed + batch)
    tau = rng.normal(size=n)
    tau[0] = 0.0
    std = np.abs(rng.normal(size=n))
    std[0] = np.inf
    pv = rng.uniform(size=n)
    pv[0] = np.nan
    return pd.DataFrame({
        "gene_names": [f"g{j % 4}" for j in range(n)],
        "tau": tau, "std": std, "pvalue": pv,
        "rej": rng.integers(0, 2, size=n).astype(np.int64),
        "estimable": np.arange(n) > 0,
        "trt": np.array(["KIF11"] * (n // 2) + ["ü-unicode"] * (n - n // 2), dtype=object),
        "batch": np.full(n, batch, dtype=np.int64),
    })


def _record(batch: int) -> BatchRecord:
    return BatchRecord(frame=_frame(batch), arrays={"U_ctrl": np.arange(6.0).reshape(3, 2) + batch},
                       info={"t_batch": 1.5, "n_cells": 10})


def _cache(path, **items) -> BatchCache:
    fp, desc = fingerprint({"r": 2, "family": "nb", **items})
    return BatchCache(path, fp, desc)


def _flip_byte(path, dataset: str) -> None:
    """Flip one byte inside the stored data of a contiguous HDF5 dataset."""
    with h5py.File(path, "r") as f:
        off = f[dataset].id.get_offset()
    assert off is not None
    with open(path, "r+b") as fh:
        fh.seek(off + 3)
        b = fh.read(1)
        fh.seek(off + 3)
        fh.write(bytes([b[0] ^ 0xFF]))


# ----------------------------------------------------------------------------------
# digests and fingerprints
# ----------------------------------------------------------------------------------
def test_content_digest_ignores_layout_but_sees_content():
    rng = np.random.default_rng(1)
    Y = rng.poisson(2.0, size=(300, 40)).astype(float)
    d = content_digest(Y)
    assert content_digest(np.asfortranarray(Y)) == d
    assert content_digest(sp.csr_matrix(Y)) == content_digest(sp.csc_matrix(Y))
    assert content_digest(pd.DataFrame(Y)) != d            # column names are part of it
    Y2 = Y.copy()
    Y2[137, 5] += 1                                          # a row that is not sampled
    assert content_digest(Y2) != d
    assert content_digest(Y[:, :39]) != d


def test_fingerprint_is_order_independent_and_sensitive():
    fp1, desc = fingerprint({"r": 2, "kw": {"a": 1, "b": [1, 2]}, "X": np.ones((3, 2))})
    fp2, _ = fingerprint({"kw": {"b": (1, 2), "a": 1}, "X": np.ones((3, 2)), "r": 2})
    assert fp1 == fp2
    assert fingerprint({"r": 3, "kw": {"a": 1, "b": [1, 2]}, "X": np.ones((3, 2))})[0] != fp1
    assert desc["X"]["array"] == [3, 2]
    assert canonical(0.1) == repr(0.1) and canonical(np.int64(3)) == 3


# ----------------------------------------------------------------------------------
# the store
# ----------------------------------------------------------------------------------
def test_commit_load_finalize_roundtrip_is_exact(tmp_path):
    path = tmp_path / "res.h5"
    c = _cache(path)
    assert c.load() == {}
    recs = {b: _record(b) for b in range(3)}
    c.commit(0, recs[0])
    c.commit(2, recs[2])
    assert (tmp_path / "res.h5.parts" / "batch_0000.h5").exists()
    assert not path.exists()
    got = _cache(path).load()
    assert sorted(got) == [0, 2]
    for b in got:
        pd.testing.assert_frame_equal(got[b].frame, recs[b].frame, check_exact=True)
        np.testing.assert_array_equal(got[b].arrays["U_ctrl"], recs[b].arrays["U_ctrl"])
        assert got[b].info == recs[b].info
    c.commit(1, recs[1])
    c2 = _cache(path)
    assert c2.needs_finalize(range(3))
    c2.finalize(c2.load())
    assert path.exists() and not (tmp_path / "res.h5.parts").exists()
    c3 = _cache(path)
    assert sorted(c3.load()) == [0, 1, 2]
    assert not c3.needs_finalize(range(3))
    full = read_cache(path)
    pd.testing.assert_frame_equal(
        full, pd.concat([recs[b].frame for b in range(3)], ignore_index=True), check_exact=True)
    assert list(os.listdir(tmp_path)) == ["res.h5"]          # no temporary files left


def test_fingerprint_mismatch_raises_with_instructions(tmp_path):
    path = tmp_path / "res.h5"
    c = _cache(path)
    c.commit(0, _record(0))
    with pytest.raises(ValueError, match=r"different data or settings \(differs in: r\); "
                                         r"delete .*res\.h5.* and .*res\.h5\.parts"):
        BatchCache(path, *fingerprint({"r": 3, "family": "nb"})).load()
    c.finalize({0: _record(0)})
    with pytest.raises(ValueError, match=r"differs in: family.*or pass a new cache_path"):
        _cache(path, family="poisson").load()


def test_truncated_part_file_is_not_trusted(tmp_path):
    path = tmp_path / "res.h5"
    c = _cache(path)
    c.commit(0, _record(0))
    c.commit(1, _record(1))
    part = tmp_path / "res.h5.parts" / "batch_0001.h5"
    size = part.stat().st_size
    with open(part, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.warns(RuntimeWarning, match="truncated or corrupt"):
        got = _cache(path).load()
    assert sorted(got) == [0]
    assert not part.exists()                                  # removed, to be rewritten


def test_flipped_byte_is_detected_by_checksum(tmp_path):
    path = tmp_path / "res.h5"
    c = _cache(path)
    c.finalize({b: _record(b) for b in range(2)})
    with h5py.File(path, "r") as f:
        cols = [c[0] for c in __import__("json").loads(f["batch_0001"].attrs["columns"])]
    _flip_byte(path, f"batch_0001/frame/c{cols.index('tau')}")
    with pytest.warns(RuntimeWarning, match=r"batch 1: checksum mismatch"):
        c2 = _cache(path)
        got = c2.load()
    assert sorted(got) == [0]
    assert c2.needs_finalize(range(2))
    pd.testing.assert_frame_equal(got[0].frame, _record(0).frame, check_exact=True)


def test_garbage_file_is_not_trusted(tmp_path):
    path = tmp_path / "res.h5"
    path.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.warns(RuntimeWarning, match="truncated or corrupt"):
        assert _cache(path).load() == {}


def test_atomic_write_keeps_old_state_on_failure(tmp_path):
    path = tmp_path / "f.h5"
    atomic_h5_write(path, lambda f: f.create_dataset("x", data=np.arange(3)))

    def failing(f):
        f.create_dataset("x", data=np.arange(10))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_h5_write(path, failing)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["x"][()], np.arange(3))
    assert os.listdir(tmp_path) == ["f.h5"]


def test_stale_temporary_file_of_dead_process_is_removed(tmp_path):
    path = tmp_path / "res.h5"
    c = _cache(path)
    c.commit(0, _record(0))
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(proc.stdout)
    stale = tmp_path / "res.h5.parts" / f"batch_0001.h5.tmp-{dead}-deadbeef"
    stale.write_bytes(b"half written")
    assert sorted(_cache(path).load()) == [0]
    assert not stale.exists()


def test_cache_path_must_not_be_a_directory(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        BatchCache(tmp_path, "x")


def test_read_cache_rejects_foreign_files(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(ValueError, match="is not a causarray batch cache"):
        read_cache(path)


def test_load_without_frames_reads_batches_back(tmp_path):
    """``load(frames=False)`` verifies every record but keeps no frame; ``read_batch``
    reads one back from its part file, and after ``finalize`` from the consolidated file."""
    path = tmp_path / "c.h5"
    c = _cache(path)
    for b in range(3):
        c.commit(b, _record(b))
    c2 = _cache(path)
    got = c2.load(frames=False)
    assert sorted(got) == [0, 1, 2] and all(r.frame is None for r in got.values())
    pd.testing.assert_frame_equal(c2.read_batch(1).frame, _record(1).frame)
    c2.finalize(got)                                   # frames read back one at a time
    assert not c2.parts_dir.exists()
    pd.testing.assert_frame_equal(c2.read_batch(2).frame, _record(2).frame)
    pd.testing.assert_frame_equal(read_cache(path), pd.concat(
        [_record(b).frame for b in range(3)], ignore_index=True))
    with pytest.raises(KeyError, match="batch 7 is not in the cache"):
        c2.read_batch(7)
