"""The real high-MOI screen kept for benchmarks (Gasperini et al. 2019, sceptre's downsample):
its layout, its annotation and a visible knockdown (benchmarks/data/README.md)."""
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "gasperini2019_highmoi.h5ad"
EXPECTED_HIGHMOI = {
    "shape": (40002, 366), "n_grnas": 79, "n_nt_grnas": 25, "n_tss": 10, "n_enhancers": 17,
    "n_pc_pairs": 10, "n_cis_pairs": 358, "batch": {"b1": 20720, "b2": 19282},
    "sha256": "b4826c4119801164a8fd16d6cb3a49df8d939be9e60db1ef8d2c21be99045b30"}


def test_highmoi_file_checksum_and_licence():
    assert hashlib.sha256(DATA.read_bytes()).hexdigest() == EXPECTED_HIGHMOI["sha256"]
    readme = (DATA.parent / "README.md").read_text()
    assert "1fc8c72883cfc42b8f001f3dcbdde0d1faacca4f" in readme
    assert EXPECTED_HIGHMOI["sha256"] in readme
    licence = (DATA.parent / "LICENSE-GPL-3.txt").read_text()
    assert "GNU GENERAL PUBLIC LICENSE" in licence and "Version 3, 29 June 2007" in licence


# --- layout and annotation ----------------------------------------------------------

@pytest.fixture(scope="module")
def highmoi():
    import anndata as ad

    return ad.read_h5ad(DATA)


def _strings(x):
    return [str(v) for v in x]


def test_highmoi_counts_layout(highmoi):
    ad, exp = highmoi, EXPECTED_HIGHMOI
    assert ad.shape == exp["shape"]
    assert ad.uns["layout"] == "high-moi"
    assert ad.uns["ctrl_label"] == "non-targeting"
    assert "pert_col" not in ad.uns and "perturbation" not in ad.obs
    assert isinstance(ad.X, sp.csr_matrix) and ad.X.dtype == np.int32
    assert ad.X.has_canonical_format and ad.X.min() >= 0
    assert ad.var_names.is_unique and ad.var_names.str.startswith("ENSG").all()
    assert ad.obs_names.is_unique
    assert (np.asarray(ad.X.sum(axis=1)).ravel() == ad.obs["n_umis_measured_genes"]).all()
    # batch, as in the source's extra covariates
    assert isinstance(ad.obs["batch"].dtype, pd.CategoricalDtype)
    assert ad.obs["batch"].value_counts().to_dict() == exp["batch"]
    # gene annotation (GRCh37 positions)
    assert ad.var["gene_name"].notna().all() and (ad.var["gene_name"].str.len() > 0).all()
    assert np.issubdtype(ad.var["tss"].dtype, np.integer) and (ad.var["tss"] > 0).all()
    assert ad.var["chr"].astype(str).str.match(r"^chr([0-9]+|X|Y|M)$").all()
    assert ad.uns["genome_build"].startswith("GRCh37")


def test_highmoi_grna_layout(highmoi):
    ad, exp = highmoi, EXPECTED_HIGHMOI
    g = ad.obsm["grna_counts"]
    assert isinstance(g, sp.csr_matrix) and g.dtype == np.int32 and g.min() >= 0
    assert g.shape == (ad.n_obs, exp["n_grnas"])
    names, targets = _strings(ad.uns["grna_names"]), _strings(ad.uns["grna_target"])
    assert len(names) == len(set(names)) == len(targets) == g.shape[1]
    nt = [n for n, t in zip(names, targets) if t == "non-targeting"]
    assert len(nt) == exp["n_nt_grnas"]
    nt_cols = [i for i, t in enumerate(targets) if t == "non-targeting"]
    # every gRNA, non-targeting ones included, is seen in some cells with >= 5 UMIs
    assert ((g >= 5).sum(axis=0) > 0).all()
    assert (g[:, nt_cols] >= 5).sum() > 0
    assert (np.asarray((g >= 5).sum(axis=1)).ravel() == ad.obs["n_grnas_ge5"]).all()
    # some cells carry several of the included gRNAs at once (high MOI)
    assert ad.obs["n_grnas_ge5"].max() >= 3


def test_highmoi_targets(highmoi):
    ad, exp = highmoi, EXPECTED_HIGHMOI
    targets = _strings(ad.uns["grna_target"])
    kinds = dict(ad.uns["target_type"])
    assert set(kinds) == set(targets) - {"non-targeting"}
    assert set(kinds.values()) <= {"tss", "enhancer"}
    assert sum(k == "tss" for k in kinds.values()) == exp["n_tss"]
    assert sum(k == "enhancer" for k in kinds.values()) == exp["n_enhancers"]
    assert all((k == "tss") == t.endswith("_TSS") for t, k in kinds.items())
    table = ad.uns["target_table"]
    assert list(table.columns) == ["target", "chr", "start", "end"]
    assert table["target"].is_unique and set(table["target"]) == set(kinds)
    assert np.issubdtype(table["start"].dtype, np.integer)
    assert np.issubdtype(table["end"].dtype, np.integer)
    assert (table["end"] > table["start"]).all()


def test_highmoi_positive_controls(highmoi):
    ad, exp = highmoi, EXPECTED_HIGHMOI
    pc = ad.uns["positive_control_pairs"]
    assert {"target", "gene"} <= set(pc.columns) and len(pc) == exp["n_pc_pairs"]
    kinds = dict(ad.uns["target_type"])
    tss_targets = {t for t, k in kinds.items() if k == "tss"}
    assert set(pc["target"]) == tss_targets        # every TSS target has its gene measured
    assert pc["gene"].isin(ad.var_names).all()
    assert set(_strings(ad.uns["positive_control_genes"])) == set(pc["gene"])
    assert set(ad.var_names[ad.var["is_perturbation_target"]]) == set(pc["gene"])
    names = ad.var.loc[pc["gene"], "gene_name"].to_numpy()
    assert [f"{n}_TSS" for n in names] == list(pc["target"])
    # the TSS target lies within 2 kb of its gene's TSS (same genome build)
    table = ad.uns["target_table"].set_index("target")
    for t, gene in zip(pc["target"], pc["gene"]):
        assert table.loc[t, "chr"] == ad.var.loc[gene, "chr"]
        assert abs(int(table.loc[t, "start"]) - int(ad.var.loc[gene, "tss"])) < 2000
    cis = ad.uns["cis_pairs"]
    assert len(cis) == exp["n_cis_pairs"] and cis["gene"].isin(ad.var_names).all()
    assert {kinds[t] for t in cis["target"]} == {"enhancer"}


def test_highmoi_knockdown_visible(highmoi):
    """CRISPRi at a TSS lowers its gene: cells with the TSS gRNAs vs all other cells."""
    ad = highmoi
    g = ad.obsm["grna_counts"]
    targets = np.asarray(_strings(ad.uns["grna_target"]))
    size = np.asarray(ad.X.sum(axis=1)).ravel()
    norm = sp.csc_matrix(sp.diags(1.0 / size) @ ad.X)
    lowered = 0
    for t, gene in zip(ad.uns["positive_control_pairs"]["target"],
                       ad.uns["positive_control_pairs"]["gene"]):
        hit = np.asarray((g[:, np.flatnonzero(targets == t)] >= 5).sum(axis=1)).ravel() > 0
        y = norm[:, ad.var_names.get_loc(gene)].toarray().ravel()
        lowered += y[hit].mean() < 0.75 * y[~hit].mean()
    assert lowered >= 8   # 8 of 10 have log2FC <= -0.8; LARP1 and VAPA are weak
