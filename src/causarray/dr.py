"""Doubly robust (AIPW) estimation of causal log fold changes (SPEC §8).

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
chance all-zero arms from producing tiny standard errors.  Nothing is materialised
as an n x p x a tensor: counterfactual means are kept as ``log mu0`` (n x p) plus
per-treatment log effects, and pseudo-outcomes are streamed per treatment and
gene chunk.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .glm import _gene_chunk_size, fit_glm, groups_from_onehot, sym_outer, sym_unpack
from .inference import multiple_testing
from .preprocessing import size_factors_from_offset
from .propensity import clip_bounds, clip_propensity, fit_propensity, make_folds

logger = logging.getLogger("causarray")

Y_HAT_CAP = 1e5
RESULT_COLUMNS = ["gene_names", "tau", "std", "log2fc", "log2fc_se", "stat", "rej", "pvalue",
                  "padj", "pvalue_emp_null_adj", "padj_emp_null_adj", "mean_control",
                  "mean_treated", "estimable"]


@dataclass
class CounterfactualMeans:
    """Outcome-model predictions without the n x p x a x 2 tensor.

    ``mu0_ij = exp(log_mu0_ij)`` for every treatment; ``mu1_ijk = mu0_ij exp(effect[fold_i, j, k])``.
    """

    log_mu0: np.ndarray        # n x p (offset included)
    effect: np.ndarray         # K x p x a log effects per fold
    fold: np.ndarray           # n, fold of each cell
    info: "OutcomeInformation | None" = None

    def arms(self, rows: np.ndarray, cols, k: int):
        """(mu0, mu1) for cells ``rows`` and genes ``cols`` under treatment k, capped at 1e5."""
        cols = np.arange(self.log_mu0.shape[1])[cols]
        l0 = self.log_mu0[np.ix_(rows, cols)]
        eff_k = self.effect[:, cols, k]                       # (K, m): one row per fold
        folds = self.fold[rows]
        if eff_k.shape[0] == 1:
            l1 = l0 + eff_k[0]
        else:
            l1 = l0 + eff_k[folds]
        return np.minimum(np.exp(l0), Y_HAT_CAP), np.minimum(np.exp(l1), Y_HAT_CAP)

    def to_array(self) -> np.ndarray:
        """The full n x p x a x 2 tensor of SPEC §8.3 (memory heavy; for small problems)."""
        n, p = self.log_mu0.shape
        a = self.effect.shape[2]
        out = np.empty((n, p, a, 2))
        for k in range(a):
            mu0, mu1 = self.arms(np.arange(n), slice(None), k)
            out[:, :, k, 0], out[:, :, k, 1] = mu0, mu1
        return out


@dataclass
class OutcomeInformation:
    """Blocks of the outcome GLM's Fisher information, for the nuisance-uncertainty term.

    For the design [W | G] (G one-hot): ``S_inv`` (p x q x q) is the inverse Schur
    complement of the group block, ``F`` (a x p x q) = E_k / D_k and ``D`` (a x p) the
    diagonal group block.  Then Cov(b) = S_inv, Cov(b, c_k) = -S_inv F_k and
    Var(c_k) = 1/D_k + F_k' S_inv F_k.
    """

    S_inv: np.ndarray
    F: np.ndarray
    D: np.ndarray
    alpha: np.ndarray          # (p,) NB dispersion of the fit (0 = Poisson)
    groups: np.ndarray         # (n,) group of each cell, -1 for controls


def outcome_information(Y, W: np.ndarray, groups: np.ndarray, cm: "CounterfactualMeans",
                        size: np.ndarray) -> OutcomeInformation:
    """Fisher information blocks of the (in-sample) outcome GLM at its estimate."""
    n, p = Y.shape
    q = W.shape[1]
    a = cm.effect.shape[2]
    alpha = np.where(np.isfinite(size), 1.0 / np.where(np.isfinite(size), size, 1.0), 0.0)
    WW = sym_outer(W)
    S = np.empty((p, q, q))
    F = np.empty((a, p, q))
    D = np.empty((a, p))
    members = _members(groups, a)
    step = _gene_chunk_size(n, None)
    for start in range(0, p, step):
        cols = np.arange(start, min(p, start + step))
        log_mu = cm.log_mu0[:, cols].copy()
        for k, idx in enumerate(members):
            log_mu[idx] += cm.effect[0][cols, k]
        mu = np.minimum(np.exp(log_mu), Y_HAT_CAP)
        w = mu / (1.0 + alpha[cols] * mu)
        H = sym_unpack(w.T @ WW, q)
        for k, idx in enumerate(members):
            Dk = w[idx].sum(axis=0) + 1e-10
            Ek = (W[idx].T @ w[idx]).T
            D[k, cols] = Dk
            F[k, cols] = Ek / Dk[:, None]
            H -= Ek[:, :, None] * F[k, cols][:, None, :]
        S[cols] = np.linalg.pinv(H, hermitian=True)
    return OutcomeInformation(S_inv=S, F=F, D=D, alpha=alpha, groups=groups)


def _outcome_influence(Y, W: np.ndarray, cm: "CounterfactualMeans", k: int, cols: np.ndarray,
                       g_w: np.ndarray, g_c: np.ndarray) -> np.ndarray:
    """Each cell's contribution to tau through the outcome-model coefficients (n x m).

    With stacked estimating equations, tau_hat - tau ≈ mean(eta) + g' I^-1 sum_i psi_i,
    where psi_i = r_i [w_i; e_g(i)] is cell i's score for the gene's GLM coefficients
    (r_i = (y - mu)/(1 + alpha mu)), I the Fisher information and g = d tau / d(b, c_k).
    Returns zeta_i = r_i (u_b' w_i + u_c[g(i)]) with u = I^-1 g (one-hot block inverse).
    """
    info = cm.info
    u_b = np.einsum("mqr,mr->mq", info.S_inv[cols], g_w - g_c[:, None] * info.F[k, cols])
    u_c = -np.einsum("amq,mq->am", info.F[:, cols], u_b)
    u_c[k] += g_c / info.D[k, cols]
    n = Y.shape[0]
    y = _dense_rows(Y, np.arange(n), cols)
    log_mu = cm.log_mu0[:, cols].copy()
    lever = W @ u_b.T
    for m, idx in enumerate(_members(info.groups, cm.effect.shape[2])):
        log_mu[idx] += cm.effect[0][cols, m]
        lever[idx] += u_c[m]
    mu = np.minimum(np.exp(log_mu), Y_HAT_CAP)
    return (y - mu) / (1.0 + info.alpha[cols] * mu) * lever


def _members(groups: np.ndarray, a: int) -> list:
    return [np.flatnonzero(groups == m) for m in range(a)]


# ----------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------
def _names_and_values(M, default_prefix: str | None):
    if isinstance(M, pd.DataFrame):
        return [str(c) for c in M.columns], M
    return None, M


def _dense_rows(Y, rows: np.ndarray, cols) -> np.ndarray:
    block = Y[rows][:, cols] if sp.issparse(Y) else Y[np.ix_(rows, np.arange(Y.shape[1])[cols])]
    return block.toarray() if sp.issparse(block) else np.asarray(block, float)


def _prepare(Y, W, A, W_A, mask):
    gene_names = [str(c) for c in Y.columns] if isinstance(Y, pd.DataFrame) else None
    trt_names = [str(c) for c in A.columns] if isinstance(A, pd.DataFrame) else None
    Y = Y.to_numpy(dtype=float) if isinstance(Y, pd.DataFrame) else Y
    Y = Y.tocsr().astype(float) if sp.issparse(Y) else np.asarray(Y, dtype=float)
    if Y.ndim != 2:
        raise ValueError(f"Y must be 2-D (cells x genes), got shape {Y.shape}")
    data = Y.data if sp.issparse(Y) else Y
    if not np.all(np.isfinite(data)):
        raise ValueError("Y contains NaN or infinite values")
    if np.any(data < 0):
        raise ValueError("Y contains negative counts")
    n, p = Y.shape
    A = np.asarray(A, dtype=float)
    if A.ndim == 1:
        A = A[:, None]
    W = np.asarray(W, dtype=float)
    W_A = W if W_A is None else np.asarray(W_A, dtype=float)
    for M, name in ((W, "W"), (A, "A"), (W_A, "W_A")):
        if M.ndim != 2 or M.shape[0] != n:
            raise ValueError(f"{name} must be 2-D with {n} rows (one per cell), got shape {M.shape}")
        if not np.all(np.isfinite(M)):
            raise ValueError(f"{name} contains NaN or infinite values")
    if not np.all(np.isin(A, (0, 1))):
        raise ValueError("A must contain only 0/1 treatment indicators")
    a = A.shape[1]
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != A.shape:
            raise ValueError(f"mask must have the shape of A {A.shape}, got {mask.shape}")
    gene_names = gene_names or [f"gene_{j}" for j in range(p)]
    trt_names = trt_names or [str(k) for k in range(a)]
    return Y, W, A, W_A, mask, gene_names, trt_names


# ----------------------------------------------------------------------------------
# nuisance models
# ----------------------------------------------------------------------------------
def fit_outcome_model(Y, W: np.ndarray, A: np.ndarray, log_s: np.ndarray, fold: np.ndarray,
                      family: str = "nb", disp_glm=None, init=None) -> CounterfactualMeans:
    """Joint count GLM of Y on [W | A] per training fold; out-of-fold counterfactual means."""
    n, p = Y.shape
    K = int(fold.max()) + 1
    a = A.shape[1]
    log_mu0 = np.empty((n, p))
    effect = np.zeros((K, p, a))
    for f in range(K):
        train = fold != f if K > 1 else np.ones(n, bool)
        test = fold == f
        fit = fit_glm(Y[train] if K > 1 else Y, W[train], A[train], family=family,
                      size=disp_glm, offset=log_s[train], init=init if K == 1 else None)
        B = fit.coef[:, :W.shape[1]]
        effect[f] = fit.coef[:, W.shape[1]:W.shape[1] + a]
        eta0 = W[test] @ B.T + log_s[test][:, None]
        log_mu0[test] = np.clip(eta0, -30.0, 20.0)
        size = fit.size
    cm = CounterfactualMeans(log_mu0=log_mu0, effect=np.clip(effect, -30.0, 30.0), fold=fold)
    groups = groups_from_onehot(A)
    if K == 1 and groups is not None:
        cm.info = outcome_information(Y, W, groups, cm, size)
    return cm


def _coerce_Y_hat(Y_hat, n: int, p: int, a: int) -> CounterfactualMeans:
    if isinstance(Y_hat, CounterfactualMeans):
        return Y_hat
    arr = np.asarray(Y_hat, float)
    if arr.shape != (n, p, a, 2):
        raise ValueError(f"Y_hat must be a CounterfactualMeans or an array of shape {(n, p, a, 2)}")
    with np.errstate(divide="ignore"):
        log_mu0 = np.log(arr[:, :, 0, 0])
        eff = np.log(arr[:, :, :, 1]) - np.log(arr[:, :, :, 0])
    # per-cell effects are stored as n folds of one cell each
    return CounterfactualMeans(log_mu0=log_mu0, effect=eff, fold=np.arange(n))


# ----------------------------------------------------------------------------------
# per-treatment estimand
# ----------------------------------------------------------------------------------
def _treatment_estimand(Y, rows, treated, s, pi, cm: CounterfactualMeans, k: int,
                        thres_diff: float, usevar: str, n_params: int, in_sample: bool,
                        keep_eta: bool, W: np.ndarray | None = None,
                        bias_correction: bool = True):
    """Means, LFC, variance and df for all genes of one treatment (streamed by gene chunk)."""
    n_k, p = rows.size, Y.shape[1]
    n1 = int(treated.sum())
    n0 = n_k - n1
    z = treated.astype(float)[:, None]
    inv_s = (1.0 / s[rows])[:, None]
    w1 = z / pi[rows][:, None]
    w0 = (1.0 - z) / (1.0 - pi[rows])[:, None]
    out = {key: np.empty(p) for key in ("m0", "m1", "o0", "o1", "tau", "var", "df", "floor")}
    out["estimable"] = np.empty(p, bool)
    eta_all = np.empty((n_k, p)) if keep_eta else None
    step = _gene_chunk_size(n_k, None)
    for start in range(0, p, step):
        cols = slice(start, min(p, start + step))
        y = _dense_rows(Y, rows, cols)
        mu0, mu1 = cm.arms(rows, np.arange(start, min(p, start + step)), k)
        phi1 = (mu1 + w1 * (y - mu1)) * inv_s
        phi0 = (mu0 + w0 * (y - mu0)) * inv_s
        m1, m0 = phi1.mean(axis=0), phi0.mean(axis=0)
        o1 = y[treated].mean(axis=0) if n1 else np.full(y.shape[1], np.nan)
        o0 = y[~treated].mean(axis=0) if n0 else np.full(y.shape[1], np.nan)
        est = (np.isfinite(m0) & np.isfinite(m1) & ((m1 > 0) | (o1 == 0)) & ((m0 > 0) | (o0 == 0))
               & ((o1 > 0) | (o0 > 0)))
        t1 = np.where(est, np.maximum(m1, thres_diff), 1.0)
        t0 = np.where(est, np.maximum(m0, thres_diff), 1.0)
        eta = phi1 / t1 - phi0 / t0
        if usevar == "pooled":
            var = eta.var(axis=0, ddof=1) / n_k
            df = np.full(var.shape, float(max(n_k - n_params, 2)))
            if in_sample:
                var *= n_k / max(n_k - n_params, 2)
        elif usevar == "unequal":
            v1 = eta[treated].var(axis=0, ddof=1) / n1 if n1 > 1 else np.full(eta.shape[1], np.nan)
            v0 = eta[~treated].var(axis=0, ddof=1) / n0 if n0 > 1 else np.full(eta.shape[1], np.nan)
            var = v0 + v1
            with np.errstate(divide="ignore", invalid="ignore"):
                df = var ** 2 / (v0 ** 2 / max(n0 - 1, 1) + v1 ** 2 / max(n1 - 1, 1))
        else:
            raise ValueError(f"usevar must be 'pooled' or 'unequal', got {usevar!r}")
        if cm.info is not None and W is not None:
            # outcome-model estimation error (stacked estimating equations): the cells'
            # GLM scores move tau through the coefficients; add their variance and their
            # covariance with the AIPW influence values
            gcols = np.arange(start, min(p, start + step))
            r1 = (1.0 - w1) * mu1 * inv_s / (n_k * t1)
            r0 = (1.0 - w0) * mu0 * inv_s / (n_k * t0)
            zeta = _outcome_influence(Y, W, cm, k, gcols, (r1 - r0).T @ W[rows], r1.sum(axis=0))
            centred = (eta - eta.mean(axis=0)) / n_k
            extra = (zeta ** 2).sum(axis=0) + 2.0 * (centred * zeta[rows]).sum(axis=0)
            var = var + np.where(est, extra, 0.0)
        floor = ((inv_s[treated].sum() / max(n1, 1) ** 2) / t1
                 + (inv_s[~treated].sum() / max(n0, 1) ** 2) / t0)
        out["m0"][cols], out["m1"][cols], out["o0"][cols], out["o1"][cols] = m0, m1, o0, o1
        tau = np.log(t1 / t0)
        if bias_correction:
            # second-order delta method: E log(m) ≈ log E(m) - Var(m) / (2 m^2)
            v1 = (phi1 / t1).var(axis=0, ddof=1) / n_k
            v0 = (phi0 / t0).var(axis=0, ddof=1) / n_k
            # the expansion holds only for small relative variances: skip it where an arm's
            # mean is too noisy (relative variance > 0.25), e.g. near the thres_diff floor
            small = est & (v1 < 0.25) & (v0 < 0.25)
            tau = tau + np.where(small, 0.5 * (v1 - v0), 0.0)
        out["tau"][cols] = tau
        out["var"][cols], out["df"][cols], out["floor"][cols] = var, df, floor
        out["estimable"][cols] = est
        if keep_eta:
            eta_all[:, cols] = eta
    return out, eta_all


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


# ----------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------
def LFC(Y, W, A, W_A=None, family: str = "nb", offset=False, Y_hat=None, pi_hat=None,
        cross_est: bool = False, K: int | None = None, mask=None, usevar: str = "pooled",
        thres_min="auto", thres_diff: float = 0.01, min_counts: int = 5, fdx: bool = False,
        fdx_alpha: float = 0.05, fdx_c: float = 0.1, ps_clip="auto", ps_class_weight=None,
        verbose: bool = False, random_state: int = 0, fdx_B: int = 1000, disp_glm=None,
        legacy_fdx_scaling: bool = False, outcome_init=None, nuisance_variance: bool = True,
        bias_correction: bool = True, recenter: bool = True,
        **kwargs):
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
    disp_glm : NB size per gene for the outcome model (estimated by MoM when None).
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
    random_state : seed of the folds and the bootstrap.

    Returns
    -------
    df_res : DataFrame, one row per (treatment, gene) with columns ``RESULT_COLUMNS``
        (+ ``trt`` when a > 1).
    estimation : dict with ``pi_hat``, ``pi_hat_raw``, ``ps_clip_bounds``, ``Y_hat``
        (:class:`CounterfactualMeans`), ``offset``, ``size_factors``, ``ps_class_weight``.
    """
    from tqdm.auto import tqdm

    if family not in ("nb", "poisson"):
        raise ValueError(f"family must be 'nb' or 'poisson', got {family!r}")
    if "clip_pseudo_outcomes" in kwargs:
        raise TypeError("clip_pseudo_outcomes was removed: AIPW pseudo-outcomes are never clipped")
    Y, W, A, W_A, mask, gene_names, trt_names = _prepare(Y, W, A, W_A, mask)
    n, p = Y.shape
    a = A.shape[1]
    K = int(K) if K is not None else (2 if cross_est else 1)
    s = size_factors_from_offset(Y, offset)
    log_s = np.log(s)
    fold = make_folds(n, K, random_state)

    if pi_hat is None:
        logger.info("fitting propensity models")
        pi_raw = fit_propensity(A, W_A, mask=mask, class_weight=ps_class_weight,
                                folds=fold if K > 1 else None, random_state=random_state)
    else:
        pi_raw = np.asarray(pi_hat, float).reshape(n, a)
    lower, upper = clip_bounds(A, mask=mask, ps_clip=ps_clip)
    pi = clip_propensity(pi_raw, lower, upper)

    if Y_hat is None:
        logger.info("fitting outcome models")
        cm = fit_outcome_model(Y, W, A, log_s, fold, family=family, disp_glm=disp_glm,
                               init=outcome_init)
    else:
        cm = _coerce_Y_hat(Y_hat, n, p, a)

    controls = A.sum(axis=1) == 0
    n_params = W.shape[1] + 1
    frames = []
    dropped: dict = {}
    for k in tqdm(range(a), desc="AIPW", disable=not verbose, leave=False):
        rows = np.flatnonzero(mask[:, k]) if mask is not None else \
            np.flatnonzero(controls | (A[:, k] == 1))
        treated = A[rows, k] == 1
        n1, n0 = int(treated.sum()), int((~treated).sum())
        if n1 < 2 or n0 < 2:
            warnings.warn(f"treatment {trt_names[k]!r} has {n1} treated and {n0} control cells; "
                          "its variance is undefined", RuntimeWarning, stacklevel=2)
        o, eta = _treatment_estimand(Y, rows, treated, s, pi[:, k], cm, k, thres_diff, usevar,
                                     n_params, K == 1, keep_eta=fdx,
                                     W=W if nuisance_variance else None,
                                     bias_correction=bias_correction)
        tested = _apply_filters(o, n0, n1, thres_min, min_counts)
        if recenter and tested.sum() >= 50:
            o["tau"] = o["tau"] - normalization_shift(o["tau"][tested], o["var"][tested])
        var = o["var"]
        floored = tested & (var < o["floor"])
        var = np.where(floored, o["floor"], var)
        tau = np.where(tested, o["tau"], 0.0)
        std = np.where(tested, np.sqrt(var), np.inf)
        df = np.where(tested, o["df"], np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            stat = np.where(tested, tau / std, np.nan)
        n_drop = int((~o["estimable"]).sum())
        if n_drop:
            dropped[trt_names[k]] = n_drop
        tests = multiple_testing(stat, df, eta=eta, std=std, n=rows.size, fdx=fdx,
                                 fdx_alpha=fdx_alpha, fdx_c=fdx_c, fdx_B=fdx_B,
                                 random_state=random_state, legacy_fdx_scaling=legacy_fdx_scaling,
                                 tau=tau)
        frame = pd.DataFrame({
            "gene_names": gene_names, "tau": tau, "std": std,
            "log2fc": tau / np.log(2), "log2fc_se": std / np.log(2), "stat": stat,
            "rej": tests["rej"], "pvalue": tests["pvalue"], "padj": tests["padj"],
            "pvalue_emp_null_adj": tests["pvalue_emp_null_adj"],
            "padj_emp_null_adj": tests["padj_emp_null_adj"],
            "mean_control": o["m0"], "mean_treated": o["m1"], "estimable": tested,
        })
        if a > 1:
            frame["trt"] = trt_names[k]
        frames.append(frame)
    if dropped:
        per = ", ".join(f"{t}: {m}" for t, m in list(dropped.items())[:10])
        more = " ..." if len(dropped) > 10 else ""
        warnings.warn(f"{sum(dropped.values())} gene x treatment pair(s) are not estimable "
                      f"(no usable counts in an arm; per treatment {per}{more})",
                      RuntimeWarning, stacklevel=2)
    df_res = pd.concat(frames, ignore_index=True)
    estimation = dict(pi_hat=pi, pi_hat_raw=pi_raw, ps_clip_bounds=(lower, upper), Y_hat=cm,
                      offset=log_s, size_factors=s, ps_class_weight=ps_class_weight,
                      K=K, usevar=usevar, **kwargs)
    return df_res, estimation
