"""The Newton system of a chunk of genes, its solution and the safeguards of a step.

For gene j with coefficients ``(b_j, c_j)`` on the design ``[X | G]`` (G one-hot groups),
the Newton system is ``[X'WX  X'WG; G'WX  G'WG] (db, dc) = ([X | G]' s)`` with working
weights ``W`` and scores ``s`` from :func:`causarray.engine.families.working_weights`.
``G'WG`` is diagonal (the groups are disjoint), so the system is solved through its
Schur complement ``S = X'WX - X'WG (G'WG)^-1 G'WX`` (docs/math.md#schur-complement-for-one-hot-treatments):
``O(n p d^2)`` work instead of ``O(n p (d + a)^2)``, with the exact Newton step.

The safeguards shared by every iteration of the engine live here too: the cap on the
step length (:func:`cap_step`), per-gene step halving on the objective
(:func:`halve_steps`) and the record of the genes still iterating
(:class:`ActiveSet`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .design import Design, sym_unpack
from .families import GROUP_COEF_BOUND

COEF_TOL = 1e-6              # max |coefficient step| for convergence
MAX_HALVING = 8
MAX_NEWTON_STEP = 5.0        # largest change of one coefficient in one Newton step


@dataclass
class NewtonSystem:
    """Schur-reduced Newton matrix of a chunk: covariate block ``S`` and group terms."""

    S: np.ndarray            # m x d x d Schur complement (damped)
    E: np.ndarray            # a x m x d cross blocks X'W G (0 for pinned groups)
    Dr: np.ndarray           # a x m damped group diagonal (1 for pinned groups)


def gram(design: Design, w: np.ndarray, single: bool) -> np.ndarray:
    """``w' [sym_outer(X) | G]`` (m x (d(d+1)/2 + a)): every X'WX and diag(G'WG) at once.

    ``single`` forms it in float32 (twice the GEMM speed).  Used only for the Hessians of
    the Newton iterations: the scores stay float64, so the fixed point -- the MLE -- is
    unchanged and only the (already quadratic) convergence rate is touched.
    """
    if single:
        return (w.astype(np.float32).T @ design.XXG32).astype(np.float64)
    return w.T @ design.XXG


def gradient(design: Design, resid: np.ndarray) -> np.ndarray:
    """Score ``[X | G]' resid`` per gene (m x (d + a))."""
    return resid.T @ design.XG


def newton_system(design: Design, w: np.ndarray, pinned: np.ndarray, ridge: float,
                   single: bool = False, pinb: np.ndarray | None = None) -> NewtonSystem:
    """Schur-reduced Newton matrix for every gene of a chunk from weights ``w`` (n x m).

    Pinned groups (a x m) and pinned covariates (``pinb``, m x d) are held fixed: they
    drop out of the system (identity rows).
    """
    d, a = design.d, design.n_groups
    m = w.shape[1]
    nsym = d * (d + 1) // 2
    WG = gram(design, w, single)                          # m x (nsym + a)
    H = sym_unpack(WG[:, :nsym], d)
    if a:
        D = WG[:, nsym:].T.copy()                          # a x m
        E = np.empty((a, m, d))
        for k, sl in enumerate(design.slices):
            np.matmul(w[sl].T, design.X[sl], out=E[k])
        if pinned.any():
            E[pinned] = 0.0
        if pinb is not None:
            E[:, pinb] = 0.0
        Dr = D + ridge * (1.0 + D)
        Dr[pinned] = 1.0
        F = (E / Dr[:, :, None]).transpose(1, 2, 0)        # m x d x a
        H -= F @ E.transpose(1, 0, 2)
    else:
        E = np.zeros((0, m, d))
        Dr = np.ones((0, m))
    idx = np.arange(d)
    H[:, idx, idx] += ridge * (1.0 + np.abs(H[:, idx, idx]))
    if pinb is not None and pinb.any():
        H[pinb] = 0.0
        H.transpose(0, 2, 1)[pinb] = 0.0
        g_idx, j_idx = np.nonzero(pinb)
        H[g_idx, j_idx, j_idx] = 1.0
    return NewtonSystem(H, E, Dr)


def batched_solve(S: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve S_j x_j = b_j for a stack of small systems; least squares where singular."""
    try:
        return np.linalg.solve(S, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        out = np.empty_like(b)
        for j in range(S.shape[0]):
            out[j] = np.linalg.lstsq(S[j], b[j], rcond=None)[0]
        return out


def batched_inverse(S: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.inv(S)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(S)


def newton_step(sys_: NewtonSystem, g: np.ndarray, pinned: np.ndarray,
                 pinb: np.ndarray | None = None):
    """Newton step (db: m x d, dc: a x m) for the score ``g`` (m x (d + a)).

    Block elimination of the diagonal group block: S db = g_x - E' D^-1 g_g, then
    dc = D^-1 (g_g - E db).  Pinned groups get dc = 0, pinned covariates db = 0.
    """
    d = sys_.S.shape[-1]
    gx = g[:, :d] if pinb is None else np.where(pinb, 0.0, g[:, :d])
    gg = np.where(pinned, 0.0, g[:, d:].T)
    if gg.shape[0]:
        gx = gx - np.einsum("kmd,km->md", sys_.E, gg / sys_.Dr)
    db = batched_solve(sys_.S, gx)
    dc = (gg - np.einsum("kmd,md->km", sys_.E, db)) / sys_.Dr
    return db, dc


def step_size(db: np.ndarray, dc: np.ndarray) -> np.ndarray:
    """Largest |coefficient change| per gene."""
    dmax = np.abs(db).max(axis=1) if db.shape[1] else np.zeros(db.shape[0])
    if dc.shape[0]:
        dmax = np.maximum(dmax, np.abs(dc).max(axis=0))
    return dmax


def covariance_diag(sys_: NewtonSystem, pinned: np.ndarray, pinb: np.ndarray | None = None):
    """Diagonals of the inverse Fisher information: var_b (m x d), var_c (a x m)."""
    Sinv = batched_inverse(sys_.S)
    var_b = np.einsum("mdd->md", Sinv)
    if pinb is not None:
        var_b[pinb] = np.inf
    a = sys_.Dr.shape[0]
    if not a:
        return var_b, np.zeros((0, var_b.shape[0]))
    F = (sys_.E / sys_.Dr[:, :, None]).transpose(1, 0, 2)   # m x a x d
    var_c = (1.0 / sys_.Dr + np.einsum("mkd,mkd->km", F @ Sinv, F))
    var_c[pinned] = np.inf
    return var_b, var_c



# ----------------------------------------------------------------------------------
# safeguards of a step: length cap, step halving, active set
# ----------------------------------------------------------------------------------
def cap_step(db: np.ndarray, dc: np.ndarray, max_step: float = MAX_NEWTON_STEP) -> np.ndarray:
    """Scale every gene's step so that no coefficient moves by more than ``max_step``.

    A trust region on the log scale: far below its optimum a log-mean has almost no
    curvature and a plain Newton step overshoots.  ``db`` (m x d) and ``dc`` (a x m) are
    scaled in place; returns the factors (m,), 1 where the step was short enough.
    """
    shrink = np.minimum(1.0, max_step / np.maximum(step_size(db, dc), 1e-300))
    db *= shrink[:, None]
    dc *= shrink
    return shrink


@dataclass
class Halving:
    """Outcome of :func:`halve_steps` for a chunk of k genes.

    Attributes
    ----------
    B, C : (d, k), (a, k) accepted coefficients (the starting point where ``stalled``).
    mu : (n, k) means at the accepted coefficients; for a stalled gene, at its last
        rejected trial point.
    f : (k,) objective at the accepted coefficients (last rejected trial where stalled).
    step : (k,) accepted fraction of the step (1 = full step).
    stalled : (k,) bool, True where no fraction of the step lowered the objective.
    """

    B: np.ndarray
    C: np.ndarray
    mu: np.ndarray
    f: np.ndarray
    step: np.ndarray
    stalled: np.ndarray


def halve_steps(objective, B0: np.ndarray, C0: np.ndarray, db: np.ndarray, dc: np.ndarray,
                f0: np.ndarray, slack: np.ndarray, max_halving: int = MAX_HALVING) -> Halving:
    """Per-gene step halving: the largest step ``2^-h (db, dc)`` that does not raise ``f``.

    For every gene j the trial point is ``(B0_j + t db_j, clip(C0_j + t dc_j))`` with
    ``t = 1, 1/2, ..., 2^-max_halving`` (group coefficients clipped to
    ``+-GROUP_COEF_BOUND``); the first ``t`` whose objective is finite and at most
    ``f0_j + slack_j`` is accepted (``slack`` absorbs the rounding error of ``f``).  Only
    the genes still rejected are evaluated again.

    Parameters
    ----------
    objective : callable ``(B, C, cols) -> (mu, f)``: means (n x k') and objective (k',)
        at coefficients ``B`` (d x k'), ``C`` (a x k') for the genes ``cols`` of the
        chunk (``None`` = all of them).  The objective is minimised (a deviance, or minus
        a log-likelihood).
    B0, C0 : (d, k), (a, k) starting coefficients.
    db, dc : (k, d), (a, k) the step.
    f0, slack : (k,) objective at the start and its tolerance.
    max_halving : largest number of halvings.

    Returns
    -------
    Halving
    """
    Bt = B0 + db.T
    Ct = np.clip(C0 + dc, -GROUP_COEF_BOUND, GROUP_COEF_BOUND)
    mu, f = objective(Bt, Ct, None)
    step = np.ones(f.shape[0])
    bad = np.flatnonzero(~(np.isfinite(f) & (f <= f0 + slack)))
    for _ in range(max_halving):
        if bad.size == 0:
            break
        step[bad] *= 0.5
        Bt[:, bad] = B0[:, bad] + step[bad] * db[bad].T
        Ct[:, bad] = np.clip(C0[:, bad] + step[bad] * dc[:, bad],
                             -GROUP_COEF_BOUND, GROUP_COEF_BOUND)
        mub, fb = objective(Bt[:, bad], Ct[:, bad], bad)
        ok = np.isfinite(fb) & (fb <= f0[bad] + slack[bad])
        acc = bad[ok]
        mu[:, acc] = mub[:, ok]
        f[acc] = fb[ok]
        bad = bad[~ok]
    stalled = np.zeros(f.shape[0], bool)
    stalled[bad] = True
    if bad.size:                    # never improved: stay at the starting point
        Bt[:, bad], Ct[:, bad] = B0[:, bad], C0[:, bad]
    return Halving(Bt, Ct, mu, f, step, stalled)


@dataclass
class ActiveSet:
    """The genes of a chunk that are still iterating, with the state each one carries.

    Converged and stalled genes leave the set through :meth:`keep`, so that every later
    pass works on the remaining columns only.

    Attributes
    ----------
    idx : (k,) chunk columns of the active genes.
    y, mu : (n, k) their counts and their means at the current iterate.
    alpha : (k,) NB dispersions (0 = Poisson).
    pinned : (a, k) groups held at ``-GROUP_COEF_BOUND``.
    pinb : (k, d) covariates held at their bound, or None.
    rel : (k,) relative deviance change of the last step (inf before the first step).
    fisher : (k,) True where the next step is Fisher scoring instead of Newton.
    system : the Newton system of the last step (its Hessian serves the convergence
        check of the next iteration), or None.
    """

    idx: np.ndarray
    y: np.ndarray
    mu: np.ndarray
    alpha: np.ndarray
    pinned: np.ndarray
    pinb: np.ndarray | None
    rel: np.ndarray
    fisher: np.ndarray
    system: NewtonSystem | None = None

    @classmethod
    def start(cls, idx: np.ndarray, Y: np.ndarray, mu: np.ndarray, alpha: np.ndarray,
              pinned: np.ndarray, pinb: np.ndarray | None) -> ActiveSet:
        """The genes ``idx`` of a chunk (counts ``Y``, means ``mu``), before any step."""
        if idx.size < Y.shape[1]:
            Y, mu, alpha = Y[:, idx], mu[:, idx], alpha[idx]
        return cls(idx, Y, mu, alpha, pinned[:, idx], None if pinb is None else pinb[idx],
                   np.full(idx.size, np.inf), np.zeros(idx.size, bool))

    @property
    def size(self) -> int:
        return self.idx.size

    def keep(self, mask: np.ndarray) -> None:
        """Keep the genes where ``mask`` is True (nothing is copied when all stay)."""
        if mask.all():
            return
        self.idx, self.rel, self.fisher = self.idx[mask], self.rel[mask], self.fisher[mask]
        self.y, self.mu, self.alpha = self.y[:, mask], self.mu[:, mask], self.alpha[mask]
        self.pinned = self.pinned[:, mask]
        if self.pinb is not None:
            self.pinb = self.pinb[mask]
        if self.system is not None:
            s = self.system
            self.system = NewtonSystem(s.S[mask], s.E[:, mask], s.Dr[:, mask])
