"""causarray: causal differential expression for single-cell CRISPR screens.

Pipeline: counts -> :mod:`~causarray.preprocessing` -> :mod:`~causarray.glm` (count-GLM engine)
-> :mod:`~causarray.gcate` (latent confounders) -> :mod:`~causarray.dr` (doubly robust LFC)
-> :mod:`~causarray.inference` (p-values, BH, empirical null, FDX) -> results.
"""
from ._version import __version__
from .dr import LFC
from .gcate import fit_gcate
from .glm import estimate_dispersion, fit_glm
from .inference import bh_adjust
from .preprocessing import comp_size_factor, from_anndata, prep_causarray_data, subset_screen
from .propensity import estimate_propensity_scores
from .simulate import simulate_screen
from .gcate import estimate_r, plot_r
from .batch import LFC_batch, fit_gcate_batch, gcate_lfc_batch
from .diagnostics import (align_test_mask, plot_propensity_scores, plot_treatment_associations,
                          summarize_propensity_scores, summarize_treatment_associations)
from . import diagnostics, pl, report, tl

__all__ = [
    "__version__",
    "prep_causarray_data",
    "comp_size_factor",
    "from_anndata",
    "subset_screen",
    "fit_glm",
    "estimate_dispersion",
    "fit_gcate",
    "LFC",
    "estimate_propensity_scores",
    "bh_adjust",
    "simulate_screen",
    "estimate_r",
    "fit_gcate_batch",
    "gcate_lfc_batch",
    "LFC_batch",
    "plot_r",
    "summarize_propensity_scores",
    "plot_propensity_scores",
    "summarize_treatment_associations",
    "plot_treatment_associations",
    "align_test_mask",
    "tl",
    "pl",
]
