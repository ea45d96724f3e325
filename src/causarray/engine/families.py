"""Count families of the engine: negative binomial and Poisson with a log link.

Model, for cell i and gene j::

    y_ij ~ NB(mu_ij, size r_j),   Var(y_ij) = mu_ij + alpha_j mu_ij^2,   alpha_j = 1 / r_j
    log mu_ij = eta_ij             (the linear predictor, clipped to [ETA_MIN, ETA_MAX])

Poisson is the limit ``alpha_j = 0`` (``r_j = inf``); every function here takes the
dispersion ``alpha`` (0 meaning Poisson) and handles both families elementwise.  The
log-likelihood splits into a mean-dependent *kernel* (:func:`kernel_sums`) and a
constant that depends on the counts and the size only (:func:`deviance_constant`;
:func:`loglik_constant_terms`, summed over a count matrix by
:func:`causarray.factor_model.loglik_constants`), so that a fit evaluates the constant
once and the kernel at every trial point.  Residuals: :func:`deviance_residuals`
(float64, any shape) and :func:`signed_root_deviance` (in place, for the streamed
float32 passes).
"""
from __future__ import annotations

import numpy as np
from scipy.special import gammaln, xlogy

ETA_MIN, ETA_MAX = -30.0, 20.0
MU_MIN, MU_MAX = float(np.exp(ETA_MIN)), float(np.exp(ETA_MAX))
#: Group coefficients of groups without any count are pinned at ``-GROUP_COEF_BOUND``.
GROUP_COEF_BOUND = 30.0


def alpha_from_size(size: np.ndarray | float | None) -> np.ndarray:
    """NB dispersion alpha = 1/size (0 for Poisson / infinite size)."""
    if size is None:
        return np.zeros(1)
    size = np.asarray(size, dtype=float)
    with np.errstate(divide="ignore"):
        return np.where(np.isfinite(size), 1.0 / size, 0.0)


