"""Diagnostics (docs/math.md#diagnostics): values against direct numpy / scipy / sklearn
computations."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from statsmodels.stats.multitest import multipletests

from causarray import diagnostics as dg
from causarray.propensity import estimate_propensity_scores


@pytest.fixture
def screen():
    """One-hot A (3 treatments + controls) and scores in (0, 1)."""
    rng = np.random.default_rng(1)
    groups = np.repeat([-1, 0, 1, 2], [120, 40, 50, 30])
    A = pd.DataFrame((groups[:, None] == np.arange(3)[None, :]).astype(float),
                     columns=["KO1", "KO2", "KO3"])
    pi = rng.beta(2, 8, size=(groups.size, 3))
    pi[groups == 0, 0] = rng.beta(5, 3, size=40)          # KO1 separated from controls
    pi[:5, 1] = 0.001                                       # some scores on the clip bound
    return A, pi, groups


def _manual_row(A, pi, k, bins=40, ob=(0.05, 0.95), cb=(0.01, 0.99)):
    ctrl = A.to_numpy().sum(axis=1) == 0
    trt = A.to_numpy()[:, k] == 1
    p1, p0 = pi[trt, k], pi[ctrl, k]
    pop = np.r_[p1, p0]
    y = np.r_[np.ones(p1.size), np.zeros(p0.size)]
    e = np.linspace(0, 1, bins + 1)
    h1 = np.histogram(p1, e)[0] / p1.size
    h0 = np.histogram(p0, e)[0] / p0.size
    w1, w0 = 1 / p1, 1 / (1 - p0)
    return dict(
        n_treated=p1.size, n_control=p0.size, prevalence=p1.size / pop.size,
        overlap_ratio=np.minimum(h1, h0).sum(), auc=roc_auc_score(y, pop),
        brier_score=np.mean((pop - y) ** 2),
        outside_overlap_fraction=np.mean((pop < ob[0]) | (pop > ob[1])),
        clipped_fraction=np.mean((pop <= cb[0]) | (pop >= cb[1])),
        ess_treated=w1.sum() ** 2 / (w1 ** 2).sum(), ess_control=w0.sum() ** 2 / (w0 ** 2).sum(),
        score_q01=np.quantile(pop, 0.01), score_median=np.median(pop),
        score_q99=np.quantile(pop, 0.99),
    )


def test_summarize_propensity_matches_direct_computation(screen):
    A, pi, _ = screen
    out = dg.summarize_propensity_scores(A, pi)
    assert list(out["treatment"]) == ["KO1", "KO2", "KO3"]
    for k in range(3):
        want = _manual_row(A, pi, k)
        row = out.iloc[k]
        for key, val in want.items():
            assert row[key] == pytest.approx(val, rel=1e-12, abs=1e-12), key
        assert row["ess_treated_fraction"] == pytest.approx(want["ess_treated"] / want["n_treated"])
        assert row["ess_control_fraction"] == pytest.approx(want["ess_control"] / want["n_control"])
    # the separated treatment has the least overlap and the largest AUC
    assert out["overlap_ratio"].idxmin() == 0 and out["auc"].idxmax() == 0
    assert out.loc[1, "clipped_fraction"] > 0


def test_summarize_propensity_clip_none_and_extremes():
    A = np.r_[np.zeros(50), np.ones(50)][:, None]
    same = np.full(100, 0.3)
    out = dg.summarize_propensity_scores(A, same, clip_bounds=None)
    assert np.isnan(out.loc[0, "clipped_fraction"])
    assert out.loc[0, "overlap_ratio"] == pytest.approx(1.0)
    assert out.loc[0, "auc"] == pytest.approx(0.5)
    # constant scores: every weight equal, so the ESS is the arm size
    assert out.loc[0, "ess_treated"] == pytest.approx(50)
    assert out.loc[0, "ess_control"] == pytest.approx(50)
    disjoint = np.r_[np.full(50, 0.1), np.full(50, 0.9)]
    out = dg.summarize_propensity_scores(A, disjoint)
    assert out.loc[0, "overlap_ratio"] == 0.0 and out.loc[0, "auc"] == 1.0


def test_summarize_propensity_errors(screen):
    A, pi, groups = screen
    treated_only = A.to_numpy()[groups >= 0]
    with pytest.raises(ValueError, match="A has no control cells"):
        dg.summarize_propensity_scores(treated_only, pi[groups >= 0])
    A2 = A.copy()
    A2["KO4"] = 0.0
    with pytest.raises(ValueError, match="treatment 'KO4' has no treated cells"):
        dg.summarize_propensity_scores(A2, np.c_[pi, pi[:, :1]])
    with pytest.raises(ValueError, match=r"pi_hat has shape \(240, 2\)"):
        dg.summarize_propensity_scores(A, pi[:, :2])
    with pytest.raises(ValueError, match="finite scores in"):
        dg.summarize_propensity_scores(A, pi * 3)


def test_plot_propensity_scores(screen):
    A, pi, _ = screen
    fig, grid, summary = dg.plot_propensity_scores(A, pi, treatments=["KO3", 0])
    assert isinstance(grid, np.ndarray) and grid.ndim == 2       # 0.1.1: array of axes
    axes = grid.ravel()
    assert len(axes) == 2 and len(summary) == 3
    assert axes[0].get_title().startswith("KO3") and axes[1].get_title().startswith("KO1")
    # two step histograms + two dashed bounds per panel
    assert len(axes[0].patches) == 2 and len(axes[0].lines) == 2
    with pytest.raises(ValueError, match="unknown treatment 'nope'"):
        dg.plot_propensity_scores(A, pi, treatments=["nope"])
    plt.close("all")


def test_estimate_propensity_scores_is_reexported():
    assert dg.estimate_propensity_scores is estimate_propensity_scores


@pytest.fixture
def assoc_data(screen):
    A, _, groups = screen
    rng = np.random.default_rng(3)
    n = groups.size
    Z = pd.DataFrame({"lib": rng.normal(size=n) + 1.0 * (groups == 1),
                      "mito": rng.normal(size=n),
                      "const": np.ones(n)})
    return A, Z


def test_treatment_associations_match_scipy(assoc_data):
    A, Z = assoc_data
    out = dg.summarize_treatment_associations(A, Z, covariate_types=["observed"] * 3)
    assert len(out) == 9
    ctrl = A.to_numpy().sum(axis=1) == 0
    for _, row in out.iterrows():
        k = list(A.columns).index(row["treatment"])
        trt = A.to_numpy()[:, k] == 1
        pop = ctrl | trt
        z = Z[row["covariate"]].to_numpy()
        if row["covariate"] == "const":
            assert row["constant"] and np.isnan(row["spearman_rho"]) and np.isnan(row["padj"])
            assert np.isnan(row["standardized_mean_difference"])
            continue
        rho, pval = spearmanr(z[pop], trt[pop].astype(float))
        assert row["spearman_rho"] == pytest.approx(rho, rel=1e-12)
        assert row["pvalue"] == pytest.approx(pval, rel=1e-10)
        smd = (z[trt].mean() - z[ctrl].mean()) / np.sqrt((z[ctrl].var(ddof=1)
                                                          + z[trt].var(ddof=1)) / 2)
        assert row["standardized_mean_difference"] == pytest.approx(smd, rel=1e-12)
        assert row["n_treated"] == trt.sum() and row["n_control"] == ctrl.sum()
    finite = out["pvalue"].notna().to_numpy()
    want = multipletests(out.loc[finite, "pvalue"], method="fdr_bh")[1]
    np.testing.assert_allclose(out.loc[finite, "padj"], want, rtol=1e-12)
    assert (out["n_tests_in_family"] == 6).all()
    assert (out["covariate_type"] == "observed").all()
    # the shifted covariate is detected for KO2 only
    hit = out[(out["padj"] < 0.01)]
    assert set(zip(hit["treatment"], hit["covariate"])) == {("KO2", "lib")}


def test_treatment_associations_per_treatment_family(assoc_data):
    A, Z = assoc_data
    out = dg.summarize_treatment_associations(A, Z.to_numpy(), bh_scope="per_treatment",
                                              covariate_names=["lib", "mito", "const"])
    assert (out["n_tests_in_family"] == 2).all()
    for t, g in out.groupby("treatment"):
        f = g["pvalue"].notna()
        np.testing.assert_allclose(g.loc[f, "padj"],
                                   multipletests(g.loc[f, "pvalue"], method="fdr_bh")[1])
    with pytest.raises(ValueError, match="bh_scope must be 'global' or 'per_treatment'"):
        dg.summarize_treatment_associations(A, Z, bh_scope="gene")
    with pytest.raises(ValueError, match="Z must be an n x m matrix with n = 240 rows"):
        dg.summarize_treatment_associations(A, Z.to_numpy()[:10])


def test_plot_treatment_associations(assoc_data):
    A, Z = assoc_data
    summary = dg.summarize_treatment_associations(A, Z)
    fig, ax = dg.plot_treatment_associations(summary, alpha=0.01)
    stars = [t for t in ax.texts if t.get_text() == "*"]
    assert len(stars) == int((summary["padj"] <= 0.01).sum()) == 1
    assert ax.images[0].get_clim() == (-1.0, 1.0)
    fig, ax = dg.plot_treatment_associations(summary, value="standardized_mean_difference")
    lim = np.nanmax(np.abs(summary["standardized_mean_difference"]))
    assert ax.images[0].get_clim() == pytest.approx((-lim, lim))
    fig, ax = dg.plot_treatment_associations(summary, value="standardized_mean_difference",
                                             vmax=2.5, treatments=["KO2"])
    assert ax.images[0].get_clim() == (-2.5, 2.5)
    assert ax.images[0].get_array().shape == (1, 3)
    with pytest.raises(ValueError, match="value must be"):
        dg.plot_treatment_associations(summary, value="pvalue")
    plt.close("all")


@pytest.fixture
def results():
    genes = ["g1", "g2", "g3"]
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"gene_names": genes * 2, "trt": ["A"] * 3 + ["B"] * 3,
                       "pvalue": rng.uniform(size=6)})
    df["padj"] = multipletests(df["pvalue"], method="fdr_bh")[1]
    return df


def test_align_test_mask_forms_agree(results):
    before = results.copy()
    arr = np.array([[True, False, True], [False, False, True]])
    want = np.array([True, False, True, False, False, True])
    m1 = dg.align_test_mask(results, arr, treatment_names=["A", "B"], gene_names=["g1", "g2", "g3"])
    # a DataFrame with shuffled labels aligns by label, not position
    frame = pd.DataFrame(arr, index=["A", "B"], columns=["g1", "g2", "g3"]).loc[["B", "A"],
                                                                              ["g3", "g1", "g2"]]
    m2 = dg.align_test_mask(results, frame)
    series = frame.stack()
    m3 = dg.align_test_mask(results, series.iloc[::-1])
    for m in (m1, m2, m3):
        assert m.dtype == bool
        np.testing.assert_array_equal(m, want)
    pd.testing.assert_frame_equal(results, before)   # p-values untouched
    m01 = dg.align_test_mask(results, arr.astype(int), ["A", "B"], ["g1", "g2", "g3"])
    np.testing.assert_array_equal(m01, want)


def test_align_test_mask_labels_compared_as_strings():
    res = pd.DataFrame({"gene_names": [1, 2], "trt": [10, 10]})
    m = dg.align_test_mask(res, np.array([[False, True]]), treatment_names=["10"],
                           gene_names=["1", "2"])
    np.testing.assert_array_equal(m, [False, True])
    # single treatment without a trt column
    m = dg.align_test_mask(res.drop(columns="trt"), np.array([[True, False]]),
                           treatment_names=["x"], gene_names=[1, 2])
    np.testing.assert_array_equal(m, [True, False])


def test_align_test_mask_errors(results):
    names = dict(treatment_names=["A", "B"], gene_names=["g1", "g2", "g3"])
    with pytest.raises(TypeError, match="test_mask must be boolean"):
        dg.align_test_mask(results, np.full((2, 3), 0.5), **names)
    with pytest.raises(ValueError, match="needs treatment_names and gene_names"):
        dg.align_test_mask(results, np.ones((2, 3), bool))
    with pytest.raises(ValueError, match=r"test_mask has shape \(2, 2\), expected \(2, 3\)"):
        dg.align_test_mask(results, np.ones((2, 2), bool), **names)
    with pytest.raises(ValueError, match="duplicated gene labels in test_mask: \\['g1'\\]"):
        dg.align_test_mask(results, np.ones((2, 3), bool), ["A", "B"], ["g1", "g1", "g3"])
    with pytest.raises(ValueError, match=r"2 result row\(s\) have no entry in test_mask"):
        dg.align_test_mask(results, np.ones((2, 2), bool), ["A", "B"], ["g1", "g2"])
    with pytest.raises(ValueError, match="results has no column 'trt' but test_mask holds 2"):
        dg.align_test_mask(results.drop(columns="trt"), np.ones((2, 3), bool), **names)
    with pytest.raises(ValueError, match="2-level"):
        dg.align_test_mask(results, pd.Series([True, False]))
