"""Peer methods for the high-MOI CRISPR screen benchmark (benchmarks only).

Nothing in ``src/`` or ``tests/`` imports this file, and neither peer is a causarray
dependency. At import time it needs only the standard library and numpy / scipy / pandas
(statsmodels is imported by the NB-GLM runner, pysceptre only inside its own runner), so
it runs both in the project's ``.venv`` and in the benchmark venv that
``benchmarks/envs/pysceptre.sh`` builds.

Exchange format -- one directory per problem
--------------------------------------------
``counts.npz``      scipy.sparse CSR, cells x genes, integer UMI counts (``save_npz``).
``grna.npz``        scipy.sparse CSR, cells x gRNAs, integer gRNA UMI counts.
``meta.json``       ``{"genes": [...], "grnas": [...], "grna_targets": [...] (aligned with
                    grnas), "non_targeting": "non-targeting" (the label in grna_targets that
                    marks an NT gRNA), "covariates": [...] (columns of covariates.csv to use),
                    "categorical_covariates": [...] (optional; non-numeric columns are
                    categorical anyway)}``.
``covariates.csv``  one row per cell, in cell order, header = covariate names, no index
                    column; may be absent when ``meta["covariates"]`` is empty.
``pairs.csv``       ``target,gene,pair_type`` with pair_type ``positive`` | ``discovery`` |
                    ``negative``. For positive / discovery pairs ``target`` is a target label
                    from ``grna_targets``; for negative pairs it is one NT gRNA id (each NT
                    gRNA is its own target; see :func:`negative_pairs`).

A cell "carries" a gRNA when its UMI count is ``>= threshold`` (sceptre's thresholding
assignment, default 5); a target's treated cells are the union over its gRNAs.

Runners (both write one row per row of pairs.csv, in the same order)
-------------------------------------------------------------------
``run_pysceptre(dir, out_csv, threshold=5)``
    pysceptre (github.com/broadinstitute/pysceptre, Python port of SCEPTRE), high-MOI
    defaults: thresholding assignment, complement control group, conditional
    randomization test (CRT) with skew-normal escalation, side "both", sceptre's default
    covariate formula (``log`` of response_n_nonzero, response_n_umis, grna_n_nonzero,
    grna_n_umis -- ``log(x + 1)`` where a column has a zero -- plus the extra covariates;
    see :func:`sceptre_covariate_matrix`). Positive + discovery pairs go through
    ``run_discovery_analysis``; negative pairs (single NT gRNAs) through
    ``run_calibration_check(negative_control_pairs=...)``, i.e. SCEPTRE's own calibration
    engine with each NT gRNA as a one-member synthetic target. ``calibration_check=True``
    additionally runs SCEPTRE's default constructed calibration check (random groups of NT
    gRNAs, group size = median gRNAs per target) into ``<out>.calibration.csv``.

``run_nbglm(dir, out_csv, threshold=5)``
    Per pair, an NB2 GLM (statsmodels) of the gene's counts on [intercept, carrier
    indicator, log(total response UMIs), log(#gRNAs assigned + 1), log(total gRNA UMIs + 1),
    extra covariates (categorical one-hot, drop-first)], Wald p-value of the indicator;
    the non-carriers are the control. Dispersion: by default (``dispersion="ml-gene"``) the
    NB2 alpha is estimated ONCE PER GENE by ``sm.NegativeBinomial`` maximum likelihood on
    the model without the indicator, then each pair is an ``sm.GLM(family=
    NegativeBinomial(alpha))`` fit with that alpha held fixed (what keeps ~500 pairs on
    ~50k cells within minutes on 2 cores). ``"mom-gene"``: alpha by method of moments on a
    Poisson fit of the same no-indicator model (Cameron-Trivedi regression through the
    origin). ``"ml-pair"``: full ``sm.NegativeBinomial`` ML with the indicator, per pair
    (slowest; alpha re-estimated with the indicator in the model). With a per-gene alpha a
    real effect inflates alpha (the indicator is not in the model it is estimated on), so
    SEs of true effects come out larger than under ``ml-pair``: conservative, not
    anti-conservative (e.g. 0.30 vs 0.20 for a -1 log effect on 17% of cells).

Both return a dict with timings; ``<out>.json`` records the same dict.

CLI::

    python benchmarks/highmoi_peers.py pysceptre DIR OUT.csv [--threshold 5] [--seed 0]
        [--n-jobs 1] [--calibration-check]
    python benchmarks/highmoi_peers.py nbglm DIR OUT.csv [--threshold 5]
        [--dispersion ml-gene|mom-gene|ml-pair]
    python benchmarks/highmoi_peers.py simulate DIR [--cells 5000 ...]    # synthetic problem
    python benchmarks/highmoi_peers.py summarize DIR OUT.csv [...]        # calibration/power

The last stdout line of ``pysceptre`` / ``nbglm`` is a JSON object with ``wall_s`` (whole
process, imports included), ``peak_rss_mb`` (``resource.getrusage``, this process) and
``peak_rss_children_mb`` (largest child, e.g. pysceptre workers with ``--n-jobs``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

_T0 = time.perf_counter()

PAIR_TYPES = ("positive", "discovery", "negative")
NT_DEFAULT = "non-targeting"
_SCEPTRE_NT = "non-targeting"  # the label pysceptre's cells_by_target recognises
OUT_COLUMNS = ["target", "gene", "pair_type", "log2fc", "pvalue"]


# --------------------------------------------------------------------------------------
# exchange format
# --------------------------------------------------------------------------------------


@dataclass
class Problem:
    counts: sparse.csr_matrix  # cells x genes
    grna: sparse.csr_matrix  # cells x gRNAs
    genes: list[str]
    grnas: list[str]
    grna_targets: list[str]
    nt_label: str
    covariates: pd.DataFrame  # cells x extra covariates (may have 0 columns)
    categorical: list[str]
    pairs: pd.DataFrame  # target, gene, pair_type

    @property
    def n_cells(self) -> int:
        return self.counts.shape[0]

    @property
    def nt_grnas(self) -> list[str]:
        return [g for g, t in zip(self.grnas, self.grna_targets) if t == self.nt_label]

    def target_grnas(self, target: str, pair_type: str) -> list[int]:
        """Column indices of the gRNAs that make up a pair's target.

        Negative pairs name one NT gRNA id; other pairs name a target label (a gRNA id is
        accepted as a fallback, so single-gRNA targets also work).
        """
        if pair_type != "negative":
            idx = [i for i, t in enumerate(self.grna_targets) if t == target]
            if idx:
                return idx
        idx = [i for i, g in enumerate(self.grnas) if g == target]
        if not idx:
            raise KeyError(
                f"pair target {target!r} ({pair_type}) is neither a target nor a gRNA id"
            )
        return idx


def write_exchange(
    directory,
    counts,
    grna,
    genes,
    grnas,
    grna_targets,
    pairs: pd.DataFrame,
    covariates: pd.DataFrame | None = None,
    nt_label: str = NT_DEFAULT,
    categorical: list[str] | None = None,
) -> Path:
    """Write one problem in the exchange format (see module docstring)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    counts = sparse.csr_matrix(counts)
    grna = sparse.csr_matrix(grna)
    if counts.shape[0] != grna.shape[0]:
        raise ValueError("counts and grna must have the same number of cells (rows)")
    if (
        counts.shape[1] != len(genes)
        or grna.shape[1] != len(grnas)
        or len(grnas) != len(grna_targets)
    ):
        raise ValueError("genes / grnas / grna_targets do not match the matrices")
    sparse.save_npz(d / "counts.npz", counts.astype(np.int64), compressed=True)
    sparse.save_npz(d / "grna.npz", grna.astype(np.int64), compressed=True)
    cov_names: list[str] = []
    if covariates is not None and covariates.shape[1] > 0:
        if len(covariates) != counts.shape[0]:
            raise ValueError("covariates must have one row per cell")
        covariates.to_csv(d / "covariates.csv", index=False)
        cov_names = [str(c) for c in covariates.columns]
    meta = {
        "genes": [str(g) for g in genes],
        "grnas": [str(g) for g in grnas],
        "grna_targets": [str(t) for t in grna_targets],
        "non_targeting": nt_label,
        "covariates": cov_names,
        "categorical_covariates": list(categorical or []),
    }
    (d / "meta.json").write_text(json.dumps(meta, indent=1))
    p = pairs.loc[:, ["target", "gene", "pair_type"]].astype(str)
    bad = sorted(set(p["pair_type"]) - set(PAIR_TYPES))
    if bad:
        raise ValueError(f"unknown pair_type(s) {bad}")
    p.to_csv(d / "pairs.csv", index=False)
    return d


