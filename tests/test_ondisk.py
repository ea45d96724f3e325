"""Counts on disk (causarray.ondisk): lazy row reads, streamed statistics, workers that
read their own batches; results identical to the in-memory pipeline."""
from __future__ import annotations

import multiprocessing as mp
import pickle
import re
import warnings
from concurrent.futures import Executor, ProcessPoolExecutor

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from causarray import ondisk
from causarray.batch import gcate_lfc_batch
from causarray.ondisk import H5Counts, open_screen
from causarray.preprocessing import from_anndata
from causarray.simulate import simulate_screen

GK = dict(kwargs_es_1=dict(max_iters=5), kwargs_es_2=dict(max_iters=5))
RUN = dict(batch_size=2, n_ctrl=None, max_cells=None, gcate_kwargs=GK)


def _screen(n_ctrl=200, n_perts=4, cells=60, genes=80, seed=1):
    a = simulate_screen(n_ctrl=n_ctrl, n_perts=n_perts, cells_per_pert=cells, n_genes=genes,
                        r=2, random_state=seed)
    a.X = sp.csr_matrix(a.X)
    return a


@pytest.fixture(scope="module")
def h5ad_file(tmp_path_factory):
    a = _screen()
    path = tmp_path_factory.mktemp("ondisk") / "screen.h5ad"
    a.write_h5ad(path)
    return path


def _in_memory(path, **kw):
    """The in-memory inputs of the same file (gene names on the counts)."""
    a = ad.read_h5ad(path)
    Y, A, X, X_A = from_anndata(a, **kw)
    Y = Y if isinstance(Y, pd.DataFrame) else \
        pd.DataFrame.sparse.from_spmatrix(Y, columns=list(a.var_names))
    return Y, A, X, X_A


def test_path_and_backed_input_equal_in_memory(h5ad_file):
    Y, A, X, X_A = _in_memory(h5ad_file)
    mem = gcate_lfc_batch(Y, X, A, 2, W_A=X_A, **RUN)
    from_path = gcate_lfc_batch(str(h5ad_file), r=2, **RUN)
    backed = gcate_lfc_batch(ad.read_h5ad(h5ad_file, backed="r"), r=2, **RUN)
    assert mem["estimable"].any()
    pd.testing.assert_frame_equal(from_path, mem, check_exact=True)
    pd.testing.assert_frame_equal(backed, mem, check_exact=True)


def test_open_screen_matches_prep_causarray_data(tmp_path):
    """Non-integer counts (rounded), an empty cell (dropped), a count above the cap and a
    covariate: designs, cap and rows equal those of from_anndata."""
    a = _screen(seed=3)
    Y = a.X.toarray().astype(np.float32)
    Y[5, :] = 0                                  # an empty cell
    Y[7, 3] = 2.4                                # a non-integer count
    Y[9, 4] = 10_000                             # far above the 99.9% cap
    a.X = sp.csr_matrix(Y)
    a.obs["batch"] = np.where(np.arange(a.n_obs) % 3 == 0, "b1", "b2")
    path = tmp_path / "s.h5ad"
    a.write_h5ad(path)
    with pytest.warns(UserWarning):
        Ym, Am, Xm, XAm = from_anndata(ad.read_h5ad(path), covariates=["batch"],
                                       drop_empty_cells=True)
    with pytest.warns(UserWarning) as record:
        M, A, X, X_A = open_screen(path, covariates=["batch"], drop_empty_cells=True)
    messages = " | ".join(str(w.message) for w in record)
    assert "1 non-integer entries; they were rounded" in messages
    assert "dropping 1 cells with zero total count" in messages
    assert M.shape == Ym.shape and M.cap < 10_000
    np.testing.assert_array_equal(X, Xm)
    np.testing.assert_array_equal(X_A, XAm)
    pd.testing.assert_frame_equal(A, Am)
    rows = np.array([30, 2, 2, M.shape[0] - 1, 8])          # unsorted, repeated
    np.testing.assert_array_equal(M[rows].toarray(), Ym[rows].toarray())
    np.testing.assert_array_equal(M.sum(axis=0), np.asarray(Ym.sum(axis=0)).ravel())


def test_dense_storage_reads_rows(tmp_path):
    a = _screen(seed=4)
    dense = a.X.toarray()
    a.X = dense
    path = tmp_path / "dense.h5ad"
    a.write_h5ad(path)
    M = H5Counts(str(path), "X")
    assert M.format == "dense"
    rows = np.array([0, 1, 2, 50, 51, 300])
    np.testing.assert_array_equal(M[rows], dense[rows])


