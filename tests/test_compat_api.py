"""0.1.1 public names: one test (or more) per name, stating its behaviour."""
from __future__ import annotations

import os
import random

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import causarray as ca
from causarray.batch import plan_batches

NEW_NAMES = ["refit_propensity_scores", "tune_penalty_factor", "select_propensity_factors",
             "reset_random_seeds", "fit_glm_fast", "fit_glm_ondisk", "subsample_ctrl_cells",
             "subsample_pert_cells", "fit_glm"]


def test_every_name_is_exported_and_listed():
    for name in NEW_NAMES:
        assert name in ca.__all__ and callable(getattr(ca, name))
    from causarray.gcate import fit_gcate_batch

    assert fit_gcate_batch is ca.fit_gcate_batch
    with pytest.raises(ImportError):
        from causarray.gcate import no_such_name  # noqa: F401


# ----------------------------------------------------------------------------------
# propensity refit workflow
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def screen():
    """Controls + 3 treatments; T1 shifts covariate 'z' strongly (near separation),
    T2 shifts 'w' mildly, T3 nothing."""
    rng = np.random.default_rng(0)
    n_c, n_t = 600, 80
    lab = np.r_[np.zeros(n_c, int), np.repeat([1, 2, 3], n_t)]
    z = rng.normal(size=lab.size) + 3.0 * (lab == 1)
    w = rng.normal(size=lab.size) + 0.6 * (lab == 2)
    A = pd.DataFrame({f"T{k}": (lab == k).astype(float) for k in (1, 2, 3)})
    X_A = pd.DataFrame({"intercept": 1.0, "z": z, "w": w})
    pi = ca.estimate_propensity_scores(A, X_A)
    return A, X_A, pi


def _elig(A, j):
    An = A.to_numpy()
    return (An.sum(axis=1) == 0) | (An[:, j] == 1)


def test_refit_with_a_covariate_dropped_changes_only_that_treatment(screen):
    A, X_A, pi = screen
    new, report = ca.refit_propensity_scores(A, X_A, {"T1": "z"}, pi_hat=pi)
    np.testing.assert_array_equal(new[:, 1:], pi[:, 1:])          # carried over exactly
    assert not np.allclose(new[:, 0], pi[:, 0])
    # the refitted column is the fit without z on T1's eligible cells
    e = _elig(A, 0)
    direct = ca.estimate_propensity_scores(A[["T1"]], X_A[["intercept", "w"]],
                                           mask=e[:, None])
    np.testing.assert_allclose(new[:, 0], direct[:, 0], rtol=1e-10)
    row = report.iloc[0]
    assert list(report["treatment"]) == ["T1"]
    assert row["dropped_covariates"] == ["z"] and row["retained_covariates"] == ["intercept", "w"]
    assert row["n_retained"] == 2 and not row["degenerate_design"]
    assert row["score_std"] == pytest.approx(np.std(new[e, 0]))


def test_refit_penalty_factor_is_a_rescaled_column(screen):
    A, X_A, pi = screen
    f = 16.0
    new, rep = ca.refit_propensity_scores(A, X_A, pi_hat=pi,
                                          penalty_factors_by_treatment={"T1": {"z": f}})
    Xs = X_A.copy()
    Xs["z"] = Xs["z"] / np.sqrt(f)
    e = _elig(A, 0)
    direct = ca.estimate_propensity_scores(A[["T1"]], Xs, mask=e[:, None])
    np.testing.assert_allclose(new[:, 0], direct[:, 0], rtol=1e-10)
    assert rep.iloc[0]["penalty_factors"] == {"z": f}
    with pytest.raises(ValueError, match="penalty factors must be finite numbers at least 1"):
        ca.refit_propensity_scores(A, X_A, penalty_factors_by_treatment={"T1": {"z": 0.5}})
    with pytest.raises(ValueError, match="both dropped and penalized"):
        ca.refit_propensity_scores(A, X_A, {"T1": ["z"]},
                                   penalty_factors_by_treatment={"T1": {"z": 2.0}})
    with pytest.raises(ValueError, match="Unknown covariate: 'depth'"):
        ca.refit_propensity_scores(A, X_A, {"T1": ["depth"]})


