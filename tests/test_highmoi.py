"""Screens given as guide counts: ``tl.lfc(guides=...)`` and ``causarray run --guides``.

* calibration and power on high-MOI simulations (``simulate_highmoi_screen``: cells with
  more guides are larger and shifted in latent state), against an oracle given the true
  guide assignment, and the MOI covariates that make it calibrated;
* every guide layout (obsm, a guide AnnData or its .h5ad, Cell Ranger's guide-capture
  features, a guide -> target table) gives the same table;
* low MOI from guides equals the label analysis; guide assignment rules; pairs and their
  BH families; bad input with exact messages; the command line end to end.

The statistical tests use 4,000 cells x 200 genes x 20 targets (r = 2) and three seeds;
everything else a toy screen (1,200 cells x 40 genes x 6 targets, r = 1, 3 epochs).
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import io
import re
import subprocess
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats
from statsmodels.stats.multitest import multipletests

from causarray import tl
from causarray.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_USAGE, main
from causarray.guides import GuideAssignment, assign_guides, infer_moi
from causarray.highmoi import restrict_pairs
from causarray.simulate import simulate_highmoi_screen, simulate_screen

NT = "non-targeting"
#: the toy screen: two short chromosomes so that every target has genes in cis
TOY = dict(n_cells=1200, n_genes=40, n_targets=6, n_nt_guides=4, n_positive=2, r=1,
           n_chromosomes=2, chrom_length=5_000_000, cis_window=400_000, random_state=4)
FIT = dict(r=1, max_iters=3, verbose=False)
TABLES = ("results", "negative_controls", "guides", "targets")


def _carriers(counts: sp.spmatrix, guide_targets, target: str, threshold: int = 5) -> np.ndarray:
    """Cells with at least ``threshold`` UMIs of a guide of ``target`` (by hand)."""
    cols = np.flatnonzero(np.asarray(guide_targets, dtype=object) == target)
    return np.asarray((sp.csr_matrix(counts)[:, cols] >= threshold).sum(axis=1)).ravel() > 0


def _keys(df: pd.DataFrame, t: str = "trt", g: str = "gene_names") -> set:
    return set(zip(df[t].astype(str), df[g].astype(str)))


# ----------------------------------------------------------------------------------
# 1-2. calibration and power on simulations
# ----------------------------------------------------------------------------------
#: 20 targets (10 non-null: 5 TSS positive controls, 5 enhancers with |beta| in 0.1-0.4),
#: 6 non-targeting guides, moi 6
SIM = dict(n_cells=4000, n_genes=200, n_targets=20, n_nt_guides=6, moi=6.0, r=2,
           effect_size=(0.1, 0.4), moi_confounding=0.5, moi_libsize=0.3)
SEEDS = (0, 1, 2)
Z99 = stats.norm.ppf(0.995)          # two-sided 99 % band


def _oracle(adata):
    """The same screen with the true assignment as guide counts (10 UMIs per carried
    guide), so the threshold of 5 recovers the truth exactly."""
    o = adata.copy()
    o.obsm["grna_counts"] = sp.csr_matrix(adata.obsm["grna_true"].astype(np.int64) * 10)
    return o


@pytest.fixture(scope="module")
def sim_runs():
    runs = []
    for seed in SEEDS:
        adata = simulate_highmoi_screen(random_state=seed, **SIM)
        oracle = _oracle(adata)
        one = adata.copy()
        tl.lfc(adata, guides="obsm:grna_counts", r=2, verbose=False)
        tl.lfc(oracle, guides="obsm:grna_counts", r=2, verbose=False)
        # every target and non-targeting guide in one batch (a small library)
        tl.lfc(one, guides="obsm:grna_counts", r=2, verbose=False, batch_size=40)
        runs.append(dict(seed=seed, est=adata.uns["causarray"], oracle=oracle.uns["causarray"],
                         one_batch=one.uns["causarray"], adata=adata))
    return runs


def _is_true(table: pd.DataFrame, effects: pd.DataFrame) -> np.ndarray:
    truth = _keys(effects, "target", "gene")
    return np.array([k in truth for k in zip(table["trt"].astype(str),
                                               table["gene_names"].astype(str))])


def _hits(table: pd.DataFrame, effects: pd.DataFrame) -> int:
    """True pairs called at padj < 0.05."""
    return int(np.sum((table["padj"] < 0.05).to_numpy() & _is_true(table, effects)))


def _rate_band(groups: list[np.ndarray]) -> tuple[float, int, float, tuple[float, float]]:
    """Pooled share of p < 0.05 over clusters of tests (one cluster: the genes of one
    target or guide in one run, which share its cells and are correlated), the number of
    tests N, the design effect d (between-cluster variance of the pooled rate over its
    binomial variance, at least 1) and the 99 % band of a calibrated test,
    0.05 +- z sqrt(0.05 * 0.95 * d / N)."""
    k = np.array([np.sum(p < 0.05) for p in groups], dtype=float)
    n = np.array([p.size for p in groups], dtype=float)
    N, K = n.sum(), k.size
    rate = k.sum() / N
    v_cluster = K / (K - 1) * np.sum((k - rate * n) ** 2) / N ** 2
    d = max(1.0, v_cluster / (0.05 * 0.95 / N))
    half = Z99 * np.sqrt(0.05 * 0.95 * d / N)
    return rate, int(N), d, (0.05 - half, 0.05 + half)


def _null_target_groups(store, effects) -> list[np.ndarray]:
    res = store["results"]
    null = set(res["trt"].astype(str)) - set(effects["target"])
    return [g["pvalue"].dropna().to_numpy() for t, g in res.groupby("trt", observed=True)
            if str(t) in null]


def _nt_groups(store) -> list[np.ndarray]:
    neg = store["negative_controls"]
    return [g["pvalue"].dropna().to_numpy() for _, g in neg.groupby("trt", observed=True)]


def _cis_table(adata, store, window: int) -> pd.DataFrame:
    """The run's table restricted to the cis pairs by the function tl.lfc(pairs='cis')
    uses (one BH family of discovery pairs, one of positive controls; test_pairs_cis
    checks that the two agree)."""
    from causarray.highmoi import cis_pairs, gene_positions

    cis = cis_pairs(gene_positions(adata.var), adata.uns["target_table"], window)
    return restrict_pairs(store["results"], cis)


@pytest.mark.slow
def test_fdr_power_and_calibration_against_the_oracle(sim_runs):
    """(a) FDR over the cis discovery family (one BH family, as with pairs='cis') at most
    0.05 plus the binomial tolerance of the number of discoveries, pooled over the seeds,
    and every positive control found; (b) power at padj < 0.05 over all pairs at least
    0.9 x that of the oracle given the true assignment; (c) type-I at p < 0.05 of the
    non-targeting guides (tested against their complement) and of the null targets' pairs
    in the 99 % band of a calibrated test (design-effect aware, pooled over the seeds)."""
    V = R = tp = tp_oracle = n_true = 0
    nt, null = [], []
    for run in sim_runs:
        adata, est = run["adata"], run["est"]
        effects = adata.uns["true_effects"]
        assert est["settings"]["moi"] == "high" and est["settings"]["control"] == "complement"
        assert est["settings"]["covariates"][:4] == [
            "log1p_n_guides", "log1p_n_guides_pow2", "log1p_n_guides_pow3", "log1p_guide_umis"]
        cis = _cis_table(adata, est, window=1_000_000)     # the simulator's window
        on = cis["on_target"].to_numpy(bool)
        disc = (cis["padj"] < 0.05).to_numpy() & ~on       # the discovery family
        true = _is_true(cis, effects)
        V += int(np.sum(disc & ~true))
        R += int(disc.sum())
        # every true pair is in cis, and every positive control (TSS target, knockdown
        # >= 1.5) is called in its own family
        assert true.sum() == len(effects)
        assert _keys(cis[on]) == _keys(adata.uns["positive_control_pairs"], "target", "gene")
        assert (cis.loc[on, "padj"] < 0.05).all() and (cis.loc[on, "log2fc"] < -1).all()
        tp += _hits(est["results"], effects)
        tp_oracle += _hits(run["oracle"]["results"], effects)
        n_true += len(effects)
        nt += _nt_groups(est)
        null += _null_target_groups(est, effects)
    fdr = V / max(R, 1)
    tol = stats.binom.ppf(0.99, R, 0.05) / R
    power, power_oracle = tp / n_true, tp_oracle / n_true
    nt_rate, nt_n, nt_d, nt_band = _rate_band(nt)
    null_rate, null_n, null_d, null_band = _rate_band(null)
    print(f"cis FDR {V}/{R} = {fdr:.3f} (tolerance {tol:.3f}); power {power:.3f}, oracle "
          f"{power_oracle:.3f}; type-I NT guides {nt_rate:.4f} over {nt_n} (d = {nt_d:.2f}, "
          f"band {nt_band[0]:.4f}-{nt_band[1]:.4f}); null targets {null_rate:.4f} over "
          f"{null_n} (d = {null_d:.2f}, band {null_band[0]:.4f}-{null_band[1]:.4f})")
    # measured (seeds 0-2): cis FDR 0/13; power 0.90, oracle 0.87; type-I 0.051 (NT
    # guides, d = 1.0) and 0.054 (null targets, d = 1.9).  Not asserted: with pairs='all'
    # (BH per target) the mean per-target FDP over seeds 0-5 is 0.11-0.12, the oracle's
    # 0.11 too; the null targets' p-values are heavier-tailed than uniform below ~1e-3.
    assert R >= 10
    assert fdr <= tol
    assert power >= 0.9 * power_oracle and power >= 0.5
    assert nt_band[0] <= nt_rate <= nt_band[1]
    assert null_band[0] <= null_rate <= null_band[1]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["est", "one_batch"])
def test_fdr_over_all_pairs_in_either_batch_layout(sim_runs, layout):
    """The default table (pairs='all': every call, of both BH families) keeps its FDR
    at q = 0.05 pooled over the seeds, whether the targets are split over batches (the
    default batch_size) or all sit in one batch, where every target's carriers share
    the latent shift that the number of guides brings (docs/math.md#high-moi)."""
    V = R = tp = n_true = 0
    for run in sim_runs:
        store, effects = run[layout], run["adata"].uns["true_effects"]
        res = store["results"]
        n_cols = res["trt"].nunique() + store["negative_controls"]["trt"].nunique()
        assert (store["settings"]["batch_size"] >= n_cols) == (layout == "one_batch")
        disc = (res["padj"] < 0.05).to_numpy()          # both families: every call made
        true = _is_true(res, effects)
        V += int(np.sum(disc & ~true))
        R += int(disc.sum())
        tp += _hits(res, effects)
        n_true += len(effects)
    tol = stats.binom.ppf(0.99, R, 0.05) / R
    print(f"{layout}: all-pairs FDR {V}/{R} = {V / max(R, 1):.3f} (tolerance {tol:.3f}), "
          f"power {tp / n_true:.3f}")
    # measured (seeds 0-2): default layout 0/25, power 0.83; one batch 0/24, 0.80; before
    # this session's high-MOI changes 2/27 and 16/40 (this test failed).  Over 20 seeds
    # (benchmarks/highmoi_sims.py, discovery family): 0.08 and 0.06 (before 0.19, 0.40)
    assert R >= 10
    assert V / R <= tol
    assert tp / n_true >= 0.5


def test_moi_polynomial_spans_the_cubic_in_log_guides():
    """The extra MOI terms: orthogonal to the constant, log(1 + m) and each other, unit
    SD, and with log(1 + m) spanning every cubic in it; none when m takes too few
    values to carry a curvature."""
    from causarray.highmoi import moi_polynomial

    m = np.random.default_rng(0).poisson(6.0, 2000)
    P, names = moi_polynomial(m)
    assert names == ["log1p_n_guides_pow2", "log1p_n_guides_pow3"]
    x = np.log1p(m)
    B = np.column_stack([np.ones_like(x), x, P])
    G = B.T @ B / len(m)
    np.testing.assert_allclose(np.diag(G)[2:], 1.0, rtol=1e-12)
    off = G - np.diag(np.diag(G))
    np.testing.assert_allclose(off[2:], 0.0, atol=1e-10 * np.abs(x ** 3).max())
    cubic = 0.3 - x + 2 * x ** 2 - 0.5 * x ** 3
    coef, *_ = np.linalg.lstsq(B, cubic, rcond=None)
    np.testing.assert_allclose(B @ coef, cubic, atol=1e-9 * np.abs(cubic).max())
    # a degree-k curve needs k + 2 values of m holding >= 1 % of the cells each
    assert moi_polynomial(np.array([1, 2, 3, 4] * 50))[1] == ["log1p_n_guides_pow2"]
    assert moi_polynomial(np.array([1, 2, 3] * 50 + [9]))[1] == []
    # the Gasperini file's shape: m = 0, 1, 2 for 99.7 % of the cells, 108 cells above
    sparse = np.repeat([0, 1, 2, 3, 4, 5], [32364, 6623, 907, 98, 9, 1])
    assert moi_polynomial(sparse)[1] == []


def test_carrier_shares_by_hand():
    """The shares of column j among the carriers and the non-carriers of column k, per
    stratum and averaged with the strata's cell counts, against a loop over the cells;
    a stratum without carriers of k (or without non-carriers) adds no difference."""
    from causarray.highmoi import carrier_shares

    rng = np.random.default_rng(3)
    n, c = 300, 5
    A = (rng.random((n, c)) < 0.3).astype(float) * rng.integers(1, 4, (n, c))
    strata = rng.integers(0, 4, n)
    A[strata == 3, 1] = 0                        # column 1: no carrier in stratum 3
    cols = np.array([1, 3])
    sh = carrier_shares(sp.csr_matrix(A), strata, cols)
    S1, S0 = sh.S1, sh.S0
    want1, want0 = np.zeros((c, 2)), np.zeros((c, 2))
    var1, var0 = np.zeros((c, 2)), np.zeros((c, 2))
    for k in range(c):
        for a, j in enumerate(cols):
            for v in range(4):
                cells = strata == v
                carriers, others = cells & (A[:, k] > 0), cells & (A[:, k] == 0)
                overall = np.mean(A[cells, j] > 0)
                s0 = np.mean(A[others, j] > 0) if others.any() else overall
                s1 = np.mean(A[carriers, j] > 0) if carriers.any() else s0
                want1[k, a] += cells.mean() * s1
                want0[k, a] += cells.mean() * s0
                if carriers.any() and others.any():   # the stratified means' variances
                    var1[k, a] += cells.mean() ** 2 * s1 * (1 - s1) / carriers.sum()
                    var0[k, a] += cells.mean() ** 2 * s0 * (1 - s0) / others.sum()
    np.testing.assert_allclose(S1, want1, rtol=1e-12)
    np.testing.assert_allclose(S0, want0, rtol=1e-12)
    np.testing.assert_allclose(sh.V1, var1, rtol=1e-12)
    np.testing.assert_allclose(sh.V0, var0, rtol=1e-12)
    # a column against itself: 1 among its carriers, 0 without, and stratum 3 (no
    # carrier) adds its overall share 0 to both
    np.testing.assert_allclose([S1[1, 0], S0[1, 0]], [1 - np.mean(strata == 3), 0.0],
                               rtol=1e-12)
    one = carrier_shares(sp.csr_matrix(A), None, cols)
    carriers = A[:, 0] > 0
    np.testing.assert_allclose([one.S1[0, 0], one.S0[0, 0]],
                               [np.mean(A[carriers, 1] > 0), np.mean(A[~carriers, 1] > 0)],
                               rtol=1e-12)


@pytest.mark.slow
def test_other_targets_known_effects_are_taken_out(sim_runs):
    """Given its number of guides, a carrier of k carries fewer other guides than a cell
    without k (46 guides, drawn without replacement), so on a gene that a positive
    control knocks down every other target shows a small rise.  Over the null pairs on
    such genes (targets and non-targeting guides, three seeds) the mean t statistic is
    far above 0 before the correction (the estimate before it over the final standard
    error) and within the 99 % band of 0 after it, and the type-I error at p < 0.05
    falls to at most nominal."""
    before, after, cluster = [], [], []
    for run in sim_runs:
        effects = run["adata"].uns["true_effects"]
        for name in ("results", "negative_controls"):
            tab = run["est"][name]
            bias = tab["other_target_bias"].to_numpy()
            sel = (bias != 0) & ~_is_true(tab, effects) & tab["tested"].to_numpy(bool)
            std = tab["std"].to_numpy()[sel]
            before.append((tab["tau"].to_numpy()[sel] + bias[sel]) / std)
            after.append(tab["stat"].to_numpy()[sel])
            cluster.append(tab["trt"].astype(str).to_numpy()[sel] + f"|{run['seed']}")
    z0, z1, cl = np.concatenate(before), np.concatenate(after), np.concatenate(cluster)

    def cluster_se(z):            # pairs of one target share its cells: cluster by target
        sums = pd.Series(z - z.mean()).groupby(cl).sum().to_numpy()
        return np.sqrt(np.sum(sums ** 2)) / z.size

    rate0, rate1 = np.mean(np.abs(z0) > 1.96), np.mean(np.abs(z1) > 1.96)
    print(f"{z0.size} null pairs on genes with known effects: mean t {z0.mean():.3f} "
          f"before, {z1.mean():.3f} after (cluster SE {cluster_se(z1):.3f}); type-I "
          f"{rate0:.3f} before, {rate1:.3f} after")
    # measured (seeds 0-2): 573 pairs, mean t 0.763 before, -0.042 after (cluster SE
    # 0.033); type-I 0.143 before, 0.042 after
    assert z0.size >= 100
    assert z0.mean() > 5 * Z99 * cluster_se(z0)
    assert abs(z1.mean()) <= Z99 * cluster_se(z1)
    assert rate1 <= 0.05 + Z99 * np.sqrt(0.05 * 0.95 / z1.size) < rate0


@pytest.mark.slow
def test_moi_covariates_are_needed_for_calibration(sim_runs):
    """Acceptance: leaving the MOI covariates out breaks calibration (the null targets'
    type-I at p < 0.05 well above 0.05, and so are the non-targeting guides'), including
    them keeps it in the band.  Seed 0 of the simulations above."""
    run = sim_runs[0]
    effects = run["adata"].uns["true_effects"]
    bare = simulate_highmoi_screen(random_state=run["seed"], **SIM)
    tl.lfc(bare, guides="obsm:grna_counts", r=2, verbose=False, moi_covariates=False)
    store = bare.uns["causarray"]
    assert store["settings"]["moi_covariates"] is False
    assert not {"log1p_n_guides", "log1p_guide_umis"} & set(store["settings"]["covariates"])
    off, n_off, d_off, _ = _rate_band(_null_target_groups(store, effects))
    nt_off, _, _, _ = _rate_band(_nt_groups(store))
    on, _, _, band = _rate_band(_null_target_groups(run["est"], effects))
    print(f"null targets' type-I: {off:.3f} without the MOI covariates (d = {d_off:.1f}), "
          f"{on:.4f} with them (band {band[0]:.4f}-{band[1]:.4f}); NT guides {nt_off:.3f}")
    # measured over seeds 0-5: 0.26-0.30 without (NT guides 0.15-0.24), 0.050-0.061 with
    assert band[0] <= on <= band[1]
    assert off > 0.1 and nt_off > 0.1
    # the excess is larger than the design-effect aware band allows many times over
    assert off - 0.05 > 3 * Z99 * np.sqrt(0.05 * 0.95 * d_off / n_off)


def test_every_cell_carrying_a_targeting_guide(toy):
    """No cell free of targeting guides (as in most high-MOI screens): every target is
    still compared with its complement (fixed in bc97ad7; it used to fail on the empty
    'no targeting guide' label)."""
    gt = np.asarray(toy.uns["grna_target"], dtype=object)
    counts = sp.csr_matrix(toy.obsm["grna_counts"])
    keep = np.asarray((counts[:, np.flatnonzero(gt != NT)] >= 5).sum(axis=1)).ravel() > 0
    adata = toy[keep].copy()
    tl.lfc(adata, guides="obsm:grna_counts", **FIT)
    store = adata.uns["causarray"]
    assert (adata.obs["n_targets"] > 0).all() and store["settings"]["n_control"] == 0
    assert store["targets"]["tested"].all()
    res = store["results"]
    for t in sorted(set(gt) - {NT}):
        n_t = int(_carriers(adata.obsm["grna_counts"], gt, t).sum())
        rows = res[res["trt"] == t]
        assert len(rows) == adata.n_vars
        assert (rows["n_treated"] == n_t).all() and (rows["n_control"] == adata.n_obs - n_t).all()
    assert store["negative_controls"]["trt"].nunique() == 4


# ----------------------------------------------------------------------------------
# the toy screen
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    return simulate_highmoi_screen(**TOY)


@pytest.fixture(scope="module")
def toy_run(toy):
    """The toy screen run from obsm (the reference of the layouts)."""
    adata = toy.copy()
    tl.lfc(adata, guides="obsm:grna_counts", **FIT)
    return adata


def _guide_anndata(toy, obs_names=None, targets=True) -> ad.AnnData:
    var = pd.DataFrame(index=pd.Index(list(toy.uns["grna_names"]), dtype=object))
    if targets:
        var["target"] = list(toy.uns["grna_target"])
    obs = pd.DataFrame(index=pd.Index(toy.obs_names if obs_names is None else obs_names))
    return ad.AnnData(X=sp.csr_matrix(toy.obsm["grna_counts"]), obs=obs, var=var)


def _feature_types(toy) -> ad.AnnData:
    """Cell Ranger's layout: genes and guide-capture features side by side in X."""
    names = list(toy.uns["grna_names"])
    genes = toy.var.assign(feature_types="Gene Expression")
    guides = pd.DataFrame({"feature_types": "CRISPR Guide Capture",
                           "target": list(toy.uns["grna_target"])}, index=names)
    out = ad.AnnData(X=sp.hstack([toy.X, toy.obsm["grna_counts"]]).tocsr(), obs=toy.obs.copy(),
                     var=pd.concat([genes, guides]))
    out.uns.update({k: v for k, v in toy.uns.items() if k not in ("grna_names", "grna_target")})
    return out


def _without_targets(toy):
    out = toy.copy()
    del out.uns["grna_target"]
    return out


def _assert_same_tables(a, b):
    for name in TABLES:
        pd.testing.assert_frame_equal(a.uns["causarray"][name], b.uns["causarray"][name],
                                      check_exact=True, obj=name)


def test_layouts_give_the_same_table(toy, toy_run, tmp_path):
    """obsm, a guide AnnData (cells in another order), its .h5ad, Cell Ranger's
    guide-capture columns and a guide -> target table (DataFrame, CSV, feature reference):
    the same results, negative controls, guide and target tables, bit for bit."""
    names, targets = list(toy.uns["grna_names"]), list(toy.uns["grna_target"])
    shuffled = np.random.default_rng(0).permutation(toy.n_obs)
    gdata = _guide_anndata(toy)
    gpath = tmp_path / "guides.h5ad"
    gdata[shuffled].copy().write_h5ad(gpath)
    table = pd.DataFrame({"guide": names, "target": targets})
    table.to_csv(tmp_path / "guide_targets.csv", index=False)
    feature_ref = pd.DataFrame({
        "id": names, "name": names, "read": "R2", "pattern": "(BC)", "sequence": "ACGT",
        "feature_type": "CRISPR Guide Capture",
        "target_gene_id": [f"ENSG{t}" if t != NT else "Non-Targeting" for t in targets],
        "target_gene_name": targets})
    feature_ref.to_csv(tmp_path / "feature_reference.csv", index=False)
    cases = {
        "anndata": (toy.copy(), dict(guides=gdata)),
        "anndata, cells shuffled": (toy.copy(), dict(guides=gdata[shuffled].copy())),
        "h5ad path": (toy.copy(), dict(guides=str(gpath))),
        "feature_types": (_feature_types(toy), dict(guides="feature_types")),
        "targets DataFrame": (_without_targets(toy), dict(guides="obsm:grna_counts",
                                                          guide_targets=table)),
        "targets CSV": (_without_targets(toy), dict(guides="obsm:grna_counts",
                                                    guide_targets=str(tmp_path /
                                                                      "guide_targets.csv"))),
        "feature reference": (toy.copy(), dict(guides=_guide_anndata(toy, targets=False),
                                               guide_targets=tmp_path /
                                               "feature_reference.csv")),
    }
    for label, (adata, kw) in cases.items():
        tl.lfc(adata, **kw, **FIT)
        try:
            _assert_same_tables(adata, toy_run)
        except AssertionError as err:
            raise AssertionError(f"{label}: {err}") from None
        s = adata.uns["causarray"]["settings"]
        assert (s["n_genes"], s["n_guides"], s["n_nt_guides"]) == (40, len(names), 4), label
        for col in ("n_guides", "n_targets", "n_nt_guides", "guide_umis"):
            np.testing.assert_array_equal(adata.obs[col], toy_run.obs[col], err_msg=label)
    # the guide columns of the Cell Ranger layout are not genes
    ft = cases["feature_types"][0].uns["causarray"]["results"]
    assert set(ft["gene_names"]) == set(toy.var_names)


# ----------------------------------------------------------------------------------
# 4. low MOI from guides
# ----------------------------------------------------------------------------------
def _one_guide_per_cell(adata, seed: int = 0):
    """Guide counts of a low-MOI screen: each perturbation has two guides, each cell
    carries one of its perturbation's (or of the two non-targeting ones), 10 UMIs."""
    perts = [str(p) for p in adata.uns["perturbations"]]
    names = [f"{p}_g{k}" for p in perts for k in (1, 2)] + ["NT_g1", "NT_g2"]
    targets = [p for p in perts for _ in (1, 2)] + [NT, NT]
    col = {g: j for j, g in enumerate(names)}
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    pick = np.random.default_rng(seed).integers(1, 3, labels.size)
    j = [col[f"{lab}_g{k}" if lab != NT else f"NT_g{k}"] for lab, k in zip(labels, pick)]
    M = sp.csr_matrix((np.full(labels.size, 10, np.int64), (np.arange(labels.size), j)),
                      shape=(labels.size, len(names)))
    return M, names, targets


@pytest.fixture(scope="module")
def low_screen():
    adata = simulate_screen(n_ctrl=200, n_perts=4, cells_per_pert=80, n_genes=40, r=1,
                            random_state=1)
    M, names, targets = _one_guide_per_cell(adata)
    adata.obsm["guide_counts"] = M
    adata.uns["guide_counts_names"] = names
    adata.uns["guide_counts_target"] = targets
    return adata


def test_moi_is_inferred_from_the_guides(low_screen, toy, toy_run):
    ga = GuideAssignment(names=np.asarray(low_screen.uns["guide_counts_names"], dtype=object),
                         targets=np.asarray(low_screen.uns["guide_counts_target"],
                                            dtype=object),
                         assigned=assign_guides(low_screen.obsm["guide_counts"]),
                         umis=np.full(low_screen.n_obs, 10), nt_label=NT, method="threshold",
                         threshold=5)
    cells = ga.cell_table()
    assert (cells["n_guides"] == 1).all() and infer_moi(cells) == "low"
    counts = toy.obsm["grna_counts"]
    n_guides = np.asarray((counts >= 5).sum(axis=1)).ravel()
    high = pd.DataFrame({"n_guides": n_guides})
    assert np.median(n_guides) >= 2 and infer_moi(high) == "high"
    # what the file states wins over the guides
    assert infer_moi(high, "low-moi") == "low" and infer_moi(cells, "high-moi") == "high"
    assert toy_run.uns["causarray"]["settings"]["moi"] == "high"      # uns['layout'] says
    assert toy_run.uns["causarray"]["settings"]["control"] == "complement"
    unstated = toy.copy()
    del unstated.uns["layout"]                                          # the guides say
    tl.lfc(unstated, guides="obsm:grna_counts", r=0, verbose=False)
    assert unstated.uns["causarray"]["settings"]["moi"] == "high"


def test_low_moi_from_guides_equals_the_labels(low_screen):
    by_guides = low_screen.copy()
    tl.lfc(by_guides, guides="obsm:guide_counts", **FIT)
    by_labels = low_screen.copy()
    tl.lfc(by_labels, **FIT)
    assert by_guides.uns["causarray"]["settings"]["moi"] == "low"
    a = by_guides.uns["causarray"]["results"].sort_values(["trt", "gene_names"])
    b = by_labels.uns["causarray"]["results"].sort_values(["trt", "gene_names"])
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True),
                                  check_exact=True)


