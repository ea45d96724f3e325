"""Tests of the screen-scale batch pipeline (causarray.batch, docs/math.md#batch-pipeline)."""
from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import causarray.batch as batch_mod
from causarray.batch import (
    LFC_batch,
    fit_gcate_batch,
    gcate_lfc_batch,
    number_of_batches,
    plan_batches,
    shared_dispersion,
)
from causarray.dr import RESULT_COLUMNS

sys.path.insert(0, str(Path(__file__).parent))
from _batch_child import RUN_KW, R, make_problem

CHILD = Path(__file__).parent / "_batch_child.py"
GK = RUN_KW["gcate_kwargs"]


@pytest.fixture(scope="module")
def problem():
    return make_problem()


@pytest.fixture(scope="module")
def reference(problem):
    """Uninterrupted serial run without cache."""
    Y, X, A, X_A = problem
    return gcate_lfc_batch(Y, X, A, R, W_A=X_A, **RUN_KW)


def _run(problem, **kw):
    Y, X, A, X_A = problem
    return gcate_lfc_batch(Y, X, A, R, W_A=X_A, **{**RUN_KW, **kw})


class _Counter:
    """Counts the batches actually fitted (wraps causarray.batch._run_batch)."""

    def __init__(self, monkeypatch):
        self.batches = []
        orig = batch_mod._run_batch

        def wrapped(job, *shared):
            self.batches.append(job.batch)
            return orig(job, *shared)

        monkeypatch.setattr(batch_mod, "_run_batch", wrapped)


# ----------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------
def test_batch_layout_follows_array_split():
    rng = np.random.default_rng(0)
    a, n_ctrl_total = 200, 500
    labels = np.concatenate([np.full(n_ctrl_total, -1), rng.integers(0, a, size=6000)])
    A = np.zeros((labels.size, a))
    A[labels >= 0, labels[labels >= 0]] = 1
    assert number_of_batches(a, 15) == 14
    plans = plan_batches(A, batch_size=15, max_cells=300, n_ctrl=200, random_state=3)
    sizes = [pl.trt_idx.size for pl in plans]
    assert sizes == [15] * 4 + [14] * 10
    assert [list(c) for c in np.array_split(np.arange(a), 14)] == [list(pl.trt_idx) for pl in plans]
    ctrl = plans[0].ctrl_idx
    assert ctrl.size == 200 and np.all(np.diff(ctrl) > 0) and np.all(A[ctrl].sum(1) == 0)
    for pl in plans:
        np.testing.assert_array_equal(pl.ctrl_idx, ctrl)               # one shared pool
        assert pl.treated_idx.size == min(300, pl.n_treated_total)      # cap on treated only
        assert np.all(A[np.ix_(pl.treated_idx, pl.trt_idx)].sum(1) == 1)
        np.testing.assert_array_equal(pl.cell_idx, np.union1d(ctrl, pl.treated_idx))
    assert any(pl.n_treated_total > 300 for pl in plans)
    # n_batches overrides batch_size and is clamped to [1, a]
    assert len(plan_batches(A, batch_size=15, n_batches=3)) == 3
    assert number_of_batches(7, 2, n_batches=50) == 7
    assert len(plan_batches(A, max_cells=None, n_ctrl=None)[0].ctrl_idx) == n_ctrl_total
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        number_of_batches(10, 0)
    with pytest.raises(ValueError, match="A has no control cells"):
        plan_batches(np.eye(4))


# ----------------------------------------------------------------------------------
# GCATE phase
# ----------------------------------------------------------------------------------
def test_dispersion_is_estimated_once_on_controls_and_shared(problem, monkeypatch):
    from causarray.glm import estimate_dispersion
    from causarray.preprocessing import comp_size_factor

    Y, X, A, X_A = problem
    calls = []
    orig = batch_mod.shared_dispersion
    monkeypatch.setattr(batch_mod, "shared_dispersion",
                        lambda *a, **k: calls.append(1) or orig(*a, **k))
    out = fit_gcate_batch(Y, X, A, R, batch_size=3, n_ctrl=150, max_cells=100, **GK)
    assert len(calls) == 1 and len(out) == 2
    ctrl = out[0]["ctrl_idx"]
    Yc = Y[ctrl].toarray()
    expected = estimate_dispersion(Yc, X[ctrl], offset=np.log(comp_size_factor(Yc)))
    for o in out:
        np.testing.assert_array_equal(o["disp_glm"], expected)
        np.testing.assert_array_equal(o["ctrl_idx"], ctrl)
        np.testing.assert_array_equal(o["res_2"]["kwargs_glm"]["disp_glm"],
                                      expected[o["genes"]])
        # size factors are recomputed per batch, from the batch's cells (stage 1; stage 2
        # folds each perturbation's normalisation shift into its treated cells)
        np.testing.assert_allclose(o["res_1"]["kwargs_glm"]["size_factor"],
                                   comp_size_factor(Y[o["cell_idx"]].toarray()))
        assert o["res_2"]["U"].shape == (o["cell_idx"].size, R)
    assert out[0]["pert_names"] == list(A.columns[:3])
    np.testing.assert_array_equal(shared_dispersion(Y, X, ctrl), expected)


