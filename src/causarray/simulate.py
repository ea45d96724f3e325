"""Perturb-seq screen simulators with ground truth.

``simulate_screen``: a low-MOI screen (each cell carries one perturbation or none).
``simulate_highmoi_screen``: a high-MOI screen (each cell carries several gRNAs, as in
enhancer screens such as Gasperini et al. 2019; model in its docstring): cells with
more gRNAs differ in size and latent state, so a model that leaves the number of
gRNAs out is confounded for every target.

Low-MOI model, for cell i in group g(i) (control or perturbation k) and gene j::

    u_i      ~ N(delta_{g(i)}, I_r)                    latent confounders; delta_ctrl = 0,
                                                       delta_k ~ N(0, confounding^2 I_r)
    s_i      = exp(N(0, libsize_sd^2))                 library size factor
    log mu_ij = log s_i + b_j + u_i' gamma_j + beta_jk  (beta_jk = 0 for controls)
    y_ij     ~ NB(mu_ij, size_j)

Because the confounders' distribution differs between perturbed and control
cells, naive comparisons are biased by ``gamma_j' delta_k``.  The causal
log fold change of gene j under perturbation k is ``beta_jk`` (stored in
``varm['true_lfc']``).  Baseline log-means ``b_j`` follow a normal law centred
well below zero, so most genes have < 1 count per cell with a tail of highly
expressed genes, as in real droplet data.

High-MOI model (``simulate_highmoi_screen``), for cell i and gene j::

    m_i       ~ max(Poisson(moi), min_guides)          gRNAs per cell, drawn uniformly
                                                       without replacement from the library
    z_i       = N(0, libsize_sd^2) + moi_libsize (m_i - moi) / moi     log cell size
    u_i       ~ N(moi_confounding (m_i - moi) / sqrt(moi) w, I_r)     latent state
    log mu_ij = b_j + (1 + lambda_j) z_i + u_i' gamma_j + sum_{t carried by i} beta_jt
    y_ij      ~ NB(mu_ij, size_j)

``beta_jt`` is sparse: a non-null target knocks down one cis gene (within
``cis_window`` of its TSS; TSS-targeting positive controls more strongly), null
targets change nothing.  gRNA UMIs: NB(guide_umi_mean e^{z_i}, 2) + 1 for a carried
gRNA, Poisson(ambient) otherwise.  Ground truth in ``uns['true_effects']``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._validation import (
    check_all_at_least_one,
    check_at_least,
    check_nonnegative_int,
    check_positive,
    check_r,
)

CTRL_LABEL = "non-targeting"
PERT_COL = "perturbation"


def simulate_screen(n_ctrl: int = 2000, n_perts: int = 15, cells_per_pert: int = 300,
                    n_genes: int = 2000, r: int = 5, confounding: float = 1.0,
                    effect_frac: float = 0.05, effect_size: tuple[float, float] = (0.5, 1.5),
                    null: bool = False, loading_sd: float = 0.4, baseline_mean: float = -1.0,
                    baseline_sd: float = 1.5, size: float | tuple[float, float] = (2.0, 20.0),
                    libsize_sd: float = 0.3, knockdown: float | None = 2.0,
                    random_state: int = 0):
    """Simulate a single-cell CRISPR screen with latent confounding.

    Parameters
    ----------
    n_ctrl, n_perts, cells_per_pert, n_genes : layout of the screen.
    r : number of latent confounders (0 for none).
    confounding : SD of the per-perturbation shift of the confounders' mean; 0 means
        treatment is independent of the confounders.
    effect_frac : share of genes with a direct effect per perturbation.
    effect_size : range of |beta| (natural log) for affected genes; signs are random.
    null : if True no gene has a direct effect (and no knockdown of a target gene).
    loading_sd : SD of the confounder loadings gamma_j.
    baseline_mean, baseline_sd : normal law of the baseline log-means b_j.
    size : NB size, a scalar or a (low, high) range drawn log-uniformly per gene.
    libsize_sd : SD of the log library-size factors.
    knockdown : log-fold decrease of each perturbation's own target gene (the first
        ``n_perts`` genes are the targets); None for no targets.
    random_state : seed.

    Returns
    -------
    anndata.AnnData
        ``X`` raw counts (CSR, int64); ``obs['perturbation']``; ``uns['pert_col']``,
        ``uns['ctrl_label']``, ``uns['perturbations']``; ``obsm['U_true']``;
        ``obs['size_factor_true']``; ``varm['true_lfc']`` (p x a, natural log, columns in
        ``uns['perturbations']`` order); ``varm['Gamma_true']``; ``var['size_true']``,
        ``var['baseline_log_mean']``; ``uns['delta_true']`` (a x r shifts).
    """
    import anndata as ad

    check_all_at_least_one(n_ctrl=n_ctrl, n_perts=n_perts, cells_per_pert=cells_per_pert,
                           n_genes=n_genes)
    rng = np.random.default_rng(random_state)
    n = n_ctrl + n_perts * cells_per_pert
    group = np.repeat(np.arange(-1, n_perts), [n_ctrl] + [cells_per_pert] * n_perts)
    names = [f"PERT{k + 1:03d}" for k in range(n_perts)]

    delta = rng.normal(0.0, confounding, size=(n_perts, r)) if r else np.zeros((n_perts, 0))
    U = rng.normal(size=(n, r))
    treated = group >= 0
    U[treated] += delta[group[treated]]
    Gamma = rng.normal(0.0, loading_sd, size=(n_genes, r))

    b = np.maximum(rng.normal(baseline_mean, baseline_sd, size=n_genes), -4.5)
    if np.isscalar(size):
        sizes = np.full(n_genes, float(size))
    else:
        sizes = np.exp(rng.uniform(np.log(size[0]), np.log(size[1]), n_genes))
    s = np.exp(rng.normal(0.0, libsize_sd, size=n))

    lfc = np.zeros((n_genes, n_perts))
    if not null:
        n_eff = int(round(effect_frac * n_genes))
        for k in range(n_perts):
            idx = rng.choice(n_genes, n_eff, replace=False)
            mag = rng.uniform(effect_size[0], effect_size[1], n_eff)
            lfc[idx, k] = mag * rng.choice([-1.0, 1.0], n_eff)
        if knockdown is not None and n_genes >= n_perts:
            # targets are moderately expressed genes so the knockdown is observable
            b[:n_perts] = np.maximum(b[:n_perts], 0.5)
            lfc[np.arange(n_perts), np.arange(n_perts)] = -abs(knockdown)

    eta = np.log(s)[:, None] + b[None, :] + U @ Gamma.T
    eta[treated] += lfc.T[group[treated]]
    mu = np.exp(np.clip(eta, -30, 12))
    counts = rng.negative_binomial(sizes[None, :], sizes[None, :] / (sizes[None, :] + mu))

    labels = np.where(treated, np.array(names, dtype=object)[np.maximum(group, 0)], CTRL_LABEL)
    obs = pd.DataFrame({PERT_COL: pd.Categorical(labels, categories=[CTRL_LABEL] + names),
                        "size_factor_true": s},
                       index=[f"cell{i:06d}" for i in range(n)])
    var = pd.DataFrame({"baseline_log_mean": b, "size_true": sizes},
                       index=[f"GENE{j:05d}" for j in range(n_genes)])
    adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.int64)), obs=obs, var=var)
    adata.obsm["U_true"] = U
    adata.varm["true_lfc"] = lfc
    adata.varm["Gamma_true"] = Gamma
    adata.uns["pert_col"] = PERT_COL
    adata.uns["ctrl_label"] = CTRL_LABEL
    adata.uns["perturbations"] = np.array(names)
    adata.uns["delta_true"] = delta
    adata.uns["simulation"] = dict(n_ctrl=n_ctrl, n_perts=n_perts, cells_per_pert=cells_per_pert,
                                   n_genes=n_genes, r=r, confounding=confounding,
                                   effect_frac=effect_frac, null=null, random_state=random_state)
    return adata


def design_from_simulation(adata):
    """Dense (Y, X, A) of a simulated screen: counts, intercept, one-hot perturbations."""
    Y = adata.X.toarray().astype(float) if sp.issparse(adata.X) else np.asarray(adata.X, float)
    labels = adata.obs[adata.uns["pert_col"]].astype(str).to_numpy()
    perts = list(adata.uns["perturbations"])
    A = (labels[:, None] == np.array(perts)[None, :]).astype(float)
    X = np.ones((Y.shape[0], 1))
    return Y, X, A


# ----------------------------------------------------------------------------------
# high-MOI screens
# ----------------------------------------------------------------------------------
#: Layout tag of a high-MOI simulation (``uns['layout']``).
HIGHMOI_LAYOUT = "high-moi"
#: Entries per block of cells when drawing the gRNAs (bounds the temporaries).
_GUIDE_BLOCK_ENTRIES = 1 << 22
#: Half-width (bp) of a target region around its centre.
_TARGET_HALF_WIDTH = 250
#: NB size of the UMI counts of a carried gRNA.
_GUIDE_UMI_SIZE = 2.0


def simulate_highmoi_screen(n_cells: int = 4000, n_genes: int = 300, n_targets: int = 60,
                            guides_per_target: int = 2, n_nt_guides: int = 10,
                            moi: float = 8.0, min_guides: int = 1, r: int = 3,
                            null_frac: float = 0.5, n_positive: int = 5,
                            effect_size: tuple[float, float] = (0.3, 1.0),
                            positive_effect: tuple[float, float] = (1.5, 2.5),
                            cis_window: int = 1_000_000, trans_frac: float = 0.0,
                            libsize_sd: float = 0.3, moi_libsize: float = 0.3,
                            moi_confounding: float = 0.5, size_slope_sd: float = 0.2,
                            loading_sd: float = 0.4, baseline_mean: float = -1.0,
                            baseline_sd: float = 1.5, cis_gene_min_log_mean: float = 0.5,
                            size: float | tuple[float, float] = (2.0, 20.0),
                            batch_sd: float = 0.1, guide_umi_mean: float = 30.0,
                            ambient: float = 0.1, n_chromosomes: int = 10,
                            chrom_length: int = 50_000_000, random_state: int = 0):
    """Simulate a high-MOI CRISPRi screen (enhancer-screen-like) with ground truth.

    Model, for cell i and gene j::

        library   n_targets targets x guides_per_target gRNAs + n_nt_guides
                  non-targeting gRNAs (G gRNAs in all)
        m_i       ~ max(Poisson(moi), min_guides), at most G    number of gRNAs
        gRNAs     m_i of the G, uniformly without replacement
        z_i       = N(0, libsize_sd^2) + moi_libsize (m_i - moi) / moi      log cell size
        u_i       ~ N(moi_confounding (m_i - moi) / sqrt(moi) w, I_r)     latent state,
                  w a fixed random unit vector
        batch_i   ~ Bernoulli(1/2); c_j ~ N(0, batch_sd^2) added in batch 2
        b_j       ~ N(baseline_mean, baseline_sd^2); gamma_j ~ N(0, loading_sd^2 I_r);
                  lambda_j ~ N(0, size_slope_sd^2)
        log mu_ij = b_j + (1 + lambda_j) z_i + u_i' gamma_j + c_j 1{batch 2}
                    + sum_{targets t carried by i} beta_jt
        y_ij      ~ NB(mu_ij, size_j)

    A target is carried when at least one of its gRNAs is (two gRNAs of one target act
    once).  Cells with many gRNAs are larger and shifted in latent state, and carry each
    target more often: leaving ``m_i`` out of a model confounds every target.

    Effects.  Genes lie on ``n_chromosomes`` chromosomes (``var['chr']``, ``var['tss']``)
    and every target is placed near an anchor gene: ``n_positive`` targets sit on their
    (distinct) gene's TSS (``'tss'``, positive controls), the others within
    ``cis_window`` bp of their gene's TSS (``'enhancer'``).  A share ``1 - null_frac`` of
    all targets (rounded; the TSS targets first) is non-null: beta = -U(positive_effect)
    on its anchor gene for a TSS target, -U(effect_size) for an enhancer (CRISPRi
    knockdown).  With ``trans_frac`` > 0 each non-null target also changes a share
    ``trans_frac`` of the other genes by +-U(effect_size).  Null targets change nothing;
    ``null_frac=1`` is a complete null (the TSS targets too).  Anchor genes' baselines
    are raised to at least ``cis_gene_min_log_mean`` (null and non-null alike) so that a
    knockdown is observable.

    gRNA UMI counts.  A carried gRNA has ``NB(guide_umi_mean exp(z_i), size 2) + 1``
    UMIs, an uncarried one ``Poisson(ambient)`` ambient UMIs; a threshold of 5 UMIs
    recovers the assignment with some error.

    Parameters
    ----------
    n_cells, n_genes, n_targets, guides_per_target, n_nt_guides : layout of the screen.
    moi, min_guides : Poisson mean and floor of the number of gRNAs per cell.
    r : number of latent factors (0 for none).
    null_frac : share of the targets without effect (0 to 1).
    n_positive : number of TSS-targeting positive-control targets.
    effect_size, positive_effect : ranges of the knockdown |beta| (natural log) of
        enhancer and TSS targets.
    cis_window : largest distance (bp) between an enhancer target and its gene's TSS.
    trans_frac : share of the other genes each non-null target changes in trans.
    libsize_sd, moi_libsize : SD of the log cell size; its slope in (m_i - moi) / moi.
    moi_confounding : shift of the latent state per (m_i - moi) / sqrt(moi).
    size_slope_sd : SD of the genes' extra response lambda_j to the cell size.
    loading_sd, baseline_mean, baseline_sd : laws of gamma_j and b_j.
    cis_gene_min_log_mean : floor of the anchor genes' baseline log means.
    size : NB size, a scalar or a (low, high) range drawn log-uniformly per gene.
    batch_sd : SD of the genes' batch-2 shifts.
    guide_umi_mean, ambient : mean UMIs of a carried gRNA (cell of size 1); mean ambient
        UMIs of an uncarried gRNA.
    n_chromosomes, chrom_length : the simulated genome (TSS uniform on each chromosome).
    random_state : seed.

    Returns
    -------
    anndata.AnnData
        ``X`` raw counts (CSR, int64); ``obsm['grna_counts']`` (CSR int64, cells x gRNAs,
        columns in ``uns['grna_names']`` order, targets in ``uns['grna_target']``);
        ``obsm['grna_true']`` (CSR bool, the carried gRNAs); ``obsm['U_true']``;
        ``obs['n_guides_true']``, ``obs['batch']``, ``obs['size_factor_true']``
        (exp z_i); ``var['chr']``, ``var['tss']``, ``var['baseline_log_mean']``,
        ``var['size_true']``, ``var['size_slope_true']``; ``varm['Gamma_true']``;
        ``uns['target_table']`` (target, chr, start, end), ``uns['target_type']``
        (target -> 'tss' | 'enhancer'), ``uns['true_effects']`` (target, gene, beta: every
        nonzero beta), ``uns['positive_control_pairs']`` (target, gene: the TSS targets
        with an effect), ``uns['targets']``, ``uns['ctrl_label']`` (``'non-targeting'``),
        ``uns['layout']`` (``'high-moi'``), ``uns['moi_direction_true']`` (w),
        ``uns['simulation']`` (the settings).
    """
    _check_highmoi_settings(n_cells=n_cells, n_genes=n_genes, n_targets=n_targets,
                            guides_per_target=guides_per_target, n_nt_guides=n_nt_guides,
                            moi=moi, min_guides=min_guides, r=r, null_frac=null_frac,
                            n_positive=n_positive, cis_window=cis_window,
                            trans_frac=trans_frac, guide_umi_mean=guide_umi_mean,
                            ambient=ambient, n_chromosomes=n_chromosomes)
    rng = np.random.default_rng(random_state)
    targets, grnas, grna_target, guide_idx = _grna_library(n_targets, guides_per_target,
                                                           n_nt_guides)
    carried, m = _assign_guides(rng, n_cells, len(grnas), moi, min_guides)
    z, U, w = _cell_state(rng, m, moi, r, libsize_sd, moi_libsize, moi_confounding)
    batch = rng.integers(0, 2, n_cells)
    chrom, tss = _genome(rng, n_genes, n_chromosomes, chrom_length)
    anchor, is_tss, table = _place_targets(rng, chrom, tss, targets, n_positive, cis_window)
    beta = _effect_matrix(rng, anchor, is_tss, null_frac, effect_size, positive_effect,
                          trans_frac, n_genes)
    genes = _gene_parameters(rng, n_genes, r, loading_sd, baseline_mean, baseline_sd,
                             size_slope_sd, size, batch_sd)
    if n_targets:
        genes["b"][anchor] = np.maximum(genes["b"][anchor], cis_gene_min_log_mean)
    carries = _carried_targets(carried, guide_idx, n_targets)
    counts = _highmoi_counts(rng, genes, z, U, batch, carries, beta)
    umis = _grna_umis(rng, carried, np.exp(z), guide_umi_mean, ambient)
    settings = {"n_cells": n_cells, "n_genes": n_genes, "n_targets": n_targets,
                "guides_per_target": guides_per_target, "n_nt_guides": n_nt_guides,
                "moi": moi, "min_guides": min_guides, "r": r, "null_frac": null_frac,
                "n_positive": n_positive, "effect_size": list(effect_size),
                "positive_effect": list(positive_effect), "cis_window": cis_window,
                "trans_frac": trans_frac, "libsize_sd": libsize_sd,
                "moi_libsize": moi_libsize, "moi_confounding": moi_confounding,
                "size_slope_sd": size_slope_sd, "guide_umi_mean": guide_umi_mean,
                "ambient": ambient, "random_state": random_state}
    adata = _highmoi_anndata(counts, genes, chrom, tss, z, U, batch, m)
    adata.obsm["grna_counts"] = umis
    adata.obsm["grna_true"] = carried
    adata.uns.update(_highmoi_truth(targets, grnas, grna_target, table, is_tss, anchor,
                                    beta, adata.var_names))
    adata.uns["moi_direction_true"] = w
    adata.uns["simulation"] = settings
    return adata


def _check_highmoi_settings(**s) -> None:
    """Input rules of :func:`simulate_highmoi_screen` (the ``_validation`` helpers)."""
    check_all_at_least_one(n_cells=s["n_cells"], n_genes=s["n_genes"],
                           guides_per_target=s["guides_per_target"],
                           n_chromosomes=s["n_chromosomes"])
    for name in ("n_targets", "n_nt_guides", "min_guides", "n_positive"):
        check_nonnegative_int(name, s[name])
    check_all_at_least_one(**{"n_targets * guides_per_target + n_nt_guides":
                              s["n_targets"] * s["guides_per_target"] + s["n_nt_guides"]})
    check_r(s["r"])
    for name in ("moi", "cis_window", "guide_umi_mean"):
        check_positive(name, s[name])
    check_at_least("ambient", s["ambient"], 0)
    for name in ("null_frac", "trans_frac"):
        check_at_least(name, s[name], 0)
        check_at_least(f"1 - {name}", 1 - s[name], 0)
    check_at_least("n_targets - n_positive", s["n_targets"] - s["n_positive"], 0)
    check_at_least("n_genes - n_positive", s["n_genes"] - s["n_positive"], 0)


def _grna_library(n_targets: int, guides_per_target: int, n_nt_guides: int):
    """Target names, gRNA names, each gRNA's target label and target index (-1: NT).

    Targets ``T00001 ...``, their gRNAs ``T00001_g1 ...`` in target order, then the
    non-targeting gRNAs ``NT_g1 ...`` (label ``'non-targeting'``).
    """
    targets = [f"T{t + 1:05d}" for t in range(n_targets)]
    grnas = [f"{t}_g{g + 1}" for t in targets for g in range(guides_per_target)]
    grnas += [f"NT_g{g + 1}" for g in range(n_nt_guides)]
    labels = [t for t in targets for _ in range(guides_per_target)] + [CTRL_LABEL] * n_nt_guides
    index = np.concatenate([np.repeat(np.arange(n_targets), guides_per_target),
                            np.full(n_nt_guides, -1)]).astype(np.int64)
    return targets, grnas, labels, index


def _assign_guides(rng: np.random.Generator, n_cells: int, n_guides: int, moi: float,
                   min_guides: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """Carried gRNAs (CSR bool, cells x gRNAs) and their number per cell.

    m_i ~ Poisson(moi) clipped to [min_guides, n_guides]; the m_i gRNAs are the first
    m_i of a random permutation of the library (uniform, without replacement), drawn in
    blocks of cells.
    """
    m = np.clip(rng.poisson(moi, n_cells), min(min_guides, n_guides), n_guides)
    rows, cols = [], []
    step = max(1, _GUIDE_BLOCK_ENTRIES // n_guides)
    for start in range(0, n_cells, step):
        mb = m[start:start + step]
        perm = rng.permuted(np.broadcast_to(np.arange(n_guides), (mb.size, n_guides)), axis=1)
        r_, c_ = np.nonzero(np.arange(n_guides)[None, :] < mb[:, None])
        rows.append(r_ + start)
        cols.append(perm[r_, c_])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    carried = sp.csr_matrix((np.ones(rows.size, dtype=bool), (rows, cols)),
                            shape=(n_cells, n_guides))
    carried.sort_indices()
    return carried, m.astype(np.int64)


def _cell_state(rng: np.random.Generator, m: np.ndarray, moi: float, r: int,
                libsize_sd: float, moi_libsize: float, moi_confounding: float):
    """Log cell sizes z (n,), latent factors U (n x r) and the direction w (r,).

    z_i = N(0, libsize_sd^2) + moi_libsize (m_i - moi) / moi;
    u_i = N(0, I_r) + moi_confounding (m_i - moi) / sqrt(moi) w, w a random unit vector.
    """
    n = m.size
    z = rng.normal(0.0, libsize_sd, n) + moi_libsize * (m - moi) / moi
    w = rng.normal(size=r)
    w = w / np.linalg.norm(w) if r else w
    U = rng.normal(size=(n, r)) + (moi_confounding * (m - moi) / np.sqrt(moi))[:, None] * w
    return z, U, w


def _genome(rng: np.random.Generator, n_genes: int, n_chromosomes: int,
            chrom_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Genes' chromosomes (``'chr1' ...``) and TSS positions, in genomic order."""
    chrom = rng.integers(0, n_chromosomes, n_genes)
    tss = rng.integers(0, chrom_length, n_genes)
    order = np.lexsort((tss, chrom))
    names = np.array([f"chr{c + 1}" for c in range(n_chromosomes)], dtype=object)
    return names[chrom[order]], tss[order].astype(np.int64)