def test_refit_degenerate_design_warns_and_clip_covers_everything(screen):
    A, X_A, pi = screen
    with pytest.warns(RuntimeWarning, match="constant after filtering"):
        new, rep = ca.refit_propensity_scores(A, X_A, {"T3": ["z", "w"]}, pi_hat=pi,
                                              clip=(0.05, 0.95))
    assert bool(rep.iloc[0]["degenerate_design"]) and rep.iloc[0]["score_std"] == 0.0
    assert new.min() >= 0.05 and new.max() <= 0.95
    np.testing.assert_allclose(new[:, 1], np.clip(pi[:, 1], 0.05, 0.95))
    # no pi_hat: every treatment is refitted and reported
    full, rep2 = ca.refit_propensity_scores(A, X_A)
    assert list(rep2["treatment"]) == ["T1", "T2", "T3"]
    np.testing.assert_allclose(full, pi, rtol=1e-10)


def _auc(A, pi, j):
    from causarray.propensity_refit import arm_support

    return arm_support(A.to_numpy(), pi, j)["auc"]


def test_tune_penalty_factor_returns_the_smallest_qualifying_factor(screen):
    A, X_A, pi = screen
    target = 0.8
    assert _auc(A, pi, 0) > 0.9 > _auc(A, pi, 1)                 # only T1 is triggered
    tol = 0.15
    factors, report = ca.tune_penalty_factor(A, X_A, "z", target={"auc_lt": target}, tol=tol)
    assert list(report["treatment"]) == ["T1"] and set(factors) == {"T1"}
    f = factors["T1"]["z"]
    row = report.iloc[0]
    assert row["feasible"] and row["target_met"] and row["penalty_factor"] == f
    assert row["auc_chosen"] < target <= row["auc_unpenalized"]

    def auc_at(factor):
        new, _ = ca.refit_propensity_scores(A, X_A, pi_hat=pi,
                                            penalty_factors_by_treatment={"T1": {"z": factor}})
        return _auc(A, new, 0)

    assert auc_at(f) < target
    # the bisection bracket is narrower than tol: a factor exp(tol) smaller misses it
    assert auc_at(max(f * np.exp(-tol), 1.0)) >= target


def test_tune_penalty_factor_reports_infeasible_targets(screen):
    A, X_A, _ = screen
    # T1's arm is still separable without z only if w separated it: it does not, so an
    # AUC below 0.5 is out of reach even with z dropped
    factors, report = ca.tune_penalty_factor(A, X_A, "z", target={"auc_lt": 0.3})
    row = report.iloc[0]
    assert not row["feasible"] and not row["target_met"]
    assert factors == {"T1": {"z": 1e4}} and row["penalty_factor"] == 1e4
    factors, report = ca.tune_penalty_factor(A, X_A, "z", target={"auc_lt": 0.3},
                                             on_infeasible="none")
    assert factors == {} and report.iloc[0]["penalty_factor"] == 1.0
    with pytest.raises(ValueError, match="names no metric"):
        ca.tune_penalty_factor(A, X_A, "z", target={"ess_treated_lt": 0.3})
    with pytest.raises(ValueError, match="bracket must satisfy"):
        ca.tune_penalty_factor(A, X_A, "z", bracket=(0.5, 10))


def test_select_propensity_factors_drops_the_most_imbalanced_covariate(screen):
    A, X_A, pi = screen
    drop, report = ca.select_propensity_factors(A, X_A)
    assert drop == {"T1": ["z"]}                                   # largest |SMD|
    row = report.set_index("treatment").loc["T1"]
    assert row["target_met"] and row["ess_treated_fraction_after"] > 0.5
    assert row["ess_treated_fraction_before"] < 0.5
    assert set(report["treatment"]) == {"T1"}                      # T2, T3 not triggered
    new, _ = ca.refit_propensity_scores(A, X_A, drop, pi_hat=pi)
    from causarray.propensity_refit import arm_support

    assert arm_support(A.to_numpy(), new, 0)["ess_treated_fraction"] == \
        pytest.approx(row["ess_treated_fraction_after"])


# ----------------------------------------------------------------------------------
# seeds and subsampling
# ----------------------------------------------------------------------------------
def test_reset_random_seeds_seeds_python_numpy_and_hashseed():
    ca.reset_random_seeds(7)
    a = (random.random(), np.random.rand())
    assert os.environ["PYTHONHASHSEED"] == "7"
    ca.reset_random_seeds(7)
    assert (random.random(), np.random.rand()) == a
    with pytest.raises(ValueError, match="non-negative integer"):
        ca.reset_random_seeds(-1)


