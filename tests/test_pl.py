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
    from causarray.report import discovery_counts

    counts = discovery_counts(results)
    want = results[results["padj"] < 0.05].groupby("trt").size()
    assert counts.to_dict() == {"P1": want["P1"], "P2": want["P2"], "P3": 0}
    assert list(counts.index) == ["P1", "P2", "P3"]
    fig, ax = plt.subplots()
    out = pl.discoveries(results, ax=ax, top_n=2)
    assert out is ax
    heights = [p.get_height() for p in ax.patches]
    assert heights == [9, 3]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["P1", "P2"]


def test_discovery_counts_in_pl_is_deprecated(results):
    from causarray.report import discovery_counts

    adata = ad.AnnData(np.zeros((2, 2)))
    adata.uns["causarray"] = {"results": results}
    with pytest.warns(FutureWarning, match="use causarray.report.discovery_counts"):
        old = pl.discovery_counts(adata, alpha=1e-3)
    pd.testing.assert_series_equal(old, discovery_counts(results, alpha=1e-3))
    assert "discovery_counts" not in pl.__all__
    with pytest.raises(ValueError, match=r"result table lacks column\(s\) \['padj_x'\]"):
        discovery_counts(results, padj_col="padj_x")


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


def _line_data(fig):
    """(label, x, y) of every line of a figure, in drawing order (twin axes included)."""
    return [(ln.get_label(), np.asarray(ln.get_xdata(), dtype=float),
             np.asarray(ln.get_ydata(), dtype=float)) for ax in fig.axes for ln in ax.lines]


def _same_lines(fig, ref):
    got, want = _line_data(fig), _line_data(ref)
    assert [g[0] for g in got] == [w[0] for w in want]
    for (_, gx, gy), (_, wx, wy) in zip(got, want):
        np.testing.assert_array_equal(gx, wx)
        np.testing.assert_array_equal(gy, wy)


def test_r_selection_default_figure(jic):
    fig = pl.r_selection(jic, c=2.0)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3                          # two panels and the c·nu twin axis
    left, right = fig.axes[:2]
    twin_left = next(a for a in fig.axes[2:] if a.bbox.bounds == left.bbox.bounds)
    assert [ln.get_label() for ln in left.lines[:2]] == ["deviance", "JIC"]
    np.testing.assert_allclose(left.lines[1].get_ydata(), jic["deviance"] + 2.0 * jic["nu"])
    np.testing.assert_allclose(twin_left.lines[0].get_ydata(), 2.0 * jic["nu"])
    best = int(jic["r"].iloc[np.argmin(jic["deviance"] + 2.0 * jic["nu"])])
    assert [t.get_text() for t in left.texts] == [f"selected r = {best}"]
    assert left.get_title() == f"JIC: minimum at r = {best}"
    np.testing.assert_allclose(right.lines[0].get_ydata(), -np.diff(jic["deviance"]))
    np.testing.assert_allclose(right.lines[1].get_ydata(), np.diff(2.0 * jic["nu"]))


def test_plot_r_aliases_draw_the_r_selection_figure(jic):
    import inspect

    import causarray as ca
    from causarray import gcate

    # the 0.1.1 names: causarray.plot_r and causarray.gcate.plot_r, as plot_r(df_r, c=1)
    assert ca.plot_r is gcate.plot_r is pl.plot_r
    assert list(inspect.signature(ca.plot_r).parameters) == ["df_r", "c"]
    assert inspect.signature(ca.plot_r).parameters["c"].default == 1
    shuffled = jic.sample(frac=1.0, random_state=0)        # row order does not matter
    _same_lines(ca.plot_r(shuffled, c=3.0), pl.r_selection(jic, c=3.0))
    _same_lines(gcate.plot_r(df_r=jic), pl.r_selection(jic))


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
    _, scores, labels = _adata_with_scores()
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


