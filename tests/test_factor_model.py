"""The fused passes of the GCATE engine agree with the plain GLM engine and brute force."""
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import gammaln

from causarray.engine import signed_root_deviance
from causarray.factor_model import deviance_residual_svd, fisher_pass, loglik_constants
from causarray.gcate import _factor_design, _from_design, _to_design, fit_gcate
from causarray.glm import (_alpha_from_size, deviance_residuals, fit_glm, glm_deviance_residuals,
                           groups_from_onehot, sym_unpack)
from causarray.preprocessing import _grouped_median


@pytest.fixture(scope="module")
def problem():
    """600 cells (3 perturbations + controls) x 150 genes, 2 latent factors, NB counts."""
    rng = np.random.default_rng(3)
    n, p, a, r = 600, 150, 3, 2
    labels = rng.integers(-1, a, n)
    A = np.zeros((n, a))
    A[labels >= 0, labels[labels >= 0]] = 1.0
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    U = rng.normal(size=(n, r))
    log_s = rng.normal(0, 0.3, n)
    B = np.column_stack([rng.normal(0.5, 0.5, p), rng.normal(0, 0.2, p)])
    G = rng.normal(0, 0.4, (p, r))
    C = rng.normal(0, 0.3, (p, a))
    size = rng.uniform(2, 10, p)
    mu = np.exp(log_s[:, None] + X @ B.T + U @ G.T + A @ C.T)
    Y = rng.negative_binomial(size, size / (size + mu)).astype(float)
    return Y, X, A, U, log_s, size


def _run_gene_passes(Y, X, A, U, log_s, size, n_pass):
    d, r = X.shape[1], U.shape[1]
    coef = np.zeros((Y.shape[1], d + r + A.shape[1]))
    coef[:, 0] = np.log(Y.mean(axis=0) + 0.1)
    design = _factor_design(X, U, A, groups_from_onehot(A), log_s)
    Bd, Cd = _to_design(coef, design)
    alpha = _alpha_from_size(size) * np.ones(Y.shape[1])
    for _ in range(n_pass):
        res = fisher_pass(Y, design, Bd, Cd, alpha, compute_se=True, dtype=np.float64)
    return _from_design(Bd, Cd, design), res, design


def test_gene_passes_converge_to_the_glm_mle(problem):
    """Iterated fused gene steps reach the MLE and Wald SEs of fit_glm on [X | U | A]."""
    Y, X, A, U, log_s, size = problem
    coef, res, design = _run_gene_passes(Y, X, A, U, log_s, size, 25)
    ref = fit_glm(Y, np.hstack([X, U]), A, family="nb", size=size, offset=log_s, tol=1e-12)
    np.testing.assert_allclose(coef, ref.coef, atol=2e-5)
    se = np.hstack([np.sqrt(res.var_b) / design.scales, np.sqrt(res.var_c.T)])
    np.testing.assert_allclose(se, ref.se, rtol=1e-3)


def test_float32_pass_matches_float64_pass(problem):
    Y, X, A, U, log_s, size = problem
    d, r = X.shape[1], U.shape[1]
    coef64, _, _ = _run_gene_passes(Y, X, A, U, log_s, size, 25)
    design = _factor_design(X, U, A, groups_from_onehot(A), log_s)
    Bd, Cd = _to_design(coef64, design)
    alpha = 1.0 / size
    res = fisher_pass(Y, design, Bd, Cd, alpha, loadings=slice(d, d + r), dtype=np.float32)
    # one more float32 step from the MLE stays at the MLE (to float32 accuracy)
    np.testing.assert_allclose(_from_design(Bd, Cd, design), coef64, atol=1e-3)
    assert res.H.dtype == np.float32 and res.g.shape == (Y.shape[0], r)


