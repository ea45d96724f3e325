"""The screen-level stage: the shared control pool modelled once per screen.

Every batch of :func:`causarray.gcate_lfc_batch` holds the same control pool
(``n_ctrl`` cells, by default 2,000) beside its own perturbations' cells.  Fitting the
GCATE factor model per batch (``fit='per_batch'``, the original's estimator) refits
those controls in every batch: the loadings, the controls' factors and the genes'
covariate coefficients are estimated again each time.  The screen-level estimator
(``fit='screen'``, docs/math.md#screen-stage) splits what is shared from what is not:

1. **Once per screen** (:func:`fit_screen_stage`): GCATE on the pool alone gives the
   genes' covariate coefficients ``B_X`` and loadings ``Gamma``, the pool's factors
   ``U_C``, its log size factors and the NB sizes::

       log E[y_ij] = o_i + x_i' b_j + u_i' gamma_j,   i in the pool.

2. **Per batch** (:func:`fit_gcate_at_loadings`), at those fixed ``B_X``, ``Gamma``:
   the treated cells' factors (a Newton fit of r numbers per cell) alternate with the
   perturbations' coefficients ``beta_jk`` (one number per gene and perturbation); each
   perturbation's mean factor is moved into its coefficients, as stage 1's constraint
   ``U ⟂ [X | A]`` does.  Stage 2 (the treatment-linked shift, its decision, the
   pretreatment factors and gene folds) is then :func:`causarray.gcate.stage2_result`,
   unchanged.

The per-batch work is the treated cells' factors and one coefficient per (gene,
perturbation), instead of the alternating fit of every gene's ``d + r + a``
coefficients over the controls and the treated cells.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import numpy as np

from ._validation import check_size_factors
from .engine import alpha_from_size
from .factor_model import group_treatment_coefs
from .gcate import (
    DEFAULT_ES,
    _orth_basis,
    _result,
    _Stage2Options,
    fit_gcate,
    onehot_groups,
    pretreatment_factors,
    stage2_result,
)
from .preprocessing import (
    SizeFactorReference,
    size_factor_reference,
    size_factors_against,
)

logger = logging.getLogger("causarray")

#: rounds of (treatment coefficients, treated cells' factors) in a batch
FIXED_LOADING_ROUNDS = 2


@dataclass(frozen=True)
class ScreenStage:
    """What every batch of a screen shares: the control pool's GCATE fit.

    Attributes
    ----------
    pool : (m,) rows of the pool in the screen (sorted).
    genes : (p,) bool, the genes with counts in the pool (the others have no control
        mean and are not fitted).
    B_X : (p_pool, d) covariate coefficients of those genes.
    Gamma : (p_pool, r) their loadings, for factors of unit SD over the pool.
    U : (m, r) the pool's factors: posterior means at the loadings, scaled to unit SD.
    scale : (r,) that scale: the SD of the posterior means, which every batch's treated
        cells' posterior means are divided by too.
    log_s : (m,) the pool's log size factors.
    size : (p_pool,) NB sizes (``inf`` for Poisson).
    info_ctrl : (p_pool,) the pool's Fisher information of each gene's log mean,
        ``sum_i mu_ij / (1 + mu_ij / size_j)`` at the fit.
    ref_S, ref_G, ref_shift : the median-of-ratios reference of the pool's size factors
        (genes, log geometric means, ``[delta, mean_L]``;
        :class:`causarray.preprocessing.SizeFactorReference`) that the treated cells'
        factors are computed against; empty with an ``offset`` other than True.
    """

    pool: np.ndarray
    genes: np.ndarray
    B_X: np.ndarray
    Gamma: np.ndarray
    U: np.ndarray
    scale: np.ndarray
    log_s: np.ndarray
    size: np.ndarray
    info_ctrl: np.ndarray
    ref_S: np.ndarray
    ref_G: np.ndarray
    ref_shift: np.ndarray

    def size_reference(self) -> SizeFactorReference | None:
        """The pool's size-factor reference (None when the run's offset is not True)."""
        if not np.all(np.isfinite(self.ref_shift)):
            return None
        return SizeFactorReference(S=self.ref_S, G=self.ref_G, delta=float(self.ref_shift[0]),
                                   mean_L=float(self.ref_shift[1]))

    def arrays(self) -> dict:
        """The fields as a dict of arrays (the cache's record)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def fit_screen_stage(Y_pool, X_pool: np.ndarray, pool: np.ndarray, r: int, *, family: str,
                     disp: np.ndarray | None, offset, gcate_kwargs: dict) -> ScreenStage:
    """GCATE stage 1 on the control pool (no treatment column), once per screen.

    Parameters
    ----------
    Y_pool : (m, p) the pool's counts, dense.
    X_pool : (m, d) its covariates (intercept included).
    pool : (m,) its rows in the screen.
    r : number of factors (> 0).
    family, disp, offset : as :func:`causarray.fit_gcate` (``disp``: NB sizes of all p
        genes, or None; ``offset``: True, False/None or the pool's log size factors).
    gcate_kwargs : the run's :func:`fit_gcate` options (early stopping, random state,
        ...); stage 2 and the pretreatment refit do not apply to a pool without
        treatments and are switched off.
    """
    genes = np.asarray(Y_pool.sum(axis=0) > 0).ravel()
    kw = {k: v for k, v in gcate_kwargs.items()
          if k in ("kwargs_es_1", "kwargs_ls_1", "random_state", "verbose")}
    ref = None
    if offset is True:        # comp_size_factor's factors, with the reference kept
        s_pool, ref = size_factor_reference(Y_pool[:, genes])
        offset = np.log(s_pool)
    res_1, _ = fit_gcate(Y_pool[:, genes], X_pool, np.zeros((len(pool), 0)), r,
                         family=family, offset=offset,
                         disp_glm=None if disp is None else np.asarray(disp)[genes],
                         c1=0, pretreatment_u=False, gene_folds=0, **kw)
    d, m = X_pool.shape[1], len(pool)
    coef = np.asarray(res_1["B_Gamma"], float)
    glm = res_1["kwargs_glm"]
    size = np.asarray(glm["disp_glm"], float) * np.ones(int(genes.sum()))
    log_s = np.log(np.asarray(glm["size_factor"], float))
    B_X, Gamma = coef[:, :d], coef[:, d:]
    # the pool's factors as every batch's treated cells get theirs: posterior means at
    # the loadings (the fit's unit-SD rescaling would put the two arms on other scales)
    U = pretreatment_factors(Y_pool[:, genes], X_pool, np.zeros((m, 0)), log_s, size, B_X,
                             np.zeros((len(size), 0)), Gamma, np.asarray(res_1["U"], float),
                             np.ones(len(size), bool))
    scale = np.maximum(U.std(axis=0), 1e-12)
    mu = np.exp(np.clip(log_s[:, None] + X_pool @ B_X.T + U @ Gamma.T, -30.0, 20.0))
    info_ctrl = (mu / (1.0 + alpha_from_size(size) * mu)).sum(axis=0)
    return ScreenStage(pool=np.asarray(pool), genes=genes, B_X=B_X, Gamma=Gamma * scale,
                       U=U / scale, scale=scale, log_s=log_s, size=size, info_ctrl=info_ctrl,
                       ref_S=np.zeros(0, np.int64) if ref is None else ref.S,
                       ref_G=np.zeros(0) if ref is None else ref.G,
                       ref_shift=np.full(2, np.nan) if ref is None
                       else np.array([ref.delta, ref.mean_L]))