# ----------------------------------------------------------------------------------
# 5. assignment
# ----------------------------------------------------------------------------------
def test_threshold_and_maximum_rules_by_hand(toy):
    counts = sp.csr_matrix(toy.obsm["grna_counts"])
    dense = counts.toarray()
    for thr in (1, 5, 12):
        got = assign_guides(counts, "threshold", thr).toarray()
        np.testing.assert_array_equal(got, dense >= thr)
    # maximum: the top guide, if it has >= threshold UMIs and >= half of the cell's UMIs
    hand = np.zeros_like(dense, dtype=bool)
    for i, row in enumerate(dense):
        j = int(np.argmax(row))
        if row[j] >= 5 and 2 * row[j] >= row.sum():
            hand[i, j] = True
    got = assign_guides(counts, "maximum", 5).toarray()
    np.testing.assert_array_equal(got, hand)
    assert got.sum(axis=1).max() == 1
    # edge cases: exactly half of the UMIs; below the threshold; less than half; no UMI
    edge = sp.csr_matrix(np.array([[6, 6, 0], [4, 0, 0], [6, 5, 2], [0, 0, 0], [0, 9, 0]]))
    np.testing.assert_array_equal(assign_guides(edge, "maximum", 5).toarray(),
                                  [[1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 1, 0]])