def test_skip_batches_and_warm_start(problem):
    Y, X, A, X_A = problem
    kw = dict(batch_size=3, n_ctrl=150, max_cells=100, **GK)
    out = fit_gcate_batch(Y, X, A, R, skip_batches=[0], **kw)
    assert out[0]["skipped"] and out[0]["res_2"] is None and out[0]["cell_idx"] is None
    cold = fit_gcate_batch(Y, X, A, R, **kw)
    warm = fit_gcate_batch(Y, X, A, R, warm_start_U=True, **kw)
    np.testing.assert_array_equal(cold[0]["res_2"]["U"], warm[0]["res_2"]["U"])
    assert not np.allclose(cold[1]["res_1"]["U"], warm[1]["res_1"]["U"])


# ----------------------------------------------------------------------------------
# GCATE + LFC
# ----------------------------------------------------------------------------------
def test_result_table(problem, reference):
    Y, X, A, X_A = problem
    df = reference
    p, a = Y.shape[1], A.shape[1]
    assert len(df) == p * a
    assert list(df.columns) == RESULT_COLUMNS + ["trt", "batch"]
    assert sorted(df["trt"].unique()) == sorted(A.columns)
    assert sorted(df["batch"].unique()) == [0, 1, 2]
    assert df.groupby("trt")["batch"].nunique().eq(1).all()
    assert df.index.equals(pd.RangeIndex(len(df)))
    np.testing.assert_allclose(df["log2fc"], df["tau"] / np.log(2))
    # the knocked-down target genes (gene k for perturbation k) are found
    for k, name in enumerate(A.columns):
        row = df[(df.trt == name) & (df.gene_names == f"gene_{k}")].iloc[0]
        assert row.tau < -1 and row.padj < 0.05


def test_on_target_family_spans_the_batches(problem):
    """Only the on-target family is redone over the screen; every other pair keeps its
    perturbation's BH from its batch, which equals BH over the whole table."""
    from causarray.inference import family_bh, on_target_pairs

    Y, X, A, X_A = problem
    targets = {name: (f"gene_{k}",) for k, name in enumerate(A.columns)}
    df = _run(problem, lfc_kwargs=dict(targets=targets))
    assert df["batch"].nunique() == 3
    trt, genes = df["trt"].to_numpy(), df["gene_names"].to_numpy()
    on = on_target_pairs(trt, genes, targets)
    assert on.sum() == A.shape[1]
    np.testing.assert_array_equal(df["on_target"].to_numpy(), on)
    np.testing.assert_array_equal(df["padj"].to_numpy(),
                                  family_bh(df["pvalue"].to_numpy(), trt, on))


def test_results_path_writes_the_returned_table(problem, tmp_path):
    """With results_path the table goes to Parquet one batch at a time: the same rows,
    columns, dtypes and values (on-target family over all batches included), from a
    fresh run and from a finished cache."""
    Y, X, A, X_A = problem
    targets = {name: (f"gene_{k}",) for k, name in enumerate(A.columns)}
    kw = dict(lfc_kwargs=dict(targets=targets), cache_path=str(tmp_path / "c.h5"))
    expected = _run(problem, lfc_kwargs=dict(targets=targets))
    for _ in range(2):                         # computed, then read back from the cache
        out = _run(problem, results_path=tmp_path / "res.parquet", **kw)
        assert out == tmp_path / "res.parquet"
        got = pd.read_parquet(out)
        pd.testing.assert_frame_equal(got, expected)
        assert got["on_target"].sum() == A.shape[1]
    assert sorted(os.listdir(tmp_path)) == ["c.h5", "res.parquet", "res.shift.csv"]   # no temporary left
    one = pd.read_parquet(out, filters=[("trt", "==", A.columns[0])])
    pd.testing.assert_frame_equal(one, expected[expected.trt == A.columns[0]]
                                  .reset_index(drop=True))