def _place_targets(rng: np.random.Generator, chrom: np.ndarray, tss: np.ndarray,
                   targets: list[str], n_positive: int, cis_window: int):
    """Anchor gene, TSS flag and position table (target, chr, start, end) of each target.

    ``n_positive`` targets, chosen at random, sit on the TSS of distinct genes; the
    others at a distance U(0.02, 1) x ``cis_window`` (either side) from a random gene's
    TSS.  A region spans +-250 bp around its centre (start clipped at 0).
    """
    n_t, p = len(targets), tss.size
    is_tss = np.zeros(n_t, dtype=bool)
    is_tss[rng.choice(n_t, n_positive, replace=False)] = True
    anchor = rng.integers(0, p, n_t)
    anchor[is_tss] = rng.choice(p, n_positive, replace=False)
    dist = rng.uniform(0.02, 1.0, n_t) * cis_window * rng.choice([-1.0, 1.0], n_t)
    centre = tss[anchor] + np.where(is_tss, 0.0, dist)
    centre = np.where(centre < 0, tss[anchor] + np.abs(dist), centre).astype(np.int64)
    table = pd.DataFrame({"target": targets, "chr": chrom[anchor].astype(str),
                          "start": np.maximum(centre - _TARGET_HALF_WIDTH, 0),
                          "end": centre + _TARGET_HALF_WIDTH})
    return anchor, is_tss, table


