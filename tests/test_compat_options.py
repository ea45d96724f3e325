"""0.1.1 options that must not be silently ignored: save_nuisances, ps_model, backend,
eps_var."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from causarray import LFC, estimate_propensity_scores, fit_gcate, gcate_lfc_batch
from causarray.batch import plan_batches
from causarray.nuisances import load_nuisances, nuisance_path

sys.path.insert(0, str(Path(__file__).parent))
from _batch_child import RUN_KW, R, make_problem


@pytest.fixture(scope="module")
def problem():
    return make_problem()


def test_save_nuisances_requires_cache_path(problem):
    Y, X, A, X_A = problem
    with pytest.raises(ValueError, match="save_nuisances=True requires cache_path"):
        gcate_lfc_batch(Y, X, A, R, W_A=X_A, save_nuisances=True, **RUN_KW)


def test_saved_nuisances_reproduce_the_batch_results(problem, tmp_path):
    Y, X, A, X_A = problem
    cache = tmp_path / "res.h5"
    # without the outcome-model variance term (which needs the GLM fit, not only Y_hat),
    # the stored nuisances determine every estimate
    df = gcate_lfc_batch(Y, X, A, R, W_A=X_A, cache_path=cache, save_nuisances=True,
                         lfc_kwargs=dict(nuisance_variance=False), **RUN_KW)
    path = nuisance_path(cache)
    assert path == str(tmp_path / "res.nuisances.h5")
    plans = plan_batches(A.to_numpy(), RUN_KW["batch_size"], None, RUN_KW["max_cells"],
                         RUN_KW["n_ctrl"], RUN_KW["random_state"])
    with h5py.File(path, "r") as f:
        assert sorted(f.keys()) == [f"batch_{b:04d}" for b in range(len(plans))]
    Yd = Y.toarray()
    for pl in plans:
        nu = load_nuisances(cache, pl.batch)
        np.testing.assert_array_equal(nu["cell_idx"], pl.cell_idx)
        n_b, a_b = pl.cell_idx.size, pl.trt_idx.size
        genes = nu["gene_names"]
        assert nu["Y_hat"].shape == (n_b, len(genes), a_b, 2)
        assert nu["pi_hat"].shape == (n_b, a_b) and nu["U"].shape == (n_b, R)
        assert nu["pert_names"] == [A.columns[k] for k in pl.trt_idx]
        # re-running LFC on the stored nuisances gives the batch's estimates
        gene_idx = [i for i, g in enumerate(df["gene_names"].iloc[:Y.shape[1]]) if g in genes]
        Yb = pd.DataFrame(Yd[np.ix_(pl.cell_idx, gene_idx)], columns=genes)
        Ab = pd.DataFrame(A.to_numpy()[np.ix_(pl.cell_idx, pl.trt_idx)], columns=nu["pert_names"])
        W = np.hstack([X[pl.cell_idx], nu["U"]])
        W_A = np.hstack([X_A[pl.cell_idx], nu["U"]])
        re, _ = LFC(Yb, W, Ab, W_A, offset=nu["offset"], Y_hat=nu["Y_hat"].astype(float),
                    pi_hat=nu["pi_hat_raw"].astype(float), nuisance_variance=False,
                    recenter_genes=nu["recenter_genes"], shift_variance=nu["shift_variance"])
        got = df[df["batch"] == pl.batch].set_index(["trt", "gene_names"])
        re = re.set_index(["trt", "gene_names"])
        both = got.loc[re.index]
        ok = re["estimable"].to_numpy() & both["estimable"].to_numpy()
        assert ok.sum() > 0.5 * len(re)
        # float32 storage of Y_hat: relative error ~1e-7 in the means -> tau to ~1e-5
        np.testing.assert_allclose(re["tau"][ok], both["tau"][ok], atol=1e-4)
        np.testing.assert_allclose(re["std"][ok], both["std"][ok], rtol=1e-4)


def test_ps_model_ensemble_differs_from_logistic_and_is_a_probability():
    rng = np.random.default_rng(0)
    n = 400
    z = rng.normal(size=n)
    A = (rng.random(n) < 1 / (1 + np.exp(-(2 * z ** 2 - 2)))).astype(float)[:, None]
    X_A = np.c_[np.ones(n), z]
    logit = estimate_propensity_scores(A, X_A)
    ens = estimate_propensity_scores(A, X_A, 1, "ensemble")
    rf = estimate_propensity_scores(A, X_A, ps_model="random_forest_cv")
    np.testing.assert_allclose(ens, 0.5 * (logit + rf), rtol=1e-12)
    assert np.all((rf > 0) & (rf < 1))
    # a logistic model linear in z cannot represent a U-shaped propensity; the forest can
    def brier(p):
        return np.mean((p[:, 0] - A[:, 0]) ** 2)

    assert brier(rf) < brier(logit)
    with pytest.raises(ValueError, match="ps_model must be one of"):
        estimate_propensity_scores(A, X_A, ps_model="forest")


def test_lfc_passes_ps_model_to_the_propensity_fit():
    rng = np.random.default_rng(1)
    n, p = 300, 20
    z = rng.normal(size=n)
    A = (rng.random(n) < 0.3).astype(float)[:, None]
    Y = rng.poisson(3.0, size=(n, p)).astype(float)
    W = np.c_[np.ones(n), z]
    _, est_l = LFC(Y, W, A)
    _, est_e = LFC(Y, W, A, ps_model="ensemble")
    np.testing.assert_allclose(est_e["pi_hat_raw"],
                               estimate_propensity_scores(A, W, ps_model="ensemble"))
    assert not np.allclose(est_e["pi_hat_raw"], est_l["pi_hat_raw"])


def test_backend_is_validated_and_does_not_change_results():
    rng = np.random.default_rng(2)
    n, p = 200, 15
    A = (rng.random(n) < 0.3).astype(float)[:, None]
    Y = rng.poisson(3.0, size=(n, p)).astype(float)
    W = np.ones((n, 1))
    ref, _ = LFC(Y, W, A)
    for backend in ("auto", "fast", "original"):
        df, _ = LFC(Y, W, A, backend=backend)
        pd.testing.assert_frame_equal(df, ref)
    with pytest.raises(ValueError, match="backend must be one of"):
        LFC(Y, W, A, backend="crispyx")
    with pytest.raises(ValueError, match="backend must be one of"):
        fit_gcate(Y, W, A, 1, backend="gpu")


def test_eps_var_is_deprecated_and_ignored():
    rng = np.random.default_rng(3)
    n, p = 200, 15
    A = (rng.random(n) < 0.3).astype(float)[:, None]
    Y = rng.poisson(3.0, size=(n, p)).astype(float)
    W = np.ones((n, 1))
    ref, _ = LFC(Y, W, A)
    with pytest.warns(FutureWarning, match="eps_var is deprecated and ignored"):
        df, _ = LFC(Y, W, A, eps_var=1e-4)
    pd.testing.assert_frame_equal(df, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        LFC(Y, W, A, eps_var=None)


def test_y_hat_array_is_returned_as_passed():
    rng = np.random.default_rng(4)
    n, p = 150, 10
    A = (rng.random(n) < 0.3).astype(float)[:, None]
    Y = rng.poisson(3.0, size=(n, p)).astype(float)
    W = np.ones((n, 1))
    _, est = LFC(Y, W, A)
    arr = est["Y_hat"].to_array()
    _, est2 = LFC(Y, W, A, Y_hat=arr, pi_hat=est["pi_hat_raw"])
    assert est2["Y_hat"] is arr


def test_estimate_r_validates_backend():
    from causarray.gcate import estimate_r

    rng = np.random.default_rng(5)
    Y = rng.poisson(3.0, size=(60, 20)).astype(float)
    A = (rng.random(60) < 0.3).astype(float)[:, None]
    with pytest.raises(ValueError, match="backend must be one of"):
        estimate_r(Y, np.ones((60, 1)), A, 1, backend="gpu")


def test_lfc_class_weight_is_a_deprecated_alias_of_ps_class_weight():
    rng = np.random.default_rng(6)
    n, p = 200, 5
    z = rng.normal(size=n)
    A = (rng.random(n) < 1 / (1 + np.exp(-(z - 1)))).astype(float)[:, None]
    Y = rng.poisson(2.0, size=(n, p)).astype(float)
    W = np.c_[np.ones(n), z]
    with pytest.warns(FutureWarning, match="use ps_class_weight"):
        _, est = LFC(Y, W, A, class_weight="balanced")
    np.testing.assert_allclose(est["pi_hat_raw"],
                               estimate_propensity_scores(A, W, class_weight="balanced"))
    assert est["ps_class_weight"] == "balanced" and "class_weight" not in est
