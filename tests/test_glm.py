"""Tests of the count-GLM engine (causarray.glm) against statsmodels and direct formulas."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

sm = pytest.importorskip("statsmodels.api")

from causarray.glm import (
    GROUP_COEF_BOUND,
    estimate_dispersion,
    estimate_nb_size,
    fit_glm,
    glm_deviance_residuals,
    mom_size,
    nb_unit_deviance,
)

COEF_RTOL = 1e-5     # the engine must reach statsmodels' MLE: <= 1e-5 relative on the
                     # coefficients of converged genes
SE_RTOL = 1e-5


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------
def simulate(n_ctrl=300, n_per_group=80, n_groups=4, p=24, n_cov=0, size=4.0, seed=0):
    """NB counts with size factors, one-hot groups and optional dense covariates."""
    rng = np.random.default_rng(seed)
    n = n_ctrl + n_groups * n_per_group
    g = np.repeat(np.arange(-1, n_groups), [n_ctrl] + [n_per_group] * n_groups)
    rng.shuffle(g)
    A = np.zeros((n, n_groups))
    A[g >= 0, g[g >= 0]] = 1.0
    Z = rng.normal(size=(n, n_cov))
    X = np.hstack([np.ones((n, 1)), Z])
    offset = rng.normal(0.0, 0.3, n)
    b0 = rng.uniform(-1.5, 2.5, p)
    C = rng.normal(0.0, 0.5, (n_groups, p)) * (rng.random((n_groups, p)) < 0.5)
    Bz = rng.normal(0.0, 0.3, (n_cov, p))
    mu = np.exp(offset[:, None] + b0 + A @ C + Z @ Bz)
    Y = rng.negative_binomial(size, size / (size + mu)).astype(float)
    return Y, X, A, offset


def sm_fit(y, D, offset, alpha=None, start=None):
    """statsmodels GLM (NB at fixed alpha, or Poisson when alpha is None) run to tight tol."""
    from threadpoolctl import threadpool_limits

    family = sm.families.Poisson() if alpha is None else sm.families.NegativeBinomial(alpha=alpha)
    # one BLAS thread: much faster for these small per-gene problems on a shared machine
    with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
        warnings.simplefilter("ignore")
        return sm.GLM(y, D, family=family, offset=offset).fit(
            tol=1e-12, maxiter=1000, start_params=start)


def mom_alpha_numpy(y, mu, dof):
    """The MoM dispersion of docs/math.md#nb-dispersion, written out for one gene."""
    a = np.sum(((y - mu) ** 2 - y) / np.maximum(mu ** 2, 1e-10)) / max(dof, 1)
    a = np.clip(a, 1e-8, 1e6) if np.isfinite(a) else 1e-8
    return float(np.clip(a, 1e-8, 100.0))


def sm_recipe(y, D, offset):
    """Dispersion recipe (docs/math.md#nb-dispersion) with statsmodels:
    Poisson -> MoM -> NB -> MoM -> NB."""
    dof = D.shape[0] - D.shape[1]
    pois = sm_fit(y, D, offset)
    a0 = mom_alpha_numpy(y, pois.mu, dof)
    nb1 = sm_fit(y, D, offset, a0, start=pois.params)
    a1 = mom_alpha_numpy(y, nb1.mu, dof)
    return sm_fit(y, D, offset, a1, start=nb1.params), a1


