"""Helpers with causarray 0.1.1's names (``causarray.utils``): seeding and the cell
subsampling of the batch pipeline.

``subsample_ctrl_cells`` / ``subsample_pert_cells`` draw exactly the cells that
:func:`causarray.batch.plan_batches` uses (``numpy.random.default_rng`` without
replacement, sorted): the control pool with seed ``random_state`` and batch b's treated
cells with seed ``random_state + b``.
"""
from __future__ import annotations

import os
import random

import numpy as np

from ._validation import check_nonnegative_int, check_positive_int, check_row_indices
from .preprocessing import comp_size_factor, prep_causarray_data  # noqa: F401  (0.1.1 path)


def reset_random_seeds(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and ``PYTHONHASHSEED``.

    ``PYTHONHASHSEED`` only affects interpreters started afterwards (e.g. worker
    processes); this package's own randomness is seeded explicitly through
    ``random_state`` arguments and does not depend on these global generators.
    """
    check_nonnegative_int("seed", seed)
    os.environ["PYTHONHASHSEED"] = str(int(seed))
    np.random.seed(int(seed) % 2**32)
    random.seed(int(seed))


def _subsample(idx, size, random_state: int, what: str) -> np.ndarray:
    idx = np.asarray(idx)
    check_row_indices(idx, what)
    if size is None or idx.size <= size:
        return idx
    check_positive_int("the subsample size", size, allow_none=True)
    rng = np.random.default_rng(random_state)
    return np.sort(rng.choice(idx, size=int(size), replace=False))


def subsample_ctrl_cells(ctrl_idx, n_ctrl: int = 2000, random_state: int = 0) -> np.ndarray:
    """At most ``n_ctrl`` of the control rows ``ctrl_idx`` (sorted; all of them, unchanged,
    when there are no more than ``n_ctrl``): the control pool shared by every batch."""
    return _subsample(ctrl_idx, n_ctrl, random_state, "ctrl_idx")


def subsample_pert_cells(pert_idx, max_cells: int | None = 2000,
                         random_state: int = 0) -> np.ndarray:
    """At most ``max_cells`` of a batch's perturbed rows ``pert_idx`` (sorted; ``None``
    keeps all).  The batch pipeline seeds batch b with ``random_state + b``."""
    return _subsample(pert_idx, max_cells, random_state, "pert_idx")


__all__ = ["reset_random_seeds", "subsample_ctrl_cells", "subsample_pert_cells"]
