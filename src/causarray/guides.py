"""Guide (gRNA) counts to perturbations: the input of high-MOI and multi-guide screens
(docs/math.md#high-moi).

A screen given as guide UMI counts (cells x guides) instead of one label per cell goes
through three steps:

1. **read** the counts in the layout the user has (:func:`read_guide_counts`): guide
   features inside the expression AnnData (Cell Ranger's
   ``var['feature_types'] == 'CRISPR Guide Capture'``), a cells x guides matrix in
   ``obsm`` with its guide names, or a separate cells x guides AnnData (a MuData
   modality is one); the guides' targets from the guide matrix (``var['target']``,
   ``uns['grna_target']``) or a table (:func:`read_guide_targets`);
2. **assign** guides to cells (:func:`assign_guides`): a UMI threshold (SCEPTRE's
   high-MOI rule, default 5), the "maximum" rule of low-MOI screens, or a per-guide
   two-component Gaussian mixture on log UMIs;
3. **summarise** per cell (guides and targets assigned, guide UMIs) and per guide and
   target (cells assigned), and build the cells x targets treatment matrix
   (:class:`GuideAssignment`), in which a target's guides are pooled.

Numerics only: the AnnData front door (:func:`causarray.tl.lfc`) decides the design.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._validation import (
    check_choice,
    check_guide_cells,
    check_guide_count_values,
    check_guide_feature_types,
    check_guide_source,
    check_guide_targets_complete,
    check_guide_threshold,
    check_guide_target_table,
    check_obsm_key,
)

logger = logging.getLogger("causarray")

#: Cell Ranger's feature type of guide capture features.
GUIDE_FEATURE_TYPE = "CRISPR Guide Capture"
ASSIGNMENT_METHODS = ("threshold", "maximum", "mixture")
NT_LABEL = "non-targeting"


@dataclass
class GuideCounts:
    """Guide UMI counts as read: ``counts`` (CSR, cells x guides, int64), ``names`` and,
    when the source carries them, ``targets`` (one per guide, else None)."""

    counts: sp.csr_matrix
    names: np.ndarray
    targets: np.ndarray | None


def _as_csr_counts(M: Any) -> sp.csr_matrix:
    if isinstance(M, pd.DataFrame):
        M = M.sparse.to_coo() if all(isinstance(t, pd.SparseDtype) for t in M.dtypes) \
            else M.to_numpy()
    M = sp.csr_matrix(M)
    check_guide_count_values(M.data)
    return sp.csr_matrix(M, dtype=np.int64)


def _names_from_uns(adata: Any, key: str, width: int) -> np.ndarray:
    for name in (f"{key}_names", "grna_names", "guide_names"):
        if name in adata.uns and len(adata.uns[name]) == width:
            return np.asarray([str(g) for g in adata.uns[name]], dtype=object)
    return np.asarray([f"{key}_{j}" for j in range(width)], dtype=object)


def _targets_from_uns(adata: Any, key: str, width: int) -> np.ndarray | None:
    for name in (f"{key}_target", "grna_target", "guide_target"):
        if name in adata.uns and len(adata.uns[name]) == width:
            return np.asarray([str(t) for t in adata.uns[name]], dtype=object)
    return None


def _targets_from_var(var: pd.DataFrame) -> np.ndarray | None:
    for col in ("target", "target_gene_name", "target_gene", "grna_target", "gene_target"):
        if col in var.columns:
            return np.asarray([str(t) for t in var[col]], dtype=object)
    return None


def read_guide_counts(adata: Any, guides: Any) -> tuple[GuideCounts, np.ndarray | None]:
    """The guide UMI counts of a screen, from the layout the user has.

    Parameters
    ----------
    adata : anndata.AnnData
        The expression screen (cells x genes).
    guides : str or AnnData
        ``'feature_types'``: the columns of ``adata`` whose ``var['feature_types']`` is
        ``'CRISPR Guide Capture'`` (Cell Ranger's multi-feature output);
        ``'obsm:KEY'``: ``adata.obsm[KEY]`` (a DataFrame's columns, else
        ``uns['KEY_names']`` / ``uns['grna_names']``, give the guide names); an AnnData
        (cells x guides, e.g. a MuData modality) or the path of an ``.h5ad`` holding
        one; its cells are matched to ``adata``'s by name.

    Returns
    -------
    GuideCounts
        In the cell order of ``adata``.
    gene_columns : ndarray of bool or None
        With ``'feature_types'``, the columns of ``adata`` that are genes (the others
        are the guides); None otherwise.
    """
    kind = check_guide_source(guides)
    if kind == "feature_types":
        ft = np.asarray(adata.var.get("feature_types", pd.Series([], dtype=object)))
        is_guide = check_guide_feature_types(ft, GUIDE_FEATURE_TYPE)
        M = adata.X[:, np.flatnonzero(is_guide)]
        names = np.asarray([str(g) for g in adata.var_names[is_guide]], dtype=object)
        return (GuideCounts(_as_csr_counts(M), names,
                            _targets_from_var(adata.var.loc[is_guide])), ~is_guide)
    if kind == "obsm":
        key = check_obsm_key(adata, guides[len("obsm:"):])
        M = adata.obsm[key]
        width = M.shape[1]
        names = (np.asarray([str(c) for c in M.columns], dtype=object)
                 if isinstance(M, pd.DataFrame) else _names_from_uns(adata, key, width))
        return GuideCounts(_as_csr_counts(M), names,
                           _targets_from_uns(adata, key, width)), None
    gdata = guides
    if kind == "path":
        import anndata as ad

        gdata = ad.read_h5ad(Path(guides))
    pos = check_guide_cells(np.asarray(gdata.obs_names), np.asarray(adata.obs_names))
    M = gdata.X[pos] if not isinstance(gdata.X, np.ndarray) else gdata.X[pos]
    names = np.asarray([str(g) for g in gdata.var_names], dtype=object)
    return GuideCounts(_as_csr_counts(M), names, _targets_from_var(gdata.var)), None


def read_guide_targets(table: Any) -> dict[str, str]:
    """Guide -> target from a table: a DataFrame or CSV path with columns ``guide,
    target`` (also ``grna_id, grna_target``), or Cell Ranger's feature reference
    (``id`` and ``target_gene_name``, or ``target_gene_id``)."""
    df = pd.read_csv(table) if isinstance(table, (str, Path)) else pd.DataFrame(table)
    guide_col, target_col = check_guide_target_table(list(df.columns))
    return {str(g): str(t) for g, t in zip(df[guide_col], df[target_col])}


def _mixture_assignment(counts: sp.csc_matrix, random_state: int) -> sp.csr_matrix:
    """Per guide, a two-component Gaussian mixture on log(1 + UMI) of the cells with at
    least one UMI; a cell is assigned when the higher component is the more likely."""
    from sklearn.mixture import GaussianMixture

    rows, cols = [], []
    for j in range(counts.shape[1]):
        lo, hi = counts.indptr[j], counts.indptr[j + 1]
        if hi - lo < 4:
            continue
        idx, x = counts.indices[lo:hi], np.log1p(counts.data[lo:hi].astype(float))
        if np.ptp(x) == 0:
            continue
        gm = GaussianMixture(2, random_state=random_state).fit(x[:, None])
        on = gm.predict(x[:, None]) == int(np.argmax(gm.means_.ravel()))
        # never assign a cell with fewer UMIs than an unassigned one
        if on.any():
            on = x >= x[on].min()
        rows.append(idx[on])
        cols.append(np.full(int(on.sum()), j))
    r = np.concatenate(rows) if rows else np.zeros(0, int)
    c = np.concatenate(cols) if cols else np.zeros(0, int)
    return sp.csr_matrix((np.ones(r.size, bool), (r, c)), shape=counts.shape)


def assign_guides(counts: sp.csr_matrix, method: str = "threshold", threshold: int = 5,
                  random_state: int = 0) -> sp.csr_matrix:
    """Which guides each cell carries.

    Parameters
    ----------
    counts : (n, g) CSR guide UMI counts.
    method : 'threshold' (a guide with at least ``threshold`` UMIs; SCEPTRE's high-MOI
        rule), 'maximum' (the cell's top guide, if it has at least ``threshold`` UMIs
        and at least half of the cell's guide UMIs; SCEPTRE's low-MOI rule, at most one
        guide per cell) or 'mixture' (per guide, a two-component Gaussian mixture on
        log(1 + UMI) of the cells with any UMI: the upper component is assigned).
    threshold : the UMI threshold of 'threshold' and 'maximum'.

    Returns
    -------
    (n, g) CSR bool
    """
    check_choice("guide assignment", method, ASSIGNMENT_METHODS)
    threshold = check_guide_threshold(threshold)
    counts = sp.csr_matrix(counts)
    if method == "threshold":
        out = counts >= threshold
        return sp.csr_matrix(out, dtype=bool)
    if method == "mixture":
        return _mixture_assignment(counts.tocsc(), random_state)
    top = np.asarray(counts.argmax(axis=1)).ravel()
    top_umi = np.asarray(counts.max(axis=1).todense()).ravel()
    total = np.asarray(counts.sum(axis=1)).ravel()
    ok = (top_umi >= threshold) & (2 * top_umi >= total)
    rows = np.flatnonzero(ok)
    return sp.csr_matrix((np.ones(rows.size, bool), (rows, top[rows])), shape=counts.shape)


@dataclass
class GuideAssignment:
    """Guides assigned to cells, and what follows from them.

    Attributes
    ----------
    names, targets : (g,) guide names and their targets (``nt_label`` for
        non-targeting guides).
    assigned : (n, g) CSR bool, the guides each cell carries.
    umis : (n,) guide UMIs per cell (all guides).
    nt_label : the target label of non-targeting guides.
    method, threshold : how the guides were assigned.
    """

    names: np.ndarray
    targets: np.ndarray
    assigned: sp.csr_matrix
    umis: np.ndarray
    nt_label: str
    method: str
    threshold: int
    _target_matrix: sp.csc_matrix | None = field(default=None, init=False, repr=False,
                                                 compare=False)

    @property
    def is_nt(self) -> np.ndarray:
        return self.targets == self.nt_label

    @property
    def target_names(self) -> list[str]:
        """The targeting targets, sorted."""
        return sorted(set(self.targets[~self.is_nt].tolist()))

    def _pool(self, groups: np.ndarray, names: list[str]) -> sp.csc_matrix:
        """(n, len(names)) 0/1: the cell carries at least one guide of the group."""
        col = {t: k for k, t in enumerate(names)}
        keep = np.flatnonzero(np.isin(groups, names))
        G = sp.csr_matrix((np.ones(keep.size), (keep, [col[groups[j]] for j in keep])),
                          shape=(self.assigned.shape[1], len(names)))
        M = self.assigned.astype(np.float64) @ G
        M.data[:] = 1.0
        return sp.csc_matrix(M)

    def target_matrix(self) -> sp.csc_matrix:
        """(n, t) 0/1 cells x targeting targets, a target's guides pooled (computed once:
        the cell, target and treatment tables all start from it)."""
        if self._target_matrix is None:
            self._target_matrix = self._pool(self.targets, self.target_names)
        return self._target_matrix

    def nt_guide_matrix(self) -> sp.csc_matrix:
        """(n, g_nt) 0/1 cells x non-targeting guides (each its own column)."""
        return self._pool(self.names, list(self.names[self.is_nt]))

    def cell_table(self, index: Any = None) -> pd.DataFrame:
        """Per cell: ``n_guides`` and ``n_targets`` assigned (targeting targets),
        ``n_nt_guides``, ``guide_umis``."""
        n_guides = np.asarray(self.assigned.sum(axis=1)).ravel().astype(np.int64)
        n_targets = np.asarray((self.target_matrix() != 0).sum(axis=1)).ravel()
        n_nt = np.asarray(self.assigned[:, np.flatnonzero(self.is_nt)].sum(axis=1)).ravel()
        return pd.DataFrame({"n_guides": n_guides, "n_targets": n_targets.astype(np.int64),
                             "n_nt_guides": n_nt.astype(np.int64),
                             "guide_umis": self.umis.astype(np.int64)}, index=index)

    def guide_table(self) -> pd.DataFrame:
        """Per guide: ``guide, target, cells`` (cells assigned)."""
        cells = np.asarray(self.assigned.sum(axis=0)).ravel().astype(np.int64)
        return pd.DataFrame({"guide": self.names, "target": self.targets, "cells": cells})

    def target_table(self) -> pd.DataFrame:
        """Per targeting target: ``target, n_guides, cells`` (cells carrying any of its
        guides)."""
        names = self.target_names
        cells = np.asarray((self.target_matrix() != 0).sum(axis=0)).ravel().astype(np.int64)
        n_g = pd.Series(self.targets[~self.is_nt]).value_counts()
        return pd.DataFrame({"target": names, "n_guides": [int(n_g[t]) for t in names],
                             "cells": cells})


def guide_assignment(adata: Any, guides: Any, guide_targets: Any = None,
                     nt_label: str = NT_LABEL, method: str = "threshold",
                     threshold: int = 5, random_state: int = 0
                     ) -> tuple[GuideAssignment, np.ndarray | None]:
    """Read, map and assign the guides of a screen (steps 1 and 2 of the module).

    Parameters
    ----------
    adata, guides : see :func:`read_guide_counts`.
    guide_targets : guide -> target table (see :func:`read_guide_targets`); default:
        the targets the guide source carries.  Every guide needs a target.
    nt_label : the target of non-targeting guides.
    method, threshold : see :func:`assign_guides`.

    Returns
    -------
    GuideAssignment
    gene_columns : see :func:`read_guide_counts`.
    """
    gc, gene_columns = read_guide_counts(adata, guides)
    if guide_targets is not None:
        mapping = read_guide_targets(guide_targets)
        targets = np.asarray([mapping.get(str(g)) for g in gc.names], dtype=object)
    else:
        targets = gc.targets if gc.targets is not None \
            else np.full(gc.names.size, None, dtype=object)
    check_guide_targets_complete(gc.names[np.asarray([t is None for t in targets])])
    assigned = assign_guides(gc.counts, method, threshold, random_state)
    umis = np.asarray(gc.counts.sum(axis=1)).ravel()
    ga = GuideAssignment(names=gc.names, targets=targets.astype(object), assigned=assigned,
                         umis=umis, nt_label=str(nt_label), method=method,
                         threshold=int(threshold))
    logger.info("guides: %d guides (%d non-targeting) of %d targets; %s assignment "
                "(threshold %d): median %.1f guides per cell", gc.names.size,
                int(ga.is_nt.sum()), len(ga.target_names), method, threshold,
                float(np.median(np.asarray(assigned.sum(axis=1)).ravel())))
    return ga, gene_columns


def infer_moi(cells: pd.DataFrame, layout: Any = None) -> str:
    """The MOI of a screen: what the file states (``uns['layout']`` 'high-moi' or
    'low-moi'), else 'high' when the median cell carries two or more guides.

    A file may hold a few guides of a high-MOI library (a downsampled enhancer screen
    keeps 79 of 10,000+ guides: most cells then carry none of them, yet every cell
    carries ~28 guides, so its controls are the complement, not guide-free cells)."""
    if isinstance(layout, str) and layout in ("high-moi", "low-moi"):
        return layout.split("-")[0]
    return "high" if float(np.median(cells["n_guides"])) >= 2 else "low"


def low_moi_labels(ga: GuideAssignment, ctrl_label: str) -> tuple[np.ndarray, dict]:
    """One label per cell for a low-MOI screen: its target when it carries guides of one
    targeting target only, ``ctrl_label`` when it carries non-targeting guides only, None
    (dropped) otherwise.  Returns the labels and the counts of dropped cells by reason."""
    T = ga.target_matrix()
    n_t = np.asarray((T != 0).sum(axis=1)).ravel()
    n_nt = np.asarray(ga.assigned[:, np.flatnonzero(ga.is_nt)].sum(axis=1)).ravel()
    names = np.asarray(ga.target_names, dtype=object)
    first = np.asarray(T.tocsr().argmax(axis=1)).ravel() if T.shape[1] else np.zeros(0, int)
    labels = np.full(T.shape[0], None, dtype=object)
    one = (n_t == 1) & (n_nt == 0)
    labels[one] = names[first[one]]
    labels[(n_t == 0) & (n_nt > 0)] = ctrl_label
    dropped = {"no guide": int(((n_t == 0) & (n_nt == 0)).sum()),
               "two or more perturbations": int(((n_t >= 2) | ((n_t == 1) & (n_nt > 0))).sum())}
    return labels, dropped
