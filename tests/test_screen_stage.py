"""The screen-level factor model (causarray.screen_stage, docs/math.md#screen-stage)."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import causarray.batch as batch_mod
from causarray import gcate_lfc_batch, simulate_screen
from causarray.batch import resolve_factor_fit, screen_fit_obstacles
from causarray.factor_model import group_treatment_coefs
from causarray.simulate import design_from_simulation

sys.path.insert(0, str(Path(__file__).parent))
from _batch_child import RUN_KW, R, make_problem
from test_batch import _Counter, _spawn, _wait_for


# ----------------------------------------------------------------------------------
# the per-(gene, perturbation) coefficients
# ----------------------------------------------------------------------------------
def test_group_coefficients_are_the_nb_glm_with_an_offset():
    """Each (gene, group) coefficient is statsmodels' NB GLM of the group's counts on an
    intercept with the fixed ``base`` as offset, and its information is 1 / SE²."""
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(0)
    n, p, a = 300, 4, 3
    group = rng.integers(-1, a, size=n)
    base = rng.normal(0.5, 0.5, size=(n, p))
    beta = rng.normal(0, 0.7, size=(p, a))
    size = np.array([2.0, 5.0, 20.0, 1.0])
    mu = np.exp(base + np.where(group[:, None] >= 0, beta.T[np.maximum(group, 0)], 0.0))
    Y = rng.negative_binomial(size, size / (size + mu)).astype(float)
    est, info = group_treatment_coefs(Y, base, group, a, 1.0 / size, n_steps=8)
    for k in range(a):
        rows = group == k
        for j in range(p):
            fit = sm.GLM(Y[rows, j], np.ones((rows.sum(), 1)), offset=base[rows, j],
                         family=sm.families.NegativeBinomial(alpha=1.0 / size[j])).fit(
                tol=1e-12, maxiter=100)
            # both converge to the same MLE; 1e-8 is far above the float64 rounding
            # of sums over 100 cells and far below any statistical difference
            assert est[j, k] == pytest.approx(fit.params[0], abs=1e-8)
            assert info[j, k] == pytest.approx(1.0 / fit.bse[0] ** 2, rel=1e-6)


def test_group_without_counts_sits_at_the_bound():
    Y = np.zeros((6, 2))
    Y[:3, 1] = 4.0
    est, info = group_treatment_coefs(Y, np.zeros((6, 2)), np.array([0, 0, 0, 1, 1, -1]), 2,
                                      np.zeros(2))
    assert est[1, 0] == pytest.approx(np.log(4.0)) and est[0, 0] == -30.0
    assert info[0, 0] < 1e-12 < info[1, 0]


# ----------------------------------------------------------------------------------
# which estimator a run uses
# ----------------------------------------------------------------------------------
def test_auto_takes_the_screen_stage_only_for_large_randomized_panels():
    assert resolve_factor_fit("auto", [], "randomized", 3000, 30) == "screen"
    assert resolve_factor_fit("auto", [], "randomized", 2999, 30) == "per_batch"
    assert resolve_factor_fit("auto", [], "randomized", 1000, 3) == "screen"
    assert resolve_factor_fit("auto", [], "randomized", 999, 3) == "per_batch"   # a panel
    assert resolve_factor_fit("auto", [], "observational", 3000, 30) == "per_batch"
    assert resolve_factor_fit("auto", ["r > 0"], "randomized", 3000, 0) == "per_batch"
    assert resolve_factor_fit("screen", [], "observational", 50, 30) == "screen"
    assert resolve_factor_fit("per_batch", [], "randomized", 3000, 30) == "per_batch"
    lk: dict = {}
    resolve_factor_fit("auto", [], "randomized", 3000, 30, lk)
    assert lk == {"outcome_steps": 1}
    with pytest.raises(ValueError, match=r"^fit must be 'auto', 'screen' or 'per_batch', "
                                         r"got 'screen_stage'$"):
        resolve_factor_fit("screen_stage", [], "randomized", 3000, 30)


def test_screen_fit_names_what_it_needs():
    Y, X, A, X_A = make_problem()
    A2 = A.copy()
    A2.iloc[0, :2] = 1.0                                       # a cell with two perturbations
    plans = batch_mod.plan_batches(A2.to_numpy(), 2, None, 100, 150, 0)
    assert screen_fit_obstacles(0, "complement", plans, A2.to_numpy()) == [
        "r > 0", "control='non-targeting'", "one perturbation per cell"]
    with pytest.raises(ValueError, match=r"^fit='screen' needs r > 0; use fit='per_batch' "
                                         r"\(or 'auto'\)$"):
        gcate_lfc_batch(Y, X, A, 0, W_A=X_A, fit="screen", **RUN_KW)


# ----------------------------------------------------------------------------------
# statistics: the same calls as the per-batch fit on a randomized screen
# ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_screen_fit_keeps_fdr_and_power_of_the_per_batch_fit():
    """Unconfounded randomized screens (1,000 genes, r = 5): the screen-level fit's FDP
    at q = 0.05 stays below 0.1 and its power within 0.03 of the per-batch fit's
    (measured: FDP 0.036 / 0.048, power 0.824 / 0.808 against 0.823 / 0.807)."""
    for seed in (0, 1):
        ad = simulate_screen(n_ctrl=1500, n_perts=20, cells_per_pert=150, n_genes=1000, r=5,
                             confounding=0.0, random_state=seed)
        Y, X, A = design_from_simulation(ad)
        truth = ad.varm["true_lfc"].T.ravel() != 0
        out = {}
        for fit in ("per_batch", "screen"):
            df = gcate_lfc_batch(Y, X, A, 5, batch_size=10, fit=fit, random_state=0)
            rej = np.nan_to_num(df["padj"].to_numpy(), nan=1.0) < 0.05
            out[fit] = ((rej & ~truth).sum() / max(rej.sum(), 1), (rej & truth).sum()
                        / truth.sum(), df["tau"].to_numpy())
        fdp, power, tau = out["screen"]
        assert fdp < 0.1
        assert power > out["per_batch"][1] - 0.03
        ok = np.isfinite(tau) & np.isfinite(out["per_batch"][2])
        assert np.corrcoef(tau[ok], out["per_batch"][2][ok])[0, 1] > 0.99


# ----------------------------------------------------------------------------------
# the screen stage in the cache: kills, resumes, Dask
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def problem():
    return make_problem()


@pytest.fixture(scope="module")
def reference(problem):
    Y, X, A, X_A = problem
    return gcate_lfc_batch(Y, X, A, R, W_A=X_A, fit="screen", **RUN_KW)


def _run(problem, **kw):
    Y, X, A, X_A = problem
    return gcate_lfc_batch(Y, X, A, R, W_A=X_A, fit="screen", **{**RUN_KW, **kw})


class _StageFits:
    """Counts the screen stages actually fitted."""

    def __init__(self, monkeypatch):
        import causarray.screen_stage as stage_mod

        self.n = 0
        orig = stage_mod.fit_screen_stage

        def wrapped(*args, **kwargs):
            self.n += 1
            return orig(*args, **kwargs)

        monkeypatch.setattr(stage_mod, "fit_screen_stage", wrapped)


def test_screen_fit_differs_from_per_batch_and_is_deterministic(problem, reference):
    per_batch = gcate_lfc_batch(*problem[:3], R, W_A=problem[3], fit="per_batch", **RUN_KW)
    assert not np.allclose(per_batch["tau"], reference["tau"], equal_nan=True)
    pd.testing.assert_frame_equal(_run(problem), reference, check_exact=True)


def test_kill_while_storing_the_screen_stage_loses_nothing(problem, reference, tmp_path,
                                                           monkeypatch):
    proc, cache, marker = _spawn(tmp_path, "screen-die-in-save")
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert marker.read_text() == "screen"
    names = sorted(os.listdir(tmp_path))
    assert "replogle_results.h5.screen.npz" not in names       # only the temporary file
    assert any(".screen.npz.tmp-" in name for name in names)
    stages, counter = _StageFits(monkeypatch), _Counter(monkeypatch)
    pd.testing.assert_frame_equal(_run(problem, cache_path=str(cache)), reference,
                                  check_exact=True)
    assert stages.n == 1 and counter.batches == [0, 1, 2]


def test_kill_after_the_screen_stage_reuses_it(problem, reference, tmp_path, monkeypatch):
    proc, cache, marker = _spawn(tmp_path, "screen-hold")
    _wait_for(proc, marker)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert (tmp_path / "replogle_results.h5.screen.npz").exists()
    stages, counter = _StageFits(monkeypatch), _Counter(monkeypatch)
    pd.testing.assert_frame_equal(_run(problem, cache_path=str(cache)), reference,
                                  check_exact=True)
    assert stages.n == 0 and counter.batches == [1, 2]


def test_stored_screen_stage_is_kept_for_its_own_run_only(problem, reference, tmp_path):
    """The stored stage is read back only under the fingerprint it was written with, and a
    finished cache leaves no stage (nor temporaries of killed writes) beside it."""
    from causarray.screen_stage import fit_screen_stage

    Y, X, A, X_A = problem
    pool = batch_mod.plan_batches(A.to_numpy(), 2, None, 100, 150, 0)[0].ctrl_idx
    stage = fit_screen_stage(batch_mod._dense_rows(Y, pool), X[pool], pool, R, family="nb",
                             disp=None, offset=True, gcate_kwargs={})
    path = tmp_path / "c.h5.screen.npz"
    batch_mod._save_screen_stage(path, "fingerprint-a", stage)
    assert batch_mod._load_screen_stage(path, "fingerprint-b") is None
    back = batch_mod._load_screen_stage(path, "fingerprint-a")
    for key, value in stage.arrays().items():
        np.testing.assert_array_equal(getattr(back, key), value)
    (tmp_path / "c.h5.screen.npz.tmp-1.npz").write_bytes(b"half")
    pd.testing.assert_frame_equal(_run(problem, cache_path=tmp_path / "c.h5"), reference,
                                  check_exact=True)
    assert sorted(os.listdir(tmp_path)) == ["c.h5"]


@pytest.mark.slow
def test_dask_with_the_screen_stage_equals_serial(problem, reference):
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        df = _run(problem, client=client)
    # every batch runs its BLAS on one thread in any process: the same numbers
    pd.testing.assert_frame_equal(df, reference, check_exact=True)


def test_front_door_records_the_factor_model_it_used():
    import causarray as ca

    ad = simulate_screen(n_ctrl=200, n_perts=4, cells_per_pert=40, n_genes=1000, r=1,
                         random_state=0)
    ca.tl.lfc(ad, r=1, max_iters=3)                     # 1,000 genes: the screen stage
    assert ad.uns["causarray"]["settings"]["fit"] == "screen"
    small = ad[:, :999].copy()                          # a targeted panel
    ca.tl.lfc(small, r=1, max_iters=3)
    assert small.uns["causarray"]["settings"]["fit"] == "per_batch"
    ca.tl.lfc(ad, r=1, max_iters=3, fit="per_batch")
    assert ad.uns["causarray"]["settings"]["fit"] == "per_batch"
