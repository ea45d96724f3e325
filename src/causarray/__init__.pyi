# The public names of causarray: this stub is the one list of them.
#
# Each line re-exports one name from the module that defines it.  Type checkers and IDEs
# read it as the package's interface; at run time ``causarray/__init__.py`` parses it to
# build the lazy import map, ``__all__`` and ``dir(causarray)``.  To publish a name, add
# one line here (``from .module import name as name``); nothing else needs editing.
from . import calibration as calibration
from . import diagnostics as diagnostics
from . import get as get
from . import pl as pl
from . import report as report
from . import tl as tl
from ._version import __version__ as __version__
from .batch import LFC_batch as LFC_batch
from .batch import fit_gcate_batch as fit_gcate_batch
from .batch import gcate_lfc_batch as gcate_lfc_batch
from .calibration import calibration_check as calibration_check
from .diagnostics import align_test_mask as align_test_mask
from .diagnostics import summarize_propensity_scores as summarize_propensity_scores
from .diagnostics import summarize_treatment_associations as summarize_treatment_associations
from .dr import LFC as LFC
from .gcate import estimate_r as estimate_r
from .gcate import fit_gcate as fit_gcate
from .glm import estimate_dispersion as estimate_dispersion
from .glm import estimate_nb_size as estimate_nb_size
from .glm_compat import fit_glm as fit_glm
from .glm_compat import fit_glm_fast as fit_glm_fast
from .glm_compat import fit_glm_ondisk as fit_glm_ondisk
from .inference import bh_adjust as bh_adjust
from .nuisances import load_nuisances as load_nuisances
from .pl import plot_propensity_scores as plot_propensity_scores
from .pl import plot_r as plot_r
from .pl import plot_treatment_associations as plot_treatment_associations
from .preprocessing import comp_size_factor as comp_size_factor
from .preprocessing import from_anndata as from_anndata
from .preprocessing import prep_causarray_data as prep_causarray_data
from .preprocessing import subset_screen as subset_screen
from .propensity import estimate_propensity_scores as estimate_propensity_scores
from .propensity_refit import refit_propensity_scores as refit_propensity_scores
from .propensity_refit import select_propensity_factors as select_propensity_factors
from .propensity_refit import tune_penalty_factor as tune_penalty_factor
from .simulate import simulate_screen as simulate_screen
from .utils import reset_random_seeds as reset_random_seeds
from .utils import subsample_ctrl_cells as subsample_ctrl_cells
from .utils import subsample_pert_cells as subsample_pert_cells
