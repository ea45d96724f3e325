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


#: Family-wise level at which a (target, gene) effect is taken as known when the other
#: targets' estimates on that gene are corrected (:func:`correct_for_other_targets`).
KNOWN_EFFECT_LEVEL = 0.05
#: Counts of the gene a known effect's two arms must hold together: with fewer, its log
#: ratio rests on a handful of cells (on the scale simulation such pairs reached
#: 1,000-fold), and where those few cells fall, not the shares, decides another
#: target's bias.
KNOWN_EFFECT_MIN_COUNTS = 20


@dataclass
class CarrierShares:
    """Shares of the columns ``cols`` among the carriers (``S1``) and the non-carriers
    (``S0``) of every treatment column (treatments x len(cols)), and the sampling
    variances ``V1``, ``V0`` of those stratified means."""

    S1: np.ndarray
    S0: np.ndarray
    V1: np.ndarray
    V0: np.ndarray


def carrier_shares(A, strata: np.ndarray | None, cols: np.ndarray) -> CarrierShares:
    """How often the carriers and the non-carriers of each column carry ``cols``.

    For every treatment column k of ``A`` (cells x treatments, nonzero = carried) and
    every column j in ``cols``: the share of cells carrying j among the carriers of k
    (``S1[k, j]``) and among the cells without k (``S0[k, j]``), computed within each
    stratum of ``strata`` (the cells' number of guides; None: one stratum) and
    averaged with the strata's shares ``w_m`` of the cells, as the AIPW means average
    over all cells.  A stratum without carriers of k (or without non-carriers) adds no
    difference: there both shares are the stratum's overall share of j.  The
    variances are those of the stratified means, ``V1 = sum_m w_m² s(1 − s)/n_km``
    (``V0`` likewise over the non-carriers), over the strata with both arms.
    """
    A = sp.csc_matrix(A, dtype=float, copy=True)
    A.data = (A.data != 0).astype(float)
    n = A.shape[0]
    strata = np.zeros(n) if strata is None else np.asarray(strata)
    out = CarrierShares(*(np.zeros((A.shape[1], len(cols))) for _ in range(4)))
    for value in np.unique(strata):
        rows = np.flatnonzero(strata == value)
        w = rows.size / n
        A_m = A[rows]
        J_m = A_m[:, cols]
        n_k = np.asarray(A_m.sum(axis=0)).ravel()[:, None]
        n_j = np.asarray(J_m.sum(axis=0)).ravel()[None, :]
        both = (A_m.T @ J_m).toarray()
        n_without = rows.size - n_k
        overall = np.broadcast_to(n_j / rows.size, both.shape)
        share0 = np.divide(n_j - both, n_without, out=overall.copy(), where=n_without > 0)
        share1 = np.divide(both, n_k, out=share0.copy(), where=n_k > 0)
        arms = (n_k > 0) & (n_without > 0)
        out.S1 += w * share1
        out.S0 += w * share0
        out.V1 += np.divide(w * w * share1 * (1 - share1), n_k, out=np.zeros_like(both),
                            where=arms)
        out.V0 += np.divide(w * w * share0 * (1 - share0), n_without,
                            out=np.zeros_like(both), where=arms)
    return out


