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
    ActiveSet,
    Halving,
    NewtonSystem,
    cap_step,
    covariance_diag,
    gradient,
    halve_steps,
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
    """Maximum likelihood for one chunk of genes by Newton's method with step halving.

    Model: ``y_ij ~ NB(mu_ij, 1/alpha_j)`` (Poisson where ``alpha_j = 0``) with
    ``log mu_ij = o_i + x_i' b_j + c_{j, g(i)}`` on the row-sorted ``design``; ``Y`` holds
    the chunk's columns.  Each iteration, for the genes still active:

    1. working weights and scores at the current iterate (one fused pass); the
       Hessian is the observed information, or the Fisher information for a gene whose
       last step needed halving, until a full step settles again;
    2. convergence check: the relative deviance change of the last step is below
       ``tol`` and the next Newton step -- from the new score and the *previous*
       Hessian, so no Gram matrix is formed for it -- is below ``coef_tol``; that last
       small step is taken too;
    3. the Schur-reduced Newton system and its step, capped at ``MAX_NEWTON_STEP``;
    4. step halving on the deviance (:func:`causarray.engine.newton.halve_steps`);
    5. acceptance, convergence of a full step below ``coef_tol``, the Newton/Fisher
       choice, and the active set.

    ``B`` (d x m) and ``C`` (a x m) are updated in place; genes in ``skip`` are not
    fitted.  Groups in ``pinned`` (a x m) and binary covariates in ``pinb`` (m x d) whose
    cells have no counts are held at ``-GROUP_COEF_BOUND`` (their maximum-likelihood
    estimate is minus infinity).

    Returns converged, deviance, n_iter, var_b (m x d), var_c (a x m) (the variances
    from the Fisher information at the solution, None unless ``compute_se``).
    """
    m = Y.shape[1]
    pinb = _pin_coefficients(design, B, C, pinned, pinb)
    cst = deviance_constant(Y, alpha, ylogy)
    mu, dev = _evaluate(design, Y, alpha, B, C, cst)
    converged = np.zeros(m, bool)
    n_iter = np.zeros(m, int)
    state = ActiveSet.start(np.flatnonzero(~skip), Y, mu, alpha, pinned, pinb)
    del mu
    # Why float32 Hessians beyond 8 covariates.  The Gram GEMM w' [sym_outer(X) | G] has
    # d(d+1)/2 + a columns, so its share of an iteration grows like d^2 while the fused
    # weight/score passes do not.  Measured (n = 4000 cells, 256 genes, a = 10, one BLAS
    # thread): the float32 GEMM is 2.2-2.6x faster at every d (relative error of the
    # entries 4e-7), but a whole fit_glm (600 genes) gains only 2 % at d = 4 and 10-14 %
    # at d = 12-16.  It costs memory rather than saving it: a cached float32 copy of the
    # design product (n x (d(d+1)/2 + a)) and a float32 copy of each chunk's weights, so
    # it is kept for the designs where the GEMM is the cost (GCATE's [X | U] designs).
    # Precision: only the Newton *direction* is float32; the scores, the deviance, the
    # step-halving test and the convergence test are float64, so the fixed point (the
    # MLE) is unchanged -- forced on or off, the fitted coefficients agree to 2e-11 SE --
    # and the standard errors (_irls_covariance) are always formed in float64.
    single = design.d > 8
    for it in range(max_iter + 1):
        if state.size == 0:
            break
        # 1. weights and scores (after the last step: the scores alone, for step 2)
        last = it == max_iter
        w, g = _weights_and_scores(design, state, scores_only=last)
        # 2. convergence check with the previous Hessian
        if state.system is not None:
            keep = ~_converged_by_next_step(state, g, tol, coef_tol, B, C, converged)
            state.system = None
            if not keep.all():
                state.keep(keep)
                g = g[keep]
                w = None if w is None else w[:, keep]
        if last or state.size == 0:
            break
        # 3. Newton system and capped step
        system = newton_system(design, w, state.pinned, ridge, single=single, pinb=state.pinb)
        del w
        db, dc = newton_step(system, g, state.pinned, state.pinb)
        shrink = cap_step(db, dc)
        # 4. step halving on the deviance
        dev0 = dev[state.idx]
        trial = _halve_on_deviance(design, state, B, C, db, dc, dev0, cst[state.idx])
        # 5. accept, converge, choose Newton or Fisher, shrink the active set
        n_iter[state.idx] += 1
        _accept_step(state, trial, B, C, dev, dev0, step_size(db, dc), shrink, system,
                     converged, tol, coef_tol)
        del trial, system
    del state
    var_b = var_c = None
    if compute_se:
        var_b, var_c = _irls_covariance(design, B, C, alpha, pinned, pinb, skip)
    return converged, dev, n_iter, var_b, var_c


