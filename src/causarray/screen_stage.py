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
from .preprocessing import size_factors_from_offset

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
    """

    pool: np.ndarray
    genes: np.ndarray
    B_X: np.ndarray
    Gamma: np.ndarray
    U: np.ndarray
    scale: np.ndarray
    log_s: np.ndarray
    size: np.ndarray

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
          if k in ("kwargs_es_1", "kwargs_ls_1", "random_state", "A_init", "verbose")}
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
    return ScreenStage(pool=np.asarray(pool), genes=genes, B_X=B_X, Gamma=Gamma * scale,
                       U=U / scale, scale=scale, log_s=log_s, size=size)


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


def _pool_scale_log_s(Y, offset, ctrl_pos: np.ndarray, pool_log_s: np.ndarray) -> np.ndarray:
    """The batch's log size factors on the pool fit's scale: the controls keep theirs;
    the treated cells' batch factors move by the controls' median difference."""
    log_s = np.log(size_factors_from_offset(Y, offset))
    log_s = log_s - np.median(log_s[ctrl_pos] - pool_log_s)
    log_s[ctrl_pos] = pool_log_s
    return log_s


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
    the current factors, then the treated cells' factors at the coefficients (Fisher
    scoring, standard-normal prior), each group's mean factor moved into its
    coefficients; 4. the coefficients' standard errors,
    ``sqrt(1 / I_kj + 1 / I_Cj)`` (the treated cells' Fisher information and the
    controls', whose mean the coefficient is relative to); 5. stage 2.
    """
    n, p = Y.shape
    a = A.shape[1]
    B_X, Gamma, size, scale = stage.B_X, stage.Gamma, stage.size, stage.scale
    alpha = alpha_from_size(size) * np.ones(p)
    group = onehot_groups(A)
    treated = np.flatnonzero(group >= 0)
    log_s = _pool_scale_log_s(Y, offset, ctrl_pos, stage.log_s[pool_pos])      # 1.
    U = np.zeros((n, Gamma.shape[1]))                                            # 2.
    U[ctrl_pos] = stage.U[pool_pos]
    Yt, Xt, At, gt = Y[treated], X[treated], A[treated], group[treated]
    fixed_t = log_s[treated, None] + Xt @ B_X.T
    Ut = U[treated]
    ref = U[ctrl_pos].mean(axis=0)
    for _ in range(rounds):                                                      # 3.
        beta, _ = group_treatment_coefs(Yt, fixed_t + Ut @ Gamma.T, gt, a, alpha)
        Ut = pretreatment_factors(Yt, Xt, At, log_s[treated], size, B_X, beta, Gamma / scale,
                                  Ut * scale, np.ones(p, bool)) / scale
        _centre_groups(Ut, beta, gt, Gamma, ref)
    beta, info = group_treatment_coefs(Yt, fixed_t + Ut @ Gamma.T, gt, a, alpha)
    del fixed_t
    U[treated] = Ut
    eta_c = log_s[ctrl_pos, None] + X[ctrl_pos] @ B_X.T + U[ctrl_pos] @ Gamma.T   # 4.
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