def other_target_bias(table: pd.DataFrame, A, names: list[str], targets: list[str],
                      strata: np.ndarray | None,
                      level: float = KNOWN_EFFECT_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """The part of each row's ``tau`` that is the other targets' known effects, and the
    part of its variance that their chance imbalance between the arms contributes.

    Target k is compared with the cells without it at the same number of guides, and
    those carry, on average, a different share of each other target j (in a library
    drawn without replacement, or given the number of guides, a carrier of k has one
    slot less for j: docs/math.md#high-moi, "Other targets' effects").  With
    ``e = exp(tau_jg) − 1`` the effect of j on gene g and ``S1``, ``S0`` the shares of j
    among k's carriers and non-carriers (:func:`carrier_shares`), the two arms' means
    of g differ by the factor ``(1 + S1 e) / (1 + S0 e)`` whatever k does: the bias is
    ``log(1 + S1 e) − log(1 + S0 e)``, summed over the other targets with known effects
    on g.  Its sampling variance by the delta method,
    ``(e / (1 + S1 e))² V1 + (e / (1 + S0 e))² V0``, is part of the row's variance and
    leaves it with the bias.  Effects are taken as known when their pair passes
    Bonferroni at ``level`` over the targets' tested pairs (a sparse set: a few genes per
    target; smaller ones are too small to bias a comparison measurably) and its two arms
    hold at least ``KNOWN_EFFECT_MIN_COUNTS`` counts of the gene: the formula is an
    expectation over how j's carriers fall into k's arms, right for an effect carried by
    many cells, not for one carried by a few.  Returns
    ``(bias, variance)`` per row (0 where no other target has a known effect on g).
    """
    trt = table["trt"].astype(str).to_numpy()
    gene = table["gene_names"].astype(str).to_numpy()
    pvalue = table["pvalue"].to_numpy(dtype=float)
    tau = table["tau"].to_numpy(dtype=float)
    is_target = np.isin(trt, targets)
    n_tests = int(np.isfinite(pvalue[is_target]).sum())
    counted = np.ones(len(table), bool)
    if {"count_treated", "count_control"} <= set(table.columns):
        counted = (table["count_treated"].to_numpy(dtype=float)
                   + table["count_control"].to_numpy(dtype=float)) >= KNOWN_EFFECT_MIN_COUNTS
    known = np.flatnonzero(is_target & (pvalue < level / max(n_tests, 1)) & counted)
    bias, variance = np.zeros(len(table)), np.zeros(len(table))
    if known.size == 0:
        return bias, variance
    column = {name: i for i, name in enumerate(names)}
    movers = sorted(set(trt[known]))
    slot = {name: i for i, name in enumerate(movers)}
    sh = carrier_shares(A, strata, np.array([column[t] for t in movers]))
    by_gene: dict[str, list[tuple[int, float]]] = {}
    for row in known:
        by_gene.setdefault(gene[row], []).append((slot[trt[row]], np.expm1(tau[row])))
    on = np.flatnonzero(np.isin(gene, list(by_gene)) & np.isfinite(tau))
    rows_of = pd.Series(on).groupby(gene[on]).agg(list)
    for g, effects in by_gene.items():
        rows = np.asarray(rows_of.get(g, []), dtype=np.int64)
        k = np.array([column[t] for t in trt[rows]])
        for j, e in effects:
            other = trt[rows] != movers[j]               # j's own rows keep their tau
            mine, kk = rows[other], k[other]
            s1, s0 = sh.S1[kk, j], sh.S0[kk, j]
            bias[mine] += np.log1p(s1 * e) - np.log1p(s0 * e)
            variance[mine] += ((e / (1 + s1 * e)) ** 2 * sh.V1[kk, j]
                               + (e / (1 + s0 * e)) ** 2 * sh.V0[kk, j])
    return bias, variance


def correct_for_other_targets(table: pd.DataFrame, A, names: list[str],
                              targets: list[str], strata: np.ndarray | None,
                              level: float = KNOWN_EFFECT_LEVEL) -> pd.DataFrame:
    """Step 3c: each row's ``tau`` less the other targets' known effects, and its
    variance less their chance imbalance (:func:`other_target_bias`), with its
    statistic, p-values and per-target adjustments recomputed on the same degrees of
    freedom.

    The correction moves estimates by a share of the order of one over the number of
    guides in the library, so it matters for small libraries (tens of guides) with
    strong effects and is negligible for genome-scale ones.  A row whose standard
    error is the Poisson floor (``var_floored``) keeps it; no variance falls below half
    of its value (a bound the simulations never reach).  ``rej`` (the FDX decisions) is
    not recomputed.  The table gains ``other_target_bias``.
    """
    from .inference import multiple_testing

    bias, var_bias = other_target_bias(table, A, names, targets, strata, level)
    out = table.copy()
    out["other_target_bias"] = bias
    moved = bias != 0
    if not moved.any():
        return out
    tau = out["tau"].to_numpy(dtype=float) - bias
    var = out["std"].to_numpy(dtype=float) ** 2
    keep = out["var_floored"].to_numpy(bool) if "var_floored" in out else np.zeros_like(moved)
    var = np.where(keep, var, np.maximum(var - var_bias, 0.5 * var))
    std = np.sqrt(var)
    out["tau"], out["log2fc"] = tau, tau / np.log(2)
    out["std"], out["log2fc_se"], out["stat"] = std, std / np.log(2), tau / std
    if "std_raw" in out:
        out["std_raw"] = np.where(keep, out["std_raw"].to_numpy(dtype=float), std)
    trt = out["trt"].astype(str).to_numpy()
    for name in sorted(set(trt[moved])):
        rows = np.flatnonzero(trt == name)
        tests = multiple_testing(out["stat"].to_numpy()[rows], out["df"].to_numpy()[rows])
        for col in ("pvalue", "padj", "pvalue_emp_null_adj", "padj_emp_null_adj"):
            out.loc[rows, col] = tests[col]
    logger.info("other targets: %d pair(s) on %d gene(s) corrected for other targets' "
                "known effects (largest |shift| %.3g)", int(moved.sum()),
                len(set(out["gene_names"].to_numpy()[moved])), float(np.abs(bias).max()))
    return out


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