def nb_unit_deviance(y: np.ndarray, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Unit deviance of the NB (alpha > 0) or Poisson (alpha = 0) family.

    ``2 [y log(y/mu) - (y + r) log((y + r)/(mu + r))]`` with r = 1/alpha, evaluated as
    ``2 [y log(y/mu) + (y + r) log1p((mu - y)/(y + r))]`` so that huge r does not cancel.
    """
    y = np.asarray(y, dtype=float)
    alpha = np.broadcast_to(alpha, np.broadcast_shapes(np.shape(y), np.shape(alpha)))
    t1 = xlogy(y, y) - xlogy(y, mu)
    pois = 2.0 * (t1 - (y - mu))
    if not np.any(alpha > 0):
        return pois
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(alpha > 0, 1.0 / np.where(alpha > 0, alpha, 1.0), np.inf)
        nb = 2.0 * (t1 + (y + r) * np.log1p((mu - y) / (y + r)))
    return np.where(alpha > 0, nb, pois)


def deviance_residuals(y: np.ndarray, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Signed square-root unit deviances; non-finite values become 0."""
    d = np.sqrt(np.maximum(nb_unit_deviance(y, mu, alpha), 0.0)) * np.sign(y - mu)
    d[~np.isfinite(d)] = 0.0
    return d


def nb_loglik(y: np.ndarray, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Elementwise NB (or Poisson where alpha = 0) log-likelihood, constants included."""
    y = np.asarray(y, dtype=float)
    alpha = np.broadcast_to(alpha, np.broadcast_shapes(np.shape(y), np.shape(alpha)))
    pois = xlogy(y, mu) - mu - gammaln(y + 1.0)
    if not np.any(alpha > 0):
        return pois
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(alpha > 0, 1.0 / np.where(alpha > 0, alpha, 1.0), 1.0)
        nb = (gammaln(y + r) - gammaln(r) - gammaln(y + 1.0)
              + xlogy(y, mu) - xlogy(y, mu + r) + r * (np.log(r) - np.log(mu + r)))
    return np.where(alpha > 0, nb, pois)


def kernel_sums(y: np.ndarray, eta: np.ndarray, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Mean-dependent part of the NB / Poisson log-likelihood, summed over cells.

    NB: sum_i [y eta - (y + r) log1p(mu / r)];  Poisson: sum_i [y eta - mu].  The
    constant part is :func:`causarray.factor_model.loglik_constants`.  ``eta`` is used
    as scratch (overwritten); alpha is (m,).

    Uses sum_i (y + r) log1p(alpha mu) = sum_i y L + (sum_i L) / alpha, L = log1p(alpha mu),
    so that the only temporary is L.
    """
    nb = alpha > 0
    if not nb.any():
        return np.einsum("ij,ij->j", y, eta) - mu.sum(axis=0)
    L = np.multiply(mu, alpha, out=np.empty_like(mu))
    np.log1p(L, out=L)
    tail = L.sum(axis=0)
    np.subtract(eta, L, out=eta)
    del L
    out = np.einsum("ij,ij->j", y, eta)
    if nb.all():
        out -= tail / alpha
    else:
        safe = np.where(nb, alpha, 1.0)
        out -= np.where(nb, tail / safe, mu.sum(axis=0))
    return out


def deviance_constant(y: np.ndarray, alpha: np.ndarray, ylogy: np.ndarray) -> np.ndarray:
    """Per-gene ``dev + 2 * kernel``: 2 sum_i [y log y - (y + r) log1p(y / r)] (NB) or
    2 sum_i [y log y - y] (Poisson); ``ylogy`` = sum_i y log y (it does not depend on r)."""
    nb = alpha > 0
    if not nb.any():
        return 2.0 * (ylogy - y.sum(axis=0))
    L = np.multiply(y, alpha, out=np.empty_like(y))
    np.log1p(L, out=L)
    tail = np.einsum("ij,ij->j", y, L)
    safe = np.where(nb, alpha, 1.0)
    tail += L.sum(axis=0) / safe
    del L
    if not nb.all():
        tail = np.where(nb, tail, y.sum(axis=0))
    return 2.0 * (ylogy - tail)


def sum_ylogy(y: np.ndarray) -> np.ndarray:
    """Per-column sum of y log y (0 log 0 = 0), faster than ``xlogy`` for count matrices."""
    L = np.maximum(y, 1e-300)
    np.log(L, out=L)
    return np.einsum("ij,ij->j", y, L)


def working_weights(y: np.ndarray, mu: np.ndarray, alpha: np.ndarray,
                     observed: bool | np.ndarray = False):
    """Newton weights and scores of the log-link NB / Poisson likelihood.

    Scores ``(y - mu) / (1 + alpha mu)``; weights: Fisher ``mu / (1 + alpha mu)`` or, with
    ``observed`` (a bool or one per column), the observed information
    ``mu (1 + alpha y) / (1 + alpha mu)^2`` (always positive: the NB log-likelihood is
    concave in the linear predictor), which makes the Newton iteration quadratically
    convergent for the non-canonical NB link.
    """
    resid = np.subtract(y, mu)
    if not np.any(alpha > 0):
        return mu.copy(), resid
    t = np.multiply(mu, alpha, out=np.empty_like(mu))
    t += 1.0
    np.reciprocal(t, out=t)
    resid *= t
    np.multiply(mu, t, out=t)
    observed = np.broadcast_to(observed, alpha.shape)
    if observed.any():   # t (1 + alpha y)/(1 + alpha mu) = t (1 + alpha resid)
        u = np.multiply(resid, np.where(observed, alpha, 0.0))
        u += 1.0
        t *= u
    return t, resid


def scores(y: np.ndarray, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Scores ``(y - mu) / (1 + alpha mu)`` alone (see ``working_weights``)."""
    resid = np.subtract(y, mu)
    if np.any(alpha > 0):
        t = np.multiply(mu, alpha)
        t += 1.0
        resid /= t
    return resid


def mom_alpha(y: np.ndarray, mu: np.ndarray, dof: int) -> np.ndarray:
    """Method-of-moments dispersion per gene (docs/math.md#nb-dispersion), before clipping.

    alpha_j = sum_i [(y - mu)^2 - y] / max(mu^2, 1e-10) / max(dof, 1); non-finite -> 1e-8.
    """
    num = np.subtract(y, mu)
    num *= num
    num -= y
    den = np.multiply(mu, mu)
    np.maximum(den, 1e-10, out=den)
    num /= den
    del den
    alpha = num.sum(axis=0) / max(dof, 1)
    alpha = np.clip(alpha, 1e-8, 1e6)
    alpha[~np.isfinite(alpha)] = 1e-8
    return alpha


def size_from_mom(alpha: np.ndarray, all_zero: np.ndarray) -> np.ndarray:
    """alpha clipped to [1e-8, 100], size = 1/alpha, 1 for all-zero genes.

    See docs/math.md#nb-dispersion.
    """
    size = 1.0 / np.clip(alpha, 1e-8, 100.0)
    size[all_zero | ~np.isfinite(size)] = 1.0
    return size


def loglik_constant_terms(v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``lgamma(v + r) - lgamma(r) - lgamma(v + 1) - v log r`` (``-lgamma(v + 1)`` where r = inf)."""
    v, r = np.broadcast_arrays(np.asarray(v, float), np.asarray(r, float))
    term = -gammaln(v + 1.0)
    nb = np.isfinite(r)
    if nb.any():
        rn, vn = r[nb], v[nb]
        term[nb] += gammaln(vn + rn) - gammaln(rn) - vn * np.log(rn)
    return term


def signed_root_deviance(y: np.ndarray, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Deviance residuals ``sign(y - mu) sqrt(d)`` of a chunk, with few temporaries.

    ``d = 2 [y log(y / mu) + (y + r) log1p((mu - y) / (y + r))]`` for NB (r = 1/alpha),
    ``2 [y log(y / mu) - (y - mu)]`` for Poisson (alpha = 0); ``mu`` is overwritten.
    """
    t1 = np.maximum(y, 1.0)
    np.log(t1, out=t1)
    t1 -= np.log(mu)
    t1 *= y                                         # y log(y / mu), 0 at y = 0
    diff = np.subtract(mu, y)                       # mu - y
    nb = alpha > 0
    with np.errstate(divide="ignore"):
        r = np.where(nb, 1.0 / np.where(nb, alpha, 1.0), 0.0)
    if nb.all():
        yr = y + r
        np.divide(diff, yr, out=mu)
        np.log1p(mu, out=mu)
        mu *= yr
        t1 += mu
    else:
        yr = y + r
        with np.errstate(invalid="ignore", divide="ignore"):
            tail = np.log1p(diff / np.where(nb, yr, 1.0)) * yr
        t1 += np.where(nb, tail, diff)
    np.maximum(t1, 0.0, out=t1)
    t1 *= 2.0
    np.sqrt(t1, out=t1)
    t1 *= np.sign(-diff)
    t1[~np.isfinite(t1)] = 0.0
    return t1
