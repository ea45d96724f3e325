"""Tree-ensemble propensity scores (``ps_model='ensemble'`` / ``'random_forest_cv'``).

The original's ``'random_forest_cv'`` model is a bagged ensemble of pruned
classification trees (``min_samples_split=20``, ``min_samples_leaf=10``,
``max_features='sqrt'``, cost-complexity ``ccp_alpha=0.02``) whose tree depth
(3, 5, 7) and bootstrap fraction (0.4, 0.6, 0.8, 1.0) are chosen by ensemble
cross-validation; ``'ensemble'`` averages that forest's probability with the logistic
model's.  Here the same forest is a :class:`sklearn.ensemble.RandomForestClassifier`
and the grid is scored by the out-of-bag Brier score (the out-of-bag risk is the
ensemble analogue of cross-validation and costs no refit).  One deliberate change:
the trees use the logistic model's ``class_weight`` (None = calibrated) instead of a
hard-wired ``'balanced'``, so the averaged score is still a probability of treatment
(balanced weights centre scores near 0.5 whatever the prevalence, see ``docs/dr.md``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

TREE_PARAMS = dict(min_samples_split=20, min_samples_leaf=10, max_features="sqrt",
                   ccp_alpha=0.02)
GRID_DEPTH = (3, 5, 7)
GRID_MAX_SAMPLES = (0.4, 0.6, 0.8, 1.0)


def fit_forest_scores(W_train: np.ndarray, y_train: np.ndarray, W_test: np.ndarray,
                      class_weight: Any = None, random_state: int | None = 0,
                      n_estimators: int = 100) -> np.ndarray:
    """P(y = 1 | w) for the rows of ``W_test`` from the out-of-bag-tuned forest.

    Parameters
    ----------
    W_train, y_train : training design (n_train x d) and 0/1 labels (both classes present).
    W_test : rows to score.
    class_weight : None, 'balanced' or dict, as for the logistic model.
    random_state : seed of the bootstrap and of the feature subsampling.
    n_estimators : trees per forest.

    Returns
    -------
    ndarray (n_test,)
    """
    import warnings

    from sklearn.ensemble import RandomForestClassifier

    y = np.asarray(y_train).astype(int)
    best, best_risk = None, np.inf
    for depth in GRID_DEPTH:
        for frac in GRID_MAX_SAMPLES:
            model = RandomForestClassifier(
                n_estimators=n_estimators, max_depth=depth,
                max_samples=None if frac == 1.0 else frac, bootstrap=True, oob_score=True,
                class_weight=class_weight, random_state=random_state, n_jobs=1,
                **TREE_PARAMS)
            with warnings.catch_warnings():
                # a few cells may never be out of bag with small forests
                warnings.simplefilter("ignore", UserWarning)
                model.fit(W_train, y)
            oob = model.oob_decision_function_[:, list(model.classes_).index(1)]
            ok = np.isfinite(oob)
            risk = float(np.mean((oob[ok] - y[ok]) ** 2)) if ok.any() else np.inf
            if risk < best_risk:
                best, best_risk = model, risk
    return best.predict_proba(W_test)[:, list(best.classes_).index(1)]
