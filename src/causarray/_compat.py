"""Small checks for arguments kept for compatibility with causarray 0.1.1.

``backend`` chose the GLM engine of the original ('fast': its batched engine,
'original': a per-gene statsmodels-type solver, 'auto': the fast one when available).
Both compute the same maximum-likelihood fit; this package has one engine (exact IRLS,
checked against statsmodels), so every value runs it.  The value is still validated so
that a misspelt backend fails instead of being ignored.

``eps_var`` was the additive variance constant of 0.0.x; 0.1.1 deprecated and ignored it
(a model-based Poisson variance floor replaced it).  We do the same.
"""
from __future__ import annotations

import warnings

# check_clip lived here; it is re-exported for the modules that import it from _compat
from ._validation import check_clip, check_not_both, check_one_of  # noqa: F401

BACKENDS = ("auto", "fast", "original")
PS_MODELS = ("logistic", "ensemble", "random_forest_cv")


def check_backend(backend: str) -> str:
    """Validate ``backend`` ('auto', 'fast' or 'original'); all run the same exact GLM."""
    return check_one_of("backend", backend, BACKENDS)


def check_ps_model(ps_model: str) -> str:
    """Validate ``ps_model`` ('logistic', 'ensemble' or 'random_forest_cv')."""
    return check_one_of("ps_model", ps_model, PS_MODELS)


def warn_eps_var(eps_var, stacklevel: int = 3) -> None:
    """FutureWarning when ``eps_var`` is given: deprecated and ignored, as in 0.1.1."""
    if eps_var is not None:
        warnings.warn("eps_var is deprecated and ignored (as in causarray 0.1.1): the "
                      "Poisson variance floor replaces the additive constant "
                      "(column var_floored)", FutureWarning, stacklevel=stacklevel)


def renamed_keyword(value, old_value, old: str, new: str, stacklevel: int = 3):
    """Resolve a renamed keyword: ``new``'s value, or the deprecated ``old``'s with a FutureWarning.

    ``old_value`` is None when the old name was not passed.  Passing both names is an error.
    """
    if old_value is None:
        return value
    check_not_both(bool(value), old, new)
    warnings.warn(f"{old!r} is deprecated; use {new!r}", FutureWarning, stacklevel=stacklevel)
    return old_value