def _pin_coefficients(design: Design, B: np.ndarray, C: np.ndarray, pinned: np.ndarray,
                      pinb: np.ndarray | None) -> np.ndarray | None:
    """Hold pinned groups at ``-GROUP_COEF_BOUND`` and a pinned 0/v covariate where it adds
    ``-GROUP_COEF_BOUND`` to its cells' log-means; returns ``pinb`` (None if nothing is
    pinned among the covariates)."""
    C[pinned] = -GROUP_COEF_BOUND
    if pinb is None or not pinb.any():
        return None
    val = design.X[np.abs(design.X).argmax(axis=0), np.arange(design.d)]  # v of 0/v
    B.T[pinb] = (-GROUP_COEF_BOUND / np.broadcast_to(val, pinb.shape))[pinb]
    return pinb


def _weights_and_scores(design: Design, state: ActiveSet, scores_only: bool):
    """Working weights (n x k, None with ``scores_only``) and the gradient (k x (d + a))."""
    if scores_only:
        w, resid = None, scores(state.y, state.mu, state.alpha)
    else:
        w, resid = working_weights(state.y, state.mu, state.alpha, observed=~state.fisher)
    return w, gradient(design, resid)


def _converged_by_next_step(state: ActiveSet, g: np.ndarray, tol: float, coef_tol: float,
                            B: np.ndarray, C: np.ndarray, converged: np.ndarray) -> np.ndarray:
    """Genes whose last deviance change is below ``tol`` and whose next step, from the new
    score ``g`` and the previous Hessian, is below ``coef_tol``.

    That last (tiny, quasi-Newton) step is taken too: it cuts the error further at no
    cost, and its deviance change is of the order of its square.  Marks the genes in
    ``converged``; returns the mask over the active set.
    """
    dbc, dcc = newton_step(state.system, g, state.pinned, state.pinb)
    done = (state.rel < tol) & (step_size(dbc, dcc) < coef_tol)
    if done.any():
        cols = state.idx[done]
        converged[cols] = True
        B[:, cols] += dbc[done].T
        C[:, cols] = np.clip(C[:, cols] + dcc[:, done], -GROUP_COEF_BOUND, GROUP_COEF_BOUND)
    return done


def _halve_on_deviance(design: Design, state: ActiveSet, B: np.ndarray, C: np.ndarray,
                       db: np.ndarray, dc: np.ndarray, dev0: np.ndarray,
                       cst: np.ndarray) -> Halving:
    """Step halving of the active genes' step on their deviance (``cst - 2 kernel``).

    The rounding error of the deviance scales with its constant part, hence the slack.
    """
    slack = 1e-10 + 1e-12 * np.abs(dev0) + 1e-13 * np.abs(cst)

    def objective(Bt, Ct, cols):
        if cols is None:
            return _evaluate(design, state.y, state.alpha, Bt, Ct, cst)
        return _evaluate(design, state.y[:, cols], state.alpha[cols], Bt, Ct, cst[cols])

    return halve_steps(objective, B[:, state.idx], C[:, state.idx], db, dc, dev0, slack)


def _accept_step(state: ActiveSet, trial: Halving, B: np.ndarray, C: np.ndarray,
                 dev: np.ndarray, dev0: np.ndarray, size: np.ndarray, shrink: np.ndarray,
                 system: NewtonSystem, converged: np.ndarray, tol: float,
                 coef_tol: float) -> None:
    """Move to the accepted point and update the active set.

    A full Newton step below ``coef_tol`` with a deviance change below ``tol`` leaves an
    error of its square: converged; so is a gene whose tiny step (below
    ``10 coef_tol``) cannot lower the deviance beyond rounding.  A stalled Newton step is
    retried once as a Fisher-scoring step from the same iterate; other stalled genes
    leave, unconverged.  A gene uses Fisher scoring after a shortened step until its
    relative deviance change drops below 1e-3.
    """
    good = ~trial.stalled
    B[:, state.idx] = trial.B
    C[:, state.idx] = trial.C
    dev[state.idx[good]] = trial.f[good]
    rel = np.abs(dev0 - trial.f) / (np.abs(trial.f) + 0.1)
    conv_now = (good & (rel < tol) & (trial.step == 1.0) & (size < coef_tol)) | (
        ~good & (size < 10 * coef_tol))
    converged[state.idx[conv_now]] = True
    retry = ~good & ~state.fisher & ~conv_now
    mu = trial.mu
    if retry.any():
        mu[:, retry] = state.mu[:, retry]
        rel[retry] = np.inf
    state.fisher = np.where(trial.step * shrink < 1.0, True,
                            np.where(rel < 1e-3, False, state.fisher))
    state.mu, state.rel, state.system = mu, rel, system
    state.keep((good | retry) & ~conv_now)


