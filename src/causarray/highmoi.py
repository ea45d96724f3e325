"""The design of a guide-count screen: treatments, MOI covariates, pairs and negative
controls (docs/math.md#high-moi).

Given the guides assigned to each cell (:mod:`causarray.guides`):

1. every targeting target with enough carriers becomes a treatment column (its guides
   pooled), and every non-targeting guide a column of its own, the screen's negative
   controls (:func:`treatment_columns`);
2. the number of guides a cell carries and its guide UMIs enter the design as
   ``log(1 + n)`` covariates (:data:`MOI_COVARIATES`): in high MOI they rise with the
   cell's size and library, and a target is carried more often by cells with many
   guides, so leaving them out confounds every comparison;
3. after the run, the non-targeting rows are split off as the calibration table
   (:func:`split_negative_controls`) and the table is restricted to the pairs asked for
   (all, cis within a window of the target, or a list), one BH family over the
   discovery pairs and one over the positive-control pairs (:func:`restrict_pairs`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._validation import check_cis_inputs
from .guides import GuideAssignment
from .inference import family_bh

logger = logging.getLogger("causarray")

#: obs columns of the MOI covariates and what they are computed from.
MOI_COVARIATES = {"log1p_n_guides": "n_guides", "log1p_guide_umis": "guide_umis"}
#: Carriers a target needs to be tested (SCEPTRE's default pairwise QC threshold is 7).
MIN_TARGET_CELLS = 7


@dataclass
class TreatmentColumns:
    """The treatment matrix of a guide screen and what each column is."""

    A: sp.csc_matrix                  # cells x (tested targets + non-targeting guides)
    names: list[str]
    targets: list[str]                # the tested targets (first columns)
    nt_guides: list[str]              # the non-targeting guides (last columns)
    untested: dict[str, int]          # target -> carriers, for targets with too few


def write_cell_statistics(obs: pd.DataFrame, ga: GuideAssignment) -> pd.DataFrame:
    """Per-cell guide statistics and the MOI covariates, written into ``obs``."""
    cells = ga.cell_table(index=obs.index)
    for col in cells.columns:
        obs[col] = cells[col].to_numpy()
    for cov, src in MOI_COVARIATES.items():
        obs[cov] = np.log1p(cells[src].to_numpy(dtype=float))
    return cells


#: Degree of the polynomial in log(1 + number of guides) (:func:`moi_polynomial`).
MOI_DEGREE = 3
#: Share of the cells a value of the number of guides must hold to count for the degree.
MOI_VALUE_SHARE = 0.01


def moi_polynomial(n_guides: np.ndarray,
                   degree: int = MOI_DEGREE) -> tuple[np.ndarray, list[str]]:
    """Orthogonal polynomial terms of degree 2..``degree`` in ``log(1 + n_guides)``.

    A cell's number of guides m confounds every target (docs/math.md#high-moi) in a
    form nobody knows: larger cells take up more virus and are in another state,
    linearly in m, in its log, or neither.  ``log(1 + m)`` alone leaves the curvature
    to the factors, where every target's carriers then show it as a latent shift
    "beyond chance" in one direction.  The higher terms (each orthogonalised on the
    lower ones and the constant, then scaled to unit SD, as R's ``poly``) let the
    design follow any smooth form over the observed range.  A curve of degree k is
    fitted only where more than k + 1 values of m each hold a share of the cells (at
    least ``MOI_VALUE_SHARE``), so that it smooths the value means rather than
    interpolating them; otherwise the top terms rest on a handful of cells and make the
    design (nearly) singular (a file that keeps a few guides of a large library has
    m = 0, 1, 2 for 99.7 % of its cells), and the degree is lowered, down to no term.
    Returns ``(terms, names)``.
    """
    x = np.log1p(np.asarray(n_guides, dtype=float))
    _, counts = np.unique(x, return_counts=True)
    degree = min(degree, int(np.sum(counts >= MOI_VALUE_SHARE * x.size)) - 2)
    x = x - x.mean()
    basis = [np.ones_like(x), x]
    terms, names = [], []
    for k in range(2, degree + 1):
        col = x ** k
        for b in basis:
            col = col - b * (b @ col) / (b @ b)
        sd = col.std()
        basis.append(col)
        if sd > 1e-8 * max(1.0, float(np.abs(x ** k).max())):
            terms.append(col / sd)
            names.append(f"log1p_n_guides_pow{k}")
    return (np.column_stack(terms) if terms else np.empty((x.size, 0))), names


def add_independent_columns(X: np.ndarray, extra: np.ndarray, names: list[str],
                            tol: float = 1e-2) -> tuple[np.ndarray, list[str]]:
    """``X`` with the columns of ``extra`` that are not (nearly) in its span, in order.

    A column is kept when the norm of its residual on the columns kept so far is above
    ``tol`` times its own centred norm (R² below 1 − tol²): with exactly ten UMIs per
    guide, for instance, the guide UMIs are a function of the number of guides, and the
    design would be singular.  Returns the design and the names of the columns kept.
    """
    kept: list[str] = []
    for j, name in enumerate(names):
        col = extra[:, j:j + 1]
        coef, *_ = np.linalg.lstsq(X, col, rcond=None)
        resid = col - X @ coef
        scale = np.linalg.norm(col - col.mean())
        if scale > 0 and np.linalg.norm(resid) > tol * scale:
            X = np.hstack([X, col])
            kept.append(name)
        else:
            logger.info("design: %s left out (collinear with the other covariates)", name)
    return X, kept


def treatment_columns(ga: GuideAssignment, min_cells: int = MIN_TARGET_CELLS,
                      negative_controls: bool = True,
                      only: list[str] | None = None) -> TreatmentColumns:
    """Step 1: the tested targets (at least ``min_cells`` carriers; with ``only``, of
    those targets alone: a slice of a large screen) and, with ``negative_controls``,
    one column per non-targeting guide.  Targets outside ``only`` stay in the cells'
    background (their guides count in the MOI covariates) and are not reported."""
    T = ga.target_matrix()
    cells = np.asarray((T != 0).sum(axis=0)).ravel()
    names = np.asarray(ga.target_names, dtype=object)
    keep = cells >= min_cells
    if only is not None:
        chosen = np.isin(names, list(only))
        cells, names, keep, T = cells[chosen], names[chosen], keep[chosen], T[:, chosen]
    untested = {str(t): int(c) for t, c in zip(names[~keep], cells[~keep])}
    if untested:
        logger.warning("%d target(s) carried by fewer than %d cells are not tested: %s",
                       len(untested), min_cells, list(untested)[:5])
    blocks, cols = [T[:, np.flatnonzero(keep)]], [str(t) for t in names[keep]]
    nt = []
    if negative_controls and ga.is_nt.any():
        N = ga.nt_guide_matrix()
        n_nt = np.asarray((N != 0).sum(axis=0)).ravel()
        ok = n_nt >= min_cells
        nt = [str(g) for g in ga.names[ga.is_nt][ok]]
        blocks.append(N[:, np.flatnonzero(ok)])
        clash = set(nt) & set(cols)
        if clash:
            nt = [f"{ga.nt_label}:{g}" for g in nt]
    A = sp.csc_matrix(sp.hstack(blocks)) if blocks else sp.csc_matrix((T.shape[0], 0))
    return TreatmentColumns(A=A, names=cols + nt, targets=cols, nt_guides=nt,
                            untested=untested)


def split_negative_controls(table: pd.DataFrame,
                            nt_guides: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Step 3a: (the targets' rows, the non-targeting guides' rows)."""
    is_nt = table["trt"].astype(str).isin(nt_guides).to_numpy()
    return (table.loc[~is_nt].reset_index(drop=True),
            table.loc[is_nt].reset_index(drop=True))


def _interval_distance(tss: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance from each TSS to an interval (0 inside it)."""
    return np.maximum(0, np.maximum(start - tss, tss - end))


def cis_pairs(gene_pos: pd.DataFrame, target_pos: pd.DataFrame,
              window: int) -> pd.DataFrame:
    """(target, gene) pairs whose gene's TSS lies within ``window`` bases of the target
    (``gene_pos``: gene, chr, tss; ``target_pos``: target, chr, start, end)."""
    g = gene_pos.assign(chr=gene_pos["chr"].astype(str))
    t = target_pos.assign(chr=target_pos["chr"].astype(str))
    m = t.merge(g, on="chr")
    d = _interval_distance(m["tss"].to_numpy(float), m["start"].to_numpy(float),
                           m["end"].to_numpy(float))
    return m.loc[d <= window, ["target", "gene"]].reset_index(drop=True)


def gene_positions(var: pd.DataFrame, given: Any = None) -> pd.DataFrame | None:
    """Gene positions (gene, chr, tss) from ``given`` or ``var['chr']``/``var['tss']``."""
    if given is not None:
        df = pd.read_csv(given) if isinstance(given, str) else pd.DataFrame(given)
        return df[["gene", "chr", "tss"]]
    if {"chr", "tss"} <= set(var.columns):
        return pd.DataFrame({"gene": [str(v) for v in var.index], "chr": var["chr"].to_numpy(),
                             "tss": var["tss"].to_numpy()})
    return None


def requested_pairs(pairs: Any, var: pd.DataFrame, uns: Any, gene_pos_given: Any,
                    window: int) -> pd.DataFrame | None:
    """The (target, gene) pairs to report: None for all pairs."""
    if isinstance(pairs, str) and pairs == "all":
        return None
    if isinstance(pairs, pd.DataFrame):
        return pairs.assign(target=pairs["target"].astype(str),
                            gene=pairs["gene"].astype(str))[["target", "gene"]]
    gpos = gene_positions(var, gene_pos_given)
    tpos = uns.get("target_table") if hasattr(uns, "get") else None
    check_cis_inputs(gpos is not None, isinstance(tpos, pd.DataFrame))
    return cis_pairs(gpos, tpos, window)


def positive_control_map(uns: Any) -> dict[str, list[str]] | None:
    """Target -> genes of the positive-control pairs in ``uns['positive_control_pairs']``."""
    pc = uns.get("positive_control_pairs") if hasattr(uns, "get") else None
    if not isinstance(pc, pd.DataFrame) or not {"target", "gene"} <= set(pc.columns):
        return None
    out: dict[str, list[str]] = {}
    for t, g in zip(pc["target"].astype(str), pc["gene"].astype(str)):
        out.setdefault(t, []).append(g)
    return out


def restrict_pairs(table: pd.DataFrame, pairs: pd.DataFrame | None) -> pd.DataFrame:
    """Step 3b: keep the requested pairs (all with ``pairs=None``, and every
    positive-control pair), then BH over one family of discovery pairs and one of
    positive-control (``on_target``) pairs.

    One discovery family across the targets, as SCEPTRE adjusts its discovery pairs: an
    enhancer screen tests thousands of targets, most with no effect and the others with
    one or a few, so per-target families (the low-MOI default) would let every target
    make its own false call, and the FDR over the screen's calls would be far above q
    (measured on the high-MOI simulations, ``docs/math.md#high-moi``).
    """
    out = table
    if pairs is not None:
        key = table["trt"].astype(str) + "\x00" + table["gene_names"].astype(str)
        want = set(pairs["target"].astype(str) + "\x00" + pairs["gene"].astype(str))
        keep = key.isin(want).to_numpy() | table["on_target"].to_numpy(bool)
        out = table.loc[keep].reset_index(drop=True)
    fam = np.full(len(out), "discovery", dtype=object)
    out["padj"] = family_bh(out["pvalue"].to_numpy(float), fam,
                            out["on_target"].to_numpy(bool))
    logger.info("pairs: %d of %d (target, gene) pairs kept; BH over the kept discovery "
                "pairs and over the positive controls", len(out), len(table))
    return out
