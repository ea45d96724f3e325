"""The front door: keyword checks, r = 0 everywhere, every cell by default, scanpy manners.

Tiny simulated screens (3 perturbations, 30 genes); at most 3 GCATE epochs.
"""
from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from causarray import LFC, estimate_r, fit_gcate, fit_gcate_batch, gcate_lfc_batch, get, tl
from causarray._validation import LFC_COMPAT_KEYWORDS, check_keywords
from causarray.batch import layout_for_budget, parse_memory, plan_batches
from causarray.preprocessing import from_anndata, size_factors_from_offset
from causarray.simulate import simulate_screen


@pytest.fixture(scope="module")
def screen():
    return simulate_screen(n_ctrl=150, n_perts=3, cells_per_pert=60, n_genes=30, r=2,
                           random_state=3)


@pytest.fixture(scope="module")
def arrays(screen):
    Y, A, X, X_A = from_anndata(screen)
    return Y, A, X, X_A


# ----------------------------------------------------------------------------------
# unknown keywords
# ----------------------------------------------------------------------------------
def test_unknown_keywords_raise_at_every_entry_point(screen, arrays):
    Y, A, X, X_A = arrays
    with pytest.raises(TypeError, match=r"^fit_gcate\(\) got an unexpected keyword argument "
                                        r"'bogus_option'$"):
        fit_gcate(Y, X, A, 1, bogus_option=1)
    with pytest.raises(TypeError, match=r"^LFC\(\) got an unexpected keyword argument "
                                        r"'fdx_alpa'; did you mean 'fdx_alpha'\?$"):
        LFC(Y, X, A, fdx_alpa=0.1)
    with pytest.raises(TypeError, match=r"^gcate_lfc_batch\(lfc_kwargs=\.\.\.\) got an "
                                        r"unexpected keyword argument 'fdx_alpa'; did you "
                                        r"mean 'fdx_alpha'\?$"):
        gcate_lfc_batch(Y, X, A, 1, lfc_kwargs=dict(fdx_alpa=0.1))
    with pytest.raises(TypeError, match=r"^gcate_lfc_batch\(gcate_kwargs=\.\.\.\) got an "
                                        r"unexpected keyword argument 'kwargs_es1'; did you "
                                        r"mean 'kwargs_es_1'\?$"):
        gcate_lfc_batch(Y, X, A, 1, gcate_kwargs=dict(kwargs_es1={}))
    with pytest.raises(TypeError, match=r"^gcate_lfc_batch\(\) got an unexpected keyword "
                                        r"argument 'bogus_option'$"):
        gcate_lfc_batch(Y, X, A, 1, bogus_option=1)
    with pytest.raises(TypeError, match=r"^fit_gcate_batch\(\) got an unexpected keyword "
                                        r"argument 'bogus_option'$"):
        fit_gcate_batch(Y, X, A, 1, bogus_option=1)
    with pytest.raises(TypeError, match=r"^estimate_r\(\) got an unexpected keyword "
                                        r"argument 'bogus_option'$"):
        estimate_r(Y, X, A, 2, bogus_option=1)
    with pytest.raises(TypeError, match=r"^lfc\(\) got an unexpected keyword argument "
                                        r"'bogus_option'$"):
        tl.lfc(screen, bogus_option=1)
    with pytest.raises(TypeError, match=r"^lfc\(lfc_kwargs=\.\.\.\) got an unexpected keyword "
                                        r"argument 'fdx_alpa'"):
        tl.lfc(screen, r=0, lfc_kwargs=dict(fdx_alpa=0.1))
    assert "causarray" not in screen.uns             # every check ran before any work


def test_original_lfc_keywords_are_accepted_names():
    check_keywords("LFC", dict(ps_model="logistic", eps_var=1e-4, save_nuisances=True),
                   LFC_COMPAT_KEYWORDS)
    assert {"ps_model", "eps_var", "save_nuisances"} <= LFC_COMPAT_KEYWORDS


def test_tl_lfc_options_are_keyword_only(screen):
    with pytest.raises(TypeError, match="positional argument"):
        tl.lfc(screen, "perturbation")