def test_mixture_rule_recovers_a_bimodal_assignment():
    # carried guides: NB(30 s, 2) + 1 UMIs; the others Poisson(0.1): below 3 UMIs the two
    # laws overlap for about 1 % of the carried guides, so both rates lie far above 0.95
    adata = simulate_highmoi_screen(n_cells=2000, n_genes=5, n_targets=10, n_nt_guides=4,
                                    n_positive=2, random_state=11)
    truth = adata.obsm["grna_true"]
    got = assign_guides(adata.obsm["grna_counts"], "mixture")
    hits = got.multiply(truth).sum()
    recall, precision = hits / truth.sum(), hits / got.sum()
    print(f"mixture: recall {recall:.4f}, precision {precision:.4f}")
    assert recall > 0.95 and precision > 0.95
    # never a cell assigned with fewer UMIs of a guide than an unassigned cell has
    C = sp.csc_matrix(adata.obsm["grna_counts"])
    G = sp.csc_matrix(got)
    for j in range(C.shape[1]):
        on = G[:, j].toarray().ravel()
        x = C[:, j].toarray().ravel()
        if on.any() and (~on & (x > 0)).any():
            assert x[on].min() > x[~on & (x > 0)].max()


def test_cell_statistics_and_target_tables_by_hand(toy, toy_run):
    counts = sp.csr_matrix(toy.obsm["grna_counts"])
    gt = np.asarray(toy.uns["grna_target"], dtype=object)
    on = (counts >= 5).toarray()
    targets = sorted(set(gt) - {NT})
    carry = np.column_stack([_carriers(counts, gt, t) for t in targets])
    obs = toy_run.obs
    np.testing.assert_array_equal(obs["n_guides"], on.sum(axis=1))
    np.testing.assert_array_equal(obs["n_targets"], carry.sum(axis=1))
    np.testing.assert_array_equal(obs["n_nt_guides"], on[:, gt == NT].sum(axis=1))
    np.testing.assert_array_equal(obs["guide_umis"], np.asarray(counts.sum(axis=1)).ravel())
    np.testing.assert_allclose(obs["log1p_n_guides"], np.log1p(on.sum(axis=1)), rtol=1e-15)
    np.testing.assert_allclose(obs["log1p_guide_umis"],
                               np.log1p(np.asarray(counts.sum(axis=1)).ravel()), rtol=1e-15)
    store = toy_run.uns["causarray"]
    tab = store["targets"].set_index("target")
    assert list(tab.index) == targets
    np.testing.assert_array_equal(tab["cells"], carry.sum(axis=0))
    assert (tab["n_guides"] == 2).all() and tab["tested"].all()
    guides = store["guides"]
    assert list(guides["guide"]) == list(toy.uns["grna_names"])
    np.testing.assert_array_equal(guides["cells"], on.sum(axis=0))
    # each target is compared with the cells without its guides
    res = store["results"]
    for t in targets:
        n_t = int(carry[:, targets.index(t)].sum())
        rows = res[res["trt"] == t]
        assert (rows["n_treated"] == n_t).all() and (rows["n_control"] == toy.n_obs - n_t).all()
    # every non-targeting guide is a negative control, tested against its complement
    neg = store["negative_controls"]
    assert sorted(neg["trt"].unique()) == sorted(np.asarray(toy.uns["grna_names"])[gt == NT])
    assert len(neg) == 4 * toy.n_vars and not set(neg["trt"]) & set(res["trt"])