def assert_coef_close(ours, ref, rtol=COEF_RTOL):
    """|ours - ref| <= rtol * max(|ref|, 1), elementwise."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    err = np.abs(ours - ref) / np.maximum(np.abs(ref), 1.0)
    assert err.max() <= rtol, f"max relative coefficient error {err.max():.3g}"


def log_libsize(Y) -> np.ndarray:
    tot = np.asarray(Y.sum(axis=1)).ravel()
    return np.log(tot / np.exp(np.mean(np.log(tot))))


def onehot(labels, ctrl):
    levels = [v for v in dict.fromkeys(labels) if v != ctrl]
    return np.stack([(labels == v).astype(float) for v in levels], axis=1)


# ----------------------------------------------------------------------------------
# agreement with statsmodels on simulated data
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n_cov", [0, 3], ids=["intercept+groups", "dense+groups"])
@pytest.mark.parametrize("family", ["nb", "poisson"])
def test_matches_statsmodels_fixed_size(n_cov, family):
    Y, X, A, off = simulate(n_cov=n_cov, seed=1)
    p = Y.shape[1]
    size = np.linspace(1.0, 20.0, p)
    fit = fit_glm(Y, X, A, family=family, size=size if family == "nb" else None, offset=off)
    assert fit.converged.all()
    assert fit.coef.shape == (p, X.shape[1] + A.shape[1])
    D = np.hstack([X, A])
    for j in range(p):
        res = sm_fit(Y[:, j], D, off, 1.0 / size[j] if family == "nb" else None)
        assert_coef_close(fit.coef[j], res.params)
        np.testing.assert_allclose(fit.se[j], res.bse, rtol=SE_RTOL)
        np.testing.assert_allclose(fit.deviance[j], res.deviance, rtol=1e-9)
    expect = np.full(p, np.inf) if family == "poisson" else size
    np.testing.assert_allclose(fit.size, expect, rtol=1e-14)


def test_non_onehot_A_is_appended_to_X():
    Y, X, A, off = simulate(n_cov=1, seed=2)
    A = A.copy()
    A[:40, 0] = 1.0           # some cells carry two perturbations: A is not one-hot
    A[:40, 1] = 1.0
    fit = fit_glm(Y, X, A, family="nb", size=5.0, offset=off)
    assert fit.n_covariates == X.shape[1] + A.shape[1]
    D = np.hstack([X, A])
    for j in range(Y.shape[1]):
        res = sm_fit(Y[:, j], D, off, 0.2)
        assert_coef_close(fit.coef[j], res.params)
        np.testing.assert_allclose(fit.se[j], res.bse, rtol=SE_RTOL)


@pytest.mark.parametrize("n_cov", [0, 2], ids=["intercept+groups", "dense+groups"])
def test_estimated_dispersion_follows_recipe(n_cov):
    """size=None: Poisson -> MoM -> NB -> MoM -> NB reproduces the statsmodels recipe."""
    Y, X, A, off = simulate(n_cov=n_cov, seed=3, size=3.0)
    fit = fit_glm(Y, X, A, family="nb", offset=off)
    D = np.hstack([X, A])
    assert fit.converged.all()
    for j in range(Y.shape[1]):
        res, alpha = sm_recipe(Y[:, j], D, off)
        np.testing.assert_allclose(fit.size[j], 1.0 / alpha, rtol=1e-6)
        assert_coef_close(fit.coef[j], res.params)
    np.testing.assert_allclose(estimate_dispersion(Y, X, A, offset=off), fit.size, rtol=1e-12)


def test_estimate_nb_size_returns_the_size_not_the_dispersion():
    """Both names return the NB size theta of Var(y) = mu + mu^2 / theta, not 1/theta."""
    import scipy.stats as st

    import causarray

    theta = 4.0
    # the simulator's law: numpy's NB(theta, theta / (theta + mu)) has that variance
    mu = 2.5
    assert st.nbinom(theta, theta / (theta + mu)).var() == pytest.approx(mu + mu**2 / theta)
    Y, X, A, off = simulate(n_ctrl=2000, n_per_group=500, p=40, size=theta, seed=5)
    size = estimate_nb_size(Y, X, A, offset=off)
    np.testing.assert_array_equal(estimate_dispersion(Y, X, A, offset=off), size)
    assert causarray.estimate_nb_size is estimate_nb_size
    # median MoM size over 40 genes of 4000 cells: within 10 % of theta (its sampling
    # error is 1-2 % over seeds 5-9), and far from the dispersion 1/theta = 0.25
    assert abs(np.median(size) / theta - 1.0) < 0.10


def test_nb_with_huge_size_equals_poisson():
    Y, X, A, off = simulate(n_cov=2, seed=4)
    pois = fit_glm(Y, X, A, family="poisson", offset=off)
    for XX in (X, X[:, :1]):          # dense and saturated solvers
        pois = fit_glm(Y, XX, A, family="poisson", offset=off)
        nb = fit_glm(Y, XX, A, family="nb", size=1e12, offset=off)
        np.testing.assert_allclose(nb.coef, pois.coef, rtol=1e-7, atol=1e-7)
        np.testing.assert_allclose(nb.se, pois.se, rtol=1e-6)
        np.testing.assert_allclose(nb.deviance, pois.deviance, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------
# method of moments and deviance residuals
# ----------------------------------------------------------------------------------
def test_mom_size_matches_numpy_formula():
    Y, X, A, off = simulate(seed=5, size=2.0)
    Y[:, 0] = 0.0                                  # no counts: size 1 by convention
    Y[:, 1] = 3.0                                  # underdispersed: alpha clipped to 1e-8
    fit = fit_glm(Y, X, A, family="poisson", offset=off)
    got = mom_size(Y, fit, X, A, off)
    mu = np.exp(np.clip(off[:, None] + X @ fit.coef[:, :1].T + A @ fit.coef[:, 1:].T, -30, 20))
    dof = Y.shape[0] - fit.coef.shape[1]
    expect = np.array([1.0 / mom_alpha_numpy(Y[:, j], mu[:, j], dof) for j in range(Y.shape[1])])
    expect[0] = 1.0
    np.testing.assert_allclose(got, expect, rtol=1e-10)
    assert got[1] == pytest.approx(1e8)
    # the engine's own MoM steps match the formula too (saturated path: exact recipe)
    sat = fit_glm(Y[:, 2:], X, A, family="nb", offset=off)
    pois2 = fit_glm(Y[:, 2:], X, A, family="poisson", offset=off)
    a0 = 1.0 / mom_size(Y[:, 2:], pois2, X, A, off)
    nb1 = fit_glm(Y[:, 2:], X, A, family="nb", size=1.0 / a0, offset=off)
    np.testing.assert_allclose(sat.size, mom_size(Y[:, 2:], nb1, X, A, off), rtol=1e-8)


@pytest.mark.parametrize("n_cov", [0, 2], ids=["intercept+groups", "dense+groups"])
def test_deviance_residuals_match_statsmodels(n_cov):
    Y, X, A, off = simulate(n_cov=n_cov, seed=6, p=10)
    fit = fit_glm(Y, X, A, family="nb", size=3.0, offset=off)
    R = glm_deviance_residuals(Y, fit, X, A, off)
    D = np.hstack([X, A])
    for j in range(Y.shape[1]):
        res = sm_fit(Y[:, j], D, off, 1.0 / 3.0)
        np.testing.assert_allclose(R[:, j], res.resid_deviance, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose((R[:, j] ** 2).sum(), fit.deviance[j], rtol=1e-9)


def test_unit_deviance_is_stable_for_huge_size():
    y = np.array([0.0, 1.0, 5.0, 40.0])
    mu = np.array([0.3, 1.5, 4.0, 55.0])
    pois = nb_unit_deviance(y, mu, np.zeros(1))
    np.testing.assert_allclose(nb_unit_deviance(y, mu, np.array([1e-12])), pois, rtol=1e-9)
    fam = sm.families.NegativeBinomial(alpha=0.5)
    np.testing.assert_allclose(nb_unit_deviance(y, mu, np.array([0.5])),
                               fam.resid_dev(y, mu) ** 2, rtol=1e-10)


# ----------------------------------------------------------------------------------
# groups without counts
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n_cov", [0, 2], ids=["intercept+groups", "dense+groups"])
def test_group_without_counts_is_pinned(n_cov):
    Y, X, A, off = simulate(n_cov=n_cov, seed=7, p=8)
    k = 2
    in_k = A[:, k] == 1
    Y[in_k, :3] = 0.0                              # genes 0-2 have no counts in group k
    fit = fit_glm(Y, X, A, family="nb", size=4.0, offset=off)
    d = X.shape[1]
    assert fit.converged.all()
    np.testing.assert_array_equal(fit.coef[:3, d + k], -GROUP_COEF_BOUND)
    assert np.isinf(fit.se[:3, d + k]).all()
    assert np.isfinite(fit.se[3:]).all()
    # the other coefficients are those of statsmodels fitted without that group
    keep_cols = [c for c in range(d + A.shape[1]) if c != d + k]
    D = np.hstack([X, A])[~in_k][:, keep_cols]
    for j in range(3):
        res = sm_fit(Y[~in_k, j], D, off[~in_k], 0.25)
        assert_coef_close(fit.coef[j, keep_cols], res.params)
        np.testing.assert_allclose(fit.se[j, keep_cols], res.bse, rtol=1e-4)


def test_indicator_covariate_without_counts_is_pinned():
    """Non-one-hot A is appended to X; an indicator column without counts is pinned too."""
    Y, X, A, off = simulate(n_cov=1, seed=13, p=5)
    A = A.copy()
    A[:30, 1] = 1.0                                # overlapping indicators: not one-hot
    hit = A[:, 0] == 1
    Y[hit, :2] = 0.0
    fit = fit_glm(Y, X, A, family="nb", size=2.0, offset=off)
    d = X.shape[1]
    assert fit.converged.all()
    np.testing.assert_allclose(fit.coef[:2, d], -GROUP_COEF_BOUND, rtol=1e-14)
    assert np.isinf(fit.se[:2, d]).all() and np.isfinite(fit.se[2:]).all()
    keep = [c for c in range(d + A.shape[1]) if c != d]
    D = np.hstack([X, A])[~hit][:, keep]
    for j in range(2):
        res = sm_fit(Y[~hit, j], D, off[~hit], 0.5)
        assert_coef_close(fit.coef[j, keep], res.params)


def test_gene_without_counts_does_not_disturb_others():
    Y, X, A, off = simulate(seed=8, p=6)
    Y[:, 0] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for XX in (X, np.hstack([X, np.linspace(-1, 1, X.shape[0])[:, None]])):
            fit = fit_glm(Y, XX, A, family="nb", offset=off)
            ref = fit_glm(Y[:, 1:], XX, A, family="nb", offset=off)
            assert not fit.converged[0] and fit.converged[1:].all()
            assert np.all(np.isfinite(fit.coef[0]))
            assert fit.size[0] == 1.0
            mu0 = np.exp(off + XX @ fit.coef[0, :XX.shape[1]])
            assert mu0.max() < 1e-6
            np.testing.assert_allclose(fit.coef[1:], ref.coef, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------
# solver paths, input formats, warm starts
# ----------------------------------------------------------------------------------
def test_saturated_and_dense_solvers_agree():
    Y, X, A, off = simulate(seed=9)
    sat = fit_glm(Y, X, A, family="nb", size=2.5, offset=off)          # per-set Newton
    dense = fit_glm(Y, np.hstack([X, A]), None, family="nb", size=2.5, offset=off)
    assert_coef_close(sat.coef, dense.coef, rtol=1e-7)
    np.testing.assert_allclose(sat.se, dense.se, rtol=1e-6)
    np.testing.assert_allclose(sat.deviance, dense.deviance, rtol=1e-10)


@pytest.mark.parametrize("seed", [18, 26])
def test_solvers_agree_on_extreme_random_problems(seed):
    """Huge and tiny means, sizes from 0.05 to 1e5, groups with one count: both solvers
    converge (except genes without control counts, whose MLE does not exist) and agree."""
    rng = np.random.default_rng(seed)
    n_groups, n = int(rng.integers(1, 6)), int(rng.integers(50, 400))
    g = rng.integers(-1, n_groups, n)
    g[:n_groups + 1] = np.arange(-1, n_groups)
    A = np.zeros((n, n_groups))
    A[g >= 0, g[g >= 0]] = 1.0
    off = rng.normal(0.0, rng.uniform(0.0, 1.5), n)
    b, C = rng.uniform(-6, 6, 20), rng.normal(0.0, 2.0, (n_groups, 20))
    size = np.exp(rng.uniform(np.log(0.05), np.log(1e5), 20))
    mu = np.exp(np.clip(off[:, None] + b + A @ C, -20, 15))
    Y = rng.negative_binomial(size, size / (size + mu)).astype(float)
    X = np.ones((n, 1))
    sat = fit_glm(Y, X, A, family="nb", size=size, offset=off)
    dense = fit_glm(Y, np.hstack([X, A]), None, family="nb", size=size, offset=off)
    ok = Y[g == -1].sum(axis=0) > 0
    assert ok.sum() >= 8
    assert sat.converged[ok].all() and dense.converged[ok].all()
    assert not sat.converged[~ok].any()
    assert_coef_close(sat.coef[ok], dense.coef[ok], rtol=1e-6)


@pytest.mark.parametrize("n_cov", [0, 2], ids=["intercept+groups", "dense+groups"])
def test_sparse_input_and_chunking_do_not_change_the_fit(n_cov):
    Y, X, A, off = simulate(n_cov=n_cov, seed=10)
    ref = fit_glm(Y, X, A, family="nb", offset=off)
    for kw in ({"Y": sp.csr_matrix(Y)}, {"Y": sp.csc_matrix(Y), "chunk_size": 7},
               {"Y": Y.astype(np.int32), "chunk_size": 5}):
        Yk = kw.pop("Y")
        fit = fit_glm(Yk, X, A, family="nb", offset=off, **kw)
        np.testing.assert_allclose(fit.coef, ref.coef, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(fit.size, ref.size, rtol=1e-9)


@pytest.mark.parametrize("n_cov", [0, 2], ids=["intercept+groups", "dense+groups"])
def test_warm_start_returns_the_same_fit(n_cov):
    Y, X, A, off = simulate(n_cov=n_cov, seed=11)
    cold = fit_glm(Y, X, A, family="nb", size=3.0, offset=off)
    warm = fit_glm(Y, X, A, family="nb", size=3.0, offset=off, init=cold.coef)
    assert_coef_close(warm.coef, cold.coef, rtol=1e-8)
    assert warm.n_iter.max() <= 1
    np.testing.assert_array_equal(fit_glm(Y, X, A, size=3.0, offset=off, init=cold.coef,
                                          compute_se=False).se, np.nan)


def test_predict_log_mean_reproduces_fitted_means():
    Y, X, A, off = simulate(n_cov=1, seed=12, p=5)
    fit = fit_glm(Y, X, A, family="poisson", offset=off)
    eta = fit.predict_log_mean(X, A, off)
    # Poisson score equations: fitted and observed totals agree per group and overall
    np.testing.assert_allclose(A.T @ np.exp(eta), A.T @ Y, rtol=1e-8)
    np.testing.assert_allclose(np.exp(eta).sum(0), Y.sum(0), rtol=1e-8)
    np.testing.assert_allclose(fit.predict_mean(X, A, off), np.exp(eta))


# ----------------------------------------------------------------------------------
# bundled real data
# ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_schraivogel_matches_statsmodels_recipe(ci_adata):
    Y = ci_adata.X.toarray().astype(float)
    labels = ci_adata.obs[ci_adata.uns["pert_col"]].to_numpy()
    A = onehot(labels, ci_adata.uns["ctrl_label"])
    X = np.ones((Y.shape[0], 1))
    off = log_libsize(Y)
    genes = np.flatnonzero(Y.sum(0) > 0)
    fit = fit_glm(sp.csr_matrix(Y[:, genes]), X, A, family="nb", offset=off)
    D = np.hstack([X, A])
    n_checked = 0
    for i, j in enumerate(genes):
        free = fit.coef[i] > -GROUP_COEF_BOUND + 1      # statsmodels diverges on pinned groups
        if not (fit.converged[i] and free.all()):
            continue
        res, alpha = sm_recipe(Y[:, j], D, off)
        np.testing.assert_allclose(fit.size[i], 1.0 / alpha, rtol=1e-6)
        assert_coef_close(fit.coef[i], res.params)
        np.testing.assert_allclose(fit.se[i], res.bse, rtol=SE_RTOL)
        n_checked += 1
    assert n_checked >= 50


@pytest.mark.slow
def test_real_papalexi_covariates_and_groups_match_statsmodels():
    from causarray.datasets import load_dataset

    ad = load_dataset("papalexi2021")
    labels = ad.obs[ad.uns["pert_col"]].to_numpy()
    A = onehot(labels, ad.uns["ctrl_label"])
    rep = ad.obs["bio_rep"].astype(str).to_numpy()
    X = np.column_stack([np.ones(len(rep)), rep == "rep_2", rep == "rep_3"]).astype(float)
    off = log_libsize(ad.X)
    means = np.asarray(ad.X.mean(axis=0)).ravel()
    order = np.argsort(means)[::-1]
    genes = order[np.linspace(0, np.sum(means > 0.2) - 1, 8).round().astype(int)]
    Y = ad.X[:, genes].toarray().astype(float)
    fit = fit_glm(Y, X, A, family="nb", offset=off)
    D = np.hstack([X, A])
    for i in range(len(genes)):
        free = fit.coef[i] > -GROUP_COEF_BOUND + 1
        assert fit.converged[i]
        res = sm_fit(Y[:, i], D[:, free], off, 1.0 / fit.size[i])
        assert_coef_close(fit.coef[i, free], res.params)
        np.testing.assert_allclose(fit.se[i, free], res.bse, rtol=SE_RTOL)


# ----------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------
def test_bad_input_messages():
    Y, X, A, off = simulate(p=3)
    n = Y.shape[0]
    with pytest.raises(ValueError, match="family must be 'nb' or 'poisson', got 'gaussian'"):
        fit_glm(Y, X, A, family="gaussian")
    with pytest.raises(ValueError, match=r"X must be 2-D \(cells x covariates\), got shape"):
        fit_glm(Y, X[:, 0], A)
    with pytest.raises(ValueError, match=r"X must be 2-D"):
        fit_glm(Y, X[None], A)
    with pytest.raises(ValueError, match=rf"X has {n - 1} rows but Y has {n} cells"):
        fit_glm(Y, X[1:], A)
    with pytest.raises(ValueError, match=rf"A has {n - 1} rows but Y has {n} cells"):
        fit_glm(Y, X, A[1:])
    with pytest.raises(ValueError, match=rf"offset has length {n - 2} but Y has {n} cells"):
        fit_glm(Y, X, A, offset=off[2:])
    with pytest.raises(ValueError, match=r"init must have shape \(3, 5\), got \(3, 4\)"):
        fit_glm(Y, X, A, init=np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"Y must be 2-D \(cells x genes\)"):
        fit_glm(Y[:, 0], X, A)
    with pytest.raises(ValueError, match="size must be positive"):
        fit_glm(Y, X, A, size=-1.0)


# ----------------------------------------------------------------------------------
# the MoM size at the means of a start (LFC's outcome GLM warm-started by GCATE)
# ----------------------------------------------------------------------------------
def test_size_at_init_is_the_mom_at_the_start_and_the_fit_its_mle():
    """With ``size_at_init`` the sizes are the MoM at the start's means and the fit is
    the NB MLE at those sizes; the recipe's sizes differ from them only by the noise of
    the MoM itself (the start is an NB fit of the same model)."""
    Y, X, A, off = simulate(n_cov=10, p=40, seed=3)       # d = 11 > 8: the Schur IRLS
    start = fit_glm(Y, X, A, size=4.0, offset=off, compute_se=False)
    fit = fit_glm(Y, X, A, offset=off, init=start.coef, size_at_init=True, compute_se=False)
    np.testing.assert_allclose(fit.size, mom_size(Y, start, X, A, off), rtol=1e-12)
    at = fit_glm(Y, X, A, size=fit.size, offset=off, compute_se=False)
    ok = fit.converged & at.converged
    assert ok.mean() > 0.9
    np.testing.assert_allclose(fit.coef[ok], at.coef[ok], rtol=COEF_RTOL, atol=COEF_RTOL)
    recipe = fit_glm(Y, X, A, offset=off, init=start.coef, compute_se=False)
    ratio = np.log(fit.size / recipe.size)
    assert abs(np.median(ratio)) < 0.05                    # same estimator, other means
    # without a start there is nothing to take the means of: the recipe
    cold = fit_glm(Y, X, A, offset=off, size_at_init=True, compute_se=False)
    np.testing.assert_array_equal(cold.size, fit_glm(Y, X, A, offset=off,
                                                     compute_se=False).size)