def test_outcome_glm_is_warm_started_from_gcate(problem, monkeypatch):
    """LFC gets GCATE's coefficients in [W | A] column order: at GCATE's dispersion the
    outcome GLM then converges in a step or two (a wrong order would not)."""
    import causarray.dr as dr_mod
    from causarray.glm import fit_glm

    seen = []
    lfc = dr_mod.LFC

    @functools.wraps(lfc)           # keeps LFC's signature: its keywords are checked
    def spy(Y, W, A, W_A=None, **kw):
        seen.append((np.asarray(Y, float), W, np.asarray(A, float), kw))
        return lfc(Y, W, A, W_A, **kw)

    monkeypatch.setattr(dr_mod, "LFC", spy)
    gk = {**GK, "disp_glm": 5.0}
    _run(problem, n_batches=1, gcate_kwargs=gk)
    Y, W, A, kw = seen[0]
    init = kw["outcome_init"]
    assert init.shape == (Y.shape[1], W.shape[1] + A.shape[1])
    warm = fit_glm(Y, W, A, size=5.0, offset=kw["offset"], init=init, compute_se=False)
    cold = fit_glm(Y, W, A, size=5.0, offset=kw["offset"], compute_se=False)
    assert warm.n_iter.mean() <= 2.5 < cold.n_iter.mean()
    np.testing.assert_allclose(warm.coef, cold.coef, atol=1e-4)
    # lfc_kwargs can switch the warm start off, but not pass coefficients
    seen.clear()
    _run(problem, n_batches=1, gcate_kwargs=gk, lfc_kwargs=dict(outcome_init=None))
    assert seen[0][3]["outcome_init"] is None
    with pytest.raises(ValueError, match="outcome_init only to None"):
        _run(problem, n_batches=1, lfc_kwargs=dict(outcome_init=np.zeros((2, 2))))


def test_single_perturbation_batches_keep_trt(problem):
    Y, X, A, X_A = problem
    keep = np.flatnonzero(A.iloc[:, 2:].sum(1).to_numpy() == 0)   # controls + first two perts
    df = gcate_lfc_batch(Y[keep], X[keep], A.iloc[keep, :2], R, W_A=X_A[keep], n_batches=2,
                         n_ctrl=150, gcate_kwargs=GK)
    assert df["trt"].notna().all()
    assert list(df.groupby("batch")["trt"].first()) == list(A.columns[:2])


def test_gene_without_counts_in_one_batch_is_non_estimable(problem):
    Y, X, A, X_A = problem
    Y = Y.tolil(copy=True)
    j = 60
    own = A.iloc[:, :2].sum(1).to_numpy() > 0                     # cells of batch 0's perts
    Y[np.flatnonzero(~own), j] = 0
    Y[np.flatnonzero(own)[:40], j] = 3
    Y = Y.tocsr()
    df = gcate_lfc_batch(Y, X, A, R, W_A=X_A, **RUN_KW)
    g = df[df.gene_names == f"gene_{j}"]
    late = g[g.batch > 0]
    assert len(late) == 4
    assert late[["tau", "std", "log2fc", "log2fc_se", "stat"]].isna().all().all()
    assert late.pvalue.isna().all() and late.padj.isna().all() and not late.estimable.any()
    assert late.tested.dtype == bool and not late.tested.any()
    assert (df.tested == df.pvalue.notna()).all()
    assert (late.mean_control == 0).all() and (late.mean_treated == 0).all()
    assert g[g.batch == 0].pvalue.notna().any()
    # the other genes of the affected batches are still tested
    assert df[(df.batch > 0) & (df.gene_names != f"gene_{j}")].estimable.mean() > 0.5


def test_sparse_input_stays_sparse_and_matches_dense(problem, reference):
    Y, X, A, X_A = problem
    n_full = Y.shape

    class GuardedCSR(sp.csr_matrix):
        def toarray(self, *a, **k):
            assert self.shape != n_full, "the whole count matrix was densified"
            return super().toarray(*a, **k)

        def todense(self, *a, **k):
            assert self.shape != n_full, "the whole count matrix was densified"
            return super().todense(*a, **k)

    df_sparse = gcate_lfc_batch(GuardedCSR(Y), X, A, R, W_A=X_A, **RUN_KW)
    pd.testing.assert_frame_equal(df_sparse, reference, check_exact=True)
    Yd = pd.DataFrame(Y.toarray(), columns=[f"gene_{j}" for j in range(Y.shape[1])])
    df_dense = gcate_lfc_batch(Yd, X, A, R, W_A=X_A, **RUN_KW)
    pd.testing.assert_frame_equal(df_dense, reference, check_exact=True)