def test_cell_sums_are_the_cells_fisher_systems(problem):
    """H_i = sum_j w_ij g_j g_j' and g_i = sum_j g_j (y - mu)/(1 + alpha mu) at the new loadings."""
    Y, X, A, U, log_s, size = problem
    d, r = X.shape[1], U.shape[1]
    coef, _, _ = _run_gene_passes(Y, X, A, U, log_s, size, 3)
    design = _factor_design(X, U, A, groups_from_onehot(A), log_s)
    Bd, Cd = _to_design(coef, design)
    alpha = 1.0 / size
    res = fisher_pass(Y, design, Bd, Cd, alpha, loadings=slice(d, d + r), dtype=np.float64)
    new = _from_design(Bd, Cd, design)
    Gm = new[:, d:d + r]
    mu = np.exp(log_s[:, None] + X @ new[:, :d].T + U @ Gm.T + A @ new[:, d + r:].T)
    t = 1.0 / (1.0 + alpha * mu)
    H_ref = np.einsum("ij,jk,jl->ikl", mu * t, Gm, Gm)
    g_ref = ((Y - mu) * t) @ Gm
    H = np.empty((Y.shape[0], r, r))
    H[design.order] = sym_unpack(res.H.astype(float), r)
    g = np.empty_like(g_ref)
    g[design.order] = res.g
    # H is accumulated in float32 over the p genes: whatever the summation order (BLAS,
    # blocking), each entry of cell i is off by at most p * eps32 * sum_j |w_ij g_jk g_jl|
    # <= p * eps32 * max|H_i| (Cauchy-Schwarz on the diagonal). The bound is per cell and
    # relative to the cell's largest entry, not to a near-zero off-diagonal element.
    p = Y.shape[1]
    eps32 = float(np.finfo(np.float32).eps)
    scale = np.abs(H_ref).reshape(len(H_ref), -1).max(axis=1)[:, None, None]
    err = np.abs(H - H_ref)
    assert (err <= 2 * p * eps32 * scale).all(), float((err / scale).max())
    # the gradient is accumulated in float64
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)


def test_loglik_constants_match_their_definition(problem):
    Y, *_, size = problem
    size = size.copy()
    size[:10] = np.inf                                   # Poisson genes
    Y = Y.copy()
    Y[0, :5] = 400                                       # counts beyond the tabulated range
    r = np.where(np.isfinite(size), size, 1.0)[None, :]
    nb = (gammaln(Y + r) - gammaln(r) - gammaln(Y + 1.0) - Y * np.log(r)).sum(axis=0)
    ref = np.where(np.isfinite(size), nb, -gammaln(Y + 1.0).sum(axis=0))
    np.testing.assert_allclose(loglik_constants(Y, size), ref, rtol=1e-10)
    np.testing.assert_allclose(loglik_constants(sp.csc_matrix(Y), size), ref, rtol=1e-10)


def test_signed_root_deviance_matches_glm():
    rng = np.random.default_rng(0)
    mu = rng.gamma(1.0, 1.0, (300, 40))
    y = rng.poisson(mu).astype(float)
    alpha = rng.uniform(0.0, 2.0, 40)
    alpha[:5] = 0.0
    np.testing.assert_allclose(signed_root_deviance(y, mu.copy(), alpha[None, :]),
                               deviance_residuals(y, mu, alpha[None, :]), atol=1e-9)


def test_streamed_svd_spans_the_deviance_residuals_top_space(problem):
    Y, X, A, U, log_s, size = problem
    fit0 = fit_glm(Y, X, A, family="nb", size=size, offset=log_s)
    u, s = deviance_residual_svd(Y, fit0, X, A, log_s, 2, random_state=0)
    R = glm_deviance_residuals(Y, fit0, X, A, log_s)
    u_ref, s_ref, _ = np.linalg.svd(R, full_matrices=False)
    np.testing.assert_allclose(s, s_ref[:2], rtol=2e-3)
    cos = np.linalg.svd(u.T @ u_ref[:, :2], compute_uv=False)
    assert cos.min() > 0.999


def test_dense_integer_and_sparse_counts_give_the_same_fit(problem):
    Y, X, A, *_ = problem
    kw = dict(kwargs_es_1=dict(max_iters=4))
    r_dense = fit_gcate(Y, X, A, 2, **kw)[1]
    r_int = fit_gcate(Y.astype(np.int32), X, A, 2, **kw)[1]
    r_csr = fit_gcate(sp.csr_matrix(Y), X, A, 2, **kw)[1]
    # the engine works in float32: dense and sparse kernels may sum in another order, so
    # agreement is to float32 rounding over the p genes, relative to the scale of U
    tol = 10 * np.finfo(np.float32).eps * np.sqrt(Y.shape[1]) * np.abs(r_dense["U"]).max()
    np.testing.assert_allclose(r_int["U"], r_dense["U"], rtol=0, atol=tol)
    np.testing.assert_allclose(r_csr["U"], r_dense["U"], rtol=0, atol=tol)


def test_grouped_median_sorted_and_unsorted_paths_agree():
    rng = np.random.default_rng(1)
    v = rng.normal(size=2000)
    g = rng.integers(0, 40, 2000)
    g[g == 7] = 8                                        # an empty group
    order = np.argsort(g, kind="stable")
    ref = np.array([np.median(v[g == k]) if (g == k).any() else np.nan for k in range(41)])
    np.testing.assert_allclose(_grouped_median(v, g, 41), ref, equal_nan=True)
    np.testing.assert_allclose(_grouped_median(v[order], g[order], 41), ref, equal_nan=True)