def _effect_matrix(rng: np.random.Generator, anchor: np.ndarray, is_tss: np.ndarray,
                   null_frac: float, effect_size: tuple[float, float],
                   positive_effect: tuple[float, float], trans_frac: float,
                   n_genes: int) -> sp.csr_matrix:
    """Effects beta (CSR, targets x genes, natural log).

    ``round((1 - null_frac) n_targets)`` targets are non-null, the TSS targets first and
    then random enhancers; each knocks its anchor gene down by U(positive_effect) (TSS) or
    U(effect_size) (enhancer), and changes ``round(trans_frac (n_genes - 1))`` other
    random genes by +-U(effect_size).
    """
    n_t = anchor.size
    n_nonnull = round(float(1.0 - null_frac) * n_t)
    tss_idx = rng.permutation(np.flatnonzero(is_tss))
    enh_idx = rng.permutation(np.flatnonzero(~is_tss))
    nonnull = np.sort(np.concatenate([tss_idx, enh_idx])[:n_nonnull])
    lo_hi = np.where(is_tss[nonnull, None], positive_effect, effect_size)
    rows, cols = [nonnull], [anchor[nonnull]]
    vals = [-rng.uniform(lo_hi[:, 0], lo_hi[:, 1]) if nonnull.size else np.zeros(0)]
    n_trans = round(float(trans_frac) * (n_genes - 1))
    for t in (nonnull if n_trans else []):
        idx = rng.choice(np.delete(np.arange(n_genes), anchor[t]), n_trans, replace=False)
        rows.append(np.full(n_trans, t))
        cols.append(idx)
        vals.append(rng.uniform(*effect_size, n_trans) * rng.choice([-1.0, 1.0], n_trans))
    beta = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(n_t, n_genes))
    beta.sort_indices()
    return beta