def test_targets_with_too_few_carriers_are_not_tested(toy, caplog):
    adata = toy.copy()
    counts = sp.lil_matrix(adata.obsm["grna_counts"])
    gt = np.asarray(adata.uns["grna_target"], dtype=object)
    carriers = np.flatnonzero(_carriers(adata.obsm["grna_counts"], gt, "T00001"))
    for j in np.flatnonzero(gt == "T00001"):       # keep 5 of its carriers
        counts[carriers[5:], j] = 0
    adata.obsm["grna_counts"] = sp.csr_matrix(counts, dtype=np.int64)
    assert _carriers(adata.obsm["grna_counts"], gt, "T00001").sum() == 5
    with caplog.at_level("WARNING", logger="causarray"):
        tl.lfc(adata, guides="obsm:grna_counts", **FIT)
    assert ("1 target(s) carried by fewer than 7 cells are not tested: ['T00001']"
            in caplog.text)
    store = adata.uns["causarray"]
    tab = store["targets"].set_index("target")
    assert tab.loc["T00001", "cells"] == 5 and not tab.loc["T00001", "tested"]
    assert tab.drop("T00001")["tested"].all()
    assert "T00001" not in set(store["results"]["trt"])
    assert store["results"]["trt"].nunique() == 5
    # with min_target_cells=5 it is tested
    tl.lfc(adata, guides="obsm:grna_counts", min_target_cells=5, **FIT)
    assert adata.uns["causarray"]["targets"]["tested"].all()
    assert (adata.uns["causarray"]["results"]["trt"] == "T00001").sum() == toy.n_vars


