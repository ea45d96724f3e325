"""Build ``benchmarks/data/gasperini2019_highmoi.h5ad`` (a high-MOI CRISPRi screen).

Not imported by the package or its tests. It records how the benchmark file was made and
can make it again from the upstream ``.rda`` files.

Data
----
Gasperini et al. 2019, *Cell* 176:377 ("A genome-wide framework for mapping gene
regulation via cellular genetic screens"; K562, dCas9-KRAB CRISPRi, high MOI; GEO
GSE120861). The sceptre authors made a downsampled copy: 40,002 random cells, the genes
paired with 17 candidate enhancers and 10 TSS positive controls, and the gRNAs of those
targets plus 25 non-targeting gRNAs. Each object is stored as its own ``.rda`` in
github.com/Katsevich-Lab/sceptre (GPL-3). The commit used is
1fc8c72883cfc42b8f001f3dcbdde0d1faacca4f (2023-09-09), from these paths:

    data/response_matrix_highmoi.rda        blob 0722c7631d89fd411ab0d5cce217aa3a9c2f584c
    data/grna_matrix_highmoi.rda            blob e9b5669f6595d49bef7333214a645c92f8185c55
    data/extra_covariates_highmoi.rda       blob 60d4c9ff5bc67764c993947bbe81b11e45fc3470
    data/grna_group_data_frame_highmoi.rda  blob 8c8997f0f6e424d9a1160c5e6958e8c2036adaa6
    data/pc_pairs_highmoi.rda               blob b15e79e37d765696a97dbe01d3a613d7a740d48c
    data/discovery_pairs_highmoi.rda        blob 3fb9b0774be8b4020fba7e2f0ae6079ae9f8c3d1

Gene names and TSS positions come from ``data/gene_position_data_frame_grch37.rda``
(blob 4a2e6cbc64983254d9905ee2e7b5c8db07cb8463, unchanged from commit 84142ba, 2024-04-29,
to 3ba046b, 2026-08-07). The gRNA target coordinates come from Gasperini's
``GSE120861_gene_gRNAgroup_pair_table`` and are on hg19. All 10 TSS targets are within
1.1 kb of their genes' GRCh37 TSS. Nine of them are 27 kb to 0.7 Mb from the GRCh38 TSS
(VAPA is 3 bp off in both builds), so the GRCh37 table is the one that matches.

The newer, single-object ``highmoi_example_data.rda`` (in sceptredata at ec722d5 and in
sceptre between 2023-09 and 2024-03) is not stored in the snapshots we have: blob db6d3fc
cannot be read. Its separate response matrix (blob 53ecf16) is missing too. sceptre's
``highmoi_example_data.rda`` from 2025-01 on is **simulated** and is not used.

To get the inputs::

    git --git-dir=<sceptre mirror> show 1fc8c72:data/response_matrix_highmoi.rda > response.rda
    ... (one line per path above; grch37 from any commit from 84142ba on)

Run with a Python that has ``rdata``, ``anndata``, ``scipy``, ``pandas`` and ``numpy``
(``rdata`` is not a causarray dependency)::

    python benchmarks/data/make_gasperini.py --response response.rda --grna grna.rda \\
        --covariates extra_covariates.rda --grna-groups grna_groups.rda \\
        --pc-pairs pc_pairs.rda --cis-pairs discovery_pairs.rda \\
        --gene-positions gene_position_grch37.rda --out gasperini2019_highmoi.h5ad

Conversion
----------
* R ``dgTMatrix`` (features x cells, doubles that hold whole numbers) becomes a cells x
  features ``csr_matrix`` of ``int32``. The counts are not changed.
* The cells have no barcodes in the source, so they are named ``cell_00000`` ... in the
  source's order (sorted by batch).
* A target is ``tss`` when it is the gRNA group of a row of ``pc_pairs_highmoi`` (all
  such groups are named ``<GENE>_TSS``). Every other targeting group
  (``chrN.K_top_two`` / ``chrN.K_second_two``, the cis sites of ``discovery_pairs_highmoi``)
  is ``enhancer``. The script checks that the two rules agree with each other.
* ``--max-cells`` keeps a deterministic subset (seeded ``numpy`` permutation, in source
  order). ``--drop-unused-genes`` removes genes that no pair uses. Neither was needed for
  the benchmark file, which keeps every cell, gene and gRNA.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

NT = "non-targeting"
SOURCE = (
    "Gasperini et al. 2019 Cell 176:377 (K562 CRISPRi enhancer screen, high MOI, GEO GSE120861); "
    "downsampled example objects from github.com/Katsevich-Lab/sceptre commit 1fc8c72 "
    "(data/*_highmoi.rda, GPL-3); gene TSS from sceptre data/gene_position_data_frame_grch37.rda"
)


def read_rda(path: str | Path):
    """The single object stored in an ``.rda`` file."""
    try:
        import rdata
    except ImportError as exc:  # pragma: no cover - helper script
        raise SystemExit("this script needs the 'rdata' package (pip install rdata)") from exc
    with warnings.catch_warnings():
        # classes rdata has no constructor for (dgTMatrix, tbl_df) come back as plain objects
        warnings.simplefilter("ignore")
        objects = rdata.conversion.convert(rdata.parser.parse_file(str(path)), default_encoding="utf8")
    if len(objects) != 1:
        raise ValueError(f"{path}: expected one object, found {list(objects)}")
    return next(iter(objects.values()))


def triplet_to_cells_by_features(obj) -> tuple[sp.csr_matrix, list[str]]:
    """An R ``dgTMatrix`` (features x cells) as a cells x features int32 CSR plus row names."""
    slots = vars(obj)
    rows = np.asarray(slots["i"], dtype=np.int64)
    cols = np.asarray(slots["j"], dtype=np.int64)
    vals = np.asarray(slots["x"], dtype=np.float64)
    n_features, n_cells = (int(d) for d in np.asarray(slots["Dim"]))
    if not np.all(vals == np.round(vals)) or vals.min() < 0 or vals.max() > np.iinfo(np.int32).max:
        raise ValueError("matrix entries are not non-negative integers")
    mat = sp.csr_matrix(
        (vals.astype(np.int32), (cols, rows)), shape=(n_cells, n_features), dtype=np.int32
    )
    mat.sum_duplicates()
    mat.sort_indices()
    mat.eliminate_zeros()
    names = [str(x) for x in slots["Dimnames"][0]]
    if len(names) != n_features or len(set(names)) != n_features:
        raise ValueError("feature names missing or not unique")
    return mat, names


def build(args: argparse.Namespace):
    import anndata

    counts, gene_ids = triplet_to_cells_by_features(read_rda(args.response))
    grna, grna_ids = triplet_to_cells_by_features(read_rda(args.grna))
    covariates = read_rda(args.covariates)
    groups = read_rda(args.grna_groups)
    pc_pairs = read_rda(args.pc_pairs)
    cis_pairs = read_rda(args.cis_pairs)
    positions = read_rda(args.gene_positions)

    n_cells = counts.shape[0]
    if grna.shape[0] != n_cells or len(covariates) != n_cells:
        raise ValueError("response, gRNA matrix and covariates disagree on the number of cells")
    if list(groups["grna_id"].astype(str)) != grna_ids:
        raise ValueError("gRNA group table is not in the gRNA matrix's row order")

    # --- gRNA targets and the target table ---------------------------------------------
    grna_target = groups["grna_group"].astype(str).tolist()
    tss_groups = set(pc_pairs["grna_group"].astype(str))
    targets = [t for t in dict.fromkeys(grna_target) if t != NT]
    target_type = {t: ("tss" if t in tss_groups else "enhancer") for t in targets}
    for t, kind in target_type.items():  # the two annotations in the source must agree
        if (kind == "tss") != t.endswith("_TSS"):
            raise ValueError(f"target {t!r}: pc_pairs and the _TSS name disagree")
    if not tss_groups <= set(targets):
        raise ValueError("a positive-control group has no gRNA in the matrix")
    enh = {t for t, k in target_type.items() if k == "enhancer"}
    if enh != set(cis_pairs["grna_group"].astype(str)):
        raise ValueError("enhancer targets differ from the cis (discovery) pair groups")

    rows = []
    tg = groups.assign(grna_group=groups["grna_group"].astype(str))
    for t in targets:
        sub = tg[tg["grna_group"] == t]
        chrom, start, end = sub["chr"].astype(str), sub["start"].astype("int64"), sub["end"].astype("int64")
        if chrom.nunique() != 1:
            raise ValueError(f"target {t!r} spans several chromosomes")
        rows.append((t, chrom.iloc[0], int(start.min()), int(end.max())))
    target_table = pd.DataFrame(rows, columns=["target", "chr", "start", "end"])
    target_table["start"] = target_table["start"].astype(np.int64)
    target_table["end"] = target_table["end"].astype(np.int64)

    # --- genes ---------------------------------------------------------------------------
    pos = positions.assign(response_id=positions["response_id"].astype(str)).set_index("response_id")
    missing = [g for g in gene_ids if g not in pos.index]
    if missing:
        raise ValueError(f"genes without a GRCh37 position: {missing}")
    var = pd.DataFrame(index=pd.Index(gene_ids, name="gene_id"))
    var["gene_name"] = pos.loc[gene_ids, "response_name"].astype(str).to_numpy()
    var["chr"] = pos.loc[gene_ids, "chr"].astype(str).to_numpy()
    var["tss"] = pos.loc[gene_ids, "position"].astype("int64").to_numpy()

    pc = pd.DataFrame({
        "target": pc_pairs["grna_group"].astype(str).to_numpy(),
        "gene": pc_pairs["response_id"].astype(str).to_numpy(),
    })
    pc = pc[pc["gene"].isin(var.index)].reset_index(drop=True)
    pc["gene_name"] = var.loc[pc["gene"], "gene_name"].to_numpy()
    for t, g in zip(pc["target"], pc["gene_name"]):
        if t != f"{g}_TSS":
            raise ValueError(f"positive control {t!r} is paired with gene {g!r}")
    cis = pd.DataFrame({
        "target": cis_pairs["grna_group"].astype(str).to_numpy(),
        "gene": cis_pairs["response_id"].astype(str).to_numpy(),
    })
    cis = cis[cis["gene"].isin(var.index)].reset_index(drop=True)
    var["is_perturbation_target"] = var.index.isin(pc["gene"])

    # --- optional deterministic subsets --------------------------------------------------
    keep_cells = np.arange(n_cells)
    if args.max_cells is not None and args.max_cells < n_cells:
        rng = np.random.default_rng(args.seed)
        keep_cells = np.sort(rng.permutation(n_cells)[: args.max_cells])
    keep_genes = np.ones(len(gene_ids), dtype=bool)
    if args.drop_unused_genes:
        keep_genes = var.index.isin(set(pc["gene"]) | set(cis["gene"]))

    counts = counts[keep_cells][:, np.flatnonzero(keep_genes)].tocsr()
    grna = grna[keep_cells].tocsr()
    var = var.loc[keep_genes]
    obs = pd.DataFrame(index=pd.Index([f"cell_{i:05d}" for i in keep_cells], name="cell"))
    obs["batch"] = pd.Categorical(np.asarray(covariates["batch"].astype(str))[keep_cells])
    obs["n_umis_measured_genes"] = np.asarray(counts.sum(axis=1)).ravel().astype(np.int64)
    obs["n_grnas_ge5"] = np.asarray((grna >= 5).sum(axis=1)).ravel().astype(np.int64)

    for m in (counts, grna):
        m.indices = m.indices.astype(np.int32)
        m.indptr = m.indptr.astype(np.int32)
        m.sort_indices()

    adata = anndata.AnnData(X=counts, obs=obs, var=var)
    adata.obsm["grna_counts"] = grna
    adata.uns["grna_names"] = list(grna_ids)
    adata.uns["grna_target"] = grna_target
    adata.uns["target_table"] = target_table
    adata.uns["target_type"] = target_type
    adata.uns["positive_control_pairs"] = pc
    adata.uns["cis_pairs"] = cis
    adata.uns["positive_control_genes"] = sorted(pc["gene"])
    adata.uns["genome_build"] = "GRCh37 (hg19)"
    adata.uns["source"] = SOURCE
    adata.uns["ctrl_label"] = NT
    adata.uns["layout"] = "high-moi"
    return adata


def summary(adata) -> str:
    g = adata.obsm["grna_counts"]
    n5 = np.asarray((g >= 5).sum(axis=1)).ravel()
    kinds = pd.Series(adata.uns["target_type"]).value_counts().to_dict()
    nt = sum(t == NT for t in adata.uns["grna_target"])
    return (
        f"cells x genes {adata.shape}; gRNAs {g.shape[1]} ({nt} non-targeting); "
        f"targets {len(adata.uns['target_type'])} {kinds}; gRNAs/cell with >=5 UMIs: "
        f"median {np.median(n5):g}, mean {n5.mean():.3f}, cells with >=1: {(n5 >= 1).mean():.3f}; "
        f"positive-control pairs {len(adata.uns['positive_control_pairs'])}; "
        f"cis pairs {len(adata.uns['cis_pairs'])}; batch {adata.obs['batch'].value_counts().to_dict()}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    for name in ("response", "grna", "covariates", "grna-groups", "pc-pairs", "cis-pairs", "gene-positions"):
        ap.add_argument(f"--{name}", required=True, help=f"{name} .rda file")
    ap.add_argument("--out", required=True, help="output .h5ad")
    ap.add_argument("--max-cells", type=int, default=None, help="keep at most this many cells")
    ap.add_argument("--seed", type=int, default=0, help="seed for --max-cells")
    ap.add_argument("--drop-unused-genes", action="store_true")
    args = ap.parse_args(argv)

    adata = build(args)
    out = Path(args.out)
    adata.write_h5ad(out, compression="gzip")
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(summary(adata))
    print(f"{out}: {out.stat().st_size / 1e6:.2f} MB, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
