"""causarray: causal differential expression for single-cell CRISPR screens.

Pipeline: counts -> :mod:`~causarray.preprocessing` -> :mod:`~causarray.glm` (count-GLM engine)
-> :mod:`~causarray.gcate` (latent confounders) -> :mod:`~causarray.dr` (doubly robust LFC)
-> :mod:`~causarray.inference` (p-values, BH, empirical null, FDX) -> results.

The public names below are imported on first use (PEP 562), so ``import causarray``
stays light: a GCATE fit never loads scikit-learn, matplotlib or the Dask machinery.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "prep_causarray_data": "preprocessing",
    "comp_size_factor": "preprocessing",
    "from_anndata": "preprocessing",
    "subset_screen": "preprocessing",
    "fit_glm": "glm_compat",
    "fit_glm_fast": "glm_compat",
    "fit_glm_ondisk": "glm_compat",
    "reset_random_seeds": "utils",
    "subsample_ctrl_cells": "utils",
    "subsample_pert_cells": "utils",
    "refit_propensity_scores": "propensity_refit",
    "tune_penalty_factor": "propensity_refit",
    "select_propensity_factors": "propensity_refit",
    "load_nuisances": "nuisances",
    "estimate_dispersion": "glm",
    "fit_gcate": "gcate",
    "estimate_r": "gcate",
    "plot_r": "gcate",
    "LFC": "dr",
    "estimate_propensity_scores": "propensity",
    "bh_adjust": "inference",
    "simulate_screen": "simulate",
    "fit_gcate_batch": "batch",
    "gcate_lfc_batch": "batch",
    "LFC_batch": "batch",
    "summarize_propensity_scores": "diagnostics",
    "plot_propensity_scores": "diagnostics",
    "summarize_treatment_associations": "diagnostics",
    "plot_treatment_associations": "diagnostics",
    "align_test_mask": "diagnostics",
    "calibration_check": "calibration",
}
_SUBMODULES = ("tl", "get", "pl", "report", "calibration", "diagnostics", "datasets",
               "preprocessing", "glm", "gcate", "factor_model", "dr", "propensity", "inference",
               "simulate", "batch", "cache", "cli", "glm_compat", "utils", "propensity_refit",
               "propensity_forest", "nuisances")

__all__ = [
    "__version__",
    "prep_causarray_data",
    "comp_size_factor",
    "from_anndata",
    "subset_screen",
    "fit_glm",
    "fit_glm_fast",
    "fit_glm_ondisk",
    "reset_random_seeds",
    "subsample_ctrl_cells",
    "subsample_pert_cells",
    "refit_propensity_scores",
    "tune_penalty_factor",
    "select_propensity_factors",
    "load_nuisances",
    "estimate_dispersion",
    "fit_gcate",
    "estimate_r",
    "plot_r",
    "LFC",
    "estimate_propensity_scores",
    "bh_adjust",
    "simulate_screen",
    "fit_gcate_batch",
    "gcate_lfc_batch",
    "LFC_batch",
    "summarize_propensity_scores",
    "plot_propensity_scores",
    "summarize_treatment_associations",
    "plot_treatment_associations",
    "align_test_mask",
    "calibration_check",
    "calibration",
    "diagnostics",
    "report",
    "tl",
    "get",
    "pl",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))


if TYPE_CHECKING:  # pragma: no cover - static analysers see the eager imports
    from . import calibration, diagnostics, pl, report, tl
    from .batch import LFC_batch, fit_gcate_batch, gcate_lfc_batch
    from .calibration import calibration_check
    from .diagnostics import (
        align_test_mask,
        plot_propensity_scores,
        plot_treatment_associations,
        summarize_propensity_scores,
        summarize_treatment_associations,
    )
    from .dr import LFC
    from .gcate import estimate_r, fit_gcate, plot_r
    from .glm import estimate_dispersion
    from .glm_compat import fit_glm, fit_glm_fast, fit_glm_ondisk
    from .inference import bh_adjust
    from .nuisances import load_nuisances
    from .preprocessing import comp_size_factor, from_anndata, prep_causarray_data, subset_screen
    from .propensity import estimate_propensity_scores
    from .propensity_refit import (
        refit_propensity_scores,
        select_propensity_factors,
        tune_penalty_factor,
    )
    from .simulate import simulate_screen
    from .utils import reset_random_seeds, subsample_ctrl_cells, subsample_pert_cells