def _irls_covariance(design: Design, B: np.ndarray, C: np.ndarray, alpha: np.ndarray,
                     pinned: np.ndarray, pinb: np.ndarray | None, skip: np.ndarray):
    """Inverse-Fisher variances at the solution: var_b (m x d), var_c (a x m); inf for
    skipped genes and pinned coefficients."""
    m = B.shape[1]
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
    return var_b, var_c


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
    const = design.constant_columns()
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
                 compute_se: bool, size_at_init: bool = False):
    """Fit one row-sorted chunk of genes with the Schur IRLS.

    Model: ``y_ij ~ NB(mu_ij, 1/alpha_j)``, ``log mu_ij = o_i + x_i' b_j + c_{j, g(i)}``.

    1. coefficients without a finite MLE: genes without counts, groups and 0/v
       covariates whose cells have no counts (pinned);
    2. starting values: ``init``, else the closed-form Poisson MLE of intercept +
       groups, else one weighted least-squares fit of ``log(y + 0.1)``;
    3. with ``alpha`` None, the dispersion by the method-of-moments recipe
       (docs/math.md#nb-dispersion): Poisson fit, MoM, NB fit, MoM -- or, with
       ``size_at_init`` and ``init`` (an NB fit of the same model, such as GCATE's), the
       MoM at the means of ``init``, which stand in for the recipe's NB fit;
    4. the final fit at that dispersion (:func:`irls_chunk`).

    Returns B (d x m, scaled units), C (a x m), alpha, converged, deviance, n_iter,
    var_b, var_c.
    """
    # 1. pinned coefficients
    all_zero = ~(Y > 0).any(axis=0)
    pinned, pinb = _pinned_coefficients(design, Y, all_zero)
    ylogy = sum_ylogy(Y)
    # 2. starting values
    if init is not None:
        B = (init[:, :design.d] * design.scales).T.copy()
        C = init[:, design.d:].T.copy()
    else:
        start = _group_mean_start(design, Y)
        B, C = _wls_start(design, Y, pinned) if start is None else start
    _pin_all_zero(design, B, C, all_zero)
    # 3. dispersion by the method of moments
    if alpha is None and size_at_init and init is not None:
        _pin_coefficients(design, B, C, pinned, pinb)
        alpha = _mom_at(design, Y, B, C, all_zero)
    elif alpha is None:
        alpha = _mom_dispersion(design, Y, B, C, pinned, pinb, all_zero, ylogy, max_iter,
                                ridge)
    # 4. final fit
    conv, dev, n_iter, var_b, var_c = irls_chunk(
        design, Y, alpha, B, C, pinned, all_zero, ylogy, max_iter, tol, ridge, compute_se,
        pinb=pinb)
    return B, C, alpha, conv, dev, n_iter, var_b, var_c


def _pinned_coefficients(design: Design, Y: np.ndarray, all_zero: np.ndarray):
    """Groups (a x m) and 0/v covariates (m x d, None if the design has none) whose cells
    have no counts, for genes with some counts: their MLE is minus infinity."""
    m = Y.shape[1]
    pinned = (group_sums(design, Y) == 0) & ~all_zero[None, :]
    pinb = None
    if design.bin_cols.size:
        hit = (design.X[:, design.bin_cols] != 0).astype(float).T @ Y     # nb x m
        pinb = np.zeros((m, design.d), bool)
        pinb[:, design.bin_cols] = (hit == 0).T & ~all_zero[:, None]
    return pinned, pinb


def _mom_dispersion(design: Design, Y: np.ndarray, B: np.ndarray, C: np.ndarray,
                    pinned: np.ndarray, pinb: np.ndarray | None, all_zero: np.ndarray,
                    ylogy: np.ndarray, max_iter: int, ridge: float) -> np.ndarray:
    """NB dispersion per gene by the MoM recipe (docs/math.md#nb-dispersion).

    A Poisson fit (at most 5 iterations), the MoM dispersion at its means (clipped to
    [1e-8, 100]), an NB fit at that dispersion (at most 10 iterations), the MoM
    dispersion again.  ``B`` and ``C`` are updated in place (they warm-start the final
    fit).
    """
    m = Y.shape[1]
    dof = Y.shape[0] - design.d - design.n_groups
    irls_chunk(design, Y, np.zeros(m), B, C, pinned, all_zero, ylogy, min(max_iter, 5), 1e-6,
               ridge, False, pinb=pinb)
    mu = np.exp(design.linear_predictor(B, C))
    alpha = np.clip(mom_alpha(Y, mu, dof), 1e-8, 100.0)
    del mu
    irls_chunk(design, Y, alpha, B, C, pinned, all_zero, ylogy, min(max_iter, 10), 1e-6,
               ridge, False, pinb=pinb)
    return _mom_at(design, Y, B, C, all_zero)


def _mom_at(design: Design, Y: np.ndarray, B: np.ndarray, C: np.ndarray,
            all_zero: np.ndarray) -> np.ndarray:
    """The MoM dispersion ``1 / size`` (docs/math.md#nb-dispersion) at the means of
    coefficients ``(B, C)``, with ``n - d - a`` degrees of freedom."""
    dof = Y.shape[0] - design.d - design.n_groups
    mu = np.exp(design.linear_predictor(B, C))
    return 1.0 / size_from_mom(mom_alpha(Y, mu, dof), all_zero)


def _pin_all_zero(design: Design, B: np.ndarray, C: np.ndarray, all_zero: np.ndarray) -> None:
    """Genes without counts: mean pinned at the lower clip (intercept column if any)."""
    if not all_zero.any():
        return
    B[:, all_zero] = 0.0
    C[:, all_zero] = -GROUP_COEF_BOUND
    const = design.constant_columns()
    if const.size:
        c0 = const[0]
        B[c0, all_zero] = (ETA_MIN - design.offset.max()) / design.X[0, c0]