# ----------------------------------------------------------------------------------
# 6. pairs
# ----------------------------------------------------------------------------------
def _cis_by_hand(adata, window: int) -> set:
    out = set()
    for row in adata.uns["target_table"].itertuples():
        for gene, chrom, tss in zip(adata.var_names, adata.var["chr"], adata.var["tss"]):
            d = max(row.start - tss, tss - row.end, 0)
            if str(chrom) == str(row.chr) and d <= window:
                out.add((row.target, gene))
    return out


def _check_families(table: pd.DataFrame) -> None:
    """padj: BH over the kept discovery pairs, and separately over the on-target pairs."""
    on = table["on_target"].to_numpy(bool)
    for mask in (~on, on):
        part = table[mask]
        ok = part["pvalue"].notna().to_numpy()
        want = np.full(len(part), np.nan)
        want[ok] = multipletests(part["pvalue"].to_numpy()[ok], method="fdr_bh")[1]
        np.testing.assert_allclose(part["padj"].to_numpy(), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("window", [150_000, 600_000])
def test_pairs_cis(toy, toy_run, window):
    adata = toy.copy()
    tl.lfc(adata, guides="obsm:grna_counts", pairs="cis", cis_window=window, **FIT)
    table = adata.uns["causarray"]["results"]
    pcs = _keys(toy.uns["positive_control_pairs"], "target", "gene")
    cis = _cis_by_hand(toy, window)
    assert _keys(table) == cis | pcs
    assert _keys(table[table["on_target"]]) == pcs
    assert len(cis - pcs) >= 3                       # the toy has pairs to keep
    _check_families(table)
    s = adata.uns["causarray"]["settings"]
    assert (s["pairs"], s["n_pairs_requested"], s["cis_window"]) == ("cis", len(cis), window)
    # the estimates are those of the unrestricted run; only padj changes
    full = toy_run.uns["causarray"]["results"].set_index(["trt", "gene_names"])
    kept = table.set_index(["trt", "gene_names"])
    cols = ["log2fc", "pvalue", "std", "n_treated", "n_control", "on_target"]
    pd.testing.assert_frame_equal(kept[cols], full.loc[kept.index, cols], check_exact=True)
    # the negative controls are kept whole
    pd.testing.assert_frame_equal(adata.uns["causarray"]["negative_controls"],
                                  toy_run.uns["causarray"]["negative_controls"])


def test_pairs_from_a_csv(toy, tmp_path):
    wanted = pd.DataFrame({"target": ["T00001", "T00001", "T00004", "T00006"],
                           "gene": ["GENE00000", "GENE00007", "GENE00030", "GENE00039"]})
    path = tmp_path / "pairs.csv"
    wanted.to_csv(path, index=False)
    adata = toy.copy()
    tl.lfc(adata, guides="obsm:grna_counts", pairs=str(path), **FIT)
    table = adata.uns["causarray"]["results"]
    pcs = _keys(toy.uns["positive_control_pairs"], "target", "gene")
    assert _keys(table) == _keys(wanted, "target", "gene") | pcs
    _check_families(table)
    assert adata.uns["causarray"]["settings"]["pairs"] == "table"


@pytest.mark.parametrize("drop, message", [
    ("var", "pairs='cis' needs gene positions (var['chr'], var['tss'] or gene_positions=)"),
    ("uns", "pairs='cis' needs target positions (uns['target_table'] with target, chr, "
            "start, end)"),
    ("both", "pairs='cis' needs gene positions (var['chr'], var['tss'] or gene_positions=) "
             "and target positions (uns['target_table'] with target, chr, start, end)"),
])
def test_pairs_cis_without_positions(toy, drop, message):
    adata = toy.copy()
    if drop in ("var", "both"):
        adata.var = adata.var.drop(columns=["chr", "tss"])
    if drop in ("uns", "both"):
        del adata.uns["target_table"]
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        tl.lfc(adata, guides="obsm:grna_counts", pairs="cis", **FIT)


# ----------------------------------------------------------------------------------
# 7. bad input
# ----------------------------------------------------------------------------------
def _with_counts(toy, M):
    out = toy.copy()
    out.obsm["grna_counts"] = M
    return out


def test_bad_guide_input_through_tl(toy):
    n = toy.n_obs
    other = _guide_anndata(toy, obs_names=[f"x{i}" for i in range(n)])
    first = [str(c) for c in toy.obs_names[:5]]
    with pytest.raises(ValueError, match="^" + re.escape(
            f"guides: the guide matrix's cells do not match the expression cells: {n} of {n} "
            f"expression cells are not in it (first: {first})") + "$"):
        tl.lfc(toy.copy(), guides=other, **FIT)
    neg = sp.csr_matrix(toy.obsm["grna_counts"], copy=True)
    neg.data[:3] = -1
    with pytest.raises(ValueError, match="^" + re.escape(
            "guides: guide counts must be non-negative; found 3 negative value(s)") + "$"):
        tl.lfc(_with_counts(toy, neg), guides="obsm:grna_counts", **FIT)
    frac = sp.csr_matrix(toy.obsm["grna_counts"], dtype=float, copy=True)
    frac.data[0] = 2.5
    with pytest.raises(ValueError, match="^" + re.escape(
            "guides: guide counts must be integer UMI counts; found non-integer values (pass "
            "the raw guide UMI matrix)") + "$"):
        tl.lfc(_with_counts(toy, frac), guides="obsm:grna_counts", **FIT)
    names, targets = list(toy.uns["grna_names"]), list(toy.uns["grna_target"])
    partial = pd.DataFrame({"guide": names[:-2], "target": targets[:-2]})
    with pytest.raises(ValueError, match="^" + re.escape(
            "guide_targets: 2 guide(s) have no target: ['NT_g3', 'NT_g4']; give a "
            "guide-target table that lists every guide") + "$"):
        tl.lfc(_without_targets(toy), guides="obsm:grna_counts", guide_targets=partial, **FIT)
    with pytest.raises(ValueError, match="^" + re.escape(
            "guides='obsm:guides': adata.obsm has no key 'guides'; available: ['U_true', "
            "'grna_counts', 'grna_true']") + "$"):
        tl.lfc(toy.copy(), guides="obsm:guides", **FIT)
    with pytest.raises(ValueError, match="^" + re.escape(
            "guide_threshold must be a positive integer number of UMIs, got 0") + "$"):
        tl.lfc(toy.copy(), guides="obsm:grna_counts", guide_threshold=0, **FIT)
    with pytest.raises(ValueError, match="^" + re.escape(
            "guides='feature_types': adata.var['feature_types'] has no 'CRISPR Guide "
            "Capture' feature") + "$"):
        tl.lfc(toy.copy(), guides="feature_types", **FIT)
    with pytest.raises(ValueError, match="^" + re.escape(
            "guide_targets: the table needs columns 'guide,target' (or 'grna_id,grna_target', "
            "or Cell Ranger's 'id,target_gene_name'); got ['sgRNA', 'gene']") + "$"):
        tl.lfc(toy.copy(), guides="obsm:grna_counts",
               guide_targets=pd.DataFrame({"sgRNA": names, "gene": targets}), **FIT)
    # none of these wrote a result
    assert "causarray" not in toy.uns


from test_cli import _error_line  # noqa: E402  (tests/ is on sys.path)
from test_cli import _run as _cli  # noqa: E402


@pytest.fixture(scope="module")
def toy_path(toy, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "toy.h5ad"
    toy.write_h5ad(path)
    return path


def test_bad_guide_input_through_the_cli(capsys, toy, toy_path, tmp_path):
    """Exit 3 and one line naming the flag; checked before any fit, so --out stays empty.
    --guide-threshold 0 is a usage error (exit 2)."""
    names, targets = list(toy.uns["grna_names"]), list(toy.uns["grna_target"])
    n = toy.n_obs
    other = tmp_path / "other_cells.h5ad"
    _guide_anndata(toy, obs_names=[f"x{i}" for i in range(n)]).write_h5ad(other)
    partial = tmp_path / "partial.csv"
    pd.DataFrame({"guide": names[:-2], "target": targets[:-2]}).to_csv(partial, index=False)
    neg = _with_counts(toy, sp.csr_matrix(-sp.csr_matrix(toy.obsm["grna_counts"])))
    neg_path = tmp_path / "negative.h5ad"
    neg.write_h5ad(neg_path)
    n_neg = int(toy.obsm["grna_counts"].nnz)
    first = [str(c) for c in toy.obs_names[:5]]
    cases = [
        ([toy_path, "--guides", other],
         f"--guides: the guide matrix's cells do not match the expression cells: {n} of {n} "
         f"expression cells are not in it (first: {first})"),
        ([neg_path, "--guides", "obsm:grna_counts"],
         f"--guides: guide counts must be non-negative; found {n_neg} negative value(s)"),
        ([toy_path, "--guides", "obsm:grna_counts", "--guide-targets", partial],
         "--guide-targets: 2 guide(s) have no target: ['NT_g3', 'NT_g4']; give a "
         "guide-target table that lists every guide"),
        ([toy_path, "--guides", "obsm:nope"],
         "--guides 'obsm:nope': adata.obsm has no key 'nope'; available: ['U_true', "
         "'grna_counts', 'grna_true']"),
        ([toy_path, "--guides", "obsm:grna_counts", "--pairs", tmp_path / "nope.csv"],
         "--pairs must be 'all', 'cis' or a CSV file of target,gene pairs; no such file "
         f"'{tmp_path / 'nope.csv'}'"),
        ([toy_path, "--guides", "obsm:grna_counts", "--nt-label", ""],
         "--nt-label must be a non-empty string, got ''"),
    ]
    for k, (argv, message) in enumerate(cases):
        out = tmp_path / f"out{k}"
        code, _, err = _cli(capsys, ["run", *argv, "--out", out, "--r", "0"])
        assert code == EXIT_BAD_INPUT, (argv, err)
        assert _error_line(err) == f"causarray: error: {message}"
        assert sorted(p.name for p in out.iterdir()) == [], argv
    code, _, err = _cli(capsys, ["run", toy_path, "--out", tmp_path / "o", "--guides",
                                 "obsm:grna_counts", "--guide-threshold", "0"])
    assert code == EXIT_USAGE
    assert "argument --guide-threshold: expected a positive integer, got '0'" in err
    assert not (tmp_path / "o").exists()


def test_cli_design_errors_stop_before_any_fit(capsys, toy, toy_path, tmp_path):
    """--calibration on without a non-targeting guide, and --pairs cis without positions,
    are found once the guides are read, before any fit: exit 3, and --out stays empty."""
    out = tmp_path / "calib"       # --nt-label NTC: the non-targeting guides are a target
    code, _, err = _cli(capsys, ["run", toy_path, "--out", out, "--r", "0", "--guides",
                                 "obsm:grna_counts", "--nt-label", "NTC", "--calibration",
                                 "on"])
    assert code == EXIT_BAD_INPUT
    assert _error_line(err) == (
        "causarray: error: --nt-label: no guide targets 'NTC', and the calibration needs "
        "non-targeting guides; set --nt-label to their target label, or pass --calibration "
        "off")
    assert sorted(p.name for p in out.iterdir()) == []
    no_pos = toy.copy()
    del no_pos.uns["target_table"]
    path = tmp_path / "no_pos.h5ad"
    no_pos.write_h5ad(path)
    out = tmp_path / "cis"
    code, _, err = _cli(capsys, ["run", path, "--out", out, "--r", "0", "--guides",
                                 "obsm:grna_counts", "--pairs", "cis"])
    assert code == EXIT_BAD_INPUT
    assert _error_line(err) == ("causarray: error: --pairs cis needs target positions "
                                "(uns['target_table'] with target, chr, start, end)")
    assert sorted(p.name for p in out.iterdir()) == []


# ----------------------------------------------------------------------------------
# 8. the command line, end to end
# ----------------------------------------------------------------------------------
GUIDE_OUTPUTS = ("results.csv.gz", "results.parquet", "guides.csv", "targets.csv",
                 "negative_controls.csv", "calibration.csv", "guide_assignment.png",
                 "report.html", "cache.h5")


@pytest.fixture(scope="module")
def cli_run(toy_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    argv = ["run", str(toy_path), "--out", str(out), "--guides", "obsm:grna_counts",
            "--r", "1", "--max-iters", "3"]
    code = main(argv)
    return out, argv, code


def test_cli_run_writes_guide_outputs_and_resumes(capsys, cli_run, toy, toy_run):
    out, argv, code = cli_run
    assert code == EXIT_OK
    for name in GUIDE_OUTPUTS:
        assert (out / name).is_file(), name
    assert (out / "guide_assignment.png").read_bytes().startswith(b"\x89PNG")
    # the backed file read by the command line gives the table of tl.lfc in memory
    res = pd.read_csv(out / "results.csv.gz")
    ref = toy_run.uns["causarray"]["results"]
    pd.testing.assert_frame_equal(res, pd.read_csv(io.StringIO(ref.to_csv(index=False))),
                                  check_exact=True)
    targets = pd.read_csv(out / "targets.csv")
    pd.testing.assert_frame_equal(targets, toy_run.uns["causarray"]["targets"],
                                  check_dtype=False)
    guides = pd.read_csv(out / "guides.csv")
    assert list(guides["guide"]) == list(toy.uns["grna_names"])
    neg = pd.read_csv(out / "negative_controls.csv")
    assert sorted(neg["trt"].unique()) == ["NT_g1", "NT_g2", "NT_g3", "NT_g4"]
    calib = pd.read_csv(out / "calibration.csv")
    assert set(calib["kind"]) == {"nt_guide"} and len(calib) == 4
    np.testing.assert_array_equal(calib.sort_values("fake")["n_tested"],
                                  neg.groupby("trt")["pvalue"].count().sort_index())
    html = (out / "report.html").read_text()
    assert "<h2 id='guides'>Guide assignment</h2>" in html
    assert "high MOI screen: 16 guides (4 non-targeting) assigned by the threshold rule" in html
    assert "id='calibration'" in html or 'id="calibration"' in html
    first = (out / "results.csv.gz").read_bytes()
    capsys.readouterr()
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == EXIT_OK and f"resuming from the cache in {out}" in err
    assert (out / "results.csv.gz").read_bytes() == first


# the browser helpers of tests/test_report_browser.py (tests/ is on sys.path under
# pytest's default import mode); its session fixture `chromium` finds or installs chromium
try:
    from test_report_browser import CHECK_SCRIPT, CHROMIUM_FLAGS, _pngs, chromium
except ImportError:         # pragma: no cover
    chromium = None


@pytest.mark.slow
@pytest.mark.skipif(chromium is None, reason="tests/test_report_browser.py is not importable")
def test_guide_report_renders_in_the_browser(cli_run, chromium, tmp_path):
    """The high-MOI report (guide assignment and calibration sections) in headless
    chromium: every image decodes, both sections are in the DOM."""
    out, _, code = cli_run
    assert code == EXIT_OK
    text = (out / "report.html").read_text()
    checked = tmp_path / "report_checked.html"
    checked.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, "--window-size=1200,3000",
                          "--virtual-time-budget=10000", "--dump-dom", checked.as_uri()],
                         capture_output=True, text=True, timeout=120, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"',
                            re.search(r"<body([^>]*)>", dom.stdout).group(1)))
    n_png = len(_pngs(text))
    assert n_png >= 4
    assert attrs.get("data-images-total") == str(n_png) == attrs.get("data-images-loaded")
    assert re.search(r'id="guides"', dom.stdout) and re.search(r'id="calibration"', dom.stdout)
    assert "Guide assignment" in dom.stdout