def _gene_parameters(rng: np.random.Generator, n_genes: int, r: int, loading_sd: float,
                     baseline_mean: float, baseline_sd: float, size_slope_sd: float,
                     size: float | tuple[float, float], batch_sd: float) -> dict:
    """Per-gene laws: baseline ``b``, loadings ``Gamma``, size slope ``lam``, NB ``size``
    (as in :func:`simulate_screen`) and batch-2 shift ``batch``."""
    b = np.maximum(rng.normal(baseline_mean, baseline_sd, n_genes), -4.5)
    Gamma = rng.normal(0.0, loading_sd, size=(n_genes, r))
    lam = rng.normal(0.0, size_slope_sd, n_genes)
    if np.isscalar(size):
        sizes = np.full(n_genes, float(size))
    else:
        sizes = np.exp(rng.uniform(np.log(size[0]), np.log(size[1]), n_genes))
    shift = rng.normal(0.0, batch_sd, n_genes)
    return {"b": b, "Gamma": Gamma, "lam": lam, "size": sizes, "batch": shift}


def _carried_targets(carried: sp.csr_matrix, guide_idx: np.ndarray,
                     n_targets: int) -> sp.csr_matrix:
    """Cells x targets 0/1 (CSR float): 1 where the cell carries any gRNA of the target."""
    keep = np.flatnonzero(guide_idx >= 0)
    to_target = sp.csr_matrix((np.ones(keep.size), (keep, guide_idx[keep])),
                              shape=(carried.shape[1], n_targets))
    hits = (carried.astype(np.float64) @ to_target).tocsr()
    hits.data = np.ones_like(hits.data)
    return hits