def test_subsampling_draws_the_batch_pipelines_cells():
    rng = np.random.default_rng(1)
    lab = rng.integers(0, 5, size=3000)
    A = np.stack([(lab == k).astype(float) for k in range(1, 5)], axis=1)
    plans = plan_batches(A, batch_size=2, max_cells=300, n_ctrl=400, random_state=3)
    ctrl = np.flatnonzero(A.sum(axis=1) == 0)
    np.testing.assert_array_equal(ca.subsample_ctrl_cells(ctrl, 400, 3), plans[0].ctrl_idx)
    for pl in plans:
        treated = np.flatnonzero(A[:, pl.trt_idx].sum(axis=1) > 0)
        np.testing.assert_array_equal(ca.subsample_pert_cells(treated, 300, 3 + pl.batch),
                                      pl.treated_idx)
    small = np.arange(10)
    assert ca.subsample_ctrl_cells(small, 2000) is not None
    np.testing.assert_array_equal(ca.subsample_ctrl_cells(small, 2000), small)
    np.testing.assert_array_equal(ca.subsample_pert_cells(small, None), small)
    sub = ca.subsample_ctrl_cells(ctrl, 50, 0)
    assert sub.size == 50 and np.all(np.diff(sub) > 0) and np.isin(sub, ctrl).all()


# ----------------------------------------------------------------------------------
# GLMs with 0.1.1's return shapes
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def glm_data():
    rng = np.random.default_rng(5)
    n, p = 400, 12
    x = rng.normal(size=n)
    A = (rng.random((n, 2)) < 0.25).astype(float)
    A[A.sum(axis=1) > 1, 1] = 0
    X = np.c_[np.ones(n), x]
    mu = np.exp(0.5 + 0.3 * x[:, None] + A @ rng.normal(0, 0.5, (2, p)))
    Y = rng.negative_binomial(5, 5 / (5 + mu)).astype(float)
    return Y, X, A