# ----------------------------------------------------------------------------------
# r = 0
# ----------------------------------------------------------------------------------
def test_r0_batch_is_the_doubly_robust_step_on_the_observed_design(arrays, tmp_path):
    Y, A, X, X_A = arrays
    cache = tmp_path / "r0.h5"
    df = gcate_lfc_batch(Y, X, A, 0, W_A=X_A, n_ctrl=None, max_cells=None, batch_size=3,
                         cache_path=cache)
    assert cache.exists()
    s = size_factors_from_offset(Y.toarray(), True)
    ref, _ = LFC(Y, X, A, X, offset=np.log(s))   # randomized: propensity on X
    ok = ref["estimable"].to_numpy()
    assert ok.sum() > 60 and (df["estimable"].to_numpy() == ok).all()
    # the batch run starts the outcome GLM from the GLM on [X | A]: a warm start only
    np.testing.assert_allclose(df["tau"].to_numpy()[ok], ref["tau"].to_numpy()[ok],
                               atol=1e-5)
    np.testing.assert_allclose(df["std"].to_numpy()[ok], ref["std"].to_numpy()[ok],
                               rtol=1e-4)
    res = fit_gcate_batch(Y, X, A, 0, n_ctrl=None, max_cells=None)
    assert res[0]["res_2"]["U"].shape == (330, 0)


def test_tl_lfc_r0_keeps_lfc_kwargs(screen):
    ad0 = tl.lfc(screen, r=0, propensity=False, copy=True)
    ad1 = tl.lfc(screen, r=0, propensity=False, copy=True, lfc_kwargs=dict(usevar="unequal"))
    a, b = get.results(ad0), get.results(ad1)
    assert ad1.uns["causarray"]["settings"]["r"] == 0
    ok = a["estimable"].to_numpy()
    assert not np.allclose(a["std"].to_numpy()[ok], b["std"].to_numpy()[ok])


# ----------------------------------------------------------------------------------
# every cell by default; scanpy manners
# ----------------------------------------------------------------------------------
def test_parse_memory():
    assert parse_memory("2GB") == 2 * 10**9
    assert parse_memory("1.5 GiB") == int(1.5 * 2**30)
    assert parse_memory(1000) == 1000
    with pytest.raises(ValueError, match="memory_budget must be a size such as '2GB'"):
        parse_memory("lots")


def test_layout_for_budget_uses_every_cell_and_shrinks_batches(arrays):
    _, A, _, _ = arrays
    A = A.to_numpy()
    big = layout_for_budget(A, 30, "1GB", batch_size=15)
    assert big == dict(batch_size=3, n_ctrl=None, max_cells=None, cells_per_batch=330)
    # room for the 150 controls + 60 treated cells of one perturbation, not two
    small = layout_for_budget(A, 30, 230 * 30 * 48, batch_size=15)
    assert (small["batch_size"], small["n_ctrl"], small["max_cells"]) == (1, None, None)
    plans = plan_batches(A, small["batch_size"], None, None, None)
    assert all(pl.cell_idx.size == 210 for pl in plans)


def test_batch_caps_are_logged(arrays, caplog):
    Y, A, X, X_A = arrays
    with caplog.at_level(logging.WARNING, logger="causarray"):
        fit_gcate_batch(Y, X, A, 1, n_ctrl=100, max_cells=50, kwargs_es_1=dict(max_iters=2),
                        kwargs_es_2=dict(max_iters=2))
    assert ("the caps n_ctrl=100 and max_cells=50 leave out 50 of 150 control cells and "
            "130 of 180 treated cells") in caplog.text


def test_tl_lfc_copy_key_added_and_accessor(screen):
    before = set(screen.uns)
    out = tl.lfc(screen, r=0, key_added="ca0", copy=True)
    assert set(screen.uns) == before and "ca0_propensity" not in screen.obsm
    df = get.results(out, key="ca0")
    assert isinstance(df, pd.DataFrame) and len(df) == 90
    s = get.settings(out, key="ca0")
    assert (s["n_ctrl"], s["max_cells"], s["memory_budget"]) == (None, None, "2GB")
    with pytest.raises(KeyError, match=r"run causarray.tl.lfc\(adata, key_added='ca0'\)"):
        get.results(screen, key="ca0")