def test_warnings_and_quiet_by_default(problem, capsys):
    Y, X, A, X_A = problem
    A2 = A.copy()
    A2.iloc[300, 4] = 1.0                        # a cell with two perturbations
    with pytest.warns(RuntimeWarning, match="1 cell\\(s\\) carry more than one perturbation"):
        plan = fit_gcate_batch(Y, X, A2, R, n_batches=2, n_ctrl=150, max_cells=100,
                               skip_batches=[0, 1])
    assert len(plan) == 2
    with pytest.warns(DeprecationWarning, match="LFC_batch is deprecated; use gcate_lfc_batch"):
        with pytest.raises(ValueError, match=r"r must be a non-negative integer \(0: no latent "
                                             r"factors\), got -1"):
            LFC_batch(Y, X, A, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _run(problem, n_batches=1)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    with pytest.raises(ValueError, match="lfc_kwargs may not set \\['Y_hat'\\]"):
        _run(problem, lfc_kwargs=dict(Y_hat=1))
    with pytest.raises(ValueError, match="cannot run on an executor or client"):
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(1) as ex:
            _run(problem, warm_start_U=True, executor=ex)


def test_verbose_shows_progress_bar(problem, capsys):
    _run(problem, n_batches=2, verbose=True)
    err = capsys.readouterr().err
    assert "GCATE+LFC batches" in err and "2/2" in err and "avg" in err and "ETA" in err


# ----------------------------------------------------------------------------------
# cache: resume, fingerprint, corruption
# ----------------------------------------------------------------------------------
def _spawn(tmp_path, mode):
    cache = tmp_path / "replogle_results.h5"
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(CHILD), str(cache), str(marker), mode],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, cache, marker


def _wait_for(proc, marker, timeout=120):
    t0 = time.time()
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.stderr.read().decode()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("child did not commit a batch in time")
        time.sleep(0.02)


def test_resume_after_sigkill_equals_uninterrupted_run(problem, reference, tmp_path,
                                                       monkeypatch):
    proc, cache, marker = _spawn(tmp_path, "hold")
    _wait_for(proc, marker)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    parts = sorted(os.listdir(tmp_path / "replogle_results.h5.parts"))
    assert parts == ["batch_0000.h5"]
    counter = _Counter(monkeypatch)
    df = _run(problem, cache_path=str(cache))
    assert counter.batches == [1, 2]                   # only the unfinished batches
    pd.testing.assert_frame_equal(df, reference, check_exact=True)
    assert cache.exists() and not (tmp_path / "replogle_results.h5.parts").exists()
    # a finished cache is read back without fitting anything
    counter.batches.clear()
    pd.testing.assert_frame_equal(_run(problem, cache_path=str(cache)), reference,
                                  check_exact=True)
    assert counter.batches == []


def test_sigkill_during_commit_write_leaves_previous_state(problem, reference, tmp_path,
                                                           monkeypatch):
    proc, cache, marker = _spawn(tmp_path, "die-in-write")
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert marker.exists()
    parts_dir = tmp_path / "replogle_results.h5.parts"
    names = sorted(os.listdir(parts_dir))
    assert names[0] == "batch_0000.h5" and len(names) == 2 and ".tmp-" in names[1]
    counter = _Counter(monkeypatch)
    df = _run(problem, cache_path=str(cache))
    assert counter.batches == [1, 2]
    pd.testing.assert_frame_equal(df, reference, check_exact=True)
    assert sorted(os.listdir(tmp_path)) == ["marker", "replogle_results.h5"]