def stage2_options(family: str, gcate_kwargs: dict) -> _Stage2Options:
    """Stage 2's options from a run's :func:`fit_gcate` keywords (its defaults for the
    ones not given)."""
    defaults = {k: v.default for k, v in inspect.signature(fit_gcate).parameters.items()}
    get = {**defaults, **gcate_kwargs}.get
    return _Stage2Options(family=family, es={**DEFAULT_ES, **(get("kwargs_es_2") or {})},
                          ls=get("kwargs_ls_2"), c1=get("c1"), renormalize=get("renormalize"),
                          control=get("control"), assignment=get("assignment"),
                          shift_level=get("shift_level"), pretreatment_u=get("pretreatment_u"),
                          affected_z=get("affected_z"), gene_folds=get("gene_folds"),
                          random_state=get("random_state"))


def _pool_scale_log_s(Y, offset, ctrl_pos: np.ndarray, treated: np.ndarray,
                      stage: ScreenStage, pool_pos: np.ndarray) -> np.ndarray:
    """The batch's log size factors on the pool fit's scale: the controls keep theirs;
    the treated cells' are median-of-ratios factors against the pool's reference
    (``offset=True``), the given ones (an array) or 1 (False / None)."""
    log_s = np.zeros(Y.shape[0])
    log_s[ctrl_pos] = stage.log_s[pool_pos]
    ref = stage.size_reference()
    if offset is True and ref is not None:
        s_t = np.concatenate([size_factors_against(Y[treated[i:i + 1024]], ref, True)
                              for i in range(0, treated.size, 1024)] or [np.zeros(0)])
        check_size_factors(s_t, treated.size)
        log_s[treated] = np.log(s_t)
    elif offset is not True and offset is not False and offset is not None:
        log_s[treated] = np.asarray(offset, dtype=float).ravel()[treated]
    return log_s


class _Rows:
    """Rows ``idx`` of a matrix, read on demand: ``view[sel]`` is ``M[idx[sel]]`` (the
    treated cells of a batch without a copy of all of them at once)."""

    def __init__(self, M, idx: np.ndarray):
        self.M, self.idx = M, np.asarray(idx)
        self.shape = (self.idx.size, M.shape[1])

    def __getitem__(self, sel):
        return self.M[self.idx[sel]]