def test_verbose_none_follows_scanpy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scanpy", SimpleNamespace(
        settings=SimpleNamespace(verbosity=3)))
    assert tl.resolve_verbose(None) is True
    monkeypatch.setitem(sys.modules, "scanpy", SimpleNamespace(
        settings=SimpleNamespace(verbosity=1)))
    assert tl.resolve_verbose(None) is False
    assert tl.resolve_verbose(True) is True


def test_fit_gcate_r0_is_the_glm_on_the_observed_design(arrays):
    from causarray.glm import fit_glm

    Y, A, X, _ = arrays
    Y = Y.toarray()
    res_1, res_2 = fit_gcate(Y, X, A.to_numpy(), 0)
    assert res_2["U"].shape == (Y.shape[0], 0) and res_2["alpha"].shape == (3, 0)
    s = res_2["kwargs_glm"]["size_factor"]
    ref = fit_glm(Y, X, A.to_numpy(), family="nb", size=res_2["kwargs_glm"]["disp_glm"],
                  offset=np.log(s), max_iter=50, compute_se=False)
    # the same GLM refitted at the final size: equal to the IRLS convergence tolerance
    np.testing.assert_allclose(res_2["B_Gamma"], ref.coef, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(res_1["B_Gamma"], res_2["B_Gamma"])


# ----------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------
def _main(capsys, argv):
    from causarray.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("causarray: error:")]


def test_cli_errors_name_the_flag(capsys, screen, tmp_path):
    from causarray.cli import EXIT_BAD_INPUT

    bare = screen.copy()
    bare.uns = {}
    path = tmp_path / "bare.h5ad"
    bare.write_h5ad(path)
    code, _, err = _main(capsys, ["run", path, "--out", tmp_path / "o"])
    assert code == EXIT_BAD_INPUT
    assert _errors(err) == ["causarray: error: --pert-col was not given and adata.uns has no "
                            "'pert_col' entry; pass --pert-col <obs column holding the "
                            "perturbation labels>"]


def test_cli_auto_r_on_a_small_panel_runs(capsys, tmp_path):
    """An 8-gene panel with 6 perturbations: --r auto chooses r on a subset instead of
    failing (it exited with an error before)."""
    tiny = simulate_screen(n_ctrl=60, n_perts=6, cells_per_pert=10, n_genes=8, r=1,
                           random_state=0)
    path = tmp_path / "tiny.h5ad"
    tiny.write_h5ad(path)
    code, _, err = _main(capsys, ["run", path, "--out", tmp_path / "o", "-q",
                                  "--calibration", "off"])
    assert code == 0, err
    assert (tmp_path / "o" / "results.csv.gz").exists()


def test_cli_checks_out_before_any_work(capsys, screen, tmp_path, monkeypatch):
    import causarray.cli as cli

    path = tmp_path / "s.h5ad"
    screen.write_h5ad(path)
    (tmp_path / "file").write_text("x")

    def no_work(*a, **k):
        raise AssertionError("the input was read before --out was checked")

    monkeypatch.setattr(cli, "_read_h5ad", no_work)
    code, _, err = _main(capsys, ["run", path, "--out", tmp_path / "file" / "sub"])
    assert code == cli.EXIT_BAD_INPUT
    (line,) = _errors(err)
    assert line.startswith(f"causarray: error: --out {tmp_path / 'file' / 'sub'} is not "
                           "writable:")


def test_cli_warnings_are_one_line(capsys, monkeypatch, tmp_path):
    import warnings

    import causarray.cli as cli

    def warn_and_succeed(args, input_path, adata=None):
        warnings.warn("3 gene x treatment pair(s)\n are not estimable", RuntimeWarning)
        return cli.EXIT_OK

    monkeypatch.setattr(cli, "_run", warn_and_succeed)
    code, _, err = _main(capsys, ["run", tmp_path / "x.h5ad", "--out", tmp_path / "o"])
    assert code == cli.EXIT_OK
    assert err.splitlines() == ["causarray: warning: RuntimeWarning: 3 gene x treatment "
                                "pair(s) are not estimable"]
    assert warnings.showwarning is not cli._one_line_warning        # restored