def test_propensity_alias_draws_the_same_panels():
    import inspect

    import causarray as ca
    from causarray import diagnostics

    _, scores, labels = _adata_with_scores()
    A = pd.DataFrame({p: (labels == p).astype(float) for p in ["P1", "P2", "P3"]})
    assert ca.plot_propensity_scores is diagnostics.plot_propensity_scores \
        is pl.plot_propensity_scores
    # 0.1.1's parameters, in 0.1.1's order (bins before max_panels, clip_bounds last)
    assert list(inspect.signature(ca.plot_propensity_scores).parameters) == [
        "A", "pi_hat", "treatments", "treatment_names", "overlap_bounds", "bins",
        "max_panels", "axes", "clip_bounds"]
    fig, grid, summary = ca.plot_propensity_scores(A, scores, ["P2", 0], None, (0.05, 0.95),
                                                   40, 4, None, (0.01, 0.99))
    ref = pl.propensity(A, scores, treatments=["P2", "P1"])
    assert isinstance(grid, np.ndarray) and len(summary) == 3
    for got, want in zip(grid.ravel(), [a for a in ref.axes if a.get_visible()]):
        assert got.get_title() == want.get_title()
        for pg, pw in zip(got.patches, want.patches):          # the two step histograms
            np.testing.assert_array_equal(pg.get_path().vertices, pw.get_path().vertices)
    # the histogram is the density of the treated cells' scores
    heights = np.histogram(scores[labels == "P2", 1], np.linspace(0, 1, 41), density=True)[0]
    treated = grid.ravel()[0].patches[1].get_path().vertices
    np.testing.assert_allclose(np.unique(treated[:, 1][treated[:, 1] > 0]),
                               np.unique(heights[heights > 0]))


def test_treatment_associations_and_alias():
    import causarray as ca
    from causarray import diagnostics

    rng = np.random.default_rng(4)
    labels = np.repeat(["ctrl", "P1", "P2"], [60, 30, 30])
    A = pd.DataFrame({p: (labels == p).astype(float) for p in ["P1", "P2"]})
    Z = pd.DataFrame({"lib": rng.normal(size=120) + 2.0 * (labels == "P1"),
                      "mito": rng.normal(size=120)})
    summary = ca.summarize_treatment_associations(A, Z)
    ax = pl.treatment_associations(summary, alpha=0.05)
    assert isinstance(ax, Axes)
    grid = summary.pivot(index="treatment", columns="covariate", values="spearman_rho")
    np.testing.assert_allclose(ax.images[0].get_array(), grid.loc[["P1", "P2"],
                                                                  ["lib", "mito"]])
    assert ax.images[0].get_clim() == (-1.0, 1.0)
    stars = [t for t in ax.texts if t.get_text() == "*"]
    assert len(stars) == int((summary["padj"] <= 0.05).sum()) >= 1
    assert ca.plot_treatment_associations is diagnostics.plot_treatment_associations
    fig, ax2 = ca.plot_treatment_associations(summary, "standardized_mean_difference",
                                              vmax=1.5)
    assert fig is ax2.figure
    ref = pl.treatment_associations(summary, "standardized_mean_difference", vmax=1.5)
    np.testing.assert_array_equal(ax2.images[0].get_array(), ref.images[0].get_array())
    assert ax2.images[0].get_clim() == ref.images[0].get_clim() == (-1.5, 1.5)
    with pytest.raises(ValueError, match=r"unknown covariate\(s\) \['nope'\]"):
        pl.treatment_associations(summary, covariates=["nope"])


def test_every_pl_function_draws_and_returns_what_it_documents(results, jic):
    """Each public pl name draws under Agg: Axes for one panel, Figure for several."""
    _, scores, labels = _adata_with_scores()
    A = pd.DataFrame({p: (labels == p).astype(float) for p in ["P1", "P2", "P3"]})
    summary = pd.DataFrame({"treatment": ["P1", "P2"], "covariate": ["z", "z"],
                            "spearman_rho": [0.1, -0.2], "padj": [0.5, 0.01]})
    calls = {"volcano": (Axes, lambda: pl.volcano(results)),
             "discoveries": (Axes, lambda: pl.discoveries(results)),
             "r_selection": (Figure, lambda: pl.r_selection(jic)),
             "propensity": (Figure, lambda: pl.propensity(A, scores)),
             "treatment_associations": (Axes, lambda: pl.treatment_associations(summary)),
             "calibration_qq": (Axes, lambda: pl.calibration_qq(results)),
             "guide_assignment": (Figure, lambda: pl.guide_assignment(
                 ([1, 2, 2, 3], pd.DataFrame({"target": ["a", "b"], "cells": [10, 3],
                                              "tested": [True, False]})))),
             "place_labels": (list, lambda: pl.place_labels(plt.subplots()[1],
                                                            [(0.5, 0.5, "g")]))}
    assert set(calls) == set(pl.__all__)
    for name, (kind, call) in calls.items():
        out = call()
        assert isinstance(out, kind), name
        fig = out if isinstance(out, Figure) else getattr(out, "figure", None)
        if fig is not None:
            fig.canvas.draw()                                     # renders without error
            assert any(a.has_data() or a.images for a in fig.axes), name