def _highmoi_counts(rng: np.random.Generator, genes: dict, z: np.ndarray, U: np.ndarray,
                    batch: np.ndarray, carries: sp.csr_matrix,
                    beta: sp.csr_matrix) -> sp.csr_matrix:
    """NB counts (CSR int64) of log mu = b + (1 + lam) z + U Gamma' + batch + carries beta."""
    eta = genes["b"][None, :] + z[:, None] * (1.0 + genes["lam"])[None, :] + U @ genes["Gamma"].T
    eta += batch[:, None] * genes["batch"][None, :]
    eta += (carries @ beta).toarray()
    mu = np.exp(np.clip(eta, -30, 12))
    sizes = genes["size"][None, :]
    counts = rng.negative_binomial(sizes, sizes / (sizes + mu))
    return sp.csr_matrix(counts.astype(np.int64))


def _grna_umis(rng: np.random.Generator, carried: sp.csr_matrix, size_factor: np.ndarray,
               guide_umi_mean: float, ambient: float) -> sp.csr_matrix:
    """gRNA UMI counts (CSR int64): NB(guide_umi_mean s_i, 2) + 1 where carried,
    Poisson(ambient) elsewhere.

    The ambient counts are drawn sparsely: a Poisson(ambient G) total per cell spread
    uniformly over the G gRNAs (the same law as independent Poisson(ambient) entries),
    then dropped where the gRNA is carried.
    """
    n, G = carried.shape
    totals = rng.poisson(ambient * G, n)
    amb = sp.csr_matrix((np.ones(totals.sum(), dtype=np.int64),
                         (np.repeat(np.arange(n), totals), rng.integers(0, G, totals.sum()))),
                        shape=(n, G))
    amb.sum_duplicates()
    amb = (amb - amb.multiply(carried.astype(np.int64))).tocsr()
    rows, cols = carried.nonzero()
    mean = guide_umi_mean * size_factor[rows]
    hits = rng.negative_binomial(_GUIDE_UMI_SIZE, _GUIDE_UMI_SIZE / (_GUIDE_UMI_SIZE + mean)) + 1
    umis = (amb + sp.csr_matrix((hits.astype(np.int64), (rows, cols)), shape=(n, G))).tocsr()
    umis.eliminate_zeros()
    umis.sort_indices()
    return umis.astype(np.int64)