def test_interrupted_r_choice_keeps_finished_fits(screen, tmp_path, monkeypatch):
    import causarray.gcate as gcate_mod

    kw = dict(r_grid=[1, 2], max_iters=3, propensity=False, n_ctrl=100, max_cells=200)
    ref = tl.lfc(screen, copy=True, **kw).uns["causarray"]["jic"]
    real, calls = gcate_mod._alternate, []

    def interrupted(*args, **kwargs):
        calls.append(args[5].shape[1])          # r of the fit (U's columns)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gcate_mod, "_alternate", interrupted)
    cache = tmp_path / "cache.h5"
    with pytest.raises(KeyboardInterrupt):
        tl.lfc(screen, copy=True, cache_path=cache, **kw)
    assert calls == [2, 1]                       # r = 2 finished, r = 1 interrupted
    partial = pd.read_csv(tmp_path / "cache.h5.jic.partial.csv")
    assert sorted(partial["r"]) == [0, 2]
    calls.clear()
    out = tl.lfc(screen, copy=True, cache_path=cache, **kw)
    assert calls == [1]                          # only the unfinished r is fitted
    jic = out.uns["causarray"]["jic"]
    pd.testing.assert_frame_equal(jic.drop(columns="time_s"), ref.drop(columns="time_s"))
    assert not (tmp_path / "cache.h5.jic.partial.csv").exists()


def test_pyarrow_is_a_core_dependency():
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    core = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    assert re.search(r'^\s*"pyarrow[>=<]', core, re.M)


def test_make_demo_installs_only_the_package(tmp_path):
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).parents[1]
    res = subprocess.run(["make", "-n", "demo", f"VENV={tmp_path / 'venv'}"], cwd=root,
                         capture_output=True, text=True, check=True)
    installs = [ln for ln in res.stdout.splitlines() if "pip install" in ln and " -e " in ln]
    assert installs and all("[dev]" not in ln for ln in installs), res.stdout