def read_exchange(directory) -> Problem:
    d = Path(directory)
    meta = json.loads((d / "meta.json").read_text())
    counts = sparse.load_npz(d / "counts.npz").tocsr()
    grna = sparse.load_npz(d / "grna.npz").tocsr()
    cov_names = list(meta.get("covariates", []))
    if cov_names:
        cov = pd.read_csv(d / "covariates.csv")
        missing = [c for c in cov_names if c not in cov.columns]
        if missing:
            raise KeyError(f"covariates.csv lacks {missing}")
        cov = cov.loc[:, cov_names]
        if len(cov) != counts.shape[0]:
            raise ValueError(f"covariates.csv has {len(cov)} rows for {counts.shape[0]} cells")
    else:
        cov = pd.DataFrame(index=range(counts.shape[0]))
    pairs = pd.read_csv(d / "pairs.csv", dtype=str, keep_default_na=False)
    pairs = pairs.loc[:, ["target", "gene", "pair_type"]]
    categorical = list(meta.get("categorical_covariates", []))
    categorical += [
        c for c in cov.columns if c not in categorical and not pd.api.types.is_numeric_dtype(cov[c])
    ]
    return Problem(
        counts=counts,
        grna=grna,
        genes=list(meta["genes"]),
        grnas=list(meta["grnas"]),
        grna_targets=list(meta["grna_targets"]),
        nt_label=meta.get("non_targeting", NT_DEFAULT),
        covariates=cov,
        categorical=categorical,
        pairs=pairs,
    )


def negative_pairs(nt_grnas, genes) -> pd.DataFrame:
    """Every NT gRNA id, as its own target, against every gene given."""
    genes = list(dict.fromkeys(genes))
    return pd.DataFrame(
        [(g, gene, "negative") for g in nt_grnas for gene in genes],
        columns=["target", "gene", "pair_type"],
    )


# --------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------


def _row_sums(m: sparse.csr_matrix) -> np.ndarray:
    return np.asarray(m.sum(axis=1), dtype=np.float64).ravel()


def _row_nnz(m: sparse.csr_matrix) -> np.ndarray:
    m = m.copy()
    m.data = (m.data > 0).astype(np.float64)
    return _row_sums(m)


def _log_count(x: np.ndarray) -> np.ndarray:
    """sceptre's rule for a count covariate: log(x), or log(x + 1) if any cell has 0."""
    x = np.asarray(x, dtype=np.float64)
    return np.log(x + 1.0) if np.any(x == 0) else np.log(x)


