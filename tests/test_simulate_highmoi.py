"""simulate.simulate_highmoi_screen: layout, MOI law, confounding, gRNA UMIs, truth."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from causarray.simulate import simulate_highmoi_screen


@pytest.fixture(scope="module")
def sim():
    return simulate_highmoi_screen(random_state=3)


def _carriers(adata, target: str) -> np.ndarray:
    """Cells that truly carry at least one gRNA of ``target``."""
    cols = np.flatnonzero(np.asarray(adata.uns["grna_target"]) == target)
    return np.asarray(adata.obsm["grna_true"][:, cols].sum(axis=1)).ravel() > 0


def _region_distance(table: pd.DataFrame, target: str, chrom: str, tss: int) -> float:
    """Distance (bp) from a TSS to a target's region; inf on another chromosome."""
    row = table.set_index("target").loc[target]
    if row["chr"] != chrom:
        return np.inf
    return max(row["start"] - tss, tss - row["end"], 0)


def test_shapes_names_and_types(sim):
    n, p, n_t, gpt, n_nt = 4000, 300, 60, 2, 10
    G = n_t * gpt + n_nt
    assert sim.shape == (n, p)
    assert isinstance(sim.X, sp.csr_matrix) and sim.X.dtype == np.int64
    for key in ("grna_counts", "grna_true"):
        assert isinstance(sim.obsm[key], sp.csr_matrix) and sim.obsm[key].shape == (n, G)
    assert sim.obsm["grna_counts"].dtype == np.int64
    assert sim.obsm["grna_true"].dtype == bool
    names, labels = list(sim.uns["grna_names"]), list(sim.uns["grna_target"])
    assert len(names) == len(labels) == G and len(set(names)) == G
    assert names[:3] == ["T00001_g1", "T00001_g2", "T00002_g1"] and names[-1] == "NT_g10"
    assert labels.count("non-targeting") == n_nt
    assert all(g.split("_")[0] == t for g, t in zip(names, labels) if t != "non-targeting")
    targets = [f"T{t:05d}" for t in range(1, n_t + 1)]
    assert list(sim.uns["targets"]) == targets
    table = sim.uns["target_table"]
    assert list(table.columns) == ["target", "chr", "start", "end"]
    assert list(table["target"]) == targets and (table["end"] > table["start"]).all()
    assert set(sim.uns["target_type"]) == set(targets)
    assert sum(v == "tss" for v in sim.uns["target_type"].values()) == 5
    assert sim.uns["layout"] == "high-moi" and sim.uns["ctrl_label"] == "non-targeting"
    assert set(table["chr"]) <= set(sim.var["chr"])
    assert sim.var["tss"].dtype == np.int64 and sim.obsm["U_true"].shape == (n, 3)
    assert list(sim.obs["batch"].cat.categories) == ["batch1", "batch2"]
    assert sim.obs["batch"].value_counts().min() > n / 2 - 5 * np.sqrt(n / 4)
    assert list(sim.uns["true_effects"].columns) == ["target", "gene", "beta"]
    assert list(sim.uns["positive_control_pairs"].columns) == ["target", "gene"]


@pytest.mark.parametrize("moi,min_guides", [(8.0, 1), (2.0, 1), (3.0, 2)])
def test_number_of_guides_follows_clipped_poisson(moi, min_guides):
    n = 4000
    ad = simulate_highmoi_screen(n_cells=n, n_genes=20, moi=moi, min_guides=min_guides,
                                 random_state=5)
    m = ad.obs["n_guides_true"].to_numpy()
    true = ad.obsm["grna_true"]
    assert np.array_equal(np.asarray(true.sum(axis=1)).ravel(), m)   # without replacement
    assert m.min() >= min_guides
    k = np.arange(0, 200)
    pmf = stats.poisson.pmf(k, moi)
    clipped = np.maximum(k, min_guides)
    mean = float(pmf @ clipped)
    sd = float(np.sqrt(pmf @ (clipped - mean) ** 2))
    assert abs(m.mean() - mean) < 5 * sd / np.sqrt(n)
    # every gRNA equally likely: carriers per gRNA ~ Binomial-like around n mean(m) / G
    per_guide = np.asarray(true.sum(axis=0)).ravel()
    G = true.shape[1]
    expected = m.sum() / G
    assert np.all(np.abs(per_guide - expected) < 5 * np.sqrt(expected))


def test_library_size_and_latent_state_rise_with_guides(sim):
    m = sim.obs["n_guides_true"].to_numpy().astype(float)
    n = m.size
    libsize = np.asarray(sim.X.sum(axis=1)).ravel()
    assert stats.spearmanr(libsize, m)[0] > 5 / np.sqrt(n)
    proj = sim.obsm["U_true"] @ sim.uns["moi_direction_true"]
    assert np.corrcoef(proj, m)[0, 1] > 5 / np.sqrt(n)
    # a target is carried more often by cells with many guides: its carriers have more
    # gRNAs (each difference is about 7 standard errors; pooled over targets, far more)
    z = []
    for target in sim.uns["targets"]:
        carry = _carriers(sim, target)
        diff = m[carry].mean() - m[~carry].mean()
        z.append(diff / np.sqrt(m[carry].var() / carry.sum() + m[~carry].var() / (~carry).sum()))
    assert min(z) > 0 and np.mean(z) > 5


