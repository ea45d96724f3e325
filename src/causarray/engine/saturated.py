"""Saturated designs: intercept plus one-hot groups with a non-empty control set.

The likelihood then separates into one-parameter problems, one per (gene, cell set):
``log mu_ij = o_i + theta_{set(i), j}``.  The Poisson MLE is closed form (log of the
set's count sum over its size-factor sum) and the NB MLE is a safeguarded
one-dimensional Newton iteration on a strictly concave function.  No Gram matrices are
formed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .design import Design
from .families import (
    ETA_MAX,
    ETA_MIN,
    GROUP_COEF_BOUND,
    MU_MAX,
    MU_MIN,
    deviance_constant,
    kernel_sums,
    mom_alpha,
    size_from_mom,
    sum_ylogy,
)
from .newton import COEF_TOL, MAX_NEWTON_STEP


@dataclass
class _SetStats:
    """Per-set sufficient statistics of a chunk (sets = groups, then controls)."""

    Sy: np.ndarray           # K x m count sums
    Ss: np.ndarray           # K size-factor sums
    o_lo: np.ndarray         # K min offset
    o_hi: np.ndarray         # K max offset
    pinned: np.ndarray       # K x m, set without counts
    all_zero: np.ndarray     # m


def _set_stats(design: Design, Y: np.ndarray, s: np.ndarray) -> _SetStats:
    sl = design.set_slices
    K = len(sl)
    Sy = np.empty((K, Y.shape[1]))
    for k, r in enumerate(sl):
        Y[r].sum(axis=0, out=Sy[k])
    o = design.offset
    Ss = np.array([s[r].sum() for r in sl])
    pinned = Sy == 0
    return _SetStats(Sy, Ss, np.array([o[r].min() for r in sl]),
                     np.array([o[r].max() for r in sl]), pinned, pinned.all(axis=0))


def _fill_pinned(theta: np.ndarray, st: _SetStats) -> np.ndarray:
    """Set log-means of sets without counts: groups at control - bound; a control set
    without counts at (largest group) - bound; genes without counts at the lower clip."""
    th = theta.copy()
    ctrl_pin = st.pinned[-1] & ~st.all_zero
    if ctrl_pin.any():
        th[-1, ctrl_pin] = np.where(st.pinned[:-1, ctrl_pin], -np.inf,
                                    th[:-1, ctrl_pin]).max(axis=0) - GROUP_COEF_BOUND
    th[-1, st.all_zero] = ETA_MIN - st.o_hi.max()
    grp = st.pinned[:-1]
    th[:-1][grp] = np.broadcast_to(th[-1], grp.shape)[grp] - GROUP_COEF_BOUND
    return th


def _set_means(design: Design, s: np.ndarray, theta: np.ndarray, st: _SetStats,
               free: np.ndarray | None = None) -> np.ndarray:
    """mu_ij = s_i exp(theta_{set(i), j}), clipped to [e^-30, e^20] where needed.

    ``free`` (K x m) restricts the clipping check to those sets (the means of pinned sets
    are then left unclipped: they do not enter the Newton iteration).
    """
    with np.errstate(under="ignore"):
        eth = np.exp(theta)
    mu = np.empty((s.shape[0], theta.shape[1]))
    for k, r in enumerate(design.set_slices):
        np.multiply(s[r, None], eth[k], out=mu[r])
    hi = theta + st.o_hi[:, None]
    lo = theta + st.o_lo[:, None]
    if free is not None:
        hi, lo = hi[free], lo[free]
    if hi.size and (hi.max() > ETA_MAX or lo.min() < ETA_MIN):
        np.clip(mu, MU_MIN, MU_MAX, out=mu)
    return mu


def _set_newton(design: Design, Y: np.ndarray, s: np.ndarray, theta: np.ndarray,
                alpha: np.ndarray, st: _SetStats, max_iter: int,
                coef_tol: float = COEF_TOL):
    """Safeguarded Newton on every (set, gene) log-mean; theta (K x m) updated in place.

    Each one-parameter NB log-likelihood is strictly concave in theta, so its score is
    decreasing: the iterate keeps a bracket [lo, hi] around the root and bisects when a
    Newton step leaves it.  A gene converges when its largest step is below ``coef_tol``,
    or when the quadratic convergence of Newton's method predicts the next step,
    |step_k|^3 / |step_{k-1}|^2, to be below ``coef_tol / 100`` (which saves the final,
    confirming iteration).  Returns converged (m,), n_iter (m,).
    """
    K, m = theta.shape
    free = ~st.pinned
    theta[st.pinned] = 0.0          # placeholder: pinned sets are masked out below
    active = np.flatnonzero(~st.all_zero)
    converged = np.zeros(m, bool)
    n_iter = np.zeros(m, int)
    lo = np.full((K, m), -np.inf)
    hi = np.full((K, m), np.inf)
    Ya, ala = (Y, alpha) if active.size == m else (Y[:, active], alpha[active])
    prev = np.full((K, active.size), np.inf)          # previous |step| (inf: none yet)
    for _ in range(max_iter):
        if active.size == 0:
            break
        # 1. per-set score and observed information at the current log-means
        th = theta[:, active]
        fr = free[:, active]
        score, hess = _set_score_hessian(design, Ya, ala, _set_means(design, s, th, st, fr), fr)
        # 2. the Newton step, or bisection where it leaves the bracket around the root
        prop, absstep, newton, lo_a, hi_a = _bracketed_step(th, score, hess, fr,
                                                            lo[:, active], hi[:, active])
        theta[:, active] = prop
        lo[:, active], hi[:, active] = lo_a, hi_a
        n_iter[active] += 1
        # 3. convergence: a small step, or a small next step predicted by quadratic
        #    convergence (|step|^3 / |previous step|^2, Newton steps only)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            nxt = np.where(absstep == 0, 0.0, absstep ** 3 / prev ** 2)
        nxt = np.where((newton & np.isfinite(prev)) | ~fr, nxt, np.inf)
        done = (absstep.max(axis=0) < coef_tol) | (
            (absstep.max(axis=0) < 1e-3) & (nxt.max(axis=0) < 0.01 * coef_tol))
        converged[active[done]] = True
        prev = np.where(newton, absstep, np.inf)
        # 4. converged genes leave the active set
        if done.any():
            keep = ~done
            active, prev = active[keep], prev[:, keep]
            Ya, ala = Ya[:, keep], ala[keep]
    return converged, n_iter


def _set_score_hessian(design: Design, y: np.ndarray, alpha: np.ndarray, mu: np.ndarray,
                       free: np.ndarray):
    """Per-set score ``sum (y - mu)/(1 + alpha mu)`` and observed information (K x k).

    The observed information ``sum mu (1 + alpha y)/(1 + alpha mu)^2`` is computed as
    ``sum w + alpha sum w r`` (w the Fisher weight, r the score term); where it is not
    positive the Fisher information ``sum w`` replaces it; 1 for pinned sets.  ``mu`` is
    overwritten.
    """
    K, k = free.shape
    t = np.multiply(mu, alpha)
    t += 1.0
    np.reciprocal(t, out=t)
    resid = np.subtract(y, mu)
    resid *= t
    np.multiply(mu, t, out=mu)                          # mu now holds w
    del t
    score = np.empty((K, k))
    info = np.empty((K, k))
    cross = np.empty((K, k))
    for j, r in enumerate(design.set_slices):
        resid[r].sum(axis=0, out=score[j])
        mu[r].sum(axis=0, out=info[j])
        cross[j] = np.einsum("ij,ij->j", mu[r], resid[r])
    del mu, resid
    hess = info + alpha * cross
    hess = np.where(hess > 0, hess, info)
    hess[~free] = 1.0
    return score, hess


def _bracketed_step(th: np.ndarray, score: np.ndarray, hess: np.ndarray, free: np.ndarray,
                    lo: np.ndarray, hi: np.ndarray):
    """Newton proposal ``th + score / hess`` (clipped to +-MAX_NEWTON_STEP), replaced by the
    bracket's midpoint where it leaves ``[lo, hi]`` and both ends are finite.

    The score is decreasing in ``th``, so a positive score moves the lower end up to
    ``th`` and a negative one the upper end down.  Returns the new log-means, |step|,
    whether the step was a Newton step, and the updated bracket.
    """
    step = np.clip(score / hess, -MAX_NEWTON_STEP, MAX_NEWTON_STEP)
    lo = np.where((score > 0) & free, np.maximum(lo, th), lo)
    hi = np.where((score < 0) & free, np.minimum(hi, th), hi)
    prop = th + step
    outside = (prop < lo) | (prop > hi)
    both = np.isfinite(lo) & np.isfinite(hi)
    with np.errstate(invalid="ignore"):
        prop = np.where(outside & both, 0.5 * (lo + hi), prop)
    prop = np.where(free, prop, th)
    absstep = np.where(free, np.abs(prop - th), 0.0)
    newton = ~(outside & both)                    # a bisection step predicts nothing
    return prop, absstep, newton, lo, hi


def _set_mom(design: Design, Y: np.ndarray, s: np.ndarray, theta: np.ndarray,
             st: _SetStats, dof: int) -> np.ndarray:
    mu = _set_means(design, s, _fill_pinned(theta, st), st)
    return mom_alpha(Y, mu, dof)


def saturated_chunk(design: Design, Y: np.ndarray, alpha: np.ndarray | None,
                     init: np.ndarray | None, *, family: str, max_iter: int,
                     compute_se: bool):
    """Fit intercept + one-hot groups for one row-sorted chunk by per-set Newton."""
    n, m = Y.shape
    a = design.n_groups
    s = np.exp(design.offset)
    st = _set_stats(design, Y, s)
    with np.errstate(divide="ignore"):
        theta = np.log(st.Sy / st.Ss[:, None])            # Poisson MLE per set (closed form)
    ok_genes = ~st.all_zero & ~st.pinned[-1]
    if family == "poisson":
        alpha = np.zeros(m)
        converged = ok_genes.copy()
        n_iter = np.ones(m, int)
    else:
        if alpha is None:
            dof = n - 1 - a
            a0 = np.clip(_set_mom(design, Y, s, theta, st, dof), 1e-8, 100.0)
            _set_newton(design, Y, s, theta, a0, st, min(max_iter, 10))
            alpha = 1.0 / size_from_mom(_set_mom(design, Y, s, theta, st, dof), st.all_zero)
        elif init is not None:
            x0 = design.X[0, 0] * design.scales[0]
            start = init[:, :1].T * x0 + np.vstack([init[:, 1:].T, np.zeros((1, m))])
            theta = np.where(st.pinned | ~np.isfinite(start), theta, start)
        converged, n_iter = _set_newton(design, Y, s, theta, alpha, st, max_iter)
        converged &= ok_genes
    theta = _fill_pinned(theta, st)
    # deviance and Fisher information at the solution: one fused pass
    mu = _set_means(design, s, theta, st)
    eta = np.log(mu)
    ylogy = sum_ylogy(Y)
    cst = deviance_constant(Y, alpha, ylogy)
    if compute_se:
        w = mu / (1.0 + alpha * mu) if np.any(alpha > 0) else mu
        info = np.empty((a + 1, m))
        for k, r in enumerate(design.set_slices):
            w[r].sum(axis=0, out=info[k])
        del w
    dev = cst - 2.0 * kernel_sums(Y, eta, mu, alpha)
    del mu, eta
    x0 = design.X[0, 0] * design.scales[0]              # the constant column's value
    coef = np.empty((m, 1 + a))
    coef[:, 0] = theta[-1] / x0
    coef[:, 1:] = (theta[:-1] - theta[-1]).T
    se = np.full((m, 1 + a), np.nan)
    if compute_se:
        with np.errstate(divide="ignore"):
            var = 1.0 / info
        se[:, 0] = np.sqrt(var[-1]) / abs(x0)
        se[:, 1:] = np.sqrt(var[:-1] + var[-1]).T
        se[:, 1:][st.pinned[:-1].T] = np.inf
        se[st.all_zero | st.pinned[-1]] = np.inf
    return coef, se, alpha, converged, dev, n_iter