def _extra_covariate_columns(prob: Problem) -> tuple[list[np.ndarray], list[str]]:
    """Numeric covariates as-is; categorical ones as treatment dummies (first level = ref)."""
    cols, names = [], []
    for c in prob.covariates.columns:
        v = prob.covariates[c]
        if c in prob.categorical:
            s = v.astype(str)
            for level in sorted(s.unique())[1:]:
                cols.append((s == level).to_numpy(dtype=np.float64))
                names.append(f"{c}[{level}]")
        else:
            cols.append(v.to_numpy(dtype=np.float64))
            names.append(str(c))
    return cols, names


def _assigned(prob: Problem, threshold: float) -> sparse.csr_matrix:
    """cells x gRNAs boolean: UMI count >= threshold."""
    g = prob.grna.tocsr(copy=True)
    g.data = g.data >= threshold
    g.eliminate_zeros()
    return g.astype(bool)


def _carrier(assigned_csc: sparse.csc_matrix, cols: list[int]) -> np.ndarray:
    sub = assigned_csc[:, cols]
    return np.asarray(sub.sum(axis=1)).ravel() > 0


def _peak_rss_mb() -> tuple[float, float]:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1024.0 if sys.platform != "darwin" else 1024.0 * 1024.0
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / scale
    return own, kids


def _finish(out_csv, result: pd.DataFrame, info: dict) -> dict:
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.to_csv(out, index=False)
    own, kids = _peak_rss_mb()
    info.update(
        out_csv=str(out),
        n_pairs=len(result),
        n_pvalue_nan=int(result["pvalue"].isna().sum()),
        peak_rss_mb=round(own, 1),
        peak_rss_children_mb=round(kids, 1),
    )
    Path(str(out) + ".json").write_text(json.dumps(info, indent=1))
    return info


# --------------------------------------------------------------------------------------
# pysceptre
# --------------------------------------------------------------------------------------


def sceptre_covariate_matrix(
    prob: Problem, *, sceptre_drop_rule: bool = False
) -> tuple[np.ndarray, list[str]]:
    """sceptre's default high-MOI design, built with pysceptre's own port of its formula.

    Covariate frame in sceptre's order: response_n_nonzero, response_n_umis (from the gene
    counts), grna_n_nonzero, grna_n_umis (from the raw gRNA counts: gRNAs with a nonzero
    count, total gRNA UMIs), then the extra covariates. pysceptre's
    ``design_from_covariates`` (a port of ``auto_construct_formula_object`` + ``model.matrix``)
    applies ``log(x)`` / ``log(x + 1)`` to the count covariates and dummy-codes categorical
    ones. sceptre's auto-formula drops a non-count covariate with >= 15 distinct values,
    which silently removes any continuous extra covariate; unless ``sceptre_drop_rule`` we
    add those back as-is, so both peers see the same extra covariates.
    """
    from pysceptre.assignment.design import cell_count_covariates, design_from_covariates

    rn, ru = cell_count_covariates(prob.counts.T)  # (features, cells) orientation
    gn, gu = cell_count_covariates(prob.grna.T)
    frame = pd.DataFrame(
        {"response_n_nonzero": rn, "response_n_umis": ru, "grna_n_nonzero": gn, "grna_n_umis": gu}
    )
    extras = prob.covariates.reset_index(drop=True)
    for c in extras.columns:
        v = extras[c]
        frame[str(c)] = v.astype(str) if c in prob.categorical else v
    X, names = design_from_covariates(frame)
    if not sceptre_drop_rule:
        for c in extras.columns:
            if c in prob.categorical or str(c) in names:
                continue
            X = np.column_stack([X, extras[c].to_numpy(dtype=np.float64)])
            names.append(str(c))
    return np.ascontiguousarray(X), names


def _engine_pairs(pairs: pd.DataFrame, targets) -> pd.DataFrame:
    """The distinct (gene, target) pairs of ``targets`` in sceptre's column names."""
    return (pairs.loc[pairs["target"].isin(targets), ["gene", "target"]]
            .drop_duplicates()
            .rename(columns={"gene": "response_id", "target": "grna_target"})
            .reset_index(drop=True))