def _centre_groups(U: np.ndarray, beta: np.ndarray, group: np.ndarray, Gamma: np.ndarray,
                   ref: np.ndarray) -> None:
    """Move each group's mean factor (relative to the controls' mean ``ref``) into its
    coefficients, in place: ``U Gamma' + A beta'`` is unchanged and ``U ⟂ A`` as in
    stage 1."""
    for k in range(beta.shape[1]):
        rows = group == k
        if rows.any():
            shift = U[rows].mean(axis=0) - ref
            U[rows] -= shift
            beta[:, k] += Gamma @ shift


def fit_gcate_at_loadings(Y, X: np.ndarray, A: np.ndarray, stage: ScreenStage,
                          ctrl_pos: np.ndarray, pool_pos: np.ndarray, *, offset,
                          opts: _Stage2Options, es: dict | None = None,
                          ls: dict | None = None,
                          rounds: int = FIXED_LOADING_ROUNDS) -> tuple[dict, dict]:
    """GCATE on one batch at the screen's loadings; returns ``(res_1, res_2)`` as
    :func:`causarray.fit_gcate` does.

    Parameters
    ----------
    Y : (n, p_pool) the batch's counts of the pool's genes (``stage.genes``), dense.
    X, A : (n, d) covariates and (n, a) one-hot treatments of the batch.
    stage : the screen's :class:`ScreenStage`.
    ctrl_pos : positions of the pool's cells among the batch's rows.
    pool_pos : their positions in ``stage.pool``.
    offset : as :func:`causarray.fit_gcate`.
    opts : stage 2's options.
    es, ls : recorded in the results as ``kwargs_es`` / ``kwargs_ls``.
    rounds : rounds of step 3.

    Steps: 1. size factors on the pool's scale; 2. factors: the pool's for its cells,
    0 for treated cells; 3. ``rounds`` times: every (gene, perturbation) coefficient at
    the current factors (4 Fisher-scoring steps from the Poisson solution, then 2 from
    the previous round's), then the treated cells' factors at the coefficients (Fisher
    scoring, standard-normal prior; 2 steps, 4 in the last round), each group's mean
    factor moved into its coefficients; 4. the coefficients' standard errors (one more
    step first),
    ``sqrt(1 / I_kj + 1 / I_Cj)`` (the treated cells' Fisher information and the
    controls', whose mean the coefficient is relative to); 5. stage 2.
    """
    n, p = Y.shape
    a = A.shape[1]
    B_X, Gamma, size, scale = stage.B_X, stage.Gamma, stage.size, stage.scale
    alpha = alpha_from_size(size) * np.ones(p)
    group = onehot_groups(A)
    treated = np.flatnonzero(group >= 0)
    log_s = _pool_scale_log_s(Y, offset, ctrl_pos, treated, stage, pool_pos)   # 1.
    U = np.zeros((n, Gamma.shape[1]))                                            # 2.
    U[ctrl_pos] = stage.U[pool_pos]
    Yt, Xt, At, gt = _Rows(Y, treated), X[treated], A[treated], group[treated]
    log_s_t, Ut = log_s[treated], U[treated]
    ref = U[ctrl_pos].mean(axis=0)

    def eta_t(rows: np.ndarray) -> np.ndarray:      # the fixed part, for some treated rows
        return log_s_t[rows, None] + Xt[rows] @ B_X.T + Ut[rows] @ Gamma.T

    beta = None
    for i in range(rounds):                                                      # 3.
        beta, _ = group_treatment_coefs(Yt, eta_t, gt, a, alpha, start=beta,
                                        n_steps=4 if beta is None else 2)
        Ut = pretreatment_factors(Yt, Xt, At, log_s_t, size, B_X, beta, Gamma / scale,
                                  Ut * scale, np.ones(p, bool),
                                  n_steps=4 if i == rounds - 1 else 2) / scale
        _centre_groups(Ut, beta, gt, Gamma, ref)
    beta, info = group_treatment_coefs(Yt, eta_t, gt, a, alpha, start=beta, n_steps=1)
    U[treated] = Ut
    info_c = stage.info_ctrl                                                     # 4.
    if pool_pos.size != stage.pool.size:      # a part of the pool: its own information
        eta_c = log_s[ctrl_pos, None] + X[ctrl_pos] @ B_X.T + U[ctrl_pos] @ Gamma.T
        mu_c = np.exp(np.clip(eta_c, -30.0, 20.0))
        info_c = (mu_c / (1.0 + alpha * mu_c)).sum(axis=0)
    with np.errstate(divide="ignore"):
        se = np.sqrt(1.0 / info + 1.0 / info_c[:, None])
    coef1 = np.hstack([B_X, beta, Gamma])
    s = np.exp(log_s)
    kw_glm = dict(family=opts.family, disp_glm=size, size_factor=s)
    res_1 = _result(X, A, U, coef1, [np.nan], rounds, kw_glm, es or {}, ls)
    Q = _orth_basis(np.hstack([X, A]))                                           # 5.
    res_2 = stage2_result((Y, X, A, log_s, size, Q), s, U, coef1, se, [np.nan], opts,
                          fixed_loadings=True)
    return res_1, res_2
