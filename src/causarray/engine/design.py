"""Designs of the engine: dense covariates plus one-hot groups, rows sorted by group.

The linear predictor of cell i and gene j is ``eta_ij = o_i + x_i' b_j + c_{j, g(i)}``:
``x_i`` are dense covariates (intercept included, stored divided by their column
scales), ``g(i)`` the perturbation group of cell i (none for a control cell) and
``o_i`` the offset.  Sorting the rows by group turns every group sum into a sum over a
contiguous row slice.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .families import ETA_MAX, ETA_MIN


def groups_from_onehot(A: np.ndarray | None) -> np.ndarray | None:
    """Group code per row (-1 for all-zero rows) if ``A`` is one-hot, else ``None``."""
    if A is None:
        return None
    A = np.asarray(A)
    if A.ndim != 2 or A.shape[1] == 0:
        return None
    if not np.isin(A, (0, 1)).all() or (A.sum(axis=1) > 1).any():
        return None
    g = np.full(A.shape[0], -1, dtype=np.int64)
    rows, cols = np.nonzero(A)
    g[rows] = cols
    return g


def sym_outer(X: np.ndarray) -> np.ndarray:
    """Row-wise products X_ik X_il for k <= l (n x d(d+1)/2): the Gram's unique entries."""
    iu = np.triu_indices(X.shape[1])
    return np.ascontiguousarray(X[:, iu[0]] * X[:, iu[1]])


def sym_unpack(V: np.ndarray, d: int) -> np.ndarray:
    """Stack of symmetric d x d matrices from their upper-triangular entries (m x d(d+1)/2)."""
    iu = np.triu_indices(d)
    H = np.empty((V.shape[0], d, d))
    H[:, iu[0], iu[1]] = V
    H[:, iu[1], iu[0]] = V
    return H


def column_scales(X: np.ndarray) -> np.ndarray:
    """Root-mean-square of each column (1 for all-zero columns): the preconditioner."""
    s = np.sqrt(np.mean(X * X, axis=0))
    s[s == 0] = 1.0
    return s



@dataclass
class Design:
    """Preconditioned dense covariates plus group structure, rows sorted by group.

    Rows are ordered group 0, group 1, ..., group a-1, then the control cells.
    """

    X: np.ndarray              # n x d, preconditioned, sorted rows
    scales: np.ndarray         # d, column scales (coef_original = coef_scaled / scales)
    n_groups: int
    bounds: np.ndarray         # a + 2 row boundaries: group k = [bounds[k], bounds[k+1])
    order: np.ndarray          # permutation sorting rows by group (controls last)
    offset: np.ndarray         # n, sorted offsets
    saturated: bool            # intercept + one-hot groups with non-empty sets
    bin_cols: np.ndarray       # covariate columns taking exactly two values, one of them 0
    _XXG: np.ndarray | None = None
    _XXG32: np.ndarray | None = None
    _XG: np.ndarray | None = None
    _XoG: np.ndarray | None = None

    @classmethod
    def build(cls, X: np.ndarray, groups: np.ndarray | None, n_groups: int,
              offset: np.ndarray) -> Design:
        n = X.shape[0]
        if groups is None:
            groups = np.full(n, -1, dtype=np.int64)
        key = np.where(groups < 0, n_groups, groups)
        order = np.argsort(key, kind="stable")
        counts = np.bincount(key, minlength=n_groups + 1)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        scales = column_scales(X)
        Xs = np.ascontiguousarray(X[order] / scales)
        saturated = bool(n_groups > 0 and X.shape[1] == 1 and np.ptp(X[:, 0]) == 0
                         and X[0, 0] != 0 and (counts > 0).all())
        bin_cols = np.array([j for j in range(X.shape[1]) if np.ptp(X[:, j]) > 0
                             and np.unique(X[:, j]).size == 2 and (X[:, j] == 0).any()], int)
        return cls(Xs, scales, n_groups, bounds, order, np.ascontiguousarray(offset[order]),
                   saturated, bin_cols)

    @property
    def d(self) -> int:
        return self.X.shape[1]

    def constant_columns(self) -> np.ndarray:
        """Indices of the non-zero constant columns of ``X`` (an intercept)."""
        return np.flatnonzero((np.ptp(self.X, axis=0) == 0) & (self.X[0] != 0))

    @property
    def slices(self) -> list[slice]:
        """Row slices of the groups (controls excluded)."""
        return [slice(self.bounds[k], self.bounds[k + 1]) for k in range(self.n_groups)]

    @property
    def set_slices(self) -> list[slice]:
        """Row slices of the groups followed by the control cells."""
        return [slice(self.bounds[k], self.bounds[k + 1]) for k in range(self.n_groups + 1)]

    def _onehot(self) -> np.ndarray:
        G = np.zeros((self.X.shape[0], self.n_groups))
        for k, sl in enumerate(self.slices):
            G[sl, k] = 1.0
        return G

    @property
    def XXG(self) -> np.ndarray:
        """``[sym_outer(X) | G]``: one GEMM with the weights gives X'WX and diag(G'WG)."""
        if self._XXG is None:
            self._XXG = np.ascontiguousarray(np.hstack([sym_outer(self.X), self._onehot()]))
        return self._XXG

    @property
    def XXG32(self) -> np.ndarray:
        """``XXG`` in single precision, for the Hessians of the Newton iterations."""
        if self._XXG32 is None:
            self._XXG32 = self.XXG.astype(np.float32)
        return self._XXG32

    @property
    def XG(self) -> np.ndarray:
        """``[X | G]``: one GEMM with the scores gives the whole gradient."""
        if self._XG is None:
            self._XG = np.ascontiguousarray(np.hstack([self.X, self._onehot()]))
        return self._XG

    @property
    def XoG(self) -> np.ndarray:
        """``[X | o | G]``: one GEMM gives the linear predictor offset included."""
        if self._XoG is None:
            self._XoG = np.ascontiguousarray(
                np.hstack([self.X, self.offset[:, None], self._onehot()]))
        return self._XoG

    def linear_predictor(self, B: np.ndarray, C: np.ndarray) -> np.ndarray:
        """Clipped ``o + X B + G C`` for a chunk; B (d x m), C (a x m)."""
        coef = np.vstack([B, np.ones((1, B.shape[1])), C])
        eta = self.XoG @ coef
        return np.clip(eta, ETA_MIN, ETA_MAX, out=eta)



def group_sums(design: Design, arr: np.ndarray) -> np.ndarray:
    """Per-group column sums (a x m) of a row-sorted n x m array."""
    out = np.zeros((design.n_groups, arr.shape[1]))
    for k, sl in enumerate(design.slices):
        if sl.stop > sl.start:
            arr[sl].sum(axis=0, out=out[k])
    return out