def test_changed_settings_are_detected(problem, tmp_path):
    cache = tmp_path / "res.h5"
    _run(problem, n_batches=1, cache_path=cache)
    with pytest.raises(ValueError, match=r"differs in: layout, n_ctrl\); delete .*res\.h5"):
        _run(problem, n_batches=1, n_ctrl=120, cache_path=cache)
    with pytest.raises(ValueError, match=r"differs in: .*r\b"):
        gcate_lfc_batch(*problem[:3], 3, W_A=problem[3], **{**RUN_KW, "n_batches": 1},
                        cache_path=cache)
    Y, X, A, X_A = problem
    Y2 = Y.copy()
    Y2[5, 7] += 1
    with pytest.raises(ValueError, match=r"differs in: Y\)"):
        gcate_lfc_batch(Y2, X, A, R, W_A=X_A, **{**RUN_KW, "n_batches": 1}, cache_path=cache)
    with pytest.raises(ValueError, match=r"differs in: gcate_kwargs\)"):
        _run(problem, n_batches=1, cache_path=cache,
             gcate_kwargs=dict(kwargs_es_1=dict(max_iters=4)))


def test_corrupt_cache_is_recomputed(problem, reference, tmp_path, monkeypatch):
    import h5py

    cache = tmp_path / "res.h5"
    _run(problem, cache_path=cache)
    with h5py.File(cache, "r") as f:
        off = f["batch_0001/frame/c1"].id.get_offset()             # the tau column
    with open(cache, "r+b") as fh:
        fh.seek(off + 8)
        fh.write(b"\x00\x01\x02\x03")
    counter = _Counter(monkeypatch)
    with pytest.warns(RuntimeWarning, match="truncated or corrupt.*batch 1"):
        df = _run(problem, cache_path=cache)
    assert counter.batches == [1]
    pd.testing.assert_frame_equal(df, reference, check_exact=True)
    counter.batches.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        pd.testing.assert_frame_equal(_run(problem, cache_path=cache), reference,
                                      check_exact=True)
    assert counter.batches == []


# ----------------------------------------------------------------------------------
# parallel execution
# ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_dask_cluster_equals_serial(problem, reference, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    cache = tmp_path / "res.h5"
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        df = _run(problem, client=client, cache_path=cache)
        # same code and inputs; a tolerance far below any statistical meaning only
        # guards against BLAS thread-count rounding differences between processes
        pd.testing.assert_frame_equal(df, reference, check_exact=False, rtol=1e-10, atol=1e-12)
        df_ex = _run(problem, executor=client.get_executor(pure=False))
        pd.testing.assert_frame_equal(df_ex, df, check_exact=True)
    # the cache was written by this process and is complete
    assert cache.exists() and not Path(str(cache) + ".parts").exists()
    pd.testing.assert_frame_equal(_run(problem, cache_path=cache), df, check_exact=True)


def test_executor_and_client_are_exclusive(problem):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as ex:
        with pytest.raises(ValueError, match="pass either executor or client, not both"):
            _run(problem, executor=ex, client=object())


# ----------------------------------------------------------------------------------
# the tutorial example
# ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_replogle_tutorial_example_small(tmp_path):
    from causarray import gcate_lfc_batch  # noqa: F401  (the tutorial imports it)

    script = Path(__file__).parents[1] / "examples" / "replogle_tutorial.py"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(script), "--small", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # 32 perts x 200 genes; LFC's columns plus trt and batch
    assert f"Result shape : (6400, {len(RESULT_COLUMNS) + 2})" in out
    hits = int(re.search(r"Perturbations with >= 1 hit: (\d+)", out).group(1))
    assert hits >= 28                     # every perturbation knocks down its target gene
    assert {"replogle_results.h5", "replogle-r.csv", "replogle_simulated.h5ad",
            "figure_3.png"} <= set(os.listdir(tmp_path))
    df_r = pd.read_csv(tmp_path / "replogle-r.csv")
    assert list(df_r.columns[:4]) == ["r", "deviance", "nu", "JIC"]


# ----------------------------------------------------------------------------------
# assembling a screen's table one batch at a time
# ----------------------------------------------------------------------------------
def _result_like(b: int, a: int, p: int, rng) -> pd.DataFrame:
    n = a * p
    return pd.DataFrame({
        "gene_names": np.tile(np.array([f"g{j}" for j in range(p)], dtype=object), a),
        "tau": rng.normal(size=n), "rej": rng.integers(0, 2, n),
        "estimable": rng.random(n) < 0.9,
        "trt": np.repeat(np.array([f"P{b}_{k}" if k else None for k in range(a)],
                                  dtype=object), p),
        "batch": np.full(n, b, dtype=np.int64)})


