"""Schur-complement IRLS: Newton iterations for a chunk of genes on any design.

Used for every design other than intercept + one-hot groups (see
:mod:`causarray.engine.saturated`): dense covariates, optionally with one-hot groups.
Newton steps with step halving on the deviance, vectorised over the genes of a chunk;
every Gram block of a chunk is one BLAS call (in float32 when there are more than 8
covariates -- the scores stay float64, so the fixed point is unchanged).  The Hessian is
the observed information (quadratic convergence for the non-canonical NB link), with
Fisher scoring per gene after a step that needed halving and a cap on the step length;
convergence is checked with the next Newton step computed from the new score and the
previous Hessian, so the confirming iteration forms no Gram matrix.
"""
from __future__ import annotations

import numpy as np

from .design import Design, group_sums
from .families import (
    ETA_MIN,
    GROUP_COEF_BOUND,
    deviance_constant,
    kernel_sums,
    mom_alpha,
    scores,
    size_from_mom,
    sum_ylogy,
    working_weights,
)
from .newton import (
    COEF_TOL,
    MAX_HALVING,
    MAX_NEWTON_STEP,
    NewtonSystem,
    covariance_diag,
    gradient,
    newton_step,
    newton_system,
    step_size,
)


def _evaluate(design: Design, y: np.ndarray, alpha: np.ndarray, B: np.ndarray,
              C: np.ndarray, cst: np.ndarray):
    """Fitted means and deviance of a chunk at coefficients (B, C)."""
    eta = design.linear_predictor(B, C)
    mu = np.exp(eta)
    dev = cst - 2.0 * kernel_sums(y, eta, mu, alpha)
    return mu, dev


