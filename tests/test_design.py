"""The design is stated at every door and shown in every run: ``assignment`` in ``tl.lfc``,
``causarray run --assignment``, the settings, the cache fingerprint; the per-perturbation
shift table; the warning of a randomized run whose perturbations mostly shift the latent
state beyond chance; ``fit_gcate`` keeps the published estimator's meaning."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import causarray as ca
from causarray.batch import design_warning
from causarray.cli import EXIT_OK, EXIT_USAGE, main
from causarray.simulate import simulate_screen

SHIFT_COLUMNS = ["trt", "batch", "d2", "pvalue", "adjusted", "tau_change", "agreement"]


def _screen(confounding: float, seed: int = 0):
    return simulate_screen(n_ctrl=600, n_perts=6, cells_per_pert=150, n_genes=300, r=3,
                           confounding=confounding, random_state=seed)


def _run(adata, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ca.tl.lfc(adata, r=3, verbose=False, max_iters=10, **kw)
    return adata.uns["causarray"]


@pytest.fixture(scope="module")
def confounded():
    return _run(_screen(1.5))


@pytest.fixture(scope="module")
def randomized():
    return _run(_screen(0.0))


def test_fit_gcate_defaults_to_the_published_estimator():
    a = _screen(0.0)
    Y = a.X.toarray()
    A = pd.get_dummies(a.obs["perturbation"]).drop(columns="non-targeting").to_numpy(float)
    X = np.ones((a.n_obs, 1))
    _, res_2 = ca.fit_gcate(Y, X, A, 2, kwargs_es_1=dict(max_iters=3),
                            kwargs_es_2=dict(max_iters=3))
    assert res_2["assignment"] == "observational"
    assert res_2["shift_adjusted"].all()            # every shift removed as confounding


def test_shift_table_and_settings(randomized):
    shift = randomized["shift"]
    assert list(shift.columns) == SHIFT_COLUMNS
    assert sorted(shift["trt"]) == sorted(randomized["results"]["trt"].unique())
    assert randomized["settings"]["assignment"] == "randomized"
    # randomized: a shift is adjusted exactly when it is within chance (level 0.01)
    assert (shift["adjusted"] == (shift["pvalue"] >= 0.01)).all()
    assert (shift.loc[~shift["adjusted"], "tau_change"] == 0).all()


def test_warning_speaks_on_a_confounded_screen_and_not_on_a_randomized_one(confounded,
                                                                           randomized):
    assert (confounded["shift"]["pvalue"] < 0.01).mean() > 0.5
    assert confounded["design_warning"].startswith(
        f"{int((confounded['shift']['pvalue'] < 0.01).sum())} of 6 perturbations shift")
    assert "assignment='observational' (--assignment observational)" in \
        confounded["design_warning"]
    assert randomized["design_warning"] is None
    report = ca.report.render_report(confounded["results"], settings=confounded["settings"],
                                     shift=confounded["shift"],
                                     design_warning=confounded["design_warning"])
    assert "<h2 id='design'>" in report and "Warning:" in report


def test_observational_removes_every_shift_and_is_quiet():
    st = _run(_screen(1.5), assignment="observational")
    assert st["settings"]["assignment"] == "observational"
    assert st["shift"]["adjusted"].all() and st["shift"]["pvalue"].isna().all()
    assert st["design_warning"] is None
    shift = pd.DataFrame({"pvalue": [1e-5] * 4, "agreement": [1.0] * 4})
    assert design_warning(shift, "observational") is None
    assert design_warning(shift, "randomized") is not None


def test_assignment_is_in_the_cache_fingerprint(tmp_path):
    a = _screen(0.0)
    cache = tmp_path / "c.h5"
    _run(a, cache_path=cache)
    with pytest.raises(ValueError, match="different data or settings"):
        _run(a, cache_path=cache, assignment="observational")


def test_cli_assignment_reaches_the_run_and_writes_the_shift_table(tmp_path, capsys):
    path = tmp_path / "s.h5ad"
    _screen(0.0).write_h5ad(path)
    out = tmp_path / "out"
    code = main(["run", str(path), "--out", str(out), "--r", "2", "--max-iters", "5",
                 "--assignment", "observational", "--calibration", "off", "-q"])
    assert code == EXIT_OK
    shift = pd.read_csv(out / "shift.csv")
    assert list(shift.columns) == SHIFT_COLUMNS and shift["adjusted"].all()
    assert "observational" in (out / "report.html").read_text()
    code = main(["run", str(path), "--out", str(out), "--assignment", "random"])
    assert code == EXIT_USAGE
    assert "--assignment" in capsys.readouterr().err


def test_chance_imbalance_variance_is_that_of_the_partial_coefficient():
    """Stage 2 tests each perturbation's factor shift against randomisation: the shift is
    the factors' partial coefficient on A_k in [X | A], whose chance variance (unit
    factors) is [(Z'Z)^-1]_kk.  One-hot: 1/n_k + 1/n_0 with n_0 the cells without any
    perturbation; multi-hot with X predicting A (high MOI): the Monte Carlo variance of
    the OLS coefficient, larger than the difference of two means would say."""
    from causarray.gcate import chance_imbalance_variance

    rng = np.random.default_rng(0)
    n = 3000
    g = rng.integers(-1, 3, n)                                  # -1: no perturbation
    A1 = (g[:, None] == np.arange(3)).astype(float)
    X1 = np.ones((n, 1))
    n_k, n_0 = A1.sum(axis=0), float((g == -1).sum())
    np.testing.assert_allclose(chance_imbalance_variance(A1, "complement", X1),
                               1 / n_k + 1 / n_0, rtol=1e-10)
    # high MOI: the number of guides m predicts every target (drawn without replacement)
    m = np.maximum(rng.poisson(6, n), 1)
    lib = np.array([rng.choice(20, size=min(k, 20), replace=False) for k in m], dtype=object)
    A = np.zeros((n, 10))
    for i, guides in enumerate(lib):
        A[i, [t // 2 for t in guides if t < 20]] = 1.0
    X = np.column_stack([np.ones(n), np.log1p(m)])
    v = chance_imbalance_variance(A, "complement", X)
    Z = np.hstack([X, A])
    coefs = np.linalg.lstsq(Z, rng.normal(size=(n, 4000)), rcond=None)[0][2:]
    mc = coefs.var(axis=1)
    # Monte Carlo: relative SE of a variance from 4,000 draws is sqrt(2/4000) = 0.022
    np.testing.assert_allclose(v, mc, rtol=5 * np.sqrt(2 / 4000))
    naive = chance_imbalance_variance(A, "complement")
    assert np.all(v > 1.1 * naive)
