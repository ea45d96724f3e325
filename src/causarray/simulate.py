"""Perturb-seq screen simulator with ground truth.

Generative model, for cell i in group g(i) (control or perturbation k) and gene j::

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
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._validation import check_all_at_least_one

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