def _highmoi_anndata(counts: sp.csr_matrix, genes: dict, chrom: np.ndarray, tss: np.ndarray,
                     z: np.ndarray, U: np.ndarray, batch: np.ndarray, m: np.ndarray):
    """The AnnData of a high-MOI simulation: counts, obs, var and the cells' truth."""
    import anndata as ad

    n, p = counts.shape
    obs = pd.DataFrame({"n_guides_true": m,
                        "batch": pd.Categorical(np.where(batch == 1, "batch2", "batch1"),
                                                categories=["batch1", "batch2"]),
                        "size_factor_true": np.exp(z)},
                       index=[f"cell{i:06d}" for i in range(n)])
    var = pd.DataFrame({"chr": chrom.astype(str), "tss": tss,
                        "baseline_log_mean": genes["b"], "size_true": genes["size"],
                        "size_slope_true": genes["lam"]},
                       index=[f"GENE{j:05d}" for j in range(p)])
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.obsm["U_true"] = U
    adata.varm["Gamma_true"] = genes["Gamma"]
    return adata


def _highmoi_truth(targets: list[str], grnas: list[str], grna_target: list[str],
                   table: pd.DataFrame, is_tss: np.ndarray, anchor: np.ndarray,
                   beta: sp.csr_matrix, gene_names: pd.Index) -> dict:
    """The ``uns`` entries of a high-MOI simulation: library, targets and true effects."""
    coo = beta.tocoo()
    order = np.lexsort((coo.col, coo.row))
    t_idx, g_idx = coo.row[order], coo.col[order]
    names, genes = np.asarray(targets, dtype=object), np.asarray(gene_names, dtype=object)
    effects = pd.DataFrame({"target": names[t_idx].astype(str),
                            "gene": genes[g_idx].astype(str), "beta": coo.data[order]})
    pos = np.flatnonzero(is_tss)
    pos = pos[np.asarray(beta[pos, anchor[pos]]).ravel() != 0] if pos.size else pos
    controls = pd.DataFrame({"target": names[pos].astype(str),
                             "gene": genes[anchor[pos]].astype(str)})
    return {"grna_names": list(grnas), "grna_target": list(grna_target),
            "targets": list(targets), "target_table": table,
            "target_type": {t: ("tss" if f else "enhancer") for t, f in zip(targets, is_tss)},
            "true_effects": effects, "positive_control_pairs": controls,
            "ctrl_label": CTRL_LABEL, "layout": HIGHMOI_LAYOUT}


# ----------------------------------------------------------------------------------
# case-control donor studies
# ----------------------------------------------------------------------------------
#: Entries (cells x genes) simulated densely at a time by :func:`simulate_case_control`.
_CC_BLOCK_ENTRIES = 1 << 22