def test_umi_threshold_recovers_assignment(sim):
    umi, true = sim.obsm["grna_counts"], sim.obsm["grna_true"]
    called = umi >= 5
    hits = called.multiply(true).sum()
    assert hits / true.sum() > 0.9                           # carried entries found
    assert hits / called.sum() > 0.9                         # called entries carried
    assert (umi.multiply(true) > 0).sum() == true.sum()      # a carried gRNA has >= 1 UMI
    # uncarried entries hold Poisson(ambient) UMIs
    n_uncarried = np.prod(true.shape) - true.sum()
    ambient_total = umi.sum() - umi.multiply(true).sum()
    rate = ambient_total / n_uncarried
    assert abs(rate - 0.1) < 5 * np.sqrt(0.1 / n_uncarried)


def test_true_effects_are_exactly_the_cis_genes(sim):
    effects = sim.uns["true_effects"]
    table, types = sim.uns["target_table"], sim.uns["target_type"]
    var = sim.var
    assert not effects.duplicated("target").any()             # one gene per target
    assert len(effects) == round(0.5 * 60)                    # 1 - null_frac of the targets
    assert (effects["beta"] < 0).all()                        # knockdowns
    for row in effects.itertuples():
        gene = var.loc[row.gene]
        dist = _region_distance(table, row.target, gene["chr"], int(gene["tss"]))
        if types[row.target] == "tss":
            assert dist == 0 and 1.5 <= -row.beta <= 2.5
        else:
            assert dist <= 1_000_000 and 0.3 <= -row.beta <= 1.0
    pcs = sim.uns["positive_control_pairs"]
    tss_targets = sorted(t for t, v in types.items() if v == "tss")
    assert sorted(pcs["target"]) == tss_targets               # 5 controls, all non-null
    merged = pcs.merge(effects, on=["target", "gene"])
    assert len(merged) == len(pcs)


def test_positive_controls_knock_their_gene_down(sim):
    libsize = np.asarray(sim.X.sum(axis=1)).ravel()
    for row in sim.uns["positive_control_pairs"].itertuples():
        j = sim.var_names.get_loc(row.gene)
        y = sim.X[:, j].toarray().ravel() / libsize
        carry = _carriers(sim, row.target)
        assert np.log(y[carry].mean() / y[~carry].mean()) < -1.0


def test_null_targets_change_no_gene_and_trans_effects():
    null = simulate_highmoi_screen(n_cells=500, null_frac=1.0, trans_frac=0.1, random_state=2)
    assert len(null.uns["true_effects"]) == 0
    assert len(null.uns["positive_control_pairs"]) == 0
    ad = simulate_highmoi_screen(n_cells=500, n_genes=101, null_frac=0.75, trans_frac=0.1,
                                 random_state=2)
    effects = ad.uns["true_effects"]
    per_target = effects.groupby("target").size()
    assert len(per_target) == 15 and (per_target == 1 + 10).all()
    assert not effects.duplicated(["target", "gene"]).any()


def test_reproducible_with_seed():
    a = simulate_highmoi_screen(n_cells=300, n_genes=50, random_state=7)
    b = simulate_highmoi_screen(n_cells=300, n_genes=50, random_state=7)
    c = simulate_highmoi_screen(n_cells=300, n_genes=50, random_state=8)
    assert (a.X != b.X).nnz == 0
    assert (a.obsm["grna_counts"] != b.obsm["grna_counts"]).nnz == 0
    pd.testing.assert_frame_equal(a.uns["true_effects"], b.uns["true_effects"])
    pd.testing.assert_frame_equal(a.uns["target_table"], b.uns["target_table"])
    assert (a.X != c.X).nnz > 0
    assert (a.obsm["grna_true"] != c.obsm["grna_true"]).nnz > 0
    assert not a.uns["true_effects"].equals(c.uns["true_effects"])


@pytest.mark.parametrize("kwargs,match", [
    ({"null_frac": 1.5}, "1 - null_frac must be >= 0"),
    ({"null_frac": -0.1}, "null_frac must be >= 0"),
    ({"n_targets": 3, "n_positive": 5}, "n_targets - n_positive must be >= 0"),
    ({"moi": 0}, "moi must be positive"),
    ({"n_cells": 0}, "must all be >= 1"),
    ({"r": -1}, "r must be a non-negative integer"),
])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_highmoi_screen(**kwargs)


def test_round_trips_through_h5ad(sim, tmp_path):
    import anndata as ad

    path = tmp_path / "highmoi.h5ad"
    sim.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert (back.obsm["grna_counts"] != sim.obsm["grna_counts"]).nnz == 0
    assert list(back.uns["grna_names"]) == list(sim.uns["grna_names"])
    pd.testing.assert_frame_equal(back.uns["true_effects"], sim.uns["true_effects"],
                                  check_index_type=False)
    assert back.uns["target_type"] == sim.uns["target_type"]