def irls_chunk(design: Design, Y: np.ndarray, alpha: np.ndarray, B: np.ndarray,
                C: np.ndarray, pinned: np.ndarray, skip: np.ndarray, ylogy: np.ndarray,
                max_iter: int, tol: float, ridge: float, compute_se: bool,
                coef_tol: float = COEF_TOL, pinb: np.ndarray | None = None):
    """Newton iteration with step halving for one chunk of genes (columns of row-sorted ``Y``).

    Each iteration: observed-information weights and scores at the current iterate (one
    fused pass), the Schur-reduced Newton step, one evaluation of the deviance at the
    trial point (halving the step for genes whose deviance rose).  A gene converges when
    the relative deviance change of its last step is below ``tol`` and the next Newton
    step, computed from the new score and the previous Hessian (so no new Gram matrix is
    formed for the check), is below ``coef_tol``.  ``B`` (d x m) and ``C`` (a x m) are
    updated in place; genes in ``skip`` are not fitted.  Groups in ``pinned`` (a x m) and
    binary covariates in ``pinb`` (m x d) whose cells have no counts are held at
    ``-GROUP_COEF_BOUND`` (their maximum-likelihood estimate is minus infinity).

    Returns converged, deviance, n_iter, var_b (m x d), var_c (a x m).
    """
    m = Y.shape[1]
    C[pinned] = -GROUP_COEF_BOUND
    if pinb is not None:
        if pinb.any():
            val = design.X[np.abs(design.X).argmax(axis=0), np.arange(design.d)]  # v of 0/v
            B.T[pinb] = (-GROUP_COEF_BOUND / np.broadcast_to(val, pinb.shape))[pinb]
        else:
            pinb = None
    cst = deviance_constant(Y, alpha, ylogy)
    mu, dev = _evaluate(design, Y, alpha, B, C, cst)
    converged = np.zeros(m, bool)
    n_iter = np.zeros(m, int)
    active = np.flatnonzero(~skip)
    if active.size < m:
        Ya, mua, ala = Y[:, active], mu[:, active], alpha[active]
    else:
        Ya, mua, ala = Y, mu, alpha
    del mu
    single = design.d > 8
    sys_prev = None
    rel = np.full(active.size, np.inf)
    # Newton with the observed information; per gene, Fisher scoring (expected
    # information) after a step that needed halving, until a full step settles again:
    # far from the optimum the observed curvature of the NB likelihood can vanish
    fisher = np.zeros(active.size, bool)
    for it in range(max_iter + 1):
        if active.size == 0:
            break
        pin = pinned[:, active]
        pb = None if pinb is None else pinb[active]
        if it < max_iter:
            w, resid = working_weights(Ya, mua, ala, observed=~fisher)
        else:                          # last pass: only the score, for the convergence check
            w, resid = None, scores(Ya, mua, ala)
        g = gradient(design, resid)
        del resid
        if sys_prev is not None:       # convergence check with the previous Hessian
            dbc, dcc = newton_step(sys_prev, g, pin, pb)
            done = (rel < tol) & (step_size(dbc, dcc) < coef_tol)
            if done.any():
                # take that last (tiny, quasi-Newton) step too: it cuts the error further
                # at no cost; its deviance change is of the order of its square
                converged[active[done]] = True
                B[:, active[done]] += dbc[done].T
                C[:, active[done]] = np.clip(C[:, active[done]] + dcc[:, done],
                                             -GROUP_COEF_BOUND, GROUP_COEF_BOUND)
                keep = ~done
                active, pin, g, rel = active[keep], pin[:, keep], g[keep], rel[keep]
                fisher = fisher[keep]
                pb = None if pb is None else pb[keep]
                Ya, mua, ala = Ya[:, keep], mua[:, keep], ala[keep]
                w = None if w is None else w[:, keep]
                if active.size == 0:
                    break
        if it == max_iter:
            break
        sys_ = newton_system(design, w, pin, ridge, single=single, pinb=pb)
        del w
        db, dc = newton_step(sys_, g, pin, pb)
        # trust region: no coefficient moves by more than MAX_NEWTON_STEP at once (far
        # below its optimum a log-mean has almost no curvature and Newton overshoots)
        big = step_size(db, dc)
        shrink = np.minimum(1.0, MAX_NEWTON_STEP / np.maximum(big, 1e-300))
        db *= shrink[:, None]
        dc *= shrink
        B0, C0 = B[:, active], C[:, active]
        Bt = B0 + db.T
        Ct = np.clip(C0 + dc, -GROUP_COEF_BOUND, GROUP_COEF_BOUND)
        dev0 = dev[active]
        # deviance = constant - 2 kernel: its rounding error scales with the constant
        slack = 1e-10 + 1e-12 * np.abs(dev0) + 1e-13 * np.abs(cst[active])
        mut, devt = _evaluate(design, Ya, ala, Bt, Ct, cst[active])
        ok = np.isfinite(devt) & (devt <= dev0 + slack)
        step = np.ones(active.size)
        bad = np.flatnonzero(~ok)
        for _h in range(MAX_HALVING):
            if bad.size == 0:
                break
            step[bad] *= 0.5
            Bt[:, bad] = B0[:, bad] + step[bad] * db[bad].T
            Ct[:, bad] = np.clip(C0[:, bad] + step[bad] * dc[:, bad],
                                 -GROUP_COEF_BOUND, GROUP_COEF_BOUND)
            mub, devb = _evaluate(design, Ya[:, bad], ala[bad], Bt[:, bad], Ct[:, bad],
                                  cst[active[bad]])
            okb = np.isfinite(devb) & (devb <= dev0[bad] + slack[bad])
            acc = bad[okb]
            mut[:, acc] = mub[:, okb]
            devt[acc] = devb[okb]
            bad = bad[~okb]
        good = np.ones(active.size, bool)
        good[bad] = False              # never improved: keep the previous iterate (stalled)
        B[:, active[good]] = Bt[:, good]
        C[:, active[good]] = Ct[:, good]
        n_iter[active] += 1
        dev[active[good]] = devt[good]
        rel = np.abs(dev0 - devt) / (np.abs(devt) + 0.1)
        size = step_size(db, dc)
        # a full Newton step below the tolerance leaves an error of its square: converged;
        # so is a gene whose tiny Newton step cannot lower the deviance beyond rounding
        conv_now = (good & (rel < tol) & (step == 1.0) & (size < coef_tol)) | (
            ~good & (size < 10 * coef_tol))
        converged[active[conv_now]] = True
        # a stalled Newton step is retried as a Fisher-scoring step from the same iterate
        retry = ~good & ~fisher & ~conv_now
        if retry.any():
            mut[:, retry] = mua[:, retry]
            rel[retry] = np.inf
        fisher = np.where(step * shrink < 1.0, True, np.where(rel < 1e-3, False, fisher))
        keep = (good | retry) & ~conv_now
        if keep.all():
            mua, sys_prev = mut, sys_
        else:
            active, rel, fisher = active[keep], rel[keep], fisher[keep]
            Ya, mua, ala = Ya[:, keep], mut[:, keep], ala[keep]
            sys_prev = NewtonSystem(sys_.S[keep], sys_.E[:, keep], sys_.Dr[:, keep])
        del mut, sys_
    del Ya, mua
    var_b = var_c = None
    if compute_se:
        fit = np.flatnonzero(~skip)
        var_b = np.full((m, design.d), np.nan)
        var_c = np.full((design.n_groups, m), np.nan)
        if fit.size:
            eta = design.linear_predictor(B[:, fit], C[:, fit])
            mu = np.exp(eta, out=eta)
            w = mu if not np.any(alpha[fit] > 0) else mu / (1.0 + alpha[fit] * mu)
            pbf = None if pinb is None else pinb[fit]
            sys_ = newton_system(design, w, pinned[:, fit], 1e-12, pinb=pbf)
            del w, mu, eta
            var_b[fit], var_c[:, fit] = covariance_diag(sys_, pinned[:, fit], pbf)
        var_b[skip] = np.inf
        var_c[:, skip] = np.inf
    return converged, dev, n_iter, var_b, var_c