def simulate_case_control(n_donors: tuple[int, int] = (15, 15),
                          cells_per_donor: tuple[int, int] = (100, 300), n_genes: int = 500,
                          n_cell_types: int = 1, effect_frac: float = 0.05,
                          effect_size: tuple[float, float] = (0.5, 1.0), donor_sd: float = 0.3,
                          trait_confounding: float = 0.0, null: bool = False,
                          shuffle_labels: bool = False, trait_loading_sd: float = 0.5,
                          covariate_sd: float = 0.2, baseline_mean: float = -1.0,
                          baseline_sd: float = 1.5, cell_type_sd: float = 0.5,
                          size: float | tuple[float, float] = (2.0, 20.0),
                          libsize_sd: float = 0.3, depth_sd: float = 0.2,
                          random_state: int = 0):
    """Simulate a case-control single-cell study (cells nested in donors) with ground truth.

    Model, for donor d, cell type k, gene j and cell i of donor d(i) and type k(i)::

        t_d        ~ N(0, 1)                                 unrecorded donor trait
        case_d     ~ Bernoulli(logistic(trait_confounding t_d)), conditioned on exactly
                     n_donors = (controls, cases) donors per arm
        sex_d      ~ Bernoulli(1/2) ('F'/'M');  age_d ~ N(60, 10^2)   recorded covariates
        e_dkj      ~ N(0, donor_sd^2)                         donor x gene noise
        log m_dkj  = b_jk + sex_d c_j + (age_d - 60)/10 a_j + t_d g_j + e_dkj
                     + case_d beta_jk                         donor-level log mean
        log s_i    = N(0, depth_sd^2) (one per donor) + N(0, libsize_sd^2)   cell size
        y_ij       ~ NB(s_i m_{d(i)k(i)j}, size_j)

    with ``b_jk = b_j + N(0, cell_type_sd^2)`` (``b_j ~ N(baseline_mean, baseline_sd^2)``
    floored at -4.5), ``c_j, a_j ~ N(0, covariate_sd^2)``, ``g_j ~ N(0,
    trait_loading_sd^2)`` and NB sizes log-uniform on ``size``.  Each donor has
    ``U(cells_per_donor)`` cells (inclusive), typed by donor-specific proportions
    ``Dirichlet(5, ..., 5)``.  For each cell type, ``round(effect_frac n_genes)`` random
    genes have ``|beta_jk| ~ U(effect_size)`` with a random sign (natural log).

    The donor noise ``e`` and trait ``t`` are shared by all cells of a donor, so cells are
    not independent replicates: a cell-level test counts each donor difference hundreds
    of times.  With ``trait_confounding`` > 0 cases have higher traits, and the trait
    moves every gene: condition is confounded with a latent donor factor.

    Parameters
    ----------
    n_donors : (controls, cases) numbers of donors.
    cells_per_donor : (low, high) range of cells per donor.
    n_genes, n_cell_types : genes and cell types.
    effect_frac, effect_size : share of affected genes per cell type; range of |beta|.
    donor_sd : SD of the donor x gene (x cell type) log-normal noise.
    trait_confounding : slope of the case log-odds in the unrecorded trait (0: none).
    null : if True no gene has an effect (beta = 0).
    shuffle_labels : if True the condition labels are permuted across donors after the
        counts are drawn (a null whose only differences are donor noise).
    trait_loading_sd, covariate_sd : SDs of the genes' trait, sex and age loadings.
    baseline_mean, baseline_sd, cell_type_sd : laws of the baseline log means.
    size : NB size, a scalar or a (low, high) range drawn log-uniformly per gene.
    libsize_sd, depth_sd : SDs of the log cell size within a donor and of the donor's
        log sequencing depth.
    random_state : seed.

    Returns
    -------
    anndata.AnnData
        ``X`` raw counts (CSR int64, cells x genes); ``obs`` with ``donor`` (categorical,
        ``'D001'`` ...), ``condition`` (``'control'``/``'case'``), ``cell_type``
        (``'CT1'`` ...), ``sex``, ``age`` and ``size_factor_true``; ``var`` with
        ``baseline_log_mean``, ``size_true``, ``trait_loading_true``;
        ``uns['true_lfc']`` (DataFrame gene, cell_type, lfc: the true case-vs-control log
        fold change, natural log, one row per gene and cell type; all 0 when ``null`` or
        ``shuffle_labels``); ``uns['donor_trait']`` (DataFrame indexed by donor: ``trait``,
        ``condition`` as recorded, ``condition_simulated`` before any shuffle);
        ``uns['condition_key']`` ``'condition'``, ``uns['control_condition']``
        ``'control'``, ``uns['donor_key']`` ``'donor'``; ``uns['simulation']`` (settings).
    """
    n_ctrl, n_case = (int(v) for v in n_donors)
    lo, hi = (int(v) for v in cells_per_donor)
    check_all_at_least_one(n_genes=n_genes, n_cell_types=n_cell_types, cells_per_donor=lo)
    check_at_least("controls in n_donors", n_ctrl, 2, integer=True)
    check_at_least("cases in n_donors", n_case, 2, integer=True)
    check_at_least("cells_per_donor high - low", hi - lo, 0)
    for name, value in (("effect_frac", effect_frac), ("1 - effect_frac", 1 - effect_frac),
                        ("donor_sd", donor_sd), ("trait_loading_sd", trait_loading_sd),
                        ("covariate_sd", covariate_sd), ("libsize_sd", libsize_sd),
                        ("depth_sd", depth_sd), ("cell_type_sd", cell_type_sd)):
        check_at_least(name, value, 0)
    rng = np.random.default_rng(random_state)
    trait, case = _cc_donors(rng, n_ctrl, n_case, trait_confounding)
    D = trait.size
    sex = rng.integers(0, 2, D)
    age = rng.normal(60.0, 10.0, D)
    genes = _cc_genes(rng, n_genes, n_cell_types, baseline_mean, baseline_sd, cell_type_sd,
                      covariate_sd, trait_loading_sd, size)
    beta = np.zeros((n_cell_types, n_genes))
    if not null:
        n_eff = round(effect_frac * n_genes)
        for k in range(n_cell_types):
            idx = rng.choice(n_genes, n_eff, replace=False)
            beta[k, idx] = rng.uniform(*effect_size, n_eff) * rng.choice([-1.0, 1.0], n_eff)
    # donor x type x gene log means
    log_m = (genes["b"][None, :, :] + (sex[:, None] * genes["sex"])[:, None, :]
             + (((age - 60.0) / 10.0)[:, None] * genes["age"])[:, None, :]
             + (trait[:, None] * genes["trait"])[:, None, :]
             + rng.normal(0.0, donor_sd, (D, n_cell_types, n_genes))
             + case[:, None, None] * beta[None, :, :])
    n_cells = rng.integers(lo, hi + 1, D)
    donor = np.repeat(np.arange(D), n_cells)
    props = rng.dirichlet(np.full(n_cell_types, 5.0), D)
    ctype = (rng.random(donor.size)[:, None] > np.cumsum(props, axis=1)[donor, :-1]).sum(1)
    log_s = rng.normal(0.0, depth_sd, D)[donor] + rng.normal(0.0, libsize_sd, donor.size)
    counts = _cc_counts(rng, log_m, donor, ctype, log_s, genes["size"])
    recorded = rng.permutation(case) if shuffle_labels else case
    if shuffle_labels:
        beta[:] = 0.0
    settings = {"n_donors": [n_ctrl, n_case], "cells_per_donor": [lo, hi], "n_genes": n_genes,
                "n_cell_types": n_cell_types, "effect_frac": effect_frac,
                "effect_size": list(effect_size), "donor_sd": donor_sd,
                "trait_confounding": trait_confounding, "null": null,
                "shuffle_labels": shuffle_labels, "random_state": random_state}
    return _cc_anndata(counts, genes, donor, ctype, log_s, recorded, case, sex, age, trait,
                       beta, settings)