def test_csc_storage_is_rejected(tmp_path):
    a = _screen()
    a.X = sp.csc_matrix(a.X)
    path = tmp_path / "csc.h5ad"
    a.write_h5ad(path)
    with pytest.raises(ValueError, match="stored column-wise \\(CSC\\); rows cannot be read"):
        H5Counts(str(path), "X")


def test_rows_are_read_lazily(h5ad_file, monkeypatch):
    """No read returns more rows than one batch or one streamed block."""
    calls = []
    orig = H5Counts._read_sorted_file_rows

    def counting(self, f, frows, raw=False):
        calls.append(int(frows.size))
        return orig(self, f, frows, raw=raw)

    monkeypatch.setattr(H5Counts, "_read_sorted_file_rows", counting)
    monkeypatch.setattr(ondisk, "BLOCK_NNZ", 2000)          # blocks of a few dozen rows
    monkeypatch.setattr(ondisk, "_SCAN_CACHE", {})
    n = ad.read_h5ad(h5ad_file, backed="r").n_obs
    df = gcate_lfc_batch(str(h5ad_file), r=2, **RUN)
    batch_cells = 200 + 2 * 60                               # controls + 2 perturbations
    assert len(df) and max(calls) <= batch_cells < n
    assert sum(c == batch_cells for c in calls) >= 2         # one read per batch (+ pool)


def _rows_read(monkeypatch) -> list[int]:
    """File rows of every read of the counts from now on (streamed blocks, row reads)."""
    calls: list[int] = []
    orig = H5Counts._read_sorted_file_rows

    def counting(self, f, frows, raw=False):
        calls.append(int(frows.size))
        return orig(self, f, frows, raw=raw)

    monkeypatch.setattr(H5Counts, "_read_sorted_file_rows", counting)
    monkeypatch.setattr(ondisk, "_SCAN_CACHE", {})
    return calls


@pytest.mark.parametrize("drop_empty", [False, True])
def test_the_way_in_reads_the_counts_once(tmp_path, monkeypatch, drop_empty):
    """tl.lfc's validation and open_screen: one streamed pass over the file (two when
    empty cells are dropped, which moves the rows of the digest)."""
    from causarray import tl

    a = _screen(seed=5)
    if drop_empty:
        X = a.X.tolil()
        X[4, :] = 0
        a.X = X.tocsr()
    a.write_h5ad(tmp_path / "s.h5ad")
    calls = _rows_read(monkeypatch)
    monkeypatch.setattr(ondisk, "BLOCK_NNZ", 2000)          # several blocks
    backed = ad.read_h5ad(tmp_path / "s.h5ad", backed="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        screen = tl._read_screen(backed, None, None, [], None, drop_empty)
    n_kept = screen.Y.shape[0]
    assert len(calls) > 3 and n_kept == a.n_obs - drop_empty
    assert sum(calls) == a.n_obs + (n_kept if drop_empty else 0)


@pytest.mark.parametrize("storage", ["csr", "dense"])
@pytest.mark.parametrize("block_nnz", [300, 1 << 23])
def test_one_pass_sums_and_digest_equal_a_second_pass(tmp_path, monkeypatch, storage,
                                                      block_nnz):
    """The capped counts' sums and digest taken in the scan equal, bit for bit, those of
    a pass over the capped counts: a heavy tail (the cap binds on many entries, some in
    the first block), a non-integer count (rounded), one block or many."""
    rng = np.random.default_rng(7)
    Y = rng.poisson(0.3, size=(300, 1000)).astype(np.float32)
    Y[::10, 0] = 9_000                   # capped, from the first block on
    Y[150, 1] = 100                      # raises the cap to about 109 halfway through
    Y[17, 3] = 2.6
    a = ad.AnnData(X=Y if storage == "dense" else sp.csr_matrix(Y))
    a.write_h5ad(tmp_path / "t.h5ad")
    monkeypatch.setattr(ondisk, "_SCAN_CACHE", {})
    monkeypatch.setattr(ondisk, "BLOCK_NNZ", block_nnz)
    M = H5Counts(str(tmp_path / "t.h5ad"), "X")
    scan = ondisk.scan_counts(M)
    M.rint = bool(scan.n_frac)
    M.cap = float(np.round(np.percentile(np.rint(scan.gene_max), 99.9)))
    assert scan.n_frac == 1 and 100 < M.cap < 9_000 and (Y > M.cap).sum() == 30
    one, two = scan.capped.finish(M), ondisk._digest_pass(M)
    assert one["digest"] == two["digest"]
    np.testing.assert_array_equal(one["row_sums"], two["row_sums"])
    np.testing.assert_array_equal(one["col_sums"], two["col_sums"])
    capped = np.minimum(np.rint(Y), M.cap).astype(np.float64)
    np.testing.assert_array_equal(one["row_sums"], capped.sum(axis=1))


class _RecordingExecutor(Executor):
    """Forwards to a process pool and records the pickled size of every job."""

    def __init__(self, inner, sizes):
        self.inner, self.sizes, self._max_workers = inner, sizes, inner._max_workers

    def submit(self, fn, *args, **kwargs):
        self.sizes.append(len(pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL)))
        return self.inner.submit(fn, *args, **kwargs)