def _wls_start(design: Design, Y: np.ndarray, pinned: np.ndarray):
    """Starting values: one weighted least-squares fit of log(y + 0.1) - o (weights y + 0.1)."""
    mu0 = Y + 0.1
    z = np.log(mu0)
    z -= design.offset[:, None]
    z *= mu0
    sys_ = newton_system(design, mu0, pinned, 1e-8)
    db, dc = newton_step(sys_, gradient(design, z), pinned)
    C = np.clip(dc, -GROUP_COEF_BOUND, GROUP_COEF_BOUND)
    return db.T.copy(), C


def _group_mean_start(design: Design, Y: np.ndarray):
    """Start at the Poisson MLE of intercept + groups (closed form), other coefficients 0.

    Returns None when ``X`` has no constant column or there are no control cells.
    """
    const = np.flatnonzero((np.ptp(design.X, axis=0) == 0) & (design.X[0] != 0))
    a = design.n_groups
    if const.size == 0 or design.bounds[a] == design.bounds[a + 1]:
        return None
    s = np.exp(design.offset)
    sums = np.empty((a + 1, Y.shape[1]))
    ssum = np.empty(a + 1)
    for k, r in enumerate(design.set_slices):
        Y[r].sum(axis=0, out=sums[k])
        ssum[k] = s[r].sum()
    with np.errstate(divide="ignore"):
        theta = np.log(np.maximum(sums, 0.5) / np.maximum(ssum, 1e-300)[:, None])
    B = np.zeros((design.d, Y.shape[1]))
    B[const[0]] = theta[-1] / design.X[0, const[0]]
    C = np.clip(theta[:-1] - theta[-1], -GROUP_COEF_BOUND, GROUP_COEF_BOUND)
    return B, C


def schur_chunk(design: Design, Y: np.ndarray, alpha: np.ndarray | None,
                 init: np.ndarray | None, *, max_iter: int, tol: float, ridge: float,
                 compute_se: bool):
    """Fit one row-sorted chunk with the Schur IRLS; alpha None = MoM recipe
    (docs/math.md#nb-dispersion)."""
    n, m = Y.shape
    d, a = design.d, design.n_groups
    all_zero = ~(Y > 0).any(axis=0)
    pinned = (group_sums(design, Y) == 0) & ~all_zero[None, :]
    pinb = None
    if design.bin_cols.size:
        hit = (design.X[:, design.bin_cols] != 0).astype(float).T @ Y     # nb x m
        pinb = np.zeros((m, d), bool)
        pinb[:, design.bin_cols] = (hit == 0).T & ~all_zero[:, None]
    ylogy = sum_ylogy(Y)
    if init is not None:
        B = (init[:, :d] * design.scales).T.copy()
        C = init[:, d:].T.copy()
    else:
        start = _group_mean_start(design, Y)
        B, C = _wls_start(design, Y, pinned) if start is None else start
    _pin_all_zero(design, B, C, all_zero)
    if alpha is None:
        zeros = np.zeros(m)
        irls_chunk(design, Y, zeros, B, C, pinned, all_zero, ylogy, min(max_iter, 5), 1e-6,
                    ridge, False, pinb=pinb)
        dof = n - d - a
        mu = np.exp(design.linear_predictor(B, C))
        alpha = np.clip(mom_alpha(Y, mu, dof), 1e-8, 100.0)
        del mu
        irls_chunk(design, Y, alpha, B, C, pinned, all_zero, ylogy, min(max_iter, 10), 1e-6,
                    ridge, False, pinb=pinb)
        mu = np.exp(design.linear_predictor(B, C))
        size = size_from_mom(mom_alpha(Y, mu, dof), all_zero)
        del mu
        alpha = 1.0 / size
    conv, dev, n_iter, var_b, var_c = irls_chunk(
        design, Y, alpha, B, C, pinned, all_zero, ylogy, max_iter, tol, ridge, compute_se,
        pinb=pinb)
    return B, C, alpha, conv, dev, n_iter, var_b, var_c


def _pin_all_zero(design: Design, B: np.ndarray, C: np.ndarray, all_zero: np.ndarray) -> None:
    """Genes without counts: mean pinned at the lower clip (intercept column if any)."""
    if not all_zero.any():
        return
    B[:, all_zero] = 0.0
    C[:, all_zero] = -GROUP_COEF_BOUND
    const = np.flatnonzero((np.ptp(design.X, axis=0) == 0) & (design.X[0] != 0))
    if const.size:
        c0 = const[0]
        B[c0, all_zero] = (ETA_MIN - design.offset.max()) / design.X[0, c0]