def run_pysceptre(
    directory,
    out_csv,
    threshold: float = 5,
    *,
    seed: int = 0,
    n_jobs: int = 1,
    calibration_check: bool = False,
    n_nonzero_thresh: int = 7,
    sceptre_drop_rule: bool = False,
) -> dict:
    """SCEPTRE (pysceptre) high-MOI analysis of every pair in ``directory/pairs.csv``.

    Output columns: target, gene, pair_type, log2fc (log2 of sceptre's fold change), pvalue
    (two-sided CRT p-value), plus se_log2fc, stage (1 = B1 empirical, 2 = skew-normal,
    3 = B2 empirical), n_trt_cells, n_nonzero_trt, n_nonzero_cntrl and pass_qc (sceptre's
    pairwise QC, both >= ``n_nonzero_thresh``; reported, not applied -- every pair gets a
    p-value).
    """
    t_start = time.perf_counter()
    import pysceptre
    from pysceptre.assignment import (
        assign_grnas_thresholding,
        cells_by_grna,
        cells_by_target,
    )
    from pysceptre.pipeline.api import run_calibration_check, run_discovery_analysis
    from pysceptre.pipeline.pairwise_qc import nonzero_counts

    timings: dict[str, float] = {}
    t = time.perf_counter()
    prob = read_exchange(directory)
    timings["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    response = prob.counts.T.tocsr()  # genes x cells, as pysceptre wants
    grna_gc = prob.grna.T.tocsr()  # gRNAs x cells
    assignment = assign_grnas_thresholding(grna_gc, prob.grnas, threshold=threshold)
    per_grna = cells_by_grna(assignment.assigned, prob.grnas)
    design = pd.DataFrame(
        {
            "grna_id": prob.grnas,
            "grna_target": [_SCEPTRE_NT if t_ == prob.nt_label else t_ for t_ in prob.grna_targets],
        }
    )
    if (design["grna_target"] == _SCEPTRE_NT).sum() != len(prob.nt_grnas):
        raise ValueError(
            f"a targeting target is literally named {_SCEPTRE_NT!r}; rename it in meta.json"
        )
    target_cells, ntc_cells = cells_by_target(per_grna, design)
    X, xnames = sceptre_covariate_matrix(prob, sceptre_drop_rule=sceptre_drop_rule)
    timings["assign_design_s"] = time.perf_counter() - t

    pairs = prob.pairs.reset_index(drop=True)
    gene_ix = {g: i for i, g in enumerate(prob.genes)}
    unknown = sorted(set(pairs["gene"]) - set(gene_ix))
    if unknown:
        raise KeyError(f"pairs.csv names genes not in meta.json, e.g. {unknown[:5]}")
    results = []

    # positive + discovery: sceptre's discovery analysis (complement, CRT, skew-normal)
    disc = pairs[pairs["pair_type"] != "negative"]
    t = time.perf_counter()
    if len(disc):
        dtargets = list(dict.fromkeys(disc["target"]))
        missing = [x for x in dtargets if x not in target_cells]
        if missing:
            raise KeyError(f"targets without gRNAs in meta.json: {missing[:5]}")
        # a target no cell carries cannot be tested; leave those pairs NaN
        dcells = {x: target_cells[x] for x in dtargets if len(target_cells[x]) > 0}
        eng = _engine_pairs(disc, list(dcells))
        if len(eng):
            r = run_discovery_analysis(
                response,
                prob.genes,
                X,
                dcells,
                eng,
                side="both",
                moi="high",
                seed=seed,
                n_jobs=n_jobs,
            )
            results.append(r)
    timings["discovery_s"] = time.perf_counter() - t

    # negative: each NT gRNA as its own synthetic target, through sceptre's calibration engine
    neg = pairs[pairs["pair_type"] == "negative"]
    t = time.perf_counter()
    if len(neg):
        missing = sorted(set(neg["target"]) - set(ntc_cells))
        if missing:
            raise KeyError(f"negative pairs must name NT gRNA ids; not NT: {missing[:5]}")
        ok = [g for g in dict.fromkeys(neg["target"]) if len(ntc_cells[g]) > 0]
        eng = _engine_pairs(neg, ok)
        if len(eng):
            r = run_calibration_check(
                response,
                prob.genes,
                X,
                {g: c for g, c in ntc_cells.items() if len(c) > 0},
                n_calibration_pairs=len(eng),
                calibration_group_size=1,
                negative_control_pairs=eng,
                side="both",
                moi="high",
                seed=seed,
                n_jobs=n_jobs,
            )
            results.append(r)
    timings["negative_s"] = time.perf_counter() - t

    res = (
        pd.concat(results, ignore_index=True)
        if results
        else pd.DataFrame(columns=["response_id", "grna_target", "p_value", "fold_change"])
    )
    res = res.rename(columns={"response_id": "gene", "grna_target": "target"})
    fc = pd.to_numeric(res["fold_change"], errors="coerce").to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        res["log2fc"] = np.log2(fc)
        if "se_fold_change" in res:
            res["se_log2fc"] = res["se_fold_change"].to_numpy(dtype=float) / (fc * math.log(2))
    res["pvalue"] = res["p_value"]
    keep = ["target", "gene", "log2fc", "pvalue"] + [
        c for c in ("se_log2fc", "stage", "z_orig") if c in res
    ]
    out = pairs.merge(
        res.loc[:, keep].drop_duplicates(["target", "gene"]), how="left", on=["target", "gene"]
    )

    # pairwise QC counts (reported only)
    t = time.perf_counter()
    unit_cells = {**target_cells, **ntc_cells}
    units = list(dict.fromkeys(pairs["target"]))
    lists = [np.asarray(unit_cells.get(u, np.zeros(0, np.int64)), dtype=np.int64) for u in units]
    qc_genes = list(dict.fromkeys(pairs["gene"]))
    sub = response[[gene_ix[g] for g in qc_genes]]
    n_trt, n_cntrl = nonzero_counts(sub, lists, prob.n_cells)
    uix = {u: j for j, u in enumerate(units)}
    gix = {g: i for i, g in enumerate(qc_genes)}
    rows = np.array([gix[g] for g in out["gene"]], dtype=np.int64)
    cols = np.array([uix[u] for u in out["target"]], dtype=np.int64)
    out["n_trt_cells"] = np.array([len(lists[j]) for j in cols], dtype=np.int64)
    out["n_nonzero_trt"] = n_trt[rows, cols]
    out["n_nonzero_cntrl"] = n_cntrl[rows, cols]
    out["pass_qc"] = (out["n_nonzero_trt"] >= n_nonzero_thresh) & (
        out["n_nonzero_cntrl"] >= n_nonzero_thresh
    )
    timings["qc_s"] = time.perf_counter() - t

    info = {
        "method": "pysceptre",
        "pysceptre_version": pysceptre.__version__,
        "threshold": threshold,
        "seed": seed,
        "n_jobs": n_jobs,
        "settings": "moi=high, complement, crt, skew_normal, side=both, union",
        "covariates": xnames,
        "n_cells": prob.n_cells,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }

    if calibration_check:
        t = time.perf_counter()
        sizes = pd.Series(prob.grna_targets)
        sizes = sizes[sizes != prob.nt_label].value_counts()
        nt_nonempty = {g: c for g, c in ntc_cells.items() if len(c) > 0}
        group_size = int(
            min(max(1, round(float(np.median(sizes)))) if len(sizes) else 1, len(nt_nonempty))
        )
        n_cal = int(max(1, len(disc.drop_duplicates(["target", "gene"]))))
        cal = run_calibration_check(
            response,
            prob.genes,
            X,
            nt_nonempty,
            n_calibration_pairs=n_cal,
            calibration_group_size=group_size,
            n_nonzero_trt_thresh=n_nonzero_thresh,
            n_nonzero_cntrl_thresh=n_nonzero_thresh,
            side="both",
            moi="high",
            seed=seed,
            n_jobs=n_jobs,
        )
        cal = cal.rename(
            columns={"response_id": "gene", "grna_target": "target", "p_value": "pvalue"}
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            cal["log2fc"] = np.log2(cal["fold_change"].to_numpy(dtype=float))
        cal["pair_type"] = "calibration"
        cal_path = Path(str(out_csv).removesuffix(".csv") + ".calibration.csv")
        cal.loc[:, ["target", "gene", "pair_type", "log2fc", "pvalue", "stage"]].to_csv(
            cal_path, index=False
        )
        timings["calibration_check_s"] = time.perf_counter() - t
        info["calibration_check"] = {
            "csv": str(cal_path),
            "n_pairs": len(cal),
            "group_size": group_size,
            "n_calibration_pairs_requested": n_cal,
        }
        info["timings"] = {k: round(v, 3) for k, v in timings.items()}

    info["run_s"] = round(time.perf_counter() - t_start, 3)
    return _finish(
        out_csv, out.loc[:, OUT_COLUMNS + [c for c in out.columns if c not in OUT_COLUMNS]], info
    )


# --------------------------------------------------------------------------------------
# NB GLM (statsmodels)
# --------------------------------------------------------------------------------------


def nbglm_design(
    prob: Problem, threshold: float
) -> tuple[np.ndarray, list[str], sparse.csc_matrix]:
    """[1, log(response UMIs), log(#assigned + 1), log(gRNA UMIs + 1), extras] and assignment."""
    assigned = _assigned(prob, threshold)
    resp_umis = _row_sums(prob.counts)
    n_assigned = _row_sums(assigned.astype(np.float64))
    grna_umis = _row_sums(prob.grna)
    cols = [
        np.ones(prob.n_cells),
        _log_count(resp_umis),
        np.log(n_assigned + 1.0),
        np.log(grna_umis + 1.0),
    ]
    names = ["intercept", "log_response_umis", "log_n_grnas_assigned_p1", "log_grna_umis_p1"]
    ec, en = _extra_covariate_columns(prob)
    Z = np.column_stack(cols + ec)
    names += en
    rank = np.linalg.matrix_rank(Z)
    if rank < Z.shape[1]:
        raise ValueError(f"nbglm design is rank deficient ({rank} < {Z.shape[1]}): {names}")
    return Z, names, assigned.tocsc()


def _mom_alpha(y: np.ndarray, mu: np.ndarray) -> float:
    """NB2 alpha by moments (Cameron & Trivedi): OLS through the origin of
    ((y - mu)^2 - y) on mu^2, given a Poisson fit's mu."""
    num = float(np.sum(mu**2 * ((y - mu) ** 2 - y)))
    den = float(np.sum(mu**4))
    return max(num / den, 1e-8) if den > 0 else 1e-8


def _poisson_start(sm, y, Z):
    return sm.GLM(y, Z, family=sm.families.Poisson()).fit()


def _gene_alpha(sm, y, Z, dispersion: str) -> tuple[float, np.ndarray, str]:
    """(alpha, starting coefficients for Z, note)."""
    pois = _poisson_start(sm, y, Z)
    if dispersion == "mom-gene":
        return _mom_alpha(y, pois.mu), pois.params, "mom"
    note = "ml"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # bfgs (statsmodels' default) optimises log(alpha); newton on alpha itself can
            # step to alpha < 0 and return NaN
            nb = sm.NegativeBinomial(y, Z, loglike_method="nb2").fit(
                start_params=np.append(pois.params, 0.5), method="bfgs", maxiter=500, disp=0
            )
        alpha = float(nb.params[-1])
        if not (np.isfinite(alpha) and alpha > 0) or not nb.mle_retvals.get("converged", True):
            raise RuntimeError("NB ML did not converge")
        return max(alpha, 1e-8), np.asarray(nb.params[:-1]), note
    except Exception:  # noqa: BLE001 -- any failure: fall back to moments on the Poisson fit
        return _mom_alpha(y, pois.mu), pois.params, "ml-failed-mom"


def run_nbglm(
    directory,
    out_csv,
    threshold: float = 5,
    *,
    dispersion: str = "ml-gene",
    blas_threads: int | None = 1,
) -> dict:
    """Per-pair NB2 GLM Wald test of the carrier indicator (see module docstring).

    Output columns: target, gene, pair_type, log2fc (indicator coefficient / ln 2), pvalue
    (two-sided Wald), se_log2fc, alpha (NB2 dispersion used), n_trt_cells, status.

    ``blas_threads`` caps BLAS threads during the fits (threadpoolctl, when installed):
    the per-fit matrices are thin (cells x ~7), and on 2 cores a multithreaded BLAS made
    the fits ~4x slower than one thread. ``None`` leaves BLAS alone.
    """
    if dispersion not in ("ml-gene", "mom-gene", "ml-pair"):
        raise ValueError("dispersion must be ml-gene, mom-gene or ml-pair")
    limiter = contextlib.nullcontext()
    if blas_threads:
        try:
            from threadpoolctl import threadpool_limits

            limiter = threadpool_limits(limits=int(blas_threads))
        except ImportError:  # pragma: no cover
            pass
    with limiter:
        info = _run_nbglm(directory, out_csv, threshold, dispersion)
    info["blas_threads"] = blas_threads
    Path(str(out_csv) + ".json").write_text(json.dumps(info, indent=1))
    return info


def _run_nbglm(directory, out_csv, threshold: float, dispersion: str) -> dict:
    t_start = time.perf_counter()
    import statsmodels
    import statsmodels.api as sm

    timings: dict[str, float] = {}
    t = time.perf_counter()
    prob = read_exchange(directory)
    timings["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    Z, znames, assigned = nbglm_design(prob, threshold)
    pairs = prob.pairs.reset_index(drop=True)
    gene_ix = {g: i for i, g in enumerate(prob.genes)}
    unknown = sorted(set(pairs["gene"]) - set(gene_ix))
    if unknown:
        raise KeyError(f"pairs.csv names genes not in meta.json, e.g. {unknown[:5]}")
    # carrier indicator per distinct (target, pair_type-resolution)
    unit_key = [
        (tg, "negative" if pt == "negative" else "target")
        for tg, pt in zip(pairs["target"], pairs["pair_type"])
    ]
    indicators: dict[tuple[str, str], np.ndarray] = {}
    for key in dict.fromkeys(unit_key):
        cols = prob.target_grnas(key[0], "negative" if key[1] == "negative" else "discovery")
        indicators[key] = _carrier(assigned, cols)
    counts_csc = prob.counts.tocsc()
    timings["design_s"] = time.perf_counter() - t

    n = len(pairs)
    coef = np.full(n, np.nan)
    se = np.full(n, np.nan)
    pval = np.full(n, np.nan)
    alpha_used = np.full(n, np.nan)
    status = np.array(["ok"] * n, dtype=object)
    n_trt = np.array([int(indicators[k].sum()) for k in unit_key], dtype=np.int64)

    t_gene = t_pair = 0.0
    alpha_notes: dict[str, int] = {}
    by_gene = pairs.groupby("gene", sort=False).indices
    gc.collect()
    gc.freeze()  # long-lived objects (imports, data) out of the per-gene collections below
    for gene, rows in by_gene.items():
        j = gene_ix[gene]
        y = counts_csc[:, j].toarray().ravel().astype(np.float64)
        if y.sum() == 0:
            status[rows] = "all-zero"
            continue
        t = time.perf_counter()
        if dispersion != "ml-pair":
            alpha, start, note = _gene_alpha(sm, y, Z, dispersion)
            alpha_notes[note] = alpha_notes.get(note, 0) + 1
        t_gene += time.perf_counter() - t
        t = time.perf_counter()
        fitted_keys: dict[tuple[str, str], tuple] = {}
        for r in rows:
            key = unit_key[r]
            if key in fitted_keys:
                coef[r], se[r], pval[r], alpha_used[r], status[r] = fitted_keys[key]
                continue
            x = indicators[key].astype(np.float64)
            k = int(x.sum())
            if k == 0 or k == len(x):
                fitted_keys[key] = (
                    np.nan,
                    np.nan,
                    np.nan,
                    np.nan,
                    "no-carriers" if k == 0 else "all-carriers",
                )
                coef[r], se[r], pval[r], alpha_used[r], status[r] = fitted_keys[key]
                continue
            D = np.column_stack([Z, x])
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if dispersion == "ml-pair":
                        pois = sm.GLM(y, D, family=sm.families.Poisson()).fit()
                        fit = sm.NegativeBinomial(y, D, loglike_method="nb2").fit(
                            start_params=np.append(pois.params, 0.5),
                            method="bfgs",
                            maxiter=500,
                            disp=0,
                        )
                        b, s_, p_ = fit.params[-2], fit.bse[-2], fit.pvalues[-2]
                        a_ = float(fit.params[-1])
                        st = "ok" if fit.mle_retvals.get("converged", True) else "not-converged"
                    else:
                        fit = sm.GLM(y, D, family=sm.families.NegativeBinomial(alpha=alpha)).fit(
                            start_params=np.append(start, 0.0), maxiter=100
                        )
                        b, s_, p_ = fit.params[-1], fit.bse[-1], fit.pvalues[-1]
                        a_ = alpha
                        st = "ok" if fit.converged else "not-converged"
                if st == "ok" and not np.isfinite(p_):
                    st = "nan-se"  # e.g. ml-pair with alpha at its boundary 0
                res = (float(b), float(s_), float(p_), a_, st)
            except Exception as exc:  # noqa: BLE001 -- reported per pair, never raised
                res = (np.nan, np.nan, np.nan, np.nan, f"error:{type(exc).__name__}")
            fitted_keys[key] = res
            coef[r], se[r], pval[r], alpha_used[r], status[r] = res
        t_pair += time.perf_counter() - t
        # statsmodels results hold reference cycles (model <-> results <-> WLS arrays of
        # cells x p); without a collection they pile up to GBs on ~50k cells
        gc.collect()
    gc.unfreeze()
    timings["gene_dispersion_s"] = t_gene
    timings["pair_fits_s"] = t_pair

    out = pairs.copy()
    out["log2fc"] = coef / math.log(2)
    out["pvalue"] = pval
    out["se_log2fc"] = se / math.log(2)
    out["alpha"] = alpha_used
    out["n_trt_cells"] = n_trt
    out["status"] = status
    info = {
        "method": "nbglm",
        "statsmodels_version": statsmodels.__version__,
        "threshold": threshold,
        "dispersion": dispersion,
        "dispersion_notes": alpha_notes,
        "design": znames + ["carrier"],
        "n_cells": prob.n_cells,
        "n_genes_fitted": len(by_gene),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "run_s": round(time.perf_counter() - t_start, 3),
    }
    return _finish(out_csv, out, info)


# --------------------------------------------------------------------------------------
# synthetic high-MOI problem + summary
# --------------------------------------------------------------------------------------


def simulate(
    directory,
    *,
    n_cells: int = 5000,
    n_genes: int = 200,
    n_targets: int = 40,
    grnas_per_target: int = 2,
    n_nt: int = 10,
    moi: float = 8.0,
    n_effects: int = 10,
    effect: float = -1.0,
    n_discovery_per_target: int = 5,
    n_negative_genes: int | None = None,
    theta: float = 5.0,
    lib_per_grna: float = 0.06,
    seed: int = 0,
) -> Path:
    """A small high-MOI screen with known cis effects; writes the exchange files + truth.csv.

    Each cell draws Poisson(moi) distinct gRNAs; a carried gRNA has lognormal UMI counts
    (a few fall below 5), every gRNA has sparse ambient counts (mostly 1-2). Library size
    rises with the number of gRNAs carried (``lib_per_grna`` on the log scale, +6% per gRNA) and with a 2-level batch, which
    also shifts gene means. The first ``n_effects`` targets each change one gene (their
    "cis" gene) by ``effect`` on the log scale in carrying cells. Pairs: each effect as
    ``positive``; ``n_discovery_per_target`` random null genes per target as
    ``discovery``; every NT gRNA against every gene in those pairs (or against
    ``n_negative_genes`` of them drawn at random) as ``negative``.
    """
    rng = np.random.default_rng(seed)
    targets = [f"T{i:02d}" for i in range(n_targets)]
    grnas, gtargets = [], []
    for tg in targets:
        for k in range(grnas_per_target):
            grnas.append(f"{tg}_g{k}")
            gtargets.append(tg)
    for k in range(n_nt):
        grnas.append(f"NT_{k:02d}")
        gtargets.append(NT_DEFAULT)
    G = len(grnas)

    # which gRNAs each cell carries
    k_cell = np.minimum(rng.poisson(moi, n_cells), G)
    carry = np.zeros((n_cells, G), dtype=bool)
    for c in range(n_cells):
        carry[c, rng.choice(G, size=k_cell[c], replace=False)] = True
    umi = np.where(carry, np.round(rng.lognormal(np.log(20), 0.8, carry.shape)), 0.0)
    umi += rng.poisson(0.08, carry.shape) * rng.integers(1, 3, carry.shape)  # ambient
    grna_counts = sparse.csr_matrix(umi.astype(np.int64))

    batch = rng.integers(0, 2, n_cells)
    pct_mito = rng.normal(5, 1.5, n_cells).clip(0.1)
    lib = np.exp(rng.normal(np.log(3000), 0.35, n_cells) + lib_per_grna * k_cell + 0.15 * batch)

    genes = [f"G{j:03d}" for j in range(n_genes)]
    base = rng.gamma(0.6, 1.0, n_genes)
    base = base / base.sum() * rng.uniform(0.3, 0.8)  # fraction of library in these genes
    batch_eff = rng.normal(0, 0.2, n_genes)
    log_mu = np.log(lib)[:, None] + np.log(base)[None, :] + batch[:, None] * batch_eff[None, :]
    effect_genes = rng.choice(n_genes, size=n_effects, replace=False)
    truth = []
    for i in range(n_effects):
        tg = targets[i]
        cols = [g for g, t in enumerate(gtargets) if t == tg]
        # the effect follows the biology (any carried gRNA), not the thresholded call
        carrier = carry[:, cols].any(axis=1)
        log_mu[carrier, effect_genes[i]] += effect
        truth.append((tg, genes[effect_genes[i]], effect))
    mu = np.exp(log_mu)
    y = rng.negative_binomial(theta, theta / (theta + mu))
    counts = sparse.csr_matrix(y.astype(np.int64))

    pairs = [(tg, g, "positive") for tg, g, _ in truth]
    eff_set = {(tg, g) for tg, g, _ in truth}
    for tg in targets:
        choices = rng.choice(n_genes, size=n_discovery_per_target, replace=False)
        for j in choices:
            if (tg, genes[j]) not in eff_set:
                pairs.append((tg, genes[j], "discovery"))
    pairs = pd.DataFrame(pairs, columns=["target", "gene", "pair_type"])
    neg_genes = list(dict.fromkeys(pairs["gene"]))
    if n_negative_genes is not None and n_negative_genes < len(neg_genes):
        pick = np.sort(rng.choice(len(neg_genes), size=int(n_negative_genes), replace=False))
        neg_genes = [neg_genes[i] for i in pick]
    nt_ids = [g for g, t in zip(grnas, gtargets) if t == NT_DEFAULT]
    pairs = pd.concat([pairs, negative_pairs(nt_ids, neg_genes)], ignore_index=True)
    cov = pd.DataFrame({"batch": np.where(batch == 1, "b1", "b0"), "pct_mito": pct_mito.round(3)})
    d = write_exchange(
        directory, counts, grna_counts, genes, grnas, gtargets, pairs, cov, NT_DEFAULT, ["batch"]
    )
    pd.DataFrame(truth, columns=["target", "gene", "log_effect"]).to_csv(
        d / "truth.csv", index=False
    )
    return d


def summarize(directory, out_csv, alpha: float = 0.05) -> dict:
    """Calibration of negative / null-discovery pairs and recovery of truth.csv effects."""
    from scipy import stats

    d = Path(directory)
    res = pd.read_csv(out_csv, dtype={"target": str, "gene": str})
    truth = (
        pd.read_csv(d / "truth.csv", dtype={"target": str, "gene": str})
        if (d / "truth.csv").exists()
        else None
    )
    summary: dict = {"out_csv": str(out_csv)}
    eff = set()
    if truth is not None:
        eff = set(zip(truth["target"], truth["gene"]))
    is_true = np.array([(t, g) in eff for t, g in zip(res["target"], res["gene"])])
    eff_gene = res["gene"].isin({g for _, g in eff}).to_numpy()
    is_neg = (res["pair_type"] == "negative").to_numpy()
    for label, mask in (
        ("negative", is_neg),
        # NT pairs on genes that some target really changes: in high MOI, carrying an NT
        # gRNA goes with carrying more gRNAs, so these are the first to show confounding
        ("negative_on_effect_genes", is_neg & eff_gene),
        ("negative_on_other_genes", is_neg & ~eff_gene),
        ("discovery_null", ((res["pair_type"] == "discovery").to_numpy() & ~is_true)),
        (
            "discovery_null_on_effect_genes",
            ((res["pair_type"] == "discovery").to_numpy() & ~is_true & eff_gene),
        ),
        (
            "discovery_null_on_other_genes",
            ((res["pair_type"] == "discovery").to_numpy() & ~is_true & ~eff_gene),
        ),
        ("calibration", (res["pair_type"] == "calibration").to_numpy()),
    ):
        p = res.loc[mask, "pvalue"].dropna().to_numpy(dtype=float)
        if p.size == 0:
            continue
        summary[label] = {
            "n": int(p.size),
            "frac_p_lt_0.05": round(float(np.mean(p < 0.05)), 4),
            "frac_p_lt_0.01": round(float(np.mean(p < 0.01)), 4),
            "median_p": round(float(np.median(p)), 4),
            "ks_uniform_p": float(stats.kstest(p, "uniform").pvalue),
            "min_p": float(p.min()),
        }
    if truth is not None and is_true.any():
        tr = res.loc[is_true]
        m = len(res.loc[res["pair_type"] != "negative"])
        summary["true_effects"] = {
            "n": len(tr),
            "n_p_lt_0.05": int((tr["pvalue"] < 0.05).sum()),
            "n_bonferroni_sig": int((tr["pvalue"] < alpha / max(m, 1)).sum()),
            "max_p": float(tr["pvalue"].max()),
            "median_log2fc": float(tr["log2fc"].median()),
            "expected_log2fc": float(truth["log_effect"].median() / math.log(2)),
        }
    return summary


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _final_line(extra: dict) -> None:
    own, kids = _peak_rss_mb()
    line = {
        **extra,
        "wall_s": round(time.perf_counter() - _T0, 3),
        "peak_rss_mb": round(own, 1),
        "peak_rss_children_mb": round(kids, 1),
    }
    print(json.dumps(line), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pysceptre", help="SCEPTRE (pysceptre) high-MOI analysis")
    p.add_argument("dir")
    p.add_argument("out")
    p.add_argument("--threshold", type=float, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-jobs", type=int, default=1)
    p.add_argument("--calibration-check", action="store_true")
    p.add_argument(
        "--sceptre-drop-rule",
        action="store_true",
        help="drop continuous extra covariates as sceptre's auto-formula does",
    )
    p = sub.add_parser("nbglm", help="statsmodels NB2 GLM per pair")
    p.add_argument("dir")
    p.add_argument("out")
    p.add_argument("--threshold", type=float, default=5)
    p.add_argument("--dispersion", default="ml-gene", choices=["ml-gene", "mom-gene", "ml-pair"])
    p.add_argument("--blas-threads", type=int, default=1, help="0 = leave BLAS threads alone")
    p = sub.add_parser("simulate", help="write a synthetic high-MOI problem")
    p.add_argument("dir")
    p.add_argument("--cells", type=int, default=5000)
    p.add_argument("--genes", type=int, default=200)
    p.add_argument("--targets", type=int, default=40)
    p.add_argument("--nt", type=int, default=10)
    p.add_argument("--moi", type=float, default=8.0)
    p.add_argument("--effects", type=int, default=10)
    p.add_argument("--discovery-per-target", type=int, default=5)
    p.add_argument(
        "--negative-genes",
        type=int,
        default=None,
        help="NT gRNAs are tested against this many pair genes (default: all)",
    )
    p.add_argument(
        "--lib-per-grna",
        type=float,
        default=0.06,
        help="log library size added per gRNA a cell carries (the confounder)",
    )
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("summarize", help="calibration / power summary of a result")
    p.add_argument("dir")
    p.add_argument("out", nargs="+")
    a = ap.parse_args(argv)

    if a.cmd == "pysceptre":
        info = run_pysceptre(
            a.dir,
            a.out,
            a.threshold,
            seed=a.seed,
            n_jobs=a.n_jobs,
            calibration_check=a.calibration_check,
            sceptre_drop_rule=a.sceptre_drop_rule,
        )
        _final_line(
            {
                "method": "pysceptre",
                "out": a.out,
                "n_pairs": info["n_pairs"],
                "run_s": info["run_s"],
                "version": info["pysceptre_version"],
            }
        )
    elif a.cmd == "nbglm":
        info = run_nbglm(
            a.dir, a.out, a.threshold, dispersion=a.dispersion, blas_threads=a.blas_threads or None
        )
        _final_line(
            {
                "method": "nbglm",
                "out": a.out,
                "n_pairs": info["n_pairs"],
                "run_s": info["run_s"],
                "dispersion": a.dispersion,
            }
        )
    elif a.cmd == "simulate":
        d = simulate(
            a.dir,
            n_cells=a.cells,
            n_genes=a.genes,
            n_targets=a.targets,
            n_nt=a.nt,
            moi=a.moi,
            n_effects=a.effects,
            n_discovery_per_target=a.discovery_per_target,
            n_negative_genes=a.negative_genes,
            lib_per_grna=a.lib_per_grna,
            seed=a.seed,
        )
        print(json.dumps({"dir": str(d), "n_pairs": len(pd.read_csv(d / "pairs.csv"))}))
    elif a.cmd == "summarize":
        for o in a.out:
            print(json.dumps(summarize(a.dir, o)))
            cal = Path(str(o).removesuffix(".csv") + ".calibration.csv")
            if cal.exists():
                print(json.dumps(summarize(a.dir, cal)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
