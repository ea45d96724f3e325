"""The published estimator through ``fit_gcate``'s default (``assignment='observational'``):
the confounding properties the original's 0.0.9 suite checked (its C1-C6 and N13),
written anew against our public names and our simulator.

One perturbation whose cells' latent state is shifted (``confounding``): the factors of
``fit_gcate`` align with the true ones, and the doubly robust LFC on ``[X | U]`` is closer
to the truth than the naive LFC on ``X`` alone, whether r is right, too large or too
small, and under Poisson counts; without confounding the adjustment costs little.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from causarray import LFC, fit_gcate
from causarray.simulate import simulate_screen

ES = dict(kwargs_es_1=dict(max_iters=30), kwargs_es_2=dict(max_iters=30))


def _study(confounding: float = 2.0, seed: int = 13, size=(2.0, 20.0)):
    a = simulate_screen(n_ctrl=300, n_perts=1, cells_per_pert=200, n_genes=150, r=2,
                        confounding=confounding, effect_frac=0.2, size=size,
                        random_state=seed)
    Y = a.X.toarray().astype(float)
    A = (a.obs["perturbation"] != "non-targeting").to_numpy(float)[:, None]
    X = np.ones((a.n_obs, 1))
    return Y, X, A, a.varm["true_lfc"][:, 0], a.obsm["U_true"]


@pytest.fixture(scope="module")
def confounded():
    return _study()


def _mse_naive_and_adjusted(Y, X, A, tau, r, family="nb"):
    naive, _ = LFC(Y, X, A, family=family, offset=True)
    _, res_2 = fit_gcate(Y, X, A, r, **ES)
    W = np.hstack([X, res_2["U"]])
    adj, _ = LFC(Y, W, A, W_A=W, family=family,
                 offset=np.log(res_2["kwargs_glm"]["size_factor"]))
    ok = naive["estimable"].to_numpy() & adj["estimable"].to_numpy()
    return (float(np.mean((naive["tau"].to_numpy()[ok] - tau[ok]) ** 2)),
            float(np.mean((adj["tau"].to_numpy()[ok] - tau[ok]) ** 2)))


def test_the_default_is_the_published_estimator(confounded):
    Y, X, A, _, _ = confounded
    _, res_2 = fit_gcate(Y, X, A, 2, **ES)
    assert res_2["assignment"] == "observational" and res_2["shift_adjusted"].all()


def test_factors_align_with_the_true_confounders(confounded):
    Y, X, A, _, U = confounded
    _, res_2 = fit_gcate(Y, X, A, 2, **ES)
    C = np.abs(np.corrcoef(res_2["U"].T, U.T)[:2, 2:])
    rows, cols = linear_sum_assignment(-C)
    assert C[rows, cols].min() >= 0.5


@pytest.mark.parametrize("r", [1, 2, 4])
def test_adjustment_beats_the_naive_lfc_for_any_r(confounded, r):
    Y, X, A, tau, _ = confounded
    naive, adjusted = _mse_naive_and_adjusted(Y, X, A, tau, r)
    assert adjusted < naive


def test_adjustment_under_poisson_counts():
    Y, X, A, tau, _ = _study(seed=3, size=1e6)           # NB size 1e6: Poisson counts
    naive, adjusted = _mse_naive_and_adjusted(Y, X, A, tau, 2, family="poisson")
    assert adjusted < naive


def test_without_confounding_the_adjustment_costs_little():
    Y, X, A, tau, _ = _study(confounding=0.0, seed=5)
    naive, adjusted = _mse_naive_and_adjusted(Y, X, A, tau, 2)
    assert abs(adjusted - naive) / naive < 0.5


def test_size_factors_and_a_given_dispersion(confounded):
    Y, X, A, _, _ = confounded
    _, auto = fit_gcate(Y, X, A, 2, **ES)
    _, fixed = fit_gcate(Y, X, A, 2, disp_glm=np.ones(Y.shape[1]), **ES)
    sf = auto["kwargs_glm"]["size_factor"]
    assert sf.shape == (Y.shape[0],) and np.all(sf > 0)
    assert fixed["U"].shape == auto["U"].shape and fixed["X_U"].shape == auto["X_U"].shape
    np.testing.assert_array_equal(fixed["kwargs_glm"]["disp_glm"], np.ones(Y.shape[1]))
