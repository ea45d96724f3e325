"""causarray.pl: every plot returns a figure/axes, draws into ax=, shows the right numbers."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from causarray import pl


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def results():
    rng = np.random.default_rng(0)
    perts, genes = ["P1", "P2", "P3"], [f"G{j}" for j in range(40)]
    df = pd.DataFrame({"gene_names": genes * 3, "trt": np.repeat(perts, 40)})
    df["log2fc"] = rng.normal(0, 0.5, len(df))
    df["pvalue"] = rng.uniform(size=len(df))
    df.loc[:9, "pvalue"] = 1e-8           # 10 hits in P1
    df.loc[40:42, "pvalue"] = 1e-6        # 3 hits in P2
    df.loc[5, "pvalue"] = np.nan          # one untested gene
    df["padj"] = np.where(df["pvalue"] < 1e-5, 1e-4, 0.5)
    df.loc[5, "padj"] = np.nan
    df["tau"] = df["log2fc"] * np.log(2)
    return df


def test_volcano_colours_discoveries(results):
    fig, ax = plt.subplots()
    out = pl.volcano(results, alpha=0.05, ax=ax, n_labels=3)
    assert out is ax
    ns, sig = ax.collections
    n_sig = int((results["padj"] < 0.05).sum())
    assert sig.get_offsets().shape[0] == n_sig == 12
    assert ns.get_offsets().shape[0] == results["pvalue"].notna().sum() - n_sig
    np.testing.assert_allclose(sorted(sig.get_offsets()[:, 1]),
                               sorted(-np.log10(results.loc[results["padj"] < 0.05, "pvalue"])))
    assert len(ax.texts) == 3 and all(":" in t.get_text() for t in ax.texts)


def test_volcano_subset_and_errors(results):
    ax = pl.volcano(results, trt="P2", x="tau")
    assert isinstance(ax, Axes)
    assert ax.collections[1].get_offsets().shape[0] == 3
    assert ax.get_xlabel() == "tau"
    with pytest.raises(ValueError, match=r"result table lacks column\(s\) \['log2fc'\]"):
        pl.volcano(results.drop(columns="log2fc"))


def test_discovery_counts_and_bars(results):
    counts = pl.discovery_counts(results)
    want = results[results["padj"] < 0.05].groupby("trt").size()
    assert counts.to_dict() == {"P1": want["P1"], "P2": want["P2"], "P3": 0}
    assert list(counts.index) == ["P1", "P2", "P3"]
    fig, ax = plt.subplots()
    out = pl.discoveries(results, ax=ax, top_n=2)
    assert out is ax
    heights = [p.get_height() for p in ax.patches]
    assert heights == [9, 3]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["P1", "P2"]


@pytest.fixture
def jic():
    r = np.arange(0, 5)
    dev = np.array([3.0, 2.5, 2.2, 2.15, 2.13])
    nu = 0.1 * (2 + r)
    return pd.DataFrame({"r": r, "deviance": dev, "nu": nu, "JIC": dev + nu,
                         "time_s": np.ones(5)})


def test_r_selection_into_axes(jic):
    fig, axes = plt.subplots(1, 2)
    out = pl.r_selection(jic, ax=axes)
    assert out is fig
    left = axes[0]
    jic_line = [ln for ln in left.lines if ln.get_label() == "JIC"][0]
    np.testing.assert_allclose(jic_line.get_ydata(), jic["deviance"] + jic["nu"])
    assert left.get_title() == "JIC: minimum at r = 2"
    dev_gain = axes[1].lines[0].get_ydata()
    np.testing.assert_allclose(dev_gain, -np.diff(jic["deviance"]))
    fig1, ax1 = plt.subplots()
    assert pl.r_selection(jic, c=4.0, ax=ax1) is fig1
    assert ax1.get_title() == "JIC: minimum at r = 1"


def test_r_selection_default_is_plot_r(jic):
    from causarray import gcate

    fig = pl.r_selection(jic)
    assert isinstance(fig, Figure)
    ref = gcate.plot_r(jic)
    assert len(fig.axes) == len(ref.axes)
    np.testing.assert_allclose(fig.get_size_inches(), ref.get_size_inches())


def test_r_selection_requires_table():
    adata = ad.AnnData(np.zeros((2, 2)))
    with pytest.raises(ValueError,
                       match=r"adata.uns has no 'causarray' entry; run causarray.tl.lfc"):
        pl.r_selection(adata)
    adata.uns["causarray"] = {"jic": None}
    with pytest.raises(ValueError, match="no JIC table stored"):
        pl.r_selection(adata)


def _adata_with_scores():
    rng = np.random.default_rng(2)
    labels = np.repeat(["ctrl", "P1", "P2", "P3"], [100, 30, 30, 30])
    n = labels.size
    scores = rng.beta(2, 8, size=(n, 3))
    scores[labels == "P2", 1] = rng.beta(8, 2, size=30)   # P2 barely overlaps
    adata = ad.AnnData(np.zeros((n, 2)), obs=pd.DataFrame({"g": labels},
                                                          index=[f"c{i}" for i in range(n)]))
    adata.obsm["causarray_propensity"] = pd.DataFrame(scores, index=adata.obs_names,
                                                      columns=["P1", "P2", "P3"])
    adata.uns["causarray"] = {"settings": {"pert_col": "g", "ctrl_label": "ctrl"}}
    return adata, scores, labels


def test_propensity_from_anndata_least_overlap_first():
    adata, _, _ = _adata_with_scores()
    fig = pl.propensity(adata, max_panels=2)
    assert isinstance(fig, Figure)
    titles = [a.get_title() for a in fig.axes if a.get_visible()]
    assert len(titles) == 2 and titles[0].startswith("P2")
    fig = pl.propensity(adata, order="first", max_panels=3)
    titles = [a.get_title().split("\n")[0] for a in fig.axes if a.get_visible()]
    assert titles == ["P1", "P2", "P3"]


def test_propensity_from_matrix_with_ax():
    adata, scores, labels = _adata_with_scores()
    A = pd.DataFrame({p: (labels == p).astype(float) for p in ["P1", "P2", "P3"]})
    fig, ax = plt.subplots()
    out = pl.propensity(A, scores, treatments=["P3"], ax=ax)
    assert out is fig and ax.get_title().startswith("P3")
    with pytest.raises(ValueError, match="pi_hat is required"):
        pl.propensity(A)


def test_volcano_labels_do_not_overlap():
    # 12 discoveries crowded into one spot: every label drawn must have its own space
    rng = np.random.default_rng(2)
    n = 200
    df = pd.DataFrame({"gene_names": [f"GENE{j:03d}" for j in range(n)], "trt": "KO"})
    df["log2fc"] = rng.normal(0, 0.3, n)
    df["pvalue"] = rng.uniform(0.05, 1, n)
    df.loc[:11, "log2fc"] = -1.0 + 0.01 * np.arange(12)
    df.loc[:11, "pvalue"] = 10.0 ** (-8 - 0.02 * np.arange(12))
    df["padj"] = np.where(df["pvalue"] < 1e-6, 1e-4, 0.5)
    ax = pl.volcano(df, n_labels=12)
    texts = [t for t in ax.texts if t.get_text().startswith("KO:")]
    assert len(texts) >= 3                                   # some labels fit
    ax.figure.canvas.draw()
    renderer = ax.figure.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    for i in range(len(boxes)):
        for j in range(i):
            assert not boxes[i].overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())
    # the most significant discovery is always labelled
    assert "KO:GENE011" in {t.get_text() for t in texts}


def test_discoveries_axis_has_integer_ticks(results):
    small = results.copy()
    small["padj"] = 0.5
    small.loc[[0, 40], "padj"] = 1e-3                      # one discovery in P1 and P2
    ax = pl.discoveries(small)
    ax.figure.canvas.draw()
    ticks = ax.get_yticks()
    assert len(ticks) >= 2 and np.allclose(ticks, np.round(ticks))
