"""Batch-wise causarray analysis — the Replogle-E-K562 tutorial on a simulated screen.

The function :func:`tutorial` is the seed tutorial's code (cells [1]-[8]), unchanged
except for the input file: it reads ``replogle_simulated.h5ad``, a simulated screen in
the tutorial's layout (``uns['ctrl_label']``, ``uns['pert_col']``, one control label,
one perturbation per cell), instead of the real ``replogle_subset.h5ad``.  The seed
reads ``scanpy.read_h5ad``; when scanpy is not installed the same function is taken
from anndata (scanpy's is a re-export of it).

The screen follows the model of :func:`causarray.simulate_screen` (latent confounders
shifted by the perturbation, 5 % of genes affected, each perturbation knocking down
its own target gene) but is generated chunk by chunk as sparse counts by
``benchmarks/_common.simulate_sparse_counts``, the generator of
``benchmarks/batch.py --config full``: the full screen peaks at about 3.5 GB while it
is simulated instead of the ~25 GB of a dense simulation.

The JIC table ``replogle-r.csv`` the seed loads is generated here with
:func:`causarray.gcate.estimate_r` on the simulated screen (control-priority
subsample of 6,000 cells, as the seed suggests).

Usage::

    python examples/replogle_tutorial.py --small            # CI size, about a minute
    python examples/replogle_tutorial.py --full             # 79,865 cells x 8,563 genes x 200 perts
    python examples/replogle_tutorial.py --small --workdir DIR

Everything (inputs, ``replogle_results.h5`` cache, figures) is written to the working
directory (default ``replogle_tutorial_<mode>/`` under the current directory).  A rerun
in the same directory resumes from the cache.  In ``--full`` mode the seed's own code
makes a dense copy of the 79,865 x 8,563 count matrix (``adata.X.toarray()``, then
``prep_causarray_data``); that, not the simulation, sets the example's peak memory:
about 7.7 GB for cells [2]-[3] (5.1 GB kept), against 3.4 GB for writing the input.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# layout of the tutorial subset: top-200 perturbations + 2,000 controls -> 79,865 cells
FULL = dict(n_ctrl=2000, n_perts=200, n_genes=8563, r=5, n_cells=79865,
            r_grid=[5, 10, 15, 20, 25, 30], r_iters=30)
SMALL = dict(n_ctrl=300, n_perts=32, n_genes=200, r=2, n_cells=930,
             r_grid=[1, 2, 3], r_iters=10)
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
INPUT_FILE = "replogle_simulated.h5ad"
R_FILE = "replogle-r.csv"


# ----------------------------------------------------------------------------------
# inputs (ours)
# ----------------------------------------------------------------------------------
def write_simulated_screen(cfg: dict, path: str, random_state: int = 0) -> None:
    """Simulate a screen with the tutorial's layout, chunk by chunk, and write it as .h5ad.

    ``cfg['n_cells'] - cfg['n_ctrl']`` perturbed cells are split as evenly as possible
    over the ``cfg['n_perts']`` perturbations (389-390 each in ``--full``).
    """
    import anndata as ad
    import numpy as np
    import pandas as pd

    from causarray.simulate import CTRL_LABEL, PERT_COL

    sys.path.insert(0, str(BENCHMARKS))
    from _common import simulate_sparse_counts, split_cells

    n_perts = cfg["n_perts"]
    Y, group = simulate_sparse_counts(cfg["n_ctrl"],
                                      split_cells(cfg["n_cells"] - cfg["n_ctrl"], n_perts),
                                      cfg["n_genes"], cfg["r"], knockdown=2.0,
                                      random_state=random_state)
    names = [f"PERT{k + 1:03d}" for k in range(n_perts)]
    labels = np.where(group >= 0, np.array(names, dtype=object)[np.maximum(group, 0)],
                      CTRL_LABEL)
    obs = pd.DataFrame({PERT_COL: pd.Categorical(labels, categories=[CTRL_LABEL] + names)},
                       index=[f"cell{i:06d}" for i in range(Y.shape[0])])
    var = pd.DataFrame(index=[f"GENE{j:05d}" for j in range(Y.shape[1])])
    adata = ad.AnnData(X=Y, obs=obs, var=var)
    adata.uns["pert_col"] = PERT_COL
    adata.uns["ctrl_label"] = CTRL_LABEL
    adata.uns["perturbations"] = np.array(names)
    adata.write_h5ad(path)


def write_r_table(cfg: dict, h5ad: str, path: str) -> None:
    """The JIC table the seed reads (``replogle-r.csv``), from estimate_r."""
    import anndata
    import pandas as pd

    from causarray import prep_causarray_data

    try:
        from causarray.gcate import estimate_r
    except ImportError:
        print(f"causarray.gcate.estimate_r is not available: writing a PLACEHOLDER {path} "
              "(r = grid, JIC minimal at the simulated r); it is not an estimate.")
        grid = [0] + cfg["r_grid"]
        jic = [abs(r - cfg["r"]) for r in grid]
        pd.DataFrame(dict(r=grid, deviance=jic, nu=[0.0] * len(grid), JIC=jic)).to_csv(
            path, index=False)
        return
    adata = anndata.read_h5ad(h5ad)
    labels = adata.obs[adata.uns["pert_col"]].astype(str)
    A = pd.get_dummies(labels).drop(columns=[adata.uns["ctrl_label"]])
    Y, A, X, _ = prep_causarray_data(adata.X, A)
    df_r = estimate_r(Y, X, A, cfg["r_grid"], family="nb", max_cells=6000,
                      kwargs_es_1=dict(rel_tol=2e-4, max_iters=cfg["r_iters"]))
    df_r.to_csv(path, index=False)


# ----------------------------------------------------------------------------------
# the seed tutorial, verbatim except for the input file name
# ----------------------------------------------------------------------------------
def tutorial():
    # [1]
    import sys
    sys.path.insert(0, '../../..')
    import time

    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    try:
        import scanpy as sc
    except ImportError:  # scanpy is not installed: its read_h5ad is anndata's
        import anndata as sc
    import causarray
    from causarray import gcate_lfc_batch, prep_causarray_data
    from causarray.gcate import plot_r
    print('causarray version:', causarray.__version__)

    # [2]  (input file: the simulated screen instead of replogle_subset.h5ad)
    adata = sc.read_h5ad('replogle_simulated.h5ad')
    print(adata)
    CTRL_LABEL = adata.uns['ctrl_label'] # 'non-targeting'
    PERT_COL = adata.uns['pert_col'] # 'gene'
    vc = adata.obs[PERT_COL].value_counts()
    print(f'\nCtrl cells : {vc[CTRL_LABEL]}')
    print(f'Pert cells : {vc.drop(CTRL_LABEL).sum():,} across {len(vc) - 1} perturbations')
    print(f'Cells/pert : median {vc.drop(CTRL_LABEL).median():.0f}, '
          f'range {vc.drop(CTRL_LABEL).min()}-{vc.drop(CTRL_LABEL).max()}')

    # [3]
    Y_raw = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    Y = pd.DataFrame(Y_raw, columns=adata.var_names.tolist())
    del Y_raw
    A = (pd.get_dummies(adata.obs[PERT_COL].astype(str), drop_first=False)
         .drop(columns=[CTRL_LABEL]))
    Y, A, X, X_A = prep_causarray_data(Y, A)
    print(f'Y : {Y.shape} (cells x genes)')
    print(f'A : {A.shape} (cells x perturbations)')
    print(f'X : {X.shape} X_A : {X_A.shape}')

    # [4]
    df_r = pd.read_csv('replogle-r.csv')
    fig = plot_r(df_r)
    plt.tight_layout()
    plt.show()
    best_r = int(df_r.loc[df_r['JIC'].idxmin(), 'r'])
    print(f'\nSelected r = {best_r} (min JIC)')
    print(df_r.to_string(index=False))

    # [5]
    R = best_r
    t0 = time.perf_counter()
    df_res = gcate_lfc_batch(
        Y, X, A, R,
        W_A=X_A,
        batch_size=15,
        max_cells=2000,
        n_ctrl=2000,
        family='nb',
        cache_path='replogle_results.h5',
        random_state=0,
        verbose=True,
        gcate_kwargs=dict(
            kwargs_es_1=dict(rel_tol=2e-4, max_iters=30),
            kwargs_es_2=dict(rel_tol=2e-4, max_iters=30),
        ),
    )
    t_total = time.perf_counter() - t0
    print(f'\nTotal wall time: {t_total/60:.1f} min')
    print(f'Result shape : {df_res.shape}')
    df_res.head()

    # [6]
    FDR = 0.05
    sig = df_res[df_res['padj'] < FDR]
    print(f'Significant (padj < {FDR}): {len(sig):,} gene x pert pairs')
    print(f' Perturbations with >= 1 hit: {sig["trt"].nunique()}')
    print(f' Unique genes affected : {sig["gene_names"].nunique():,}')
    disc_per_pert = sig.groupby('trt').size().sort_values(ascending=False)
    print('\nTop-10 perts by discovery count:')
    print(disc_per_pert.head(10).to_string())

    # [7]
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = np.where(df_res['padj'] < FDR, '#e74c3c', '#aaaaaa')
    ax.scatter(
        df_res['tau'], -np.log10(df_res['pvalue'].clip(1e-300)),
        c=colors, s=1, alpha=0.4, rasterized=True,
    )
    ax.axhline(-np.log10(0.05 / len(df_res)), color='navy', lw=0.8, ls='--',
               label='Bonferroni')
    ax.set_ylim(0, 10)
    ax.set_xlabel('Estimated LFC (tau)')
    ax.set_ylabel('-log10(p-value)')
    ax.set_title('Volcano plot — Replogle-E-K562 (top-200 perts)')
    ax.legend(fontsize=8)
    plt.tight_layout()
    plt.show()

    # [8]
    top_n = 30
    top_disc = disc_per_pert.head(top_n)
    fig, ax = plt.subplots(figsize=(10, 4))
    top_disc.plot(kind='bar', ax=ax, color='steelblue', edgecolor='none')
    ax.set_ylabel(f'Significant genes (padj < {FDR})')
    ax.set_title(f'Top-{top_n} perturbations by discovery count')
    ax.tick_params(axis='x', rotation=45, labelsize=8)
    plt.tight_layout()
    plt.show()
    return df_res


# ----------------------------------------------------------------------------------
# driver (ours)
# ----------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--small", action="store_true", help="CI size (default)")
    mode.add_argument("--full", action="store_true",
                      help="tutorial size: 79,865 cells x 8,563 genes x 200 perturbations")
    parser.add_argument("--workdir", default=None,
                        help="folder for inputs, cache and figures "
                             "(default replogle_tutorial_<mode>)")
    args = parser.parse_args(argv)
    name = "full" if args.full else "small"
    cfg = FULL if args.full else SMALL
    workdir = Path(args.workdir or f"replogle_tutorial_{name}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    import matplotlib
    if not os.environ.get("DISPLAY") and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        t0 = time.perf_counter()
        if not Path(INPUT_FILE).exists():
            write_simulated_screen(cfg, INPUT_FILE)
        if not Path(R_FILE).exists():
            write_r_table(cfg, INPUT_FILE, R_FILE)
        print(f"[{name}] inputs ready in {workdir} ({time.perf_counter() - t0:.1f}s)")
        df_res = tutorial()
        for k, num in enumerate(plt.get_fignums()):
            plt.figure(num).savefig(f"figure_{k + 1}.png", dpi=80)
        plt.close("all")
    finally:
        os.chdir(cwd)
    return df_res


if __name__ == "__main__":
    main()
