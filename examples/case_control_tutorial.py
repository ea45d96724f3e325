"""Case-control pseudobulk analysis of a simulated donor study (SEA-AD-shaped).

Mirrors causarray 0.1.1's case-control tutorial (SEA-AD MTG excitatory neurons,
85 donors x 22,911 genes pseudobulk, r = 4, Welch variance) on simulated data of the
same shape, so it runs without network access and can be scored against the truth.

The simulated study: 85 donors, disease status confounded by an **unrecorded donor
trait** t_d (P(case) = logistic(1.5 t_d)) that also moves the expression of every
gene through loadings gamma_j, three further unrecorded donor factors (batch,
ancestry-like; independent of status), recorded sex and age, and donor-level
biological noise.  Each donor contributes 20-100 cells drawn from a negative binomial;
the cells are **aggregated to donors** (summed counts: pseudobulk) before the
analysis, since cells of one donor are not independent replicates.

Analysis: ``prep_causarray_data`` on the pseudobulk (recorded covariates sex and age),
``fit_gcate`` with r = 4 latent donor factors, then ``LFC`` on ``W = [X | U]`` with the
Welch variance ``usevar='unequal'`` (0.1.1's recommendation for case-control data),
compared with the same ``LFC`` without latent factors (recorded covariates only).

Usage::

    python examples/case_control_tutorial.py --small     # CI size, ~5 s
    python examples/case_control_tutorial.py --full      # 85 donors x 22,911 genes, r = 4

The same study also goes through the donor route (``tl.lfc(condition_key=,
control_condition=, donor_key=)``), which aggregates the cells itself and reports
delete-one-donor jackknife standard errors.

Outputs in the working directory: ``case_control_pseudobulk.csv.gz`` (donor x gene
counts), ``case_control_lfc.csv`` (with latent factors),
``case_control_lfc_no_factors.csv`` and ``case_control_lfc_donor_route.csv``.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

FULL = dict(n_donors=85, n_genes=22911, r=4, cells=(20, 100), max_iters=30)
SMALL = dict(n_donors=85, n_genes=600, r=4, cells=(10, 30), max_iters=15)
FDR = 0.05


def simulate_donor_study(n_donors: int, n_genes: int, cells: tuple[int, int],
                         effect_frac: float = 0.05, random_state: int = 0):
    """Cell-level counts of a case-control donor study with an unrecorded donor trait.

    Returns ``(Y_cells (sparse cells x genes), donor (cells,), donors DataFrame with
    columns case, sex, age and the unrecorded trait, true log fold changes (genes,))``.
    """
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(random_state)
    trait = rng.normal(size=n_donors)                           # unrecorded
    case = (rng.random(n_donors) < 1 / (1 + np.exp(-1.5 * trait))).astype(float)
    other = rng.normal(size=(n_donors, 3))                      # unrecorded, not confounding
    sex = (rng.random(n_donors) < 0.5).astype(float)
    age = rng.normal(size=n_donors)
    base = rng.normal(-1.0, 1.5, n_genes)
    gamma = rng.normal(0.0, 0.4, (n_genes, 4))
    gamma[:, 0] = rng.normal(0.0, 0.6, n_genes)                 # the trait moves expression
    c_sex, c_age = rng.normal(0, 0.2, n_genes), rng.normal(0, 0.2, n_genes)
    beta = np.zeros(n_genes)
    hit = rng.random(n_genes) < effect_frac
    beta[hit] = rng.choice([-1.0, 1.0], hit.sum()) * rng.uniform(0.4, 1.0, hit.sum())
    donor_noise = rng.normal(0.0, 0.15, (n_donors, n_genes))
    size = np.exp(rng.uniform(np.log(2.0), np.log(20.0), n_genes))
    U = np.c_[trait, other]
    blocks, donor = [], []
    for d in range(n_donors):
        m = int(rng.integers(cells[0], cells[1] + 1))
        eta = (base + c_sex * sex[d] + c_age * age[d] + beta * case[d] + gamma @ U[d]
               + donor_noise[d])
        s = np.exp(rng.normal(0.0, 0.3, m))[:, None]
        mu = s * np.exp(np.minimum(eta, 8.0))[None, :]
        y = rng.negative_binomial(size[None, :], size[None, :] / (size[None, :] + mu))
        blocks.append(sp.csr_matrix(y))
        donor.append(np.full(m, d))
    donors = pd.DataFrame({"case": case, "sex": sex, "age": age, "trait_unrecorded": trait},
                          index=[f"donor{d:03d}" for d in range(n_donors)])
    return sp.vstack(blocks, format="csr"), np.concatenate(donor), donors, beta


def pseudobulk(Y_cells, donor, n_donors: int):
    """Sum the cells of each donor: (donors x genes) counts."""
    import numpy as np
    import scipy.sparse as sp

    M = sp.csr_matrix((np.ones(donor.size), (donor, np.arange(donor.size))),
                      shape=(n_donors, donor.size))
    return np.asarray((M @ Y_cells).toarray())


def fdp_power(df, truth, fdr=FDR):
    import numpy as np

    hit = np.nan_to_num(df["padj"].to_numpy(), nan=1.0) < fdr
    true = truth != 0
    return int(hit.sum()), float((hit & ~true).sum() / max(hit.sum(), 1)), \
        float((hit & true).sum() / max(true.sum(), 1))


def main(cfg: dict, workdir: Path, random_state: int = 0) -> None:
    import numpy as np
    import pandas as pd

    import causarray as ca

    t_start = time.perf_counter()
    Yc, donor, donors, beta = simulate_donor_study(cfg["n_donors"], cfg["n_genes"],
                                                   cfg["cells"], random_state=random_state)
    print(f"Cells: {Yc.shape[0]:,} from {cfg['n_donors']} donors "
          f"({int(donors['case'].sum())} cases) x {Yc.shape[1]:,} genes")
    Ypb = pseudobulk(Yc, donor, cfg["n_donors"])
    keep = Ypb.sum(axis=0) > 0
    genes = np.array([f"GENE{j:05d}" for j in range(Ypb.shape[1])])[keep]
    Y = pd.DataFrame(Ypb[:, keep], index=donors.index, columns=genes)
    truth = beta[keep]
    print(f"Pseudobulk: {Y.shape[0]} donors x {Y.shape[1]:,} genes (genes without counts "
          f"dropped: {int((~keep).sum())})")
    Y.to_csv(workdir / "case_control_pseudobulk.csv.gz")
    print(f"Case status vs the unrecorded trait: corr "
          f"{np.corrcoef(donors['case'], donors['trait_unrecorded'])[0, 1]:.2f}")

    Y, A, X, X_A = ca.prep_causarray_data(Y, donors[["case"]], X=donors[["sex", "age"]])
    r = cfg["r"]
    es = dict(max_iters=cfg["max_iters"])
    t0 = time.perf_counter()
    # the simulated assignment depends on the unrecorded confounders: 'observational'
    _, res = ca.fit_gcate(Y, X, A, r, kwargs_es_1=es, kwargs_es_2=es,
                          assignment="observational")
    print(f"fit_gcate (r = {r}): {time.perf_counter() - t0:.1f} s")
    U = res["U"]
    print(f"|corr(U_k, unrecorded trait)| max over factors: "
          f"{np.max(np.abs([np.corrcoef(U[:, k], donors['trait_unrecorded'])[0, 1] for k in range(r)])):.2f}")
    offset = np.log(res["kwargs_glm"]["size_factor"])
    t0 = time.perf_counter()
    df, _ = ca.LFC(Y, np.hstack([X, U]), A, np.hstack([X_A, U]), offset=offset,
                   usevar="unequal")
    print(f"LFC (Welch): {time.perf_counter() - t0:.1f} s")
    df0, _ = ca.LFC(Y, X, A, X_A, offset=offset, usevar="unequal")
    n1, fdp1, pow1 = fdp_power(df, truth)
    n0, fdp0, pow0 = fdp_power(df0, truth)
    print(f"With {r} latent factors : {n1} discoveries, FDP {fdp1:.3f}, power {pow1:.3f}")
    print(f"Recorded covariates only: {n0} discoveries, FDP {fdp0:.3f}, power {pow0:.3f}")
    df.to_csv(workdir / "case_control_lfc.csv", index=False)
    df0.to_csv(workdir / "case_control_lfc_no_factors.csv", index=False)

    # the same study through the donor route: cells in, donors as the units
    import anndata as ad

    cells = ad.AnnData(Yc.tocsr(), obs=pd.DataFrame({
        "donor": donors.index[donor].astype(str),
        "status": np.where(donors["case"].to_numpy()[donor] == 1, "case", "control"),
        "sex": donors["sex"].to_numpy()[donor], "age": donors["age"].to_numpy()[donor]},
        index=[f"cell{i}" for i in range(donor.size)]))
    cells.var_names = [f"GENE{j:05d}" for j in range(Yc.shape[1])]
    cells = cells[:, keep].copy()
    t0 = time.perf_counter()
    ca.tl.lfc(cells, condition_key="status", control_condition="control", donor_key="donor",
              covariates=["sex", "age"], r=r, max_iters=cfg["max_iters"], verbose=False)
    dr = cells.uns["causarray"]["results"]
    n2, fdp2, pow2 = fdp_power(dr, truth)
    print(f"Donor route (tl.lfc, jackknife SEs): {n2} discoveries, FDP {fdp2:.3f}, "
          f"power {pow2:.3f} ({time.perf_counter() - t0:.1f} s)")
    dr.to_csv(workdir / "case_control_lfc_donor_route.csv", index=False)
    print(f"Result shape : {df.shape}")
    print(f"Total wall time: {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="CI size (default)")
    size.add_argument("--full", action="store_true", help="the tutorial's shape")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    mode = "full" if args.full else "small"
    wd = Path(args.workdir or f"case_control_tutorial_{mode}")
    os.makedirs(wd, exist_ok=True)
    main(FULL if args.full else SMALL, wd)
