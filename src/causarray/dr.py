"""Doubly robust (AIPW) estimation of causal log fold changes (docs/math.md#doubly-robust-lfc).

For treatment k the population is I_k = controls ∪ {cells with A_k = 1}.  With
outcome-model counterfactual means mu0_ij, mu1_ijk (an NB GLM on ``[W | A]``),
propensity scores pi_ik (a logistic model on ``W_A``) and size factors s_i, the
AIPW pseudo-outcomes on the normalised scale are::

    phi_ij(1) = [mu1 + A_ik / pi_ik       (y_ij - mu1)] / s_i
    phi_ij(0) = [mu0 + (1 - A_ik)/(1 - pi_ik) (y_ij - mu0)] / s_i

Their means over I_k estimate E[Y(1)], E[Y(0)]; the LFC is
``tau = log(max(m1, thres_diff) / max(m0, thres_diff))`` with influence values
``eta = phi(1)/tau_1 - phi(0)/tau_0`` and delta-method variance ``Var(eta)/n_k``
(pooled, with the small-sample factor n_k/(n_k - q) for in-sample nuisances, t
reference with n_k - q df) or Welch ('unequal').  A Poisson variance floor keeps
chance all-zero arms from producing tiny standard errors.

How it is computed
------------------
Nothing of size n x p x a is materialised.  The outcome model's means with every
indicator off are stored once, genes major, with the cells sorted by treatment and
the controls last (:class:`CounterfactualMeans`); treatment k only multiplies them by
``exp(effect_k)``.  Every statistic above is a function of a few per-gene sums over
the cells of I_k (sums of phi(1), phi(0), their squares and cross products, and the
sums that enter the outcome-model variance term), so the genes are streamed in
chunks and, per chunk, all treatments are handled at once:

* the treated cells of treatment k form a block of their own;
* the controls are shared by every treatment.  Their pseudo-outcomes are
  ``phi(1) = exp(effect_k) q`` and ``phi(0) = q + w_k d`` with ``q = mu0/s``,
  ``d = (y - mu0)/s`` independent of k and ``w_k = 1/(1 - pi_k)``, so every control
  sum of every treatment is a matrix product of a few treatment-free arrays with the
  weights ``[w_1 .. w_a]`` (exact; a gene whose capped means break the product form
  is summed cell by cell instead).

The outcome-model term of the variance (see ``docs/dr.md``) needs, per gene, the
inverse Fisher information and the "meat" sum_i r_i^2 x_i x_i' of the GLM scores; both
are formed once per gene chunk, so the per-treatment cost is O(p q^2).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._validation import (
    LFC_COMPAT_KEYWORDS,
    check_choice,
    check_count_values,
    check_counterfactual_array,
    check_counterfactual_shape,
    check_family,
    check_gene_fold_design,
    check_gene_fold_ids,
    check_gene_fold_shape,
    check_keywords,
    check_mask_shape,
    check_matrix_2d,
    check_positive_int,
    check_recenter_genes,
    check_removed_keywords,
    check_rows_2d,
    check_shape,
    check_shift_variance,
    check_targets,
    check_zero_one,
    parameter_names,
)
from .engine.threads import gene_chunks, map_chunks, run_chunks
from .glm import fit_glm, groups_from_onehot, sym_outer, sym_unpack
from .inference import family_bh, multiple_testing, on_target_pairs
from .preprocessing import size_factors_from_offset
from .propensity import clip_bounds, clip_propensity, fit_propensity, make_folds

logger = logging.getLogger("causarray")

Y_HAT_CAP = 1e5
LOG_MU_BOUNDS = (-30.0, 20.0)     # the outcome model's log means are clipped to this range
EFFECT_BOUND = 30.0               # and its treatment effects to +- this
_AIPW_CHUNK_BYTES = 4 * 2**20     # one genes x cells working array of the AIPW loop
RESULT_COLUMNS = ["gene_names", "tau", "std", "log2fc", "log2fc_se", "stat", "df", "rej",
                  "pvalue", "padj", "pvalue_emp_null_adj", "padj_emp_null_adj",
                  "mean_control", "mean_treated", "estimable", "tested", "n_treated",
                  "n_control", "count_treated", "count_control", "var_floored", "std_raw",
                  "on_target"]


# ----------------------------------------------------------------------------------
# nuisance containers
# ----------------------------------------------------------------------------------
@dataclass
class OutcomeInformation:
    """Per-gene blocks of the outcome GLM's Fisher information and score outer products.

    For the design [W | G] (G one-hot): ``S_inv`` (p x q x q) is the inverse Schur
    complement of the group block, ``F`` (a x p x q) = E_k / D_k and ``D`` (a x p) the
    diagonal group block; then Cov(b) = S_inv, Cov(b, c_k) = -S_inv F_k and
    Var(c_k) = 1/D_k + F_k' S_inv F_k.  ``meat_WW`` (p x q(q+1)/2, packed upper
    triangle), ``meat_WG`` (a x p x q) and ``meat_GG`` (a x p) are the blocks of
    sum_i r_i^2 [w_i; e_g(i)][w_i; e_g(i)]' with r_i = (y_i - mu_i)/(1 + alpha mu_i)
    the cells' GLM scores.
    """

    S_inv: np.ndarray
    F: np.ndarray
    D: np.ndarray
    alpha: np.ndarray          # (p,) NB dispersion of the fit (0 = Poisson)
    groups: np.ndarray         # (n,) group of each cell, -1 for controls
    meat_WW: np.ndarray | None = None
    meat_WG: np.ndarray | None = None
    meat_GG: np.ndarray | None = None

    @classmethod
    def empty(cls, p: int, q: int, a: int, alpha: np.ndarray, groups: np.ndarray):
        return cls(S_inv=np.zeros((p, q, q)), F=np.zeros((a, p, q)), D=np.zeros((a, p)),
                   alpha=alpha, groups=groups, meat_WW=np.zeros((p, q * (q + 1) // 2)),
                   meat_WG=np.zeros((a, p, q)), meat_GG=np.zeros((a, p)))


@dataclass
class CounterfactualMeans:
    """Outcome-model predictions without the n x p x a x 2 tensor.

    ``mu0[j, t]`` is the mean of gene j for cell ``order[t]`` with every indicator off
    (offset included; exp of a log mean clipped to [-30, 20], not yet capped); with
    indicator k on it is ``mu0 * exp(effect[fold, j, k])``.  Both arms are capped at
    ``Y_HAT_CAP`` where used.  Cells are stored sorted by treatment, controls last.
    """

    mu0: np.ndarray            # p x n, genes major, cells in ``order``
    effect: np.ndarray         # K x p x a log effects per fold
    fold: np.ndarray           # n, fold of each cell (original cell order)
    order: np.ndarray          # n, original index of each stored cell
    info: OutcomeInformation | None = None
    alpha: np.ndarray | None = None   # (p,) NB dispersion of the outcome fit, when known

    @property
    def position(self) -> np.ndarray:
        """Stored column of each cell (inverse of ``order``)."""
        pos = np.empty(self.order.size, dtype=np.int64)
        pos[self.order] = np.arange(self.order.size)
        return pos

    @property
    def log_mu0(self) -> np.ndarray:
        """n x p log means with every indicator off (original cell order)."""
        out = np.empty(self.mu0.shape[::-1])
        out[self.order] = np.log(self.mu0).T
        return out

    def arms(self, rows: np.ndarray, cols, k: int):
        """(mu0, mu1) for cells ``rows`` and genes ``cols`` under treatment k, capped at 1e5."""
        cols = np.arange(self.mu0.shape[0])[cols]
        rows = np.asarray(rows)
        m0 = self.mu0[np.ix_(cols, self.position[rows])].T
        eff = self.effect[:, cols, k]
        e = np.exp(eff[0] if eff.shape[0] == 1 else eff[self.fold[rows]])
        return np.minimum(m0, Y_HAT_CAP), np.minimum(m0 * e, Y_HAT_CAP)

    def to_array(self) -> np.ndarray:
        """The full n x p x a x 2 tensor of counterfactual means (memory heavy; small problems).

        See docs/math.md#outcome-model.
        """
        p, n = self.mu0.shape
        a = self.effect.shape[2]
        out = np.empty((n, p, a, 2))
        for k in range(a):
            mu0, mu1 = self.arms(np.arange(n), slice(None), k)
            out[:, :, k, 0], out[:, :, k, 1] = mu0, mu1
        return out

    def _factor(self, cols: slice, k: int, fold_s: np.ndarray, cells) -> np.ndarray:
        """exp(effect_k) for genes ``cols`` and stored cells ``cells``: (m, 1) or (m, c)."""
        eff = self.effect[:, cols, k]
        if eff.shape[0] == 1:
            return np.exp(eff[0])[:, None]
        return np.exp(eff[fold_s[cells]].T)


def cell_order(A: np.ndarray) -> np.ndarray:
    """Stable order of the cells by their (first) treatment, the controls last.

    For one-hot ``A`` this is the order of the GLM engine's design (each treatment's
    cells contiguous, then the controls).
    """
    a = A.shape[1]
    treated = (A != 0).any(axis=1)
    key = np.where(treated, np.argmax(A != 0, axis=1), a)
    return np.argsort(key, kind="stable")


def _as_block(idx: np.ndarray):
    """A slice when the sorted indices ``idx`` are contiguous (a view instead of a copy)."""
    if idx.size == 0:
        return slice(0, 0)
    if idx[-1] - idx[0] + 1 == idx.size:
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _block_size(sel, n: int) -> int:
    return len(range(n)[sel]) if isinstance(sel, slice) else int(np.size(sel))


# ----------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------
def _prepare(Y, W, A, W_A, mask):
    gene_names = [str(c) for c in Y.columns] if isinstance(Y, pd.DataFrame) else None
    trt_names = [str(c) for c in A.columns] if isinstance(A, pd.DataFrame) else None
    Y = Y.to_numpy(dtype=float) if isinstance(Y, pd.DataFrame) else Y
    Y = Y.tocsr().astype(float) if sp.issparse(Y) else np.asarray(Y, dtype=float)
    check_matrix_2d(Y, "Y", "genes")
    check_count_values(Y)
    n, p = Y.shape
    A = np.asarray(A, dtype=float)
    if A.ndim == 1:
        A = A[:, None]
    W = np.asarray(W, dtype=float)
    W_A = W if W_A is None else np.asarray(W_A, dtype=float)
    for M, name in ((W, "W"), (A, "A"), (W_A, "W_A")):
        check_rows_2d(M, n, name)
    check_zero_one(A, for_lfc=True)
    a = A.shape[1]
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        check_mask_shape(mask, A.shape)
    gene_names = gene_names or [f"gene_{j}" for j in range(p)]
    trt_names = trt_names or [str(k) for k in range(a)]
    return Y, W, A, W_A, mask, gene_names, trt_names


class _GeneBlocks:
    """Genes-major dense blocks of the counts with the cells in a given order."""

    def __init__(self, Y, order: np.ndarray):
        self.order = order
        if sp.issparse(Y):
            self.Yt = sp.csr_matrix(Y[order].T)
            self.Y = None
        else:
            self.Y, self.Yt = Y, None

    def __call__(self, cols: slice) -> np.ndarray:
        if self.Yt is not None:
            return self.Yt[cols].toarray().astype(np.float64, copy=False)
        return np.ascontiguousarray(self.Y[:, cols].T[:, self.order], dtype=np.float64)


# ----------------------------------------------------------------------------------
# nuisance models
# ----------------------------------------------------------------------------------
def fit_outcome_model(Y, W: np.ndarray, A: np.ndarray, log_s: np.ndarray, fold: np.ndarray,
                      family: str = "nb", disp_glm=None, init=None,
                      size_at_init: bool = False, max_iter: int = 100) -> CounterfactualMeans:
    """Joint count GLM of Y on [W | A] per training fold; out-of-fold counterfactual means.

    ``init`` (p x (d + a), columns as ``[W | A]``) warm-starts the GLM when there are no
    folds; the fit (dispersion recipe included) is the same, only fewer Newton steps
    are needed from a good start.  ``size_at_init``: ``init`` is an NB fit of this
    model and the MoM sizes are taken at its means (:func:`causarray.glm.fit_glm`).
    ``max_iter``: Newton steps of the (final) fit, see ``LFC(outcome_steps=)``.
    """
    n, p = Y.shape
    K = int(fold.max()) + 1
    d, a = W.shape[1], A.shape[1]
    order = cell_order(A)
    Ws, ls, fold_s = W[order], log_s[order], fold[order]
    mu0 = np.empty((p, n))
    effect = np.zeros((K, p, a))
    size = None
    for f in range(K):
        train = fold != f if K > 1 else slice(None)
        fit = fit_glm(Y[train], W[train], A[train], family=family, size=disp_glm,
                      offset=log_s[train], init=init if K == 1 else None, compute_se=False,
                      size_at_init=size_at_init and K == 1,
                      max_iter=max_iter if K == 1 and init is not None else 100)
        logger.debug("outcome GLM (fold %d): %d of %d genes converged, mean %.1f Newton steps",
                     f, int(fit.converged.sum()), p, float(np.mean(fit.n_iter)))
        B = fit.coef[:, :d]
        effect[f] = fit.coef[:, d:d + a]
        if K == 1:
            _fill_means(mu0, B, Ws, ls)
        else:
            test = np.flatnonzero(fold_s == f)
            mu0[:, test] = np.exp(np.clip(B @ Ws[test].T + ls[test], *LOG_MU_BOUNDS))
        size = fit.size
    alpha = np.where(np.isfinite(size), 1.0 / np.where(np.isfinite(size), size, 1.0), 0.0)
    return CounterfactualMeans(mu0=mu0, effect=np.clip(effect, -EFFECT_BOUND, EFFECT_BOUND),
                               fold=fold, order=order, alpha=alpha)


def _fill_means(mu0: np.ndarray, B: np.ndarray, Ws: np.ndarray, ls: np.ndarray) -> None:
    """``mu0 = exp(clip(B Ws' + ls))`` (genes x cells) in place, gene chunks on the
    pass's threads."""
    def fill(cols: slice) -> None:                     # writes the chunk's own rows
        blk = mu0[cols]
        np.matmul(B[cols], Ws.T, out=blk)
        blk += ls
        np.clip(blk, *LOG_MU_BOUNDS, out=blk)
        np.exp(blk, out=blk)

    run_chunks(fill, gene_chunks(mu0.shape[0], _chunk_genes(mu0.shape[1])))


def _coerce_Y_hat(Y_hat, n: int, p: int, a: int) -> CounterfactualMeans:
    if isinstance(Y_hat, CounterfactualMeans):
        check_counterfactual_shape(Y_hat.mu0.shape, Y_hat.effect.shape[2], n, p, a)
        return Y_hat
    arr = np.asarray(Y_hat, float)
    check_counterfactual_array(arr, n, p, a)
    with np.errstate(divide="ignore", invalid="ignore"):
        eff = np.log(arr[:, :, :, 1]) - np.log(arr[:, :, :, 0])
    # per-cell effects are stored as n folds of one cell each
    return CounterfactualMeans(mu0=np.ascontiguousarray(arr[:, :, 0, 0].T), effect=eff,
                               fold=np.arange(n), order=np.arange(n))


# ----------------------------------------------------------------------------------
# per-gene sums over blocks of cells
# ----------------------------------------------------------------------------------
def _group_sums(V: np.ndarray, grp, a: int) -> np.ndarray:
    """Per-group row sums (a x m) of V (m x c) for the cells' groups ``grp``: None (no
    group, all zero), one group for every cell, or one group per cell."""
    out = np.zeros((a, V.shape[0]))
    if grp is None:
        return out
    if isinstance(grp, (int, np.integer)):
        out[grp] = V.sum(axis=1)
        return out
    onehot = (np.asarray(grp)[:, None] == np.arange(a)[None, :]).astype(float)
    return (V @ onehot).T


def _block_sums(y: np.ndarray, mu0_raw: np.ndarray, e: np.ndarray, inv_s: np.ndarray,
                wt: np.ndarray, *, treated: bool, R: np.ndarray | None = None,
                W: np.ndarray | None = None, groups=None, a: int = 0,
                fourth: bool = False) -> dict:
    """Per-gene sums over one block of cells of one treatment, cell by cell.

    A block holds only treated cells (``wt`` = 1/pi) or only untreated ones
    (``wt`` = 1/(1 - pi)).  ``y``, ``mu0_raw`` are genes x cells, ``e`` the factor
    exp(effect_k) ((m, 1) or (m, c)).  Returns the sums of phi(1), phi(0), their squares
    and product, of y and of 1/s; with ``R`` (GLM scores) and ``W`` also the sums that
    enter the outcome-model variance term (``groups``: the cells' treatment groups, see
    :func:`_group_sums`); with ``fourth`` (a treated block) the third and fourth power
    sums of :func:`_cross_power_sums`, for the degrees of freedom (:func:`weighted_df`).
    """
    mu_b = mu0_raw * e if treated else mu0_raw.copy()      # the arm of this block's cells
    np.minimum(mu_b, Y_HAT_CAP, out=mu_b)
    mu_o = np.minimum(mu0_raw if treated else mu0_raw * e, Y_HAT_CAP)
    pb = mu_b
    pb *= (1.0 - wt) * inv_s                               # (1 - w) mu / s
    phi_b = y * (wt * inv_s)
    phi_b += pb                                            # [mu + w (y - mu)] / s
    phi_o = np.multiply(mu_o, inv_s, out=mu_o)
    n = y.shape[1]
    sb, so = phi_b.sum(axis=1), phi_o.sum(axis=1)
    sbb = np.einsum("ij,ij->i", phi_b, phi_b)
    soo = np.einsum("ij,ij->i", phi_o, phi_o)
    sbo = np.einsum("ij,ij->i", phi_b, phi_o)
    wt1 = np.broadcast_to(np.asarray(wt, dtype=float), (n,))
    out = dict(n=n, sy=y.sum(axis=1), sinv=float(inv_s.sum()), w1=float(wt1.sum()),
               w2=float(np.dot(wt1, wt1)))
    if treated:
        out.update(s1=sb, s0=so, s11=sbb, s00=soo, s10=sbo)
        if fourth:
            out["power"] = _cross_power_sums(phi_b, phi_o)
    else:
        out.update(s1=so, s0=sb, s11=soo, s00=sbb, s10=sbo)
    if R is not None:
        bR, oR = phi_b * R, phi_o * R
        PbW, PoW = bR @ W, oR @ W
        Pbg, Pog = _group_sums(bR, groups, a), _group_sums(oR, groups, a)
        if treated:
            out.update(r1W=pb @ W, r0W=phi_o @ W, r1s=pb.sum(axis=1),
                       P1W=PbW, P0W=PoW, P1g=Pbg, P0g=Pog)
        else:
            out.update(r1W=phi_o @ W, r0W=pb @ W, r1s=so, P1W=PoW, P0W=PbW, P1g=Pog, P0g=Pbg)
        out.update(RW=R @ W, Rg=_group_sums(R, groups, a))
    return out


def _cross_power_sums(phi1: np.ndarray, phi0: np.ndarray) -> np.ndarray:
    """Per-gene sums ``sum_i phi1^j phi0^(m - j)`` for m = 3, 4 (rows: (3,0), (2,1),
    (1,2), (0,3), (4,0), (3,1), (2,2), (1,3), (0,4)), from which the third and fourth
    moments of eta = a1 phi1 - a0 phi0 follow for any a1, a0 (:func:`_eta_central4`)."""
    p1 = [None, phi1, phi1 * phi1]
    p1 += [p1[2] * phi1, p1[2] * p1[2]]
    p0 = [None, phi0, phi0 * phi0]
    p0 += [p0[2] * phi0, p0[2] * p0[2]]
    rows = []
    for m in (3, 4):
        for j in range(m, -1, -1):
            if j == m:
                rows.append(p1[m].sum(axis=1))
            elif j == 0:
                rows.append(p0[m].sum(axis=1))
            else:
                rows.append(np.einsum("ij,ij->i", p1[j], p0[m - j]))
    return np.stack(rows)


def _eta_central4(b: dict, a1: np.ndarray, a0: np.ndarray) -> np.ndarray | None:
    """``sum_i (eta_i - mean eta)^4`` over a block with :func:`_cross_power_sums`
    (None when the block has none)."""
    P = b.get("power")
    if P is None or b["n"] < 2:
        return None
    n = b["n"]
    S1 = b["s1"] * a1 - b["s0"] * a0
    S2 = b["s11"] * a1 * a1 - 2.0 * b["s10"] * a1 * a0 + b["s00"] * a0 * a0
    S3 = a1 ** 3 * P[0] - 3 * a1 ** 2 * a0 * P[1] + 3 * a1 * a0 ** 2 * P[2] - a0 ** 3 * P[3]
    S4 = (a1 ** 4 * P[4] - 4 * a1 ** 3 * a0 * P[5] + 6 * a1 ** 2 * a0 ** 2 * P[6]
          - 4 * a1 * a0 ** 3 * P[7] + a0 ** 4 * P[8])
    m = S1 / n
    return np.maximum(S4 - 4 * m * S3 + 6 * m * m * S2 - 3 * n * m ** 4, 0.0)


class _ControlSums:
    """The control cells' sums for every treatment at once (product form).

    With ``q = mu0/s`` and ``d = (y - mu0)/s`` (mu0 capped) and, for treatment k,
    weights ``w_k = 1/(1 - pi_k)`` and factor ``e_k = exp(effect_k)``, the controls'
    pseudo-outcomes are ``phi(1) = e_k q`` and ``phi(0) = q + w_k d`` as long as
    ``mu0 e_k`` stays below the cap.  Every sum of :func:`_block_sums` is then a
    product of treatment-free arrays with the weight matrix; genes where the cap binds
    are summed cell by cell.
    """

    def __init__(self, y, mu0_raw, inv_s, w0: np.ndarray, R=None, W=None, Z=None, a=0):
        self.y, self.mu0_raw, self.inv_s, self.w0, self.R, self.W = y, mu0_raw, inv_s, w0, R, W
        self.a = a
        mu0 = np.minimum(mu0_raw, Y_HAT_CAP)
        self.mu0_max = mu0_raw.max(axis=1) if mu0_raw.shape[1] else np.zeros(mu0_raw.shape[0])
        q = np.multiply(mu0, inv_s, out=mu0)
        d = np.subtract(y, np.minimum(mu0_raw, Y_HAT_CAP))
        d *= inv_s
        self.n, self.sinv = y.shape[1], float(inv_s.sum())
        self.w1 = w0.sum(axis=0)                           # per treatment, for the df
        self.w2 = (w0 * w0).sum(axis=0)
        self.sy = y.sum(axis=1)
        self.sq = q.sum(axis=1)
        self.sqq = np.einsum("ij,ij->i", q, q)
        self.dw = d @ w0                                   # m x a
        self.qdw = (q * d) @ w0
        d2 = np.multiply(d, d)
        self.ddw = d2 @ (w0 * w0)
        del d2
        if R is not None:
            qZ = (q @ Z).reshape(q.shape[0], a, -1)       # sum_i w_ik q_i x_i
            self.qW = q @ W
            self.qZ = qZ
            qR = np.multiply(q, R)
            self.qRW = qR @ W
            del qR
            dR = np.multiply(d, R, out=d)
            self.dRZ = (dR @ Z).reshape(q.shape[0], a, -1)  # sum_i w_ik d_i r_i x_i
            self.RW = R @ W

    def sums(self, k: int, e: np.ndarray) -> dict:
        """The sums of :func:`_block_sums` for treatment k (``e``: (m,) factors)."""
        sqq, qdw = self.sqq, self.qdw[:, k]
        out = dict(n=self.n, sy=self.sy, sinv=self.sinv, w1=float(self.w1[k]),
                   w2=float(self.w2[k]), s1=e * self.sq,
                   s0=self.sq + self.dw[:, k], s11=e * e * sqq,
                   s00=sqq + 2.0 * qdw + self.ddw[:, k], s10=e * (sqq + qdw))
        if self.R is not None:
            zeros = np.zeros((self.a, e.size))
            out.update(r1W=e[:, None] * self.qW, r0W=self.qW - self.qZ[:, k],
                       r1s=out["s1"], P1W=e[:, None] * self.qRW,
                       P0W=self.qRW + self.dRZ[:, k], P1g=zeros, P0g=zeros, RW=self.RW,
                       Rg=zeros)
        bad = (self.mu0_max * np.maximum(e, 1.0)) > Y_HAT_CAP
        if bad.any():
            direct = _block_sums(self.y[bad], self.mu0_raw[bad], e[bad, None], self.inv_s,
                                 self.w0[:, k], treated=False,
                                 R=None if self.R is None else self.R[bad], W=self.W,
                                 groups=None, a=self.a)
            for key, val in direct.items():
                if isinstance(val, np.ndarray):
                    out[key] = out[key].copy()
                    if val.ndim == 2 and val.shape[0] == self.a and key.endswith("g"):
                        out[key][:, bad] = val
                    else:
                        out[key][bad] = val
        return out


def _add_sums(b1: dict, b0: dict) -> dict:
    return {key: b1[key] + b0[key] for key in b1 if key in b0}


@dataclass
class _ChunkInformation:
    """The blocks of :class:`OutcomeInformation` for one chunk of genes (meat unpacked)."""

    S_inv: np.ndarray
    F: np.ndarray
    D: np.ndarray
    meat_WW: np.ndarray
    meat_WG: np.ndarray
    meat_GG: np.ndarray

    @classmethod
    def of(cls, info: OutcomeInformation, cols: slice) -> _ChunkInformation:
        q = info.S_inv.shape[-1]
        return cls(info.S_inv[cols], info.F[:, cols], info.D[:, cols],
                   sym_unpack(info.meat_WW[cols], q), info.meat_WG[:, cols],
                   info.meat_GG[:, cols])


def _nuisance_term(tot: dict, info: _ChunkInformation, k: int, n_k: int,
                   a1: np.ndarray, a0: np.ndarray, eta_sum: np.ndarray) -> np.ndarray:
    """Outcome-model term of Var(tau) from the stacked estimating equations.

    tau_hat - tau ≈ mean(eta) + g' I^-1 sum_i psi_i with psi_i = r_i [w_i; e_g(i)] the
    cells' GLM scores, I the Fisher information and g = d tau / d(b, c_k).  With
    zeta_i = u' psi_i (u = I^-1 g, one-hot block inverse) the variance gains
    sum_i zeta_i^2 (all cells; = u' meat u) + 2 sum_{i in I_k} (eta_i - mean eta)/n_k zeta_i.
    """
    g_w = (tot["r1W"] * a1[:, None] - tot["r0W"] * a0[:, None]) / n_k
    g_c = tot["r1s"] * a1 / n_k
    F = info.F
    u_b = (info.S_inv @ (g_w - g_c[:, None] * F[k])[:, :, None])[:, :, 0]
    u_c = -np.einsum("amq,mq->am", F, u_b)
    u_c[k] += g_c / info.D[k]
    Mu = (info.meat_WW @ u_b[:, :, None])[:, :, 0]
    zz = (np.einsum("mq,mq->m", u_b, Mu)
          + 2.0 * np.einsum("am,amq,mq->m", u_c, info.meat_WG, u_b)
          + np.einsum("am,am->m", u_c * u_c, info.meat_GG))
    ebar = eta_sum / n_k
    cw = tot["P1W"] * a1[:, None] - tot["P0W"] * a0[:, None] - ebar[:, None] * tot["RW"]
    cg = tot["P1g"] * a1 - tot["P0g"] * a0 - ebar * tot["Rg"]
    cross = (np.einsum("mq,mq->m", cw, u_b) + np.einsum("am,am->m", cg, u_c)) / n_k
    return zz + 2.0 * cross


def weighted_df(b1: dict, b0: dict, eta_moments, a=None) -> np.ndarray:
    """Satterthwaite degrees of freedom of the AIPW variance under unequal weights.

    The variance estimate is a sum of the two arms' squared influence values, and in
    arm g each cell's value carries its inverse-propensity weight w_i.  A weighted sum
    of squares ``sum w_i^2 e_i^2`` of iid e_i has the variance of a chi-square with
    ``nu = (sum w_i^2)^2 / sum w_i^4`` degrees of freedom (Kish's effective sample
    size of the squared weights), so the arms' parts ``V_g`` combine as in Welch's
    test::

        df = (V_1 + V_0)^2 / (V_1^2 / (nu_1 - 1) + V_0^2 / (nu_0 - 1)).

    With equal weights (a randomised design) ``nu_g = n_g`` and this is Welch's df; a
    few cells of extreme propensity make it small, and the t reference then carries
    the extra uncertainty of a variance estimated from few effective cells (see
    ``docs/dr.md``).

    Kish's nu assumes normal influence values.  Counts are skewed and their weighted
    residuals heavy-tailed, so where a treated block carries its third and fourth power
    sums (``a = (a1, a0)`` given, comparison sets of a high-MOI screen) the arm's
    ``Var(V_g)`` is also estimated directly, ``sum_i (e_i^2 - V_g / n_g)^2``, and the
    larger of the two is used (docs/math.md#high-moi).
    """
    parts = []
    for b in (b1, b0):
        s, s2 = eta_moments(b)
        n = max(b["n"], 1)
        V = np.maximum(s2 - s * s / n, 0.0)
        nu = b["w1"] ** 2 / b["w2"] if b["w2"] > 0 else 0.0
        half_var = V ** 2 / max(nu - 1.0, 1.0)          # Var(V) / 2 under normal values
        c4 = _eta_central4(b, *a) if a is not None else None
        if c4 is not None:      # Var(V) = sum_i (e_i^2 - V/n)^2 = sum e^4 - V^2/n
            half_var = np.maximum(half_var, 0.5 * np.maximum(c4 - V * V / n, 0.0))
        parts.append((V, half_var))
    (V1, h1), (V0, h0) = parts
    with np.errstate(divide="ignore", invalid="ignore"):
        df = (V1 + V0) ** 2 / (h1 + h0)
    return np.where(np.isfinite(df), np.maximum(df, 2.0), np.inf)


def _estimand_from_sums(b1: dict, b0: dict, opts: _AIPWOptions,
                        info: _ChunkInformation | None = None, k: int = 0,
                        alpha: np.ndarray | None = None) -> dict:
    """Means, LFC, variance, df and floor of one treatment for a chunk of genes
    (``alpha``: the outcome model's NB dispersion of the chunk's genes, for the NB
    floor)."""
    thres_diff, usevar, n_params = opts.thres_diff, opts.usevar, opts.n_params
    in_sample, bias_correction = opts.in_sample, opts.bias_correction
    tot = _add_sums(b1, b0)
    n1, n0 = b1["n"], b0["n"]
    n_k = n1 + n0
    m1, m0 = tot["s1"] / n_k, tot["s0"] / n_k
    with np.errstate(divide="ignore", invalid="ignore"):
        o1 = b1["sy"] / n1 if n1 else np.full(m1.shape, np.nan)
        o0 = b0["sy"] / n0 if n0 else np.full(m0.shape, np.nan)
    est = (np.isfinite(m0) & np.isfinite(m1) & ((m1 > 0) | (o1 == 0)) & ((m0 > 0) | (o0 == 0))
           & ((o1 > 0) | (o0 > 0)))
    t1 = np.where(est, np.maximum(m1, thres_diff), 1.0)
    t0 = np.where(est, np.maximum(m0, thres_diff), 1.0)
    a1, a0 = 1.0 / t1, 1.0 / t0

    def eta_moments(b):
        s = b["s1"] * a1 - b["s0"] * a0
        s2 = b["s11"] * a1 * a1 - 2.0 * b["s10"] * a1 * a0 + b["s00"] * a0 * a0
        return s, s2

    def sample_var(s, s2, n):   # ddof = 1 from sums (the mean of eta is ~0: no cancellation)
        if n < 2:
            return np.full(s.shape, np.nan)
        return np.maximum(s2 - s * s / n, 0.0) / (n - 1)

    es, es2 = eta_moments(tot)
    with np.errstate(divide="ignore", invalid="ignore"):
        if usevar == "pooled":
            var = sample_var(es, es2, n_k) / n_k
            df = np.minimum(float(max(n_k - n_params, 2)),
                            weighted_df(b1, b0, eta_moments, (a1, a0)))
            if in_sample:
                var *= n_k / max(n_k - n_params, 2)
        else:
            v1 = sample_var(*eta_moments(b1), n1) / n1 if n1 > 1 else np.full(m1.shape, np.nan)
            v0 = sample_var(*eta_moments(b0), n0) / n0 if n0 > 1 else np.full(m0.shape, np.nan)
            var = v0 + v1
            df = var ** 2 / (v0 ** 2 / max(n0 - 1, 1) + v1 ** 2 / max(n1 - 1, 1))
        if info is not None:
            extra = _nuisance_term(tot, info, k, n_k, a1, a0, es)
            var = var + np.where(est, extra, 0.0)
        floor = (b1["sinv"] / max(n1, 1) ** 2) / t1 + (b0["sinv"] / max(n0, 1) ** 2) / t0
        if opts.variance_floor == "nb" and alpha is not None:
            # NB arm means: Var(y/s)/tau^2 = 1/(s tau) + alpha (docs/math.md#variance)
            floor = floor + alpha * (1.0 / max(n1, 1) + 1.0 / max(n0, 1))
        tau = np.log(t1 / t0)
        if bias_correction:
            # second-order delta method: E log(m) ≈ log E(m) - Var(m) / (2 m^2)
            v1 = sample_var(tot["s1"], tot["s11"], n_k) / n_k * a1 * a1
            v0 = sample_var(tot["s0"], tot["s00"], n_k) / n_k * a0 * a0
            # the expansion holds only for small relative variances: skip it where an arm's
            # mean is too noisy (relative variance > 0.25), e.g. near the thres_diff floor
            small = est & (v1 < 0.25) & (v0 < 0.25)
            tau = tau + np.where(small, 0.5 * (v1 - v0), 0.0)
    return dict(m0=m0, m1=m1, o0=o0, o1=o1, tau=tau, var=var, df=df, floor=floor,
                estimable=est, t1=t1, t0=t0, c1=np.asarray(b1["sy"], float),
                c0=np.asarray(b0["sy"], float))


# ----------------------------------------------------------------------------------
# all treatments, streamed over gene chunks
# ----------------------------------------------------------------------------------
def _glm_scores(y: np.ndarray, mufit: np.ndarray, alpha: np.ndarray, out=None):
    """Fisher weights mu/(1 + alpha mu) and scores (y - mu)/(1 + alpha mu), genes x cells."""
    t = np.multiply(mufit, alpha[:, None])
    t += 1.0
    np.reciprocal(t, out=t)
    m = y.shape[0]
    buf = np.empty((2 * m, y.shape[1])) if out is None else out
    w, r = buf[:m], buf[m:]
    np.multiply(mufit, t, out=w)
    np.subtract(y, mufit, out=r)
    r *= t
    return w, r


def _scores_and_gram(y: np.ndarray, mufit: np.ndarray, alpha: np.ndarray,
                     WWs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """GLM weights ``w`` and scores ``R`` (genes x cells) of a gene chunk at ``mufit``,
    their squares ``r2`` and, in one GEMM with the packed outer products ``WWs`` of the
    design, ``G``: rows ``[:m]`` the packed X'WX, rows ``[m:]`` the packed meat."""
    buf = np.empty((2 * y.shape[0], y.shape[1]))
    w, r2 = _glm_scores(y, mufit, alpha, out=buf)
    R = r2.copy()
    r2 *= r2
    return w, R, r2, buf @ WWs


def _group_blocks(w_g: np.ndarray, r2_g: np.ndarray, Ws_g: np.ndarray):
    """``(D, E, F = E / D, meat_WG, meat_GG)`` of one treatment group's cells: the
    diagonal information of its indicator, its cross-information with the design, and
    the score outer products (see :class:`OutcomeInformation`)."""
    D = w_g.sum(axis=1) + 1e-10
    E = w_g @ Ws_g
    return D, E, E / D[:, None], r2_g @ Ws_g, r2_g.sum(axis=1)


def _chunk_information(y: np.ndarray, mufit: np.ndarray, alpha: np.ndarray, Ws: np.ndarray,
                       WWs: np.ndarray, slices: list, info: OutcomeInformation,
                       cols: slice) -> np.ndarray:
    """Fisher information blocks and score outer products of a gene chunk (into ``info``);
    returns the cells' GLM scores (genes x cells)."""
    m = y.shape[0]
    w, R, r2, G = _scores_and_gram(y, mufit, alpha, WWs)
    H = sym_unpack(G[:m], Ws.shape[1])
    info.meat_WW[cols] = G[m:]
    for k, sl in enumerate(slices):
        Dk, Ek, Fk, info.meat_WG[k, cols], info.meat_GG[k, cols] = _group_blocks(
            w[:, sl], r2[:, sl], Ws[sl])
        info.D[k, cols], info.F[k, cols] = Dk, Fk
        H -= Ek[:, :, None] * Fk[:, None, :]
    info.S_inv[cols] = _sym_inverse(H)
    return R


def _sym_inverse(H: np.ndarray) -> np.ndarray:
    """Inverses of a stack of symmetric matrices; pseudo-inverses where (nearly) singular.

    LU inverses are checked by their residual ``max |H H^-1 - I|``; matrices failing the
    check (or singular) get the eigenvalue pseudo-inverse.  (A batched eigendecomposition
    is slow, and pathologically so with multi-threaded BLAS on a busy machine.)
    """
    q = H.shape[-1]
    try:
        inv = np.linalg.inv(H)
        with np.errstate(invalid="ignore", over="ignore"):
            resid = np.abs(H @ inv - np.eye(q)).max(axis=(1, 2))
        bad = ~(resid < 1e-8)
    except np.linalg.LinAlgError:
        inv = np.empty_like(H)
        bad = np.ones(H.shape[0], bool)
    if bad.any():
        inv[bad] = np.linalg.pinv(H[bad], hermitian=True)
    return inv


def _chunk_genes(n: int) -> int:
    return int(max(16, min(1024, _AIPW_CHUNK_BYTES // (8 * max(n, 1)))))


@dataclass(frozen=True)
class _AIPWOptions:
    """How the AIPW estimands are formed; the same for every gene chunk and treatment.

    thres_diff : floor of the arm means before the log.
    usevar : 'pooled' or 'unequal' variance (see :func:`LFC`).
    n_params : q, the outcome model's parameters per comparison (df and small-sample
        factor n_k / (n_k - q)).
    in_sample : the nuisances were fitted on the cells they are evaluated on (K = 1),
        so the pooled variance gets the small-sample factor.
    bias_correction : remove the second-order bias of the log of a ratio of means.
    nuisance_variance : add the outcome-model term of the variance where it applies
        (in-sample one-hot fits).
    variance_floor : 'poisson' (the variance is at least that of Poisson arm means) or
        'nb' (of NB arm means with the outcome model's dispersion; small arms).
    verbose : progress bar over the gene chunks.
    """

    thres_diff: float = 0.01
    usevar: str = "pooled"
    n_params: int = 1
    in_sample: bool = True
    bias_correction: bool = True
    nuisance_variance: bool = True
    variance_floor: str = "poisson"
    verbose: bool = False


class _SortedCells:
    """The cells in the order of ``cm.order`` and, per treatment, its two arms as blocks.

    Treatment k compares its treated cells with the untreated cells eligible for it
    (``mask[:, k]``, or the controls when ``mask`` is None).  ``shared``: every treatment
    uses the same contiguous block of controls (no mask, no cross-fitting), so their
    sums are formed once per gene chunk (:class:`_ControlSums`).
    """

    def __init__(self, A: np.ndarray, s: np.ndarray, pi: np.ndarray,
                 cm: CounterfactualMeans, mask):
        order = cm.order
        self.A, self.inv_s, self.pi = A[order], 1.0 / s[order], pi[order]
        self.fold = cm.fold[order]
        self.groups_unsorted = groups_from_onehot(A)
        self.groups = None if self.groups_unsorted is None else self.groups_unsorted[order]
        control = ~(self.A != 0).any(axis=1)
        elig = mask[order] if mask is not None else control[:, None] | (self.A == 1)
        self.sets = [(_as_block(np.flatnonzero(elig[:, k] & (self.A[:, k] == 1))),
                      _as_block(np.flatnonzero(elig[:, k] & (self.A[:, k] != 1))))
                     for k in range(A.shape[1])]
        self.ctrl = _as_block(np.flatnonzero(control))
        self.shared = (mask is None and cm.effect.shape[0] == 1
                       and isinstance(self.ctrl, slice) and self.ctrl.stop - self.ctrl.start > 0)
        self.masked = mask is not None


class _OutcomeTerm:
    """Per-chunk inputs of the outcome-model variance term (in-sample one-hot fits).

    Holds the sorted design ``Ws`` and the treatment groups' blocks; the per-gene
    information (:class:`OutcomeInformation`) is taken from ``cm.info`` or, the first
    time, accumulated chunk by chunk (``need``) and stored back by the caller.
    """

    def __init__(self, W: np.ndarray, cells: _SortedCells, cm: CounterfactualMeans,
                 p: int, a: int):
        self.Ws = W[cm.order]
        self.gslices = [_as_block(np.flatnonzero(cells.groups == k)) for k in range(a)]
        self.need = cm.info is None
        if self.need:
            self.info = OutcomeInformation.empty(p, W.shape[1], a, cm.alpha,
                                                 cells.groups_unsorted)
            self.WWs = sym_outer(self.Ws)
        else:
            self.info, self.WWs = cm.info, None
        self.alpha = self.info.alpha

    @staticmethod
    def applies(W, cells: _SortedCells, cm: CounterfactualMeans, nuisance_variance: bool):
        return bool(nuisance_variance and W is not None and cells.groups is not None
                    and cm.effect.shape[0] == 1 and (cm.info is not None or cm.alpha is not None))

    def scores(self, y: np.ndarray, cm: CounterfactualMeans, cols: slice) -> np.ndarray:
        """GLM scores of the chunk's genes (genes x cells); fills the information first
        when it is needed."""
        mufit = cm.mu0[cols].copy()
        for k, sl in enumerate(self.gslices):
            mufit[:, sl] *= np.exp(cm.effect[0, cols, k])[:, None]
        np.minimum(mufit, Y_HAT_CAP, out=mufit)
        if self.need:
            return _chunk_information(y, mufit, self.alpha[cols], self.Ws, self.WWs,
                                      self.gslices, self.info, cols)
        return _glm_scores(y, mufit, self.alpha[cols])[1]


class _MultiHotTerm:
    """The outcome-model variance term when a cell may carry several treatments
    (high MOI, ``mask`` given): for treatment k the information of ``[W | A_k]``.

    The GLM scores and weights are those of the fitted means (every indicator a cell
    carries); the information is ``sum_i w_i x_i x_i'`` over all cells with
    ``x_i = [W_i, A_ik]``, i.e. one group (k's carriers) per treatment.  The batch's
    other indicators, also in the fit, are left out of the information, an
    approximation (given ``W`` they are nearly uncorrelated with A_k) whose effect was
    measured on simulations, not derived (docs/math.md#high-moi).  Formed chunk by
    chunk, never stored.
    """

    def __init__(self, W: np.ndarray, cells: _SortedCells, cm: CounterfactualMeans):
        self.Ws = W[cm.order]
        self.WWs = sym_outer(self.Ws)
        self.carried = (cells.A != 0).astype(float).T      # a x cells (sorted)
        self.alpha = cm.alpha
        self.q = W.shape[1]

    @staticmethod
    def applies(W, cells: _SortedCells, cm: CounterfactualMeans, nuisance_variance: bool):
        return bool(nuisance_variance and W is not None and cells.groups is None
                    and cells.masked and cm.effect.shape[0] == 1 and cm.alpha is not None)

    def chunk(self, y: np.ndarray, mu0_raw: np.ndarray, cm: CounterfactualMeans,
              cols: slice):
        """(scores R, weights w, squared scores r2, H_WW, packed meat_WW) of the chunk's
        genes at their fitted means (every indicator a cell carries on)."""
        mufit = mu0_raw * np.exp(cm.effect[0, cols] @ self.carried)
        np.minimum(mufit, Y_HAT_CAP, out=mufit)
        m = y.shape[0]
        w, R, r2, G = _scores_and_gram(y, mufit, self.alpha[cols], self.WWs)
        return R, w, r2, sym_unpack(G[:m], self.q), G[m:]

    def information(self, k: int, cells: _SortedCells, parts) -> _ChunkInformation:
        """Treatment k's blocks (one group: its carriers)."""
        _, w, r2, H_WW, meat_WW = parts
        car = cells.sets[k][0]
        Dk, Ek, Fk, meat_WG, meat_GG = _group_blocks(w[:, car], r2[:, car], self.Ws[car])
        return _ChunkInformation(
            S_inv=_sym_inverse(H_WW - Ek[:, :, None] * Fk[:, None, :]), F=Fk[None],
            D=Dk[None], meat_WW=sym_unpack(meat_WW, self.q), meat_WG=meat_WG[None],
            meat_GG=meat_GG[None])


_ESTIMAND_KEYS = ("m0", "m1", "o0", "o1", "tau", "var", "df", "floor", "t1", "t0", "c1", "c0")


def _arm_sums(y: np.ndarray, mu0_raw: np.ndarray, cm: CounterfactualMeans, cols: slice,
              k: int, cells: _SortedCells, R, term: _OutcomeTerm | _MultiHotTerm | None,
              controls: _ControlSums | None, a: int) -> tuple[dict, dict]:
    """Per-gene sums of treatment k's treated arm and untreated arm for one gene chunk."""
    trt, unt = cells.sets[k]

    def part(rows):
        return None if R is None else R[:, rows]

    def design(rows):
        return None if term is None else term.Ws[rows]

    trt_groups = unt_groups = None
    n_groups = a
    if isinstance(term, _MultiHotTerm):         # one group per treatment: its carriers
        trt_groups, n_groups = 0, 1
    elif term is not None:
        trt_groups = cells.groups[trt] if cells.masked else k
        unt_groups = cells.groups[unt]
    b1 = _block_sums(y[:, trt], mu0_raw[:, trt], cm._factor(cols, k, cells.fold, trt),
                     cells.inv_s[trt], 1.0 / cells.pi[trt, k], treated=True, R=part(trt),
                     W=design(trt), groups=trt_groups, a=n_groups, fourth=cells.masked)
    if controls is not None:
        return b1, controls.sums(k, np.exp(cm.effect[0, cols, k]))
    b0 = _block_sums(y[:, unt], mu0_raw[:, unt], cm._factor(cols, k, cells.fold, unt),
                     cells.inv_s[unt], 1.0 / (1.0 - cells.pi[unt, k]), treated=False,
                     R=part(unt), W=design(unt), groups=unt_groups, a=n_groups)
    return b1, b0


def _aipw_estimands(Y, A: np.ndarray, W: np.ndarray | None, s: np.ndarray, pi: np.ndarray,
                    cm: CounterfactualMeans, mask, opts: _AIPWOptions) -> dict:
    """Estimands of every treatment and gene: (a, p) arrays ``m0, m1, o0, o1, tau, var,
    df, floor, estimable, t1, t0`` and the raw arm count sums ``c1, c0``, plus ``n0, n1``
    per treatment.

    Steps: (1) sort the cells and form each treatment's arms; (2) set up the
    outcome-model variance term if it applies; (3) per gene chunk, the GLM scores, the
    shared control sums, then per treatment the arm sums and the estimands from them.
    """
    from tqdm.auto import tqdm

    n, p = Y.shape
    a = A.shape[1]
    cells = _SortedCells(A, s, pi, cm, mask)                                     # (1)
    term = None                                                                  # (2)
    if _OutcomeTerm.applies(W, cells, cm, opts.nuisance_variance):
        term = _OutcomeTerm(W, cells, cm, p, a)
    elif _MultiHotTerm.applies(W, cells, cm, opts.nuisance_variance):
        term = _MultiHotTerm(W, cells, cm)
    ctrl = cells.ctrl
    Z = None
    if cells.shared:
        w0_ctrl = 1.0 / (1.0 - cells.pi[ctrl])                  # n_c x a
        if term is not None:
            W_c = term.Ws[ctrl]
            Z = (w0_ctrl[:, :, None] * W_c[:, None, :]).reshape(W_c.shape[0], -1)

    out = {key: np.empty((a, p)) for key in _ESTIMAND_KEYS}
    out["estimable"] = np.empty((a, p), bool)
    blocks = _GeneBlocks(Y, cm.order)
    step = _chunk_genes(n)

    def chunk(cols: slice) -> None:              # (3), writes the chunk's own columns
        y = blocks(cols)
        mu0_raw = cm.mu0[cols]
        R = cinfo = controls = parts = None
        if isinstance(term, _MultiHotTerm):
            parts = term.chunk(y, mu0_raw, cm, cols)
            R = parts[0]
        elif term is not None:
            R = term.scores(y, cm, cols)
            cinfo = _ChunkInformation.of(term.info, cols)
        if cells.shared:
            controls = _ControlSums(y[:, ctrl], mu0_raw[:, ctrl], cells.inv_s[ctrl], w0_ctrl,
                                    None if R is None else R[:, ctrl],
                                    None if term is None else term.Ws[ctrl], Z, a)
        for k in range(a):
            b1, b0 = _arm_sums(y, mu0_raw, cm, cols, k, cells, R, term, controls, a)
            k_info = k
            if parts is not None:
                cinfo, k_info = term.information(k, cells, parts), 0
            res = _estimand_from_sums(b1, b0, opts, cinfo, k_info,
                                      None if cm.alpha is None else cm.alpha[cols])
            for key in _ESTIMAND_KEYS:
                out[key][k, cols] = res[key]
            out["estimable"][k, cols] = res["estimable"]

    chunks = gene_chunks(p, step)
    for _ in tqdm(map_chunks(chunk, chunks), total=len(chunks), desc="AIPW",
                  disable=not opts.verbose, leave=False):
        pass
    out["n1"] = np.array([_block_size(trt, n) for trt, _ in cells.sets])
    out["n0"] = np.array([_block_size(unt, n) for _, unt in cells.sets])
    if isinstance(term, _OutcomeTerm) and term.need:
        cm.info = term.info
    return out


def _eta_matrix(Y, rows: np.ndarray, treated: np.ndarray, s: np.ndarray, pi: np.ndarray,
                cm: CounterfactualMeans, k: int, t1: np.ndarray, t0: np.ndarray) -> np.ndarray:
    """Influence values eta (n_k x p, rows in the order of ``rows``) of treatment k."""
    n_k, p = rows.size, Y.shape[1]
    z = treated.astype(float)[:, None]
    inv_s = (1.0 / s[rows])[:, None]
    w1 = z / pi[rows][:, None]
    w0 = (1.0 - z) / (1.0 - pi[rows])[:, None]
    eta = np.empty((n_k, p))
    step = _chunk_genes(n_k)
    for start in range(0, p, step):
        cols = slice(start, min(p, start + step))
        block = Y[rows][:, cols] if sp.issparse(Y) else Y[rows, cols]
        y = block.toarray() if sp.issparse(block) else np.asarray(block, float)
        mu0, mu1 = cm.arms(rows, cols, k)
        phi1 = (mu1 + w1 * (y - mu1)) * inv_s
        phi0 = (mu0 + w0 * (y - mu0)) * inv_s
        eta[:, cols] = phi1 / t1[cols] - phi0 / t0[cols]
    return eta


def normalization_shift(tau: np.ndarray, var: np.ndarray) -> float:
    """Precision-weighted median of the LFCs (weights 1/SE): the per-treatment constant
    by which normalisation may have shifted every gene."""
    w = 1.0 / np.sqrt(np.maximum(var, 1e-300))
    ok = np.isfinite(tau) & np.isfinite(w)
    order = np.argsort(tau[ok])
    cw = np.cumsum(w[ok][order])
    return float(tau[ok][order][np.searchsorted(cw, 0.5 * cw[-1])])


def _apply_filters(o: dict, n0: int, n1: int, thres_min, min_counts: int) -> np.ndarray:
    """Genes that are tested: estimable and expressed enough in at least one arm."""
    thr = min_counts / max(min(n0, n1), 1) if thres_min == "auto" else float(thres_min)
    return (o["estimable"] & (np.maximum(o["m0"], o["m1"]) >= thr)
            & (np.maximum(o["o0"], o["o1"]) >= thr))


def _gene_fold_estimands(Y, A, W_gene_folds, s, pi, log_s, fold, mask, opts: _AIPWOptions, *,
                         family: str, disp_glm, outcome_init):
    """Outcome models and AIPW sums with a design per fold of genes, stitched by gene.

    ``W_gene_folds = (gene_fold, [W_0, ..., W_{K-1}])``: genes with ``gene_fold == f`` are
    modelled on ``W_f`` (e.g. ``[X | U]`` with factors estimated without those genes, see
    :func:`causarray.gcate.fit_gcate`'s ``gene_folds``).  Every per-gene statistic is
    computed exactly as with one design; only the columns of ``Y`` differ per design.
    """
    gene_fold, designs = W_gene_folds
    n, p = Y.shape
    a = A.shape[1]
    gene_fold = np.asarray(gene_fold)
    check_gene_fold_shape(gene_fold, p)
    check_gene_fold_ids(gene_fold, len(designs))
    parts = []
    for f, W_f in enumerate(designs):
        cols = np.flatnonzero(gene_fold == f)
        if cols.size == 0:
            continue
        W_f = np.asarray(W_f, dtype=float)
        check_gene_fold_design(W_f, f, n)
        Y_f = Y[:, cols]
        disp_f = np.asarray(disp_glm, dtype=float)[cols] if np.ndim(disp_glm) == 1 else disp_glm
        init_f = None
        if outcome_init is not None and outcome_init.shape[1] == W_f.shape[1] + a:
            init_f = outcome_init[cols]
        cm_f = fit_outcome_model(Y_f, W_f, A, log_s, fold, family=family, disp_glm=disp_f,
                                 init=init_f)
        parts.append((cols, cm_f, _aipw_estimands(Y_f, A, W_f, s, pi, cm_f, mask, opts)))
    return _stitch_gene_folds(parts, n, p, a)


def _stitch_gene_folds(parts: list, n: int, p: int, a: int):
    """One :class:`CounterfactualMeans` and one estimand dict from per-fold pieces
    ``(genes, cm_f, res_f)``."""
    cm0 = parts[0][1]
    mu0 = np.empty((p, n))
    effect = np.empty((cm0.effect.shape[0], p, a))
    alpha = None if cm0.alpha is None else np.empty(p)
    res = {}
    for cols, cm_f, res_f in parts:
        mu0[cols] = cm_f.mu0
        effect[:, cols] = cm_f.effect
        if alpha is not None:
            alpha[cols] = cm_f.alpha
        for key, val in res_f.items():
            if isinstance(val, np.ndarray) and val.ndim == 2 and val.shape == (a, cols.size):
                if key not in res:
                    res[key] = np.empty((a, p), dtype=val.dtype)
                res[key][:, cols] = val
            elif key not in res:
                res[key] = val
    cm = CounterfactualMeans(mu0=mu0, effect=effect, fold=cm0.fold, order=cm0.order,
                             alpha=alpha)
    return cm, res


@dataclass(frozen=True)
class _TestingOptions:
    """What :func:`LFC` does with each treatment's estimands: which genes are tested
    (``thres_min``, ``min_counts``), re-centring, and the tests (FDX bootstrap)."""

    thres_min: Any = "auto"
    min_counts: int = 5
    recenter: bool = True
    fdx: bool = False
    fdx_alpha: float = 0.05
    fdx_c: float = 0.1
    fdx_B: int = 1000
    random_state: int = 0
    legacy_fdx_scaling: bool = False


def _check_lfc_options(kwargs: dict, *, backend: str, ps_model: str, targets, eps_var,
                       ps_class_weight, family: str, usevar: str):
    """Validate :func:`LFC`'s option values and extra keywords (``kwargs`` is edited:
    0.1.1's ``class_weight`` is taken out).  Returns ``(targets, ps_class_weight)``."""
    from ._compat import check_backend, check_ps_model, warn_eps_var

    check_backend(backend)
    check_ps_model(ps_model)
    targets = check_targets(targets)
    warn_eps_var(eps_var)
    if "class_weight" in kwargs:                 # 0.1.1's deprecated spelling
        warnings.warn("class_weight is deprecated in LFC; use ps_class_weight (as in "
                      "causarray 0.1.1, it is used as ps_class_weight)", FutureWarning,
                      stacklevel=3)
        ps_class_weight = kwargs.pop("class_weight")
    check_family(family)
    check_choice("usevar", usevar, ("pooled", "unequal"))
    check_removed_keywords(kwargs)
    check_keywords("LFC", kwargs, LFC_COMPAT_KEYWORDS | parameter_names(LFC))
    return targets, ps_class_weight


def _check_lfc_arrays(p: int, a: int, d: int, outcome_init, recenter_genes, shift_variance):
    """The optional per-gene arrays of :func:`LFC` as arrays of the right shapes."""
    if outcome_init is not None:
        outcome_init = np.asarray(outcome_init, dtype=float)
        check_shape("outcome_init", outcome_init, (p, d + a),
                    " (genes x [W | A] columns)")
    if recenter_genes is not None:
        recenter_genes = np.asarray(recenter_genes)
        check_recenter_genes(recenter_genes, p, a)
    if shift_variance is not None:
        shift_variance = np.asarray(shift_variance, dtype=float)
        check_shift_variance(shift_variance, p, a)
    return outcome_init, recenter_genes, shift_variance


def _propensities(A, W_A, mask, fold, K: int, pi_hat, *, ps_class_weight, random_state: int,
                  ps_model: str, ps_clip):
    """Raw propensity scores (fitted, cross-fitted with K > 1, or ``pi_hat``), the
    clipping bounds and the clipped scores."""
    n, a = A.shape
    if pi_hat is None:
        logger.info("fitting propensity models")
        pi_raw = fit_propensity(A, W_A, mask=mask, class_weight=ps_class_weight,
                                folds=fold if K > 1 else None, random_state=random_state,
                                ps_model=ps_model)
    else:
        pi_raw = np.asarray(pi_hat, float).reshape(n, a)
    lower, upper = clip_bounds(A, mask=mask, ps_clip=ps_clip)
    return pi_raw, (lower, upper), clip_propensity(pi_raw, lower, upper)


def _outcome_and_estimands(Y, W, A, s, pi, log_s, fold, mask, opts: _AIPWOptions, *, Y_hat,
                           W_gene_folds, family: str, disp_glm, outcome_init,
                           size_at_init: bool = False, outcome_steps: int | None = None):
    """The outcome model (fitted, per gene fold, or ``Y_hat``) and the AIPW estimands."""
    n, p = Y.shape
    a = A.shape[1]
    if W_gene_folds is not None and Y_hat is None:
        return _gene_fold_estimands(Y, A, W_gene_folds, s, pi, log_s, fold, mask, opts,
                                    family=family, disp_glm=disp_glm,
                                    outcome_init=outcome_init)
    if Y_hat is None:
        logger.info("fitting outcome models")
        cm = fit_outcome_model(Y, W, A, log_s, fold, family=family, disp_glm=disp_glm,
                               init=outcome_init, size_at_init=size_at_init,
                               max_iter=outcome_steps or 100)
    else:
        cm = _coerce_Y_hat(Y_hat, n, p, a)
    logger.info("AIPW estimands")
    return cm, _aipw_estimands(Y, A, W, s, pi, cm, mask, opts)


def _treatment_statistics(o: dict, tested: np.ndarray, recenter_ref: np.ndarray,
                          shift_var, recenter: bool) -> dict:
    """One treatment's reported tau, std (Poisson floor applied), df and t statistic.

    tau is re-centred by its precision-weighted median over ``recenter_ref`` (at least
    50 genes); ``shift_var`` (or None) adds the confounder-shift variance.  Untested
    genes get tau 0, std inf and NaN df / statistic here.
    """
    tau = o["tau"]
    if recenter and recenter_ref.sum() >= 50:
        tau = tau - normalization_shift(tau[recenter_ref], o["var"][recenter_ref])
    var = o["var"] if shift_var is None else o["var"] + shift_var
    floored = tested & (var < o["floor"])
    std_raw = np.where(tested, np.sqrt(var), np.inf)
    var = np.where(floored, o["floor"], var)
    tau = np.where(tested, tau, 0.0)
    std = np.where(tested, np.sqrt(var), np.inf)
    df = np.where(tested, o["df"], np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = np.where(tested, tau / std, np.nan)
    return {"tau": tau, "std": std, "std_raw": std_raw, "floored": floored, "df": df,
            "stat": stat}


def _treatment_frame(k: int, trt_name, gene_names, Y, A, s, pi, cm: CounterfactualMeans,
                     res: dict, controls: np.ndarray, mask, recenter_genes, shift_variance,
                     targets, topts: _TestingOptions) -> tuple[pd.DataFrame, int]:
    """Result rows of treatment k (columns ``RESULT_COLUMNS``) and its number of
    non-estimable genes."""
    p = res["tau"].shape[1]
    n1, n0 = int(res["n1"][k]), int(res["n0"][k])
    if n1 < 2 or n0 < 2:
        warnings.warn(f"treatment {trt_name!r} has {n1} treated and {n0} control cells; "
                      "its variance is undefined", RuntimeWarning, stacklevel=3)
    o = {key: res[key][k] for key in ("m0", "m1", "o0", "o1", "tau", "var", "df",
                                       "floor", "estimable")}
    tested = _apply_filters(o, n0, n1, topts.thres_min, topts.min_counts)
    ref = tested if recenter_genes is None else tested & recenter_genes[:, k]
    st = _treatment_statistics(o, tested, ref,
                               None if shift_variance is None else shift_variance[:, k],
                               topts.recenter)
    eta = None
    if topts.fdx:
        rows = np.flatnonzero(mask[:, k]) if mask is not None else \
            np.flatnonzero(controls | (A[:, k] == 1))
        eta = _eta_matrix(Y, rows, A[rows, k] == 1, s, pi[:, k], cm, k, res["t1"][k],
                          res["t0"][k])
    tests = multiple_testing(st["stat"], st["df"], eta=eta, std=st["std"], n=n0 + n1,
                             fdx=topts.fdx, fdx_alpha=topts.fdx_alpha, fdx_c=topts.fdx_c,
                             fdx_B=topts.fdx_B, random_state=topts.random_state,
                             legacy_fdx_scaling=topts.legacy_fdx_scaling, tau=st["tau"])
    del eta
    # untested pairs: no estimate (NaN), never an effect of 0 that sorts among results
    tau_out = np.where(tested, st["tau"], np.nan)
    std_out = np.where(tested, st["std"], np.nan)
    frame = pd.DataFrame({
        "gene_names": gene_names, "tau": tau_out, "std": std_out,
        "log2fc": tau_out / np.log(2), "log2fc_se": std_out / np.log(2), "stat": st["stat"],
        "df": np.where(np.isfinite(tests["pvalue"]), st["df"], np.nan), "rej": tests["rej"],
        "pvalue": tests["pvalue"], "padj": tests["padj"],
        "pvalue_emp_null_adj": tests["pvalue_emp_null_adj"],
        "padj_emp_null_adj": tests["padj_emp_null_adj"],
        "mean_control": np.maximum(o["m0"], 0.0), "mean_treated": np.maximum(o["m1"], 0.0),
        "estimable": tested, "tested": np.isfinite(tests["pvalue"]),
        "n_treated": np.full(p, n1, dtype=np.int64),
        "n_control": np.full(p, n0, dtype=np.int64),
        "count_treated": res["c1"][k], "count_control": res["c0"][k],
        "var_floored": st["floored"], "std_raw": st["std_raw"],
        "on_target": on_target_pairs(np.full(p, trt_name, dtype=object), gene_names,
                                     targets),
    })
    return frame, int((~o["estimable"]).sum())


def _warn_not_estimable(dropped: dict) -> None:
    """One warning listing the non-estimable gene x treatment pairs per treatment."""
    if dropped:
        per = ", ".join(f"{t}: {m}" for t, m in list(dropped.items())[:10])
        more = " ..." if len(dropped) > 10 else ""
        warnings.warn(f"{sum(dropped.values())} gene x treatment pair(s) are not estimable "
                      f"(reported as non-estimable: no usable counts in an arm; per "
                      f"treatment {per}{more})",
                      RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------
def LFC(Y, W, A, W_A=None, family: str = "nb", offset=False, Y_hat=None, pi_hat=None,
        cross_est: bool = False, K: int | None = None, mask=None, usevar: str = "pooled",
        thres_min="auto", thres_diff: float = 0.01, min_counts: int = 5, fdx: bool = False,
        fdx_alpha: float = 0.05, fdx_c: float = 0.1, ps_clip="auto", ps_class_weight=None,
        verbose: bool = False, random_state: int = 0, fdx_B: int = 1000, disp_glm=None,
        legacy_fdx_scaling: bool = False, outcome_init=None,
        outcome_size_at_init: bool = False, nuisance_variance: bool = True,
        bias_correction: bool = True, recenter: bool = True, shift_variance=None,
        W_gene_folds=None, recenter_genes=None, targets="auto",
        ps_model: str = "logistic", eps_var=None, backend: str = "auto",
        variance_floor: str = "poisson", outcome_steps: int | None = None, **kwargs):
    """Doubly robust log fold changes of every gene under every treatment.

    Parameters
    ----------
    Y : (n, p) raw counts (DataFrame columns give gene names; sparse accepted).
    W : (n, d) outcome covariates, e.g. ``[X | U]`` from :func:`causarray.fit_gcate`.
    A : (n, a) 0/1 treatment indicators (DataFrame columns give treatment names).
    W_A : (n, d_A) propensity covariates (defaults to ``W``).
    family : 'nb' or 'poisson' outcome model.
    offset : False (no size factors), True (median-of-ratios) or (n,) log size factors.
    Y_hat, pi_hat : re-use outcome predictions / propensity scores from a previous call.
    cross_est, K : K-fold cross-fitting of the nuisances (K = 2 when ``cross_est``).
    mask : (n, a) boolean, cells eligible for each treatment's comparison.
    usevar : 'pooled' (default; HC1-type small-sample factor, t(n_k - q)) or 'unequal'
        (Welch with Satterthwaite df).
    thres_min : 'auto' (min_counts / smaller arm size) or a float mean threshold.
    thres_diff : floor applied to the arm means before the log (never a filter).
    fdx, fdx_alpha, fdx_c, fdx_B : FDX control by the multiplier bootstrap (correctly scaled).
    ps_clip : 'auto' (prevalence-aware), a (low, high) pair or None.
    ps_class_weight : None (calibrated scores) or 'balanced' (0.0.9 behaviour).
    disp_glm : (p,) NB *size* theta_j per gene for the outcome model
        (``Var(y) = mu + mu^2 / theta_j``), i.e. 1/dispersion -- pass ``1 / dispersions``
        from DESeq2 or edgeR (the name is 0.1.1's); estimated by method of moments when
        None (:func:`causarray.glm.estimate_nb_size`).
    outcome_init : (p, d + a) starting coefficients of the outcome GLM, columns in the
        order ``[W | A]`` (e.g. GCATE's for the same design, as ``gcate_lfc_batch``
        passes them).  Only a warm start: the fit and its dispersion recipe are
        unchanged, it needs fewer Newton steps.  Ignored with cross-fitting.
    outcome_size_at_init : with ``outcome_init`` an NB fit of the same model (GCATE's
        coefficients for ``W = [X | U]``), estimate the NB sizes by method of moments at
        its means instead of after the recipe's preliminary Poisson and NB fits, which
        stand in for it (``docs/dr.md``, "Warm start").  ``gcate_lfc_batch`` sets it
        with GCATE's start.  Not applied per gene fold (``W_gene_folds``): there the
        factors differ from those of the start.
    outcome_steps : None (default: the outcome GLM to convergence) or k: at most k
        Newton steps from ``outcome_init`` -- the k-step estimator, asymptotically the
        fit itself when the start is consistent (``docs/math.md#screen-stage``;
        ``gcate_lfc_batch(fit='screen')`` sets 1).  Ignored without ``outcome_init``,
        with cross-fitting and per gene fold.
    nuisance_variance : add the delta-method variance of the outcome-model coefficients
        to the influence-function variance (K = 1, one-hot A).  It matters when treated and
        control cells overlap poorly in the confounders (see ``docs/dr.md``).
    recenter : subtract from each treatment's LFCs their robust location over the tested
        genes (precision-weighted median): size factors are only identified up to a
        per-perturbation constant, and count-based ones absorb part of the perturbation's
        effects; as median-of-ratios normalisation intends, the typical gene is taken as
        unchanged.  Applied when at least 50 genes are tested (see ``docs/dr.md``).
    bias_correction : remove the second-order bias of the log of a ratio of means,
        (Var(m1)/m1^2 - Var(m0)/m0^2)/2, from tau (see ``docs/dr.md``).
    shift_variance : (p, a) variance each LFC inherits from the confounders' estimated
        treatment shift (GCATE's ``res_2['shift_var']``; ``gcate_lfc_batch`` passes it).
        ``W`` holds ``U`` as if it were known; this term adds the error of its
        treatment-linked part (see ``docs/gcate.md``, stage 2).
    random_state : seed of the folds and the bootstrap.
    targets : 'auto' (default), None, or a mapping perturbation -> target gene(s).  The
        on-target pairs (a perturbation and the gene it targets; with 'auto', the gene
        named like the perturbation's label) form one BH family across the perturbations
        and every other pair one family per perturbation, so a knockdown is not judged
        by how many other genes the perturbation moves (column ``on_target``; see
        :func:`causarray.inference.family_bh` and ``docs/dr.md``).  None: one family
        per perturbation over all its genes, as in 0.1.1.
    ps_model : propensity model, 'logistic' (default), 'random_forest_cv' or 'ensemble'
        (forest and logistic averaged, :mod:`causarray.propensity_forest`).
    eps_var : deprecated and ignored, as in 0.1.1 (FutureWarning when given).
    backend : 'auto', 'fast' or 'original' (0.1.1's GLM engines); validated, all run this
        package's exact GLM (see :mod:`causarray._compat`).
    variance_floor : 'poisson' (default) or 'nb': the variance of each LFC is at least
        that of the two arm means of Poisson counts, or of NB counts with the outcome
        model's dispersion (``docs/math.md#variance``).  The influence-function variance
        of a small arm (a non-targeting guide's hundred cells in a high-MOI screen) is
        itself noisy; with comparison sets (``mask``) the t reference takes that into
        account through the treated arm's fourth moment (:func:`weighted_df`), and the
        NB floor is an option (the high-MOI default until 2026-12-07).
    **kwargs : only the keywords of causarray 0.1.1's ``LFC`` listed in
        :data:`causarray._validation.LFC_COMPAT_KEYWORDS` (kept in the returned
        ``estimation``); any other name raises ``TypeError``.

    Returns
    -------
    df_res : DataFrame, one row per (treatment, gene) with columns ``RESULT_COLUMNS``
        (+ ``trt`` when a > 1).  As in 0.1.1: ``n_treated`` / ``n_control`` are the cells
        of each arm entering the estimate, ``count_treated`` / ``count_control`` the raw
        counts summed over those cells, ``var_floored`` is True where the Poisson variance
        floor replaced the influence-function variance (tested pairs only), and
        ``std_raw`` is the standard error before that floor (inf for untested pairs).
    estimation : dict with ``pi_hat``, ``pi_hat_raw``, ``ps_clip_bounds``, ``Y_hat``
        (:class:`CounterfactualMeans`, or the array passed as ``Y_hat``), ``offset``,
        ``size_factors``, ``ps_class_weight``.
    """
    targets, ps_class_weight = _check_lfc_options(
        kwargs, backend=backend, ps_model=ps_model, targets=targets, eps_var=eps_var,
        ps_class_weight=ps_class_weight, family=family, usevar=usevar)
    Y, W, A, W_A, mask, gene_names, trt_names = _prepare(Y, W, A, W_A, mask)
    n, p = Y.shape
    a = A.shape[1]
    K = int(K) if K is not None else (2 if cross_est else 1)
    s = size_factors_from_offset(Y, offset)
    log_s = np.log(s)
    fold = make_folds(n, K, random_state)
    outcome_init, recenter_genes, shift_variance = _check_lfc_arrays(
        p, a, W.shape[1], outcome_init, recenter_genes, shift_variance)
    # 1. propensity scores
    pi_raw, (lower, upper), pi = _propensities(
        A, W_A, mask, fold, K, pi_hat, ps_class_weight=ps_class_weight,
        random_state=random_state, ps_model=ps_model, ps_clip=ps_clip)
    # 2. outcome model and the AIPW estimands of every gene and treatment
    opts = _AIPWOptions(thres_diff=thres_diff, usevar=usevar, n_params=W.shape[1] + 1,
                        in_sample=K == 1, bias_correction=bias_correction,
                        nuisance_variance=nuisance_variance,
                        variance_floor=check_choice("variance_floor", variance_floor,
                                                    ("poisson", "nb")),
                        verbose=verbose)
    cm, res = _outcome_and_estimands(Y, W, A, s, pi, log_s, fold, mask, opts, Y_hat=Y_hat,
                                     W_gene_folds=W_gene_folds, family=family,
                                     disp_glm=disp_glm, outcome_init=outcome_init,
                                     size_at_init=bool(outcome_size_at_init),
                                     outcome_steps=check_positive_int(
                                         "outcome_steps", outcome_steps, allow_none=True))
    # 3. per treatment: filters, re-centring, variance floor, tests
    topts = _TestingOptions(thres_min=thres_min, min_counts=min_counts, recenter=recenter,
                            fdx=fdx, fdx_alpha=fdx_alpha, fdx_c=fdx_c, fdx_B=fdx_B,
                            random_state=random_state, legacy_fdx_scaling=legacy_fdx_scaling)
    controls = A.sum(axis=1) == 0
    frames = []
    dropped: dict = {}
    for k in range(a):
        frame, n_drop = _treatment_frame(k, trt_names[k], gene_names, Y, A, s, pi, cm, res,
                                         controls, mask, recenter_genes, shift_variance,
                                         targets, topts)
        if n_drop:
            dropped[trt_names[k]] = n_drop
        if a > 1:
            frame["trt"] = trt_names[k]
        frames.append(frame)
    _warn_not_estimable(dropped)
    df_res = pd.concat(frames, ignore_index=True)
    # 4. the on-target pairs are BH-adjusted as one family, every other pair per treatment
    trt_col = df_res["trt"].to_numpy() if a > 1 else np.full(p, trt_names[0], dtype=object)
    df_res["padj"] = family_bh(df_res["pvalue"].to_numpy(), trt_col,
                               df_res["on_target"].to_numpy())
    y_hat_out = Y_hat if Y_hat is not None and not isinstance(Y_hat, CounterfactualMeans) \
        else cm
    estimation = dict(pi_hat=pi, pi_hat_raw=pi_raw, ps_clip_bounds=(lower, upper),
                      Y_hat=y_hat_out,
                      offset=log_s, size_factors=s, ps_class_weight=ps_class_weight,
                      K=K, usevar=usevar, **kwargs)
    return df_res, estimation
