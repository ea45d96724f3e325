"""Treatment-specific propensity refits (the 0.1.1 propensity-refit workflow;
docs/math.md#diagnostics).

Some perturbations shift an observed covariate (library size, a latent factor) so much
that the propensity model separates their cells from the controls; their inverse
weights then rest on a handful of cells.  Three tools adjust the propensity design of
such treatments only, leaving the outcome model (and a cached ``Y_hat``) untouched:

* :func:`refit_propensity_scores` refits named treatments with covariates dropped or
  with a stronger L2 penalty on some coefficients (penalty factor ``f >= 1``,
  implemented by dividing the column by ``sqrt(f)`` for fit and prediction: the
  penalty ``||beta||^2 / C`` on the rescaled column equals ``f beta^2 / C`` on the
  original one);
* :func:`tune_penalty_factor` picks, per triggered treatment, the smallest factor of
  one covariate that meets a support target (bisection on ``log f`` between the
  unpenalised fit and the dropped-covariate limit ``f -> inf``; when even the dropped
  fit misses the target the treatment is reported infeasible);
* :func:`select_propensity_factors` greedily drops, per triggered treatment, the
  covariate with the largest |standardised mean difference| until the target holds.

Support metrics of one treatment (over controls + its treated cells, or ``mask``) are
those of :func:`causarray.summarize_propensity_scores`: ``auc``, ``overlap_ratio``,
``ess_treated_fraction``, ``ess_control_fraction``.  Conditions are written
``{'<metric>_lt': bound}`` / ``{'<metric>_gt': bound}``; a trigger fires when any of
its conditions holds, a target is met when all hold.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd

from ._validation import (
    REFIT_METRICS,
    check_bracket,
    check_choice,
    check_kept_covariates,
    check_pi_hat_shape,
    check_refit_mappings,
    check_refit_pi_hat,
    check_tol,
    check_unique_candidates,
    refit_drops_and_factors,
)
from ._validation import check_conditions as _check_conditions
from ._validation import parse_condition as _parse
from ._validation import refit_covariates as _covariates
from ._validation import refit_mask as _mask
from ._validation import refit_resolver as _resolver
from ._validation import refit_treatments as _treatments
from .diagnostics import _auc, histogram_overlap, kish_ess, standardized_mean_difference
from .propensity import estimate_propensity_scores

DEFAULT_TUNE_TRIGGER = {"auc_gt": 0.9}
DEFAULT_TUNE_TARGET = {"auc_lt": 0.9}
DEFAULT_SELECT_TRIGGER = {"ess_treated_fraction_lt": 0.5, "overlap_ratio_lt": 0.3,
                          "auc_gt": 0.9}
DEFAULT_SELECT_TARGET = {"ess_treated_fraction_gt": 0.5, "overlap_ratio_gt": 0.3}
METRICS = REFIT_METRICS          # their names are checked in _validation.parse_condition


# ----------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------


def _eligible(A: np.ndarray, j: int, mask: np.ndarray | None) -> np.ndarray:
    elig = (A.sum(axis=1) == 0) | (A[:, j] == 1)
    if mask is not None:
        elig &= mask[:, j]
    return elig


# ----------------------------------------------------------------------------------
# support metrics and conditions
# ----------------------------------------------------------------------------------
def arm_support(A: np.ndarray, pi: np.ndarray, j: int, mask: np.ndarray | None = None,
                bins: int = 40) -> dict:
    """``auc``, ``overlap_ratio``, ``ess_treated_fraction``, ``ess_control_fraction`` of
    treatment j, as in :func:`causarray.summarize_propensity_scores`."""
    elig = _eligible(A, j, mask)
    y = A[elig, j] == 1
    p = np.asarray(pi, float)[elig, j]
    p1, p0 = p[y], p[~y]
    eps = np.finfo(float).eps
    if p1.size == 0 or p0.size == 0:
        return dict.fromkeys(METRICS, np.nan)
    return {
        "auc": _auc(p1, p0),
        "overlap_ratio": histogram_overlap(p0, p1, bins),
        "ess_treated_fraction": kish_ess(1.0 / np.clip(p1, eps, None)) / p1.size,
        "ess_control_fraction": kish_ess(1.0 / np.clip(1.0 - p0, eps, None)) / p0.size,
    }


def _holds(metrics: dict, condition: str, bound: float) -> bool:
    name, op = _parse(condition)
    v = metrics[name]
    return bool(np.isfinite(v) and (v < bound if op == "lt" else v > bound))


def meets(metrics: dict, target: Mapping) -> bool:
    """True when every condition of ``target`` holds (non-finite metrics fail)."""
    return all(_holds(metrics, c, b) for c, b in target.items())


def triggered(metrics: dict, trigger: Mapping) -> bool:
    """True when any condition of ``trigger`` holds."""
    return any(_holds(metrics, c, b) for c, b in trigger.items())


# ----------------------------------------------------------------------------------
# refit
# ----------------------------------------------------------------------------------
def refit_propensity_scores(A, X_A, drop_by_treatment=None, pi_hat=None,
                            treatment_names=None, covariate_names=None,
                            penalty_factors_by_treatment=None, K: int = 1,
                            ps_model: str = "logistic", mask=None, clip=None,
                            random_state: int = 0, verbose: bool = False,
                            class_weight=None, **kwargs):
    """Refit the propensity scores of some treatments with a modified design.

    Parameters
    ----------
    A : (n, a) 0/1 treatments (DataFrame columns give the names).
    X_A : (n, d) propensity design including its intercept (DataFrame columns give the
        covariate names, else ``covariate_1 ... covariate_d``).
    drop_by_treatment : ``{treatment: covariate or [covariates]}`` removed for that
        treatment (names or integer positions).
    pi_hat : (n, a) existing raw scores; when given only the treatments named in
        ``drop_by_treatment`` / ``penalty_factors_by_treatment`` are refitted and the
        other columns are carried over.  None refits every treatment.
    treatment_names, covariate_names : labels (default from DataFrames).
    penalty_factors_by_treatment : ``{treatment: {covariate: f}}`` with finite
        ``f >= 1``: the L2 penalty of that coefficient is multiplied by f (logistic
        model only).
    K, ps_model, mask, random_state, verbose, class_weight, **kwargs : as
        :func:`causarray.estimate_propensity_scores` (e.g. ``C``).
    clip : None, 'auto' or (lower, upper) applied to the whole returned matrix.

    Returns
    -------
    pi : (n, a) ndarray
    report : DataFrame, one row per refitted treatment: ``treatment``,
        ``dropped_covariates``, ``retained_covariates``, ``penalty_factors``,
        ``n_retained``, ``degenerate_design`` (retained design constant on the eligible
        cells; a RuntimeWarning is issued, the score is the prevalence), ``score_std``
        (SD of the refitted scores on the eligible cells).
    """
    from ._compat import check_clip

    check_clip(clip)
    drop_by_treatment = {} if drop_by_treatment is None else drop_by_treatment
    penalty_factors_by_treatment = {} if penalty_factors_by_treatment is None \
        else penalty_factors_by_treatment
    check_refit_mappings(drop_by_treatment, penalty_factors_by_treatment, ps_model)
    A_arr, t_names = _treatments(A, treatment_names)
    X, c_names = _covariates(X_A, A_arr.shape[0], covariate_names)
    n, a = A_arr.shape
    t_of = _resolver(t_names, a, "treatment")
    c_of = _resolver(c_names, X.shape[1], "covariate")

    drops, factors = refit_drops_and_factors(drop_by_treatment, penalty_factors_by_treatment,
                                             t_of, c_of, t_names, c_names)

    if pi_hat is None:
        pi = np.empty((n, a))
        todo = list(range(a))
    else:
        pi = np.array(pi_hat, dtype=float, copy=True)
        check_refit_pi_hat(pi, (n, a))
        todo = sorted(set(drops) | set(factors))
    m = _mask(mask, (n, a))

    rows = []
    for j in todo:
        dropped = drops.get(j, set())
        kept = [k for k in range(X.shape[1]) if k not in dropped]
        check_kept_covariates(kept, t_names[j])
        Xj = X[:, kept].copy()
        fj = factors.get(j, {})
        for pos, k in enumerate(kept):
            Xj[:, pos] /= np.sqrt(fj.get(k, 1.0))
        elig = _eligible(A_arr, j, m)
        degenerate = bool(np.all(np.ptp(Xj[elig], axis=0) == 0))
        if degenerate:
            warnings.warn(f"the propensity design of treatment {t_names[j]!r} is constant "
                          "after filtering (dropping covariates): its score is the prevalence "
                          "and carries no covariate information", RuntimeWarning, stacklevel=2)
        s = estimate_propensity_scores(A_arr[:, [j]], Xj, K=K, ps_model=ps_model,
                                       mask=elig[:, None], clip=None,
                                       random_state=random_state, verbose=verbose,
                                       class_weight=class_weight, **kwargs)
        pi[:, j] = s[:, 0]
        rows.append(dict(
            treatment=t_names[j], dropped_covariates=[c_names[k] for k in sorted(dropped)],
            retained_covariates=[c_names[k] for k in kept],
            penalty_factors={c_names[k]: fj[k] for k in kept if fj.get(k, 1.0) != 1.0},
            n_retained=len(kept), degenerate_design=degenerate,
            score_std=float(np.std(s[elig, 0]))))
    if clip is not None:
        from .propensity import clip_bounds, clip_propensity

        lower, upper = clip_bounds(A_arr, mask=m, ps_clip=clip)
        pi = clip_propensity(pi, lower, upper)
    report = pd.DataFrame(rows, columns=["treatment", "dropped_covariates",
                                         "retained_covariates", "penalty_factors",
                                         "n_retained", "degenerate_design", "score_std"])
    return pi, report


# ----------------------------------------------------------------------------------
# tuning one covariate's penalty
# ----------------------------------------------------------------------------------
def tune_penalty_factor(A, X_A, covariate, treatment_names=None, covariate_names=None,
                        trigger=None, target=None, bracket=(1.0, 1e4), tol: float = 0.15,
                        on_infeasible: str = "best", K: int = 1, ps_model: str = "logistic",
                        mask=None, random_state: int = 0, verbose: bool = False,
                        class_weight=None, **kwargs):
    """Smallest L2 penalty factor of ``covariate`` meeting ``target``, per treatment.

    Treatments whose unpenalised scores fire ``trigger`` (default ``{'auc_gt': 0.9}``)
    are tuned.  The dropped-covariate fit is the ``f -> inf`` limit of the penalty: if
    it misses ``target`` (default ``{'auc_lt': 0.9}``) no factor can meet it and the
    treatment is infeasible (``on_infeasible='best'`` applies the largest factor of
    ``bracket``; ``'none'`` leaves it unpenalised).  Otherwise bisection on ``log f``
    over ``bracket`` until its width is below ``tol`` returns the smallest factor found
    to meet the target (the target's metric should be monotone in f, as AUC and
    overlap are).

    Returns
    -------
    factors : ``{treatment: {covariate: f}}`` for :func:`refit_propensity_scores`
        (untriggered treatments, those meeting the target unpenalised and infeasible
        ones with ``on_infeasible='none'`` are absent).
    report : DataFrame, one row per triggered treatment: ``treatment``,
        ``penalty_factor``, ``feasible``, ``target_met``, ``n_fits`` and the metrics
        ``<metric>_unpenalized``, ``<metric>_chosen``, ``<metric>_dropped``.
    """
    trigger = dict(DEFAULT_TUNE_TRIGGER if trigger is None else trigger)
    target = dict(DEFAULT_TUNE_TARGET if target is None else target)
    _check_conditions(trigger, target)
    check_choice("on_infeasible", on_infeasible, ("best", "none"))
    low, high = check_bracket(bracket)
    check_tol(tol)
    A_arr, t_names = _treatments(A, treatment_names)
    X, c_names = _covariates(X_A, A_arr.shape[0], covariate_names)
    cov = c_names[_resolver(c_names, X.shape[1], "covariate")(covariate)]
    m = _mask(mask, A_arr.shape)
    fit = dict(K=K, ps_model=ps_model, mask=m, random_state=random_state,
               class_weight=class_weight, **kwargs)
    pi0 = estimate_propensity_scores(A_arr, X, **fit)

    def at(j, name, **change):
        pi_j, _ = refit_propensity_scores(A_arr, X, pi_hat=pi0, treatment_names=t_names,
                                          covariate_names=c_names, **change, **fit)
        return arm_support(A_arr, pi_j, j, m)

    factors, rows = {}, []
    for j, name in enumerate(t_names):
        base = arm_support(A_arr, pi0, j, m)
        if not triggered(base, trigger):
            continue
        dropped = at(j, name, drop_by_treatment={name: [cov]})
        n_fits = 2
        feasible = meets(dropped, target)
        if not feasible:
            if on_infeasible == "best":
                f, chosen = high, at(j, name, penalty_factors_by_treatment={name: {cov: high}})
                n_fits += 1
                factors[name] = {cov: high}
            else:
                f, chosen = 1.0, base
        elif meets(base, target):
            f, chosen = low, base
        else:
            lo, hi = np.log(low), np.log(high)
            f = chosen = None
            while hi - lo > tol:
                mid = 0.5 * (lo + hi)
                met = at(j, name, penalty_factors_by_treatment={name: {cov: float(np.exp(mid))}})
                n_fits += 1
                if meets(met, target):
                    hi, f, chosen = mid, float(np.exp(mid)), met
                else:
                    lo = mid
            if chosen is None:
                f, chosen = high, at(j, name, penalty_factors_by_treatment={name: {cov: high}})
                n_fits += 1
            factors[name] = {cov: f}
        rows.append(dict(treatment=name, penalty_factor=f, feasible=feasible,
                         target_met=meets(chosen, target), n_fits=n_fits,
                         **{f"{k}_unpenalized": v for k, v in base.items()},
                         **{f"{k}_chosen": v for k, v in chosen.items()},
                         **{f"{k}_dropped": v for k, v in dropped.items()}))
    report = pd.DataFrame(rows)
    if verbose and len(report):
        print(f"[tune_penalty_factor] {len(report)} treatment(s) triggered, "
              f"{int(report['feasible'].sum())} feasible, {int(report['n_fits'].sum())} fits")
    return factors, report


# ----------------------------------------------------------------------------------
# greedy covariate selection
# ----------------------------------------------------------------------------------
def select_propensity_factors(A, X_A, candidates=None, treatment_names=None,
                              covariate_names=None, trigger=None, target=None,
                              on_infeasible: str = "best", pi_hat=None, K: int = 1,
                              ps_model: str = "logistic", mask=None, random_state: int = 0,
                              verbose: bool = False, class_weight=None, **kwargs):
    """Covariates to drop from each triggered treatment's propensity design.

    For a treatment whose scores fire ``trigger`` (any of ``ess_treated_fraction < 0.5``,
    ``overlap_ratio < 0.3``, ``auc > 0.9`` by default), the candidate covariate with the
    largest |standardised mean difference| between its treated cells and the controls
    is dropped and the scores refitted, until ``target`` (``ess_treated_fraction > 0.5``
    and ``overlap_ratio > 0.3``) holds or no candidate is left.  Candidates default to
    every non-constant column of ``X_A`` (the intercept is never dropped).  When the
    target is never met, ``on_infeasible='best'`` keeps the step with the best support
    (largest ``ess_treated_fraction``, then ``overlap_ratio``) and ``'none'`` drops
    nothing.

    Returns
    -------
    drop_by_treatment : ``{treatment: [covariates]}`` for
        :func:`refit_propensity_scores` (treatments with nothing to drop are absent).
    report : DataFrame, one row per triggered treatment: ``treatment``, ``dropped``,
        ``target_met``, ``n_fits`` and the metrics before (``<metric>_before``) and after
        (``<metric>_after``).
    """
    trigger = dict(DEFAULT_SELECT_TRIGGER if trigger is None else trigger)
    target = dict(DEFAULT_SELECT_TARGET if target is None else target)
    _check_conditions(trigger, target)
    check_choice("on_infeasible", on_infeasible, ("best", "none"))
    A_arr, t_names = _treatments(A, treatment_names)
    X, c_names = _covariates(X_A, A_arr.shape[0], covariate_names)
    c_of = _resolver(c_names, X.shape[1], "covariate")
    varying = np.ptp(X, axis=0) > 0
    if candidates is None:
        cand = [k for k in range(X.shape[1]) if varying[k]]
    else:
        cand = [c_of(c) for c in ([candidates] if isinstance(candidates, str) else candidates)]
        check_unique_candidates(cand)
    m = _mask(mask, A_arr.shape)
    fit = dict(K=K, ps_model=ps_model, mask=m, random_state=random_state,
               class_weight=class_weight, **kwargs)
    pi0 = estimate_propensity_scores(A_arr, X, **fit) if pi_hat is None \
        else np.asarray(pi_hat, dtype=float)
    check_pi_hat_shape(pi0, A_arr.shape)

    def rank(step: dict) -> tuple:
        return (np.nan_to_num(step["ess_treated_fraction"], nan=-1.0),
                np.nan_to_num(step["overlap_ratio"], nan=-1.0))

    out, rows = {}, []
    for j, name in enumerate(t_names):
        base = arm_support(A_arr, pi0, j, m)
        if not triggered(base, trigger):
            continue
        elig = _eligible(A_arr, j, m)
        trt = elig & (A_arr[:, j] == 1)
        ctl = elig & (A_arr[:, j] == 0)
        smd = {k: abs(standardized_mean_difference(X[trt, k], X[ctl, k])) for k in cand}
        order = sorted((k for k in cand if np.isfinite(smd[k])), key=lambda k: -smd[k])
        steps = [([], base)]
        n_fits = 0
        while not meets(steps[-1][1], target) and len(steps) <= len(order):
            drop = [c_names[k] for k in order[:len(steps)]]
            if len(drop) >= X.shape[1]:
                break
            pi_j, _ = refit_propensity_scores(A_arr, X, drop_by_treatment={name: drop},
                                              pi_hat=pi0, treatment_names=t_names,
                                              covariate_names=c_names, **fit)
            n_fits += 1
            steps.append((drop, arm_support(A_arr, pi_j, j, m)))
        met = meets(steps[-1][1], target)
        if met:
            chosen = steps[-1]
        elif on_infeasible == "best":
            chosen = max(steps, key=lambda s: rank(s[1]))
        else:
            chosen = steps[0]
        if chosen[0]:
            out[name] = list(chosen[0])
        rows.append(dict(treatment=name, dropped=list(chosen[0]),
                         target_met=meets(chosen[1], target), n_fits=n_fits,
                         **{f"{k}_before": v for k, v in base.items()},
                         **{f"{k}_after": v for k, v in chosen[1].items()}))
    report = pd.DataFrame(rows)
    if verbose and len(report):
        print(f"[select_propensity_factors] {len(report)} treatment(s) triggered, "
              f"{int(report['target_met'].sum())} meet the target")
    return out, report


__all__ = ["arm_support", "meets", "refit_propensity_scores", "select_propensity_factors",
           "triggered", "tune_penalty_factor"]
