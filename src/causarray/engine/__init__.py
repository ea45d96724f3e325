"""The count-GLM engine shared by :mod:`causarray.glm` and :mod:`causarray.factor_model`.

Model, for cell i and gene j::

    y_ij ~ NB(mu_ij, size r_j)   (Var = mu + mu^2 / r_j;  Poisson when r_j = inf)
    log mu_ij = o_i + x_i' b_j + c_{j, g(i)}

Modules, in the order a fit uses them:

* :mod:`.families` -- the NB / Poisson family: deviance, log-likelihood kernel and
  constant, working weights and scores, method-of-moments dispersion;
* :mod:`.design` -- :class:`Design`: covariates preconditioned, rows sorted by group;
* :mod:`.newton` -- the Schur-reduced Newton system, its step, the step cap, the
  step-halving helper :func:`halve_steps` and the active-set record :class:`ActiveSet`;
* :mod:`.irls` -- :func:`schur_chunk` / :func:`irls_chunk`, Newton iterations on any
  design, chunk by chunk;
* :mod:`.saturated` -- :func:`saturated_chunk`, the separable solver for intercept +
  one-hot groups;
* :mod:`.threads` -- :func:`map_chunks`, the gene chunks of a pass on threads, each with
  a one-thread BLAS, results taken in chunk order.

The public entry points are :func:`causarray.glm.fit_glm` (GLMs) and
:func:`causarray.factor_model.fisher_pass` (the GCATE factor model), both built from
these pieces; nothing here imports from the rest of the package.
"""
from .design import Design, column_scales, group_sums, groups_from_onehot, sym_outer, sym_unpack
from .families import (
    ETA_MAX,
    ETA_MIN,
    GROUP_COEF_BOUND,
    MU_MAX,
    MU_MIN,
    alpha_from_size,
    deviance_constant,
    deviance_residuals,
    kernel_sums,
    loglik_constant_terms,
    mom_alpha,
    nb_loglik,
    nb_unit_deviance,
    scores,
    signed_root_deviance,
    size_from_mom,
    sum_ylogy,
    working_weights,
)
from .irls import irls_chunk, schur_chunk
from .newton import (
    COEF_TOL,
    MAX_HALVING,
    MAX_NEWTON_STEP,
    ActiveSet,
    Halving,
    NewtonSystem,
    batched_inverse,
    batched_solve,
    cap_step,
    covariance_diag,
    gradient,
    gram,
    halve_steps,
    newton_step,
    newton_system,
    step_size,
)
from .saturated import saturated_chunk
from .threads import map_chunks, pass_threads

__all__ = [
    "ActiveSet", "COEF_TOL", "Design", "ETA_MAX", "ETA_MIN", "GROUP_COEF_BOUND", "Halving",
    "MAX_HALVING", "MAX_NEWTON_STEP", "MU_MAX", "MU_MIN", "NewtonSystem", "alpha_from_size",
    "batched_inverse", "batched_solve", "cap_step", "column_scales", "covariance_diag",
    "deviance_constant", "deviance_residuals", "gradient", "gram", "group_sums",
    "groups_from_onehot", "halve_steps", "irls_chunk", "kernel_sums",
    "loglik_constant_terms", "map_chunks", "mom_alpha", "nb_loglik", "nb_unit_deviance",
    "newton_step", "newton_system", "pass_threads", "saturated_chunk", "schur_chunk",
    "scores", "signed_root_deviance", "size_from_mom", "step_size", "sum_ylogy",
    "sym_outer", "sym_unpack", "working_weights",
]