def test_fit_glm_returns_the_0_1_1_tuple_and_agrees_with_statsmodels(glm_data):
    import statsmodels.api as sm

    Y, X, A = glm_data
    B, Yhat, disp, off, dev = ca.fit_glm(Y, X, A, family="poisson")
    n, p = Y.shape
    assert B.shape == (p, 4) and Yhat.shape == (n, p) and dev.shape == (n, p)
    assert disp is None and off is None
    for j in (0, 5):
        ref = sm.GLM(Y[:, j], np.c_[X, A], family=sm.families.Poisson()).fit()
        np.testing.assert_allclose(B[j], ref.params, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(Yhat[:, j], ref.fittedvalues, rtol=1e-5)
        np.testing.assert_allclose(dev[:, j], ref.resid_deviance, rtol=1e-4, atol=1e-7)
    # gaussian (the 0.1.1 default family): least squares
    Bg, *_ = ca.fit_glm(Y, X, A)
    ls = np.linalg.lstsq(np.c_[X, A], Y, rcond=None)[0].T
    np.testing.assert_allclose(Bg, ls, rtol=1e-10)


def test_fit_glm_nb_impute_and_fast_alias(glm_data):
    import statsmodels.api as sm

    Y, X, A = glm_data
    size = np.full(Y.shape[1], 5.0)
    B, (Y0, Y1), disp, off, _ = ca.fit_glm(Y, X, A, family="nb", disp_glm=size, offset=True,
                                           impute=True)
    n, p = Y.shape
    assert Y0.shape == Y1.shape == (n, p, 2) and off.shape == (n,)
    np.testing.assert_array_equal(disp, size)
    ref = sm.GLM(Y[:, 3], np.c_[X, A], family=sm.families.NegativeBinomial(alpha=0.2),
                 offset=off).fit()
    np.testing.assert_allclose(B[3], ref.params, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(Y0[:, 3, 0], np.exp(off + X @ B[3, :2]), rtol=1e-10)
    np.testing.assert_allclose(Y1[:, 3, 1], np.exp(off + X @ B[3, :2] + B[3, 3]), rtol=1e-10)
    # near-Poisson sizes above thres_disp are fitted as Poisson
    _, _, d2, _, _ = ca.fit_glm(Y, X, A, family="nb", disp_glm=np.full(Y.shape[1], 500.0))
    assert np.isinf(d2).all()
    fast = ca.fit_glm_fast(Y, X, A, family="nb", disp_glm=size, offset=True, impute=True)
    np.testing.assert_allclose(fast[0], B)


def _write_h5ad(path, Y, obs):
    import anndata as ad

    ad.AnnData(X=sp.csr_matrix(Y), obs=obs).write_h5ad(path)


def test_fit_glm_ondisk_matches_the_in_memory_fit(tmp_path, glm_data):
    Y, X, _ = glm_data
    n = Y.shape[0]
    rng = np.random.default_rng(9)
    lab = np.where(rng.random(n) < 0.3, "KO", "control")
    lab[:40] = "other"
    Y = Y.copy()
    Y[50] = 0                                             # an empty cell
    obs = pd.DataFrame({"perturbation": lab, "depth": X[:, 1]},
                       index=[f"c{i}" for i in range(n)])
    path = tmp_path / "screen.h5ad"
    _write_h5ad(path, Y, obs)
    with pytest.warns(RuntimeWarning, match="dropping 1 cell"):
        B, Yhat, disp, off, dev = ca.fit_glm_ondisk(str(path), target_label="KO",
                                                    covariate_columns=["depth"],
                                                    chunk_size=37)
    keep = np.isin(lab, ["control", "KO"])
    keep[50] = False
    Yk = Y[keep]
    A = (lab[keep] == "KO").astype(float)[:, None]
    Xk = np.c_[np.ones(keep.sum()), X[keep, 1]]
    ref = ca.fit_glm(Yk, Xk, A, family="nb", offset=np.log(ca.comp_size_factor(Yk)))
    np.testing.assert_allclose(off, ref[3])
    np.testing.assert_allclose(B, ref[0], rtol=1e-8, atol=1e-10)
    assert Yhat.shape == dev.shape == Yk.shape and disp.shape == (Y.shape[1],)
    with pytest.raises(ValueError, match="target_label 'KO2' does not occur"):
        ca.fit_glm_ondisk(str(path), target_label="KO2")


# ----------------------------------------------------------------------------------
# diagnostics: 0.1.1 column names, axes array, input checks
# ----------------------------------------------------------------------------------
def test_summarize_propensity_scores_uses_0_1_1_column_names(screen):
    A, _, pi = screen
    out = ca.summarize_propensity_scores(A, pi)
    new = ["brier_score", "outside_overlap_fraction", "clipped_fraction", "score_q01",
           "score_median", "score_q99"]
    assert set(new) <= set(out.columns)
    assert not {"brier", "frac_outside_overlap", "frac_at_clip_bounds", "q01", "q50",
                "q99"} & set(out.columns)
    An = A.to_numpy()
    pop_rows = (An.sum(axis=1) == 0) | (An[:, 0] == 1)
    pop = pi[pop_rows, 0]
    assert out.loc[0, "score_median"] == pytest.approx(np.median(pop))
    assert out.loc[0, "brier_score"] == pytest.approx(np.mean((pop - An[pop_rows, 0]) ** 2))


def test_plot_propensity_scores_returns_an_array_of_axes(screen):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    A, _, pi = screen
    _, axes, _ = ca.plot_propensity_scores(A, pi, treatments=["T1", "T2", "T3"])
    assert isinstance(axes, np.ndarray) and axes.shape == (1, 3)
    assert [ax.get_title().split("\n")[0] for ax in axes.ravel()] == ["T1", "T2", "T3"]
    _, given = plt.subplots(1, 2)
    _, axes2, _ = ca.plot_propensity_scores(A, pi, treatments=["T1"], axes=given)
    assert isinstance(axes2, np.ndarray) and axes2.shape == (2,) and axes2[0] is given[0]
    plt.close("all")


def test_align_test_mask_rejects_duplicate_rows_and_none_labels():
    res = pd.DataFrame({"trt": ["a", "a", "b"], "gene_names": ["g1", "g1", "g1"]})
    mask = pd.DataFrame([[True], [False]], index=["a", "b"], columns=["g1"])
    with pytest.raises(ValueError, match="duplicated \\(treatment, gene\\) rows"):
        ca.align_test_mask(res, mask)
    ok = res.iloc[1:]
    np.testing.assert_array_equal(ca.align_test_mask(ok, mask), [True, False])
    with pytest.raises(ValueError, match="must not be missing"):
        ca.align_test_mask(pd.DataFrame({"trt": ["a", None], "gene_names": ["g1", "g1"]}),
                           mask)
    none_mask = pd.DataFrame([[True], [False]], index=["a", None], columns=["g1"])
    with pytest.raises(ValueError, match="must not be missing"):
        ca.align_test_mask(ok, none_mask)
    with pytest.raises(ValueError, match="must not be missing"):
        ca.align_test_mask(ok, np.array([[True], [False]]), treatment_names=["a", None],
                           gene_names=["g1"])


def test_summarize_treatment_associations_rejects_duplicate_names(screen):
    A, X_A, _ = screen
    Z = X_A[["z", "w"]].to_numpy()
    with pytest.raises(ValueError, match="covariate_names must be unique"):
        ca.summarize_treatment_associations(A, Z, covariate_names=["z", "z"])
    with pytest.raises(ValueError, match="treatment_names must be unique"):
        ca.summarize_treatment_associations(A, Z, treatment_names=["T1", "T1", "T3"])
    out = ca.summarize_treatment_associations(A, Z, covariate_names=["z", "w"])
    assert len(out) == 6


def test_plot_treatment_associations_rejects_vmax_zero(screen):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    A, X_A, _ = screen
    summ = ca.summarize_treatment_associations(A, X_A[["z", "w"]])
    for bad in (0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match="vmax must be None or a finite number > 0"):
            ca.plot_treatment_associations(summ, "standardized_mean_difference", vmax=bad)
    _, ax = ca.plot_treatment_associations(summ, "standardized_mean_difference", vmax=2.0)
    assert ax.images[0].get_clim() == (-2.0, 2.0)
    _, ax_rho = ca.plot_treatment_associations(summ, vmax=0.25)      # also for rho (0.1.1)
    assert ax_rho.images[0].get_clim() == (-0.25, 0.25)
    _, ax_default = ca.plot_treatment_associations(summ)
    assert ax_default.images[0].get_clim() == (-1.0, 1.0)
    plt.close("all")


# ----------------------------------------------------------------------------------
# continuous treatments: fit_gcate fits them, LFC refuses with a clear message
# ----------------------------------------------------------------------------------
def test_fit_gcate_fits_a_continuous_treatment_and_removes_confounding():
    from causarray.glm import fit_glm as engine

    rng = np.random.default_rng(0)
    n, p = 600, 80
    U = rng.normal(size=(n, 1))
    on = rng.random(n) < 1 / (1 + np.exp(-U[:, 0]))                 # confounded by U
    dose = np.where(on, rng.gamma(2.0, 1.0, n), 0.0)
    beta = np.zeros(p)
    beta[:10] = -0.5
    gamma = rng.normal(0, 0.6, p)
    Y = rng.poisson(np.exp(1.0 + U * gamma + dose[:, None] * beta)).astype(float)
    X = np.ones((n, 1))
    _, res = ca.fit_gcate(Y, X, dose[:, None], 1, offset=False)
    b_gcate = res["B_Gamma"][:, 1]
    b_naive = engine(Y, X, dose[:, None], family="poisson").coef[:, 1]
    err_g = np.sqrt(np.mean((b_gcate - beta) ** 2))
    err_n = np.sqrt(np.mean((b_naive - beta) ** 2))
    assert err_g < 0.5 * err_n                         # the latent factor absorbs U
    assert abs(np.corrcoef(res["U"][:, 0], U[:, 0])[0, 1]) > 0.9
    with pytest.raises(ValueError, match="A contains NaN"):
        ca.fit_gcate(Y, X, np.where(on, np.nan, 0.0)[:, None], 1)


def test_lfc_refuses_a_continuous_treatment_with_a_clear_message():
    rng = np.random.default_rng(1)
    n = 100
    Y = rng.poisson(2.0, size=(n, 5)).astype(float)
    dose = np.where(rng.random(n) < 0.3, rng.gamma(2.0, 1.0, n), 0.0)
    with pytest.raises(ValueError, match="continuous treatment .* must be binarised"):
        ca.LFC(Y, np.ones((n, 1)), dose[:, None])


def test_propensity_clip_must_be_a_bound_pair(screen):
    A, X_A, _ = screen
    for bad in (0.01, (0.5,), (0.1, 0.2, 0.3), "wide", (0.9, 0.1)):
        with pytest.raises(ValueError, match="clip must be None or a pair"):
            ca.estimate_propensity_scores(A, X_A, clip=bad)
        with pytest.raises(ValueError, match="clip must be None or a pair"):
            ca.refit_propensity_scores(A, X_A, clip=bad)
    pi = ca.estimate_propensity_scores(A, X_A, clip=(0.1, 0.9))
    assert pi.min() >= 0.1 and pi.max() <= 0.9