# ----------------------------------------------------------------------------------
# serial, threads, processes: the same numbers
# ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_batches_are_independent_of_the_executor(monkeypatch):
    """Each batch runs its BLAS on one thread and its gene chunks on its threads.

    The worker processes start with one BLAS thread (as Dask's workers do) while this
    process uses two: without a fixed per-batch count the summation order inside BLAS
    differs and the iterative fits drift apart (~1e-7 here, up to 1e-4 on real screens).
    The number of chunk threads (``blas_threads``) does not change a bit.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    ad = simulate_screen(n_ctrl=600, n_perts=4, cells_per_pert=150, n_genes=400, r=3,
                         random_state=1)
    Y, A, X, X_A = from_anndata(ad)
    kw = dict(W_A=X_A, batch_size=2, n_ctrl=None, max_cells=None,
              gcate_kwargs=dict(kwargs_es_1=dict(max_iters=6)))
    with threadpool_limits(limits=2, user_api="blas"):
        serial = gcate_lfc_batch(Y, X, A, 2, **kw)
        with ThreadPoolExecutor(2) as ex:
            threads = gcate_lfc_batch(Y, X, A, 2, executor=ex, **kw)
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setenv("MKL_NUM_THREADS", "1")
        with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as ex:
            procs = gcate_lfc_batch(Y, X, A, 2, executor=ex, **kw)
    with threadpool_limits(limits=1, user_api="blas"):     # the caller's count is fixed
        serial_1 = gcate_lfc_batch(Y, X, A, 2, blas_threads=2, **kw)
    one_thread = gcate_lfc_batch(Y, X, A, 2, blas_threads=1, **kw)   # chunks: any count
    for other in (threads, procs, serial_1, one_thread):
        pd.testing.assert_frame_equal(other, serial, check_exact=True)


def test_cli_memory_budget_is_checked_by_the_parser(capsys, tmp_path):
    from causarray.cli import EXIT_USAGE

    code, _, err = _main(capsys, ["run", tmp_path / "x.h5ad", "--out", tmp_path / "o",
                                  "--memory-budget", "lots"])
    assert code == EXIT_USAGE
    assert "argument --memory-budget: expected a size such as 2GB or 500MB, got 'lots'" in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------
# the JIC cache is keyed by the batch cache's content digest, not by sums alone
# ----------------------------------------------------------------------------------
def _same_sums_other_counts(screen):
    """A copy of ``screen`` with two counts moved between two cells and two genes.

    Cells 0 and n - 1 (always among the rows the content digest reads exactly) trade
    one count of genes j and k: every row and column sum stays the same.
    """
    import scipy.sparse as sp

    other = screen.copy()
    Y = _dense(other.X)
    last = Y.shape[0] - 1
    j = int(np.flatnonzero((Y[0] > 0) & (Y[last] >= 0))[0])
    k = int(np.flatnonzero((Y[last] > 0) & (np.arange(Y.shape[1]) != j))[0])
    Y[0, j] -= 1
    Y[0, k] += 1
    Y[last, j] += 1
    Y[last, k] -= 1
    other.X = sp.csr_matrix(Y) if sp.issparse(screen.X) else Y
    return other


def _dense(M) -> np.ndarray:
    return np.array(M.toarray() if hasattr(M, "toarray") else M, dtype=float)


def test_same_sums_other_counts_do_not_share_a_cached_jic_table(screen, tmp_path, caplog):
    other = _same_sums_other_counts(screen)
    Y0, Y1 = _dense(screen.X), _dense(other.X)
    assert not np.array_equal(Y0, Y1)
    np.testing.assert_array_equal(Y0.sum(axis=0), Y1.sum(axis=0))
    np.testing.assert_array_equal(Y0.sum(axis=1), Y1.sum(axis=1))

    kw = dict(r_grid=[1], max_iters=2, propensity=False, n_ctrl=100, max_cells=200)
    cache = tmp_path / "cache.h5"
    tl.lfc(screen, copy=True, cache_path=cache, **kw)
    for path in tmp_path.iterdir():          # keep only the JIC table: the batch cache
        if ".jic." not in path.name:         # would refuse the other data by itself
            if path.is_dir():
                import shutil

                shutil.rmtree(path)
            else:
                path.unlink()
    caplog.set_level(logging.INFO, logger="causarray")
    out = tl.lfc(other, copy=True, cache_path=cache, **kw)
    assert "re-using the JIC table" not in caplog.text
    assert "was computed with other settings; recomputing" in caplog.text
    fresh = tl.lfc(other, copy=True, **kw).uns["causarray"]["jic"]
    pd.testing.assert_frame_equal(out.uns["causarray"]["jic"].drop(columns="time_s"),
                                  fresh.drop(columns="time_s"))
    caplog.clear()                           # the same data does share it
    tl.lfc(other, copy=True, cache_path=tmp_path / "again.h5", **kw)
    (tmp_path / "again.h5").unlink()
    tl.lfc(other, copy=True, cache_path=tmp_path / "again.h5", **kw)
    assert "re-using the JIC table" in caplog.text


def test_the_way_in_sums_the_counts_once_per_kind(monkeypatch):
    """In memory tl.lfc's way in takes the raw row sums once (validation, empty cells)
    and the capped ones once (library size): not once per stage."""
    import scipy.sparse as sp

    from causarray import _validation, preprocessing

    adata = simulate_screen(n_ctrl=120, n_perts=2, cells_per_pert=40, n_genes=30, r=1,
                            random_state=2)
    adata.X = sp.csr_matrix(adata.X)
    whole = []
    orig = _validation.row_sums

    def counting(Y):
        if Y.shape == adata.shape:
            whole.append(float(Y.sum()))
        return orig(Y)

    monkeypatch.setattr(_validation, "row_sums", counting)
    monkeypatch.setattr(preprocessing, "row_sums", counting)
    screen = tl._read_screen(adata, None, None, [], None, False)
    capped_total = float(screen.Y.sum())
    assert whole == [float(adata.X.sum()), capped_total]