def test_concat_batches_equals_pd_concat():
    from causarray.batch import concat_batches

    rng = np.random.default_rng(0)
    frames = [_result_like(b, 3, 7, rng) for b in range(4)]
    got = concat_batches(iter([f.copy() for f in frames]))
    pd.testing.assert_frame_equal(got, pd.concat(frames, ignore_index=True))
    # one string object per distinct value, shared across batches
    g = got["gene_names"].to_numpy()
    assert g[0] is g[21] and g[0] == "g0"


def _float_frames(n_frames: int, rows: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    for _ in range(n_frames):
        yield pd.DataFrame({f"x{c}": rng.normal(size=rows) for c in range(6)})


def test_concat_batches_holds_about_one_table():
    """Peak memory of the assembly stays near one table (pd.concat of a list holds two);
    with the planned row count, one table plus a few frames: no column parts are kept."""
    import tracemalloc

    from causarray.batch import concat_batches

    table_bytes = 8 * 6 * 400_000
    for n_rows, bound in ((None, 1.5), (400_000, 1.3)):
        tracemalloc.start()
        out = concat_batches(_float_frames(16, 25_000), n_rows)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert out.shape == (400_000, 6)
        assert peak < bound * table_bytes, (n_rows, peak, table_bytes)
    pd.testing.assert_frame_equal(out, pd.concat(list(_float_frames(16, 25_000)),
                                                 ignore_index=True))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_concat_batches_planned_rss():
    """Resident memory, which tracemalloc does not see: column parts that are freed stay
    with the C allocator, so joining parts peaks near two tables (5.6 GB for the essential
    screen's 2.6 GiB); filled in place, the peak is the table plus a few frames."""
    code = """if True:
        import sys, numpy as np, pandas as pd
        sys.path.insert(0, %r)
        from test_batch import _float_frames
        from causarray.batch import concat_batches
        def kb(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1])
        before = kb("VmRSS:")
        out = concat_batches(_float_frames(64, 100_000), 6_400_000)
        print(kb("VmHWM:") - before)
    """ % os.path.dirname(__file__)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table_kb = 8 * 6 * 6_400_000 / 1024
    assert int(proc.stdout.split()[-1]) < 1.3 * table_kb


def test_concat_batches_planned_rows():
    from causarray.batch import concat_batches

    rng = np.random.default_rng(0)
    frames = [_result_like(b, 3, 7, rng) for b in range(4)]
    got = concat_batches(iter([f.copy() for f in frames]), 84)
    pd.testing.assert_frame_equal(got, pd.concat(frames, ignore_index=True))
    g = got["gene_names"].to_numpy()
    assert g[0] is g[21] and g[0] == "g0"
    # a later frame with a wider dtype widens the column as pd.concat does
    mixed = [f.copy() for f in frames]
    mixed[2]["rej"] = mixed[2]["rej"].astype(float) + 0.5
    pd.testing.assert_frame_equal(concat_batches(iter([f.copy() for f in mixed]), 84),
                                  pd.concat(mixed, ignore_index=True))
    with pytest.raises(RuntimeError, match="batch frames hold 84 rows, 85 were planned"):
        concat_batches(iter([f.copy() for f in frames]), 85)
    with pytest.raises(RuntimeError, match="batch frames hold more than the 80 rows planned"):
        concat_batches(iter([f.copy() for f in frames]), 80)




def test_return_factors_are_the_batch_fits_u_and_survive_the_cache(problem, tmp_path):
    """One batch of all perturbations: ``return_factors`` gives the U that the batch's
    LFC used (the same rows as its saved nuisances, NaN for cells left out), and a rerun
    restored from the cache gives it again; several batches give None."""
    from causarray.nuisances import load_nuisances, nuisance_path

    cache = tmp_path / "one.h5"
    table, shift, U = _run(problem, batch_size=6, cache_path=str(cache),
                           save_nuisances=True, return_factors=True)
    nuis = load_nuisances(nuisance_path(str(cache)), 0)
    rows = np.asarray(nuis["cell_idx"])
    assert U.shape == (problem[0].shape[0], R)
    np.testing.assert_array_equal(U[rows], nuis["U"])
    left_out = np.setdiff1d(np.arange(U.shape[0]), rows)
    assert left_out.size > 0 and np.isnan(U[left_out]).all()
    again = _run(problem, batch_size=6, cache_path=str(cache), return_factors=True)
    np.testing.assert_array_equal(again[2], U)
    pd.testing.assert_frame_equal(again[0], table)
    assert _run(problem, return_factors=True)[2] is None          # batch_size 2: 3 batches