def _cc_donors(rng: np.random.Generator, n_ctrl: int, n_case: int,
               trait_confounding: float) -> tuple[np.ndarray, np.ndarray]:
    """Traits and 0/1 case status of ``n_ctrl + n_case`` donors, in draw order.

    Donors are drawn as t ~ N(0, 1), case ~ Bernoulli(logistic(trait_confounding t)) until
    both arms are full; the first ``n_ctrl`` controls and ``n_case`` cases are kept, so
    the traits follow their law conditional on the status.
    """
    ts, cs = [], []
    n_c = n_t = 0
    while n_c < n_ctrl or n_t < n_case:
        t = rng.normal(size=4 * (n_ctrl + n_case))
        c = rng.random(t.size) < 1.0 / (1.0 + np.exp(-trait_confounding * t))
        ts.append(t)
        cs.append(c)
        n_c, n_t = n_c + int((~c).sum()), n_t + int(c.sum())
    t, c = np.concatenate(ts), np.concatenate(cs)
    keep = np.sort(np.concatenate([np.flatnonzero(~c)[:n_ctrl], np.flatnonzero(c)[:n_case]]))
    return t[keep], c[keep].astype(np.float64)


def _cc_genes(rng: np.random.Generator, n_genes: int, n_types: int, baseline_mean: float,
              baseline_sd: float, cell_type_sd: float, covariate_sd: float,
              trait_loading_sd: float, size: float | tuple[float, float]) -> dict:
    """Per-gene laws: baselines ``b`` (types x genes), sex, age and trait loadings, NB size."""
    b0 = np.maximum(rng.normal(baseline_mean, baseline_sd, n_genes), -4.5)
    b = b0[None, :] + (rng.normal(0.0, cell_type_sd, (n_types, n_genes)) if n_types > 1
                       else np.zeros((1, n_genes)))
    if np.isscalar(size):
        sizes = np.full(n_genes, float(size))
    else:
        sizes = np.exp(rng.uniform(np.log(size[0]), np.log(size[1]), n_genes))
    return {"b0": b0, "b": b, "sex": rng.normal(0.0, covariate_sd, n_genes),
            "age": rng.normal(0.0, covariate_sd, n_genes),
            "trait": rng.normal(0.0, trait_loading_sd, n_genes), "size": sizes}


def _cc_counts(rng: np.random.Generator, log_m: np.ndarray, donor: np.ndarray,
               ctype: np.ndarray, log_s: np.ndarray, sizes: np.ndarray) -> sp.csr_matrix:
    """NB counts (CSR int64) with mean exp(log_s_i + log_m[donor_i, type_i]), drawn in
    blocks of cells so that no more than ``_CC_BLOCK_ENTRIES`` entries are dense."""
    p = sizes.size
    step = max(1, _CC_BLOCK_ENTRIES // p)
    blocks = []
    for a in range(0, donor.size, step):
        eta = log_m[donor[a:a + step], ctype[a:a + step]] + log_s[a:a + step, None]
        mu = np.exp(np.clip(eta, -30, 12))
        y = rng.negative_binomial(sizes[None, :], sizes[None, :] / (sizes[None, :] + mu))
        blocks.append(sp.csr_matrix(y.astype(np.int64)))
    return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, p), dtype=np.int64)


def _cc_anndata(counts: sp.csr_matrix, genes: dict, donor: np.ndarray, ctype: np.ndarray,
                log_s: np.ndarray, recorded: np.ndarray, case: np.ndarray, sex: np.ndarray,
                age: np.ndarray, trait: np.ndarray, beta: np.ndarray, settings: dict):
    """The AnnData of a case-control simulation: counts, obs, var and the truth."""
    import anndata as ad

    D, (n_types, p) = trait.size, beta.shape
    names = np.array([f"D{d + 1:03d}" for d in range(D)], dtype=object)
    types = [f"CT{k + 1}" for k in range(n_types)]
    label = np.array(["control", "case"], dtype=object)
    obs = pd.DataFrame({
        "donor": pd.Categorical(names[donor], categories=list(names)),
        "condition": pd.Categorical(label[recorded.astype(int)[donor]],
                                    categories=["control", "case"]),
        "cell_type": pd.Categorical(np.array(types, dtype=object)[ctype], categories=types),
        "sex": pd.Categorical(np.array(["F", "M"], dtype=object)[sex[donor]],
                              categories=["F", "M"]),
        "age": age[donor], "size_factor_true": np.exp(log_s)},
        index=[f"cell{i:06d}" for i in range(donor.size)])
    gene_names = [f"GENE{j:05d}" for j in range(p)]
    var = pd.DataFrame({"baseline_log_mean": genes["b0"], "size_true": genes["size"],
                        "trait_loading_true": genes["trait"]}, index=gene_names)
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.uns["true_lfc"] = pd.DataFrame({"gene": np.tile(gene_names, n_types),
                                          "cell_type": np.repeat(types, p),
                                          "lfc": beta.ravel()})
    adata.uns["donor_trait"] = pd.DataFrame(
        {"trait": trait, "condition": label[recorded.astype(int)].astype(str),
         "condition_simulated": label[case.astype(int)].astype(str)},
        index=pd.Index(names.astype(str), name="donor"))
    adata.uns.update({"condition_key": "condition", "control_condition": "control",
                      "donor_key": "donor", "simulation": settings})
    return adata