def test_workers_read_their_own_batches(tmp_path, monkeypatch):
    """With a file input the job pickles small (path, rows, settings) and the workers'
    results equal the serial run."""
    a = _screen(n_ctrl=300, cells=80, genes=600, seed=2)
    path = tmp_path / "screen.h5ad"
    a.write_h5ad(path)
    serial = gcate_lfc_batch(str(path), r=2, blas_threads=1, **RUN)
    Y, A, X, X_A = _in_memory(path)
    mem_sizes: list[int] = []
    file_sizes: list[int] = []
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        par = gcate_lfc_batch(str(path), r=2, blas_threads=1,
                              executor=_RecordingExecutor(pool, file_sizes),
                              cache_path=str(tmp_path / "cache.h5"), **RUN)
        gcate_lfc_batch(Y, X, A, 2, W_A=X_A, blas_threads=1,
                        executor=_RecordingExecutor(pool, mem_sizes), **RUN)
    pd.testing.assert_frame_equal(par, serial, check_exact=True)
    print("pickled job bytes: file", file_sizes, "in memory", mem_sizes)
    # the in-memory jobs carry the batch's counts, the file jobs only row numbers
    assert max(file_sizes) < 1_000_000
    assert max(file_sizes) < min(mem_sizes) / 4
    # the caller's cache holds every batch: a rerun restores them without workers
    again = gcate_lfc_batch(str(path), r=2, blas_threads=1,
                            cache_path=str(tmp_path / "cache.h5"), **RUN)
    pd.testing.assert_frame_equal(again, serial, check_exact=True)


def test_tl_lfc_on_backed_anndata_equals_in_memory(h5ad_file):
    import causarray as ca

    mem = ad.read_h5ad(h5ad_file)
    backed = ad.read_h5ad(h5ad_file, backed="r")
    kw = dict(r="auto", r_grid=[1, 2], batch_size=2, max_iters=5, verbose=False)
    ca.tl.lfc(mem, **kw)
    ca.tl.lfc(backed, **kw)
    pd.testing.assert_frame_equal(backed.uns["causarray"]["results"],
                                  mem.uns["causarray"]["results"], check_exact=True)
    assert backed.uns["causarray"]["settings"]["r"] == mem.uns["causarray"]["settings"]["r"]


def test_backed_validation_names_the_problem(tmp_path):
    import causarray as ca

    a = _screen()
    a.X = a.X.astype(np.float32)
    a.X.data[:3] = 0.5
    path = tmp_path / "lognorm.h5ad"
    a.write_h5ad(path)
    with pytest.raises(ValueError, match=r"adata.X does not hold raw counts: 3 non-integer"):
        ca.tl.validate_screen(ad.read_h5ad(path, backed="r"))
    with pytest.raises(ValueError, match="with a file \\(or backed AnnData\\) as Y, X and A"):
        gcate_lfc_batch(str(path), np.ones((a.n_obs, 1)), None, 2)


def test_sparse_treatments_equal_dense(h5ad_file):
    """A sparse one-hot A (as the file path builds it) gives the dense A's results."""
    Y, A, X, X_A = _in_memory(h5ad_file)
    dense = gcate_lfc_batch(Y, X, A, 2, W_A=X_A, **RUN)
    A_sp = pd.DataFrame.sparse.from_spmatrix(sp.csc_matrix(A.to_numpy()), columns=A.columns)
    sparse = gcate_lfc_batch(Y, X, A_sp, 2, W_A=X_A, **RUN)
    pd.testing.assert_frame_equal(sparse, dense, check_exact=True)
    bad = sp.csc_matrix(A.to_numpy() * 2.0)
    with pytest.raises(ValueError, match=r"A must contain only 0/1 indicators; found other "
                                         r"values: \[2\]"):
        gcate_lfc_batch(Y, X, bad, 2, W_A=X_A, **RUN)


def test_progress_bar_shows_cells_per_second(h5ad_file, capsys):
    gcate_lfc_batch(str(h5ad_file), r=2, verbose=True, **RUN)
    err = capsys.readouterr().err
    assert "GCATE+LFC batches" in err and "2/2" in err
    rates = [float(v.replace(",", "")) for v in re.findall(r"([\d,]+) cells/s", err)]
    assert rates and all(v > 0 for v in rates) and "ETA" in err
