"""Plots of causarray results (``causarray.pl``).

Each function takes either an AnnData processed by :func:`causarray.tl.lfc` (results
read from ``adata.uns[key]``) or the table itself, accepts ``ax=`` to draw into an
existing Axes, and returns the Axes (:func:`volcano`, :func:`discoveries`) or the
Figure (:func:`r_selection`, :func:`propensity`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["calibration_qq", "discoveries", "discovery_counts", "has_propensity", "place_labels",
           "propensity", "r_selection",
           "volcano"]

SIG_COLOR = "#d62728"
NS_COLOR = "#aaaaaa"
BAR_COLOR = "steelblue"


def _uns(data: Any, key: str) -> dict:
    uns = getattr(data, "uns", None)
    if uns is None or key not in uns:
        raise ValueError(f"adata.uns has no {key!r} entry; run causarray.tl.lfc(adata) first")
    return uns[key]


def _results(data: Any, key: str = "causarray") -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    return _uns(data, key)["results"]


def _need(df: pd.DataFrame, cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"result table lacks column(s) {missing}")


def _axes(ax: Any, figsize: tuple[float, float]):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def volcano(data: Any, alpha: float = 0.05, padj_col: str = "padj", x: str = "log2fc",
            trt: str | Sequence[str] | None = None, n_labels: int = 5, ax: Any = None,
            key: str = "causarray", title: str | None = None):
    """Volcano plot: effect size against -log10 p-value, discoveries in red.

    Parameters
    ----------
    data : AnnData or DataFrame
        Results of :func:`causarray.tl.lfc` (or of ``LFC`` / ``gcate_lfc_batch``).
    alpha : float
        Discovery threshold on ``padj_col``.
    padj_col : str
        Adjusted p-value column (``'padj'`` or ``'padj_emp_null_adj'``).
    x : str
        Effect column (``'log2fc'`` or ``'tau'``).
    trt : str or sequence, optional
        Restrict to these perturbations.
    n_labels : int
        Label the ``n_labels`` smallest p-values among the discoveries.
    ax : matplotlib Axes, optional
    key : str
        ``adata.uns`` key.
    title : str, optional

    Returns
    -------
    matplotlib.axes.Axes
    """
    df = _results(data, key)
    pcol = "pvalue_emp_null_adj" if padj_col == "padj_emp_null_adj" else "pvalue"
    _need(df, [x, pcol, padj_col, "gene_names"])
    if trt is not None:
        _need(df, ["trt"])
        wanted = [trt] if isinstance(trt, str) else list(trt)
        df = df[df["trt"].astype(str).isin([str(t) for t in wanted])]
    df = df[np.isfinite(df[pcol].to_numpy(dtype=float)) & np.isfinite(df[x].to_numpy(dtype=float))]
    ax = _axes(ax, (6.5, 4.5))
    logp = -np.log10(np.clip(df[pcol].to_numpy(dtype=float), 1e-300, 1.0))
    sig = df[padj_col].to_numpy(dtype=float) < alpha
    xv = df[x].to_numpy(dtype=float)
    ax.scatter(xv[~sig], logp[~sig], s=3, c=NS_COLOR, alpha=0.5, rasterized=True,
               label="not significant")
    ax.scatter(xv[sig], logp[sig], s=5, c=SIG_COLOR, alpha=0.7, rasterized=True,
               label=f"{padj_col} < {alpha:g} ({int(sig.sum())})")
    ax.axvline(0.0, color="black", lw=0.5)
    if n_labels and sig.any():
        top = [i for i in np.argsort(-logp * sig)[: int(n_labels)] if sig[i]]
        labels = []
        for i in top:
            lab = str(df["gene_names"].iloc[i])
            if "trt" in df.columns:
                lab = f"{df['trt'].iloc[i]}:{lab}"
            labels.append((xv[i], logp[i], lab))
        place_labels(ax, labels, fontsize=7)
    ax.set_xlabel("log2 fold change" if x == "log2fc" else x)
    ax.set_ylabel("-log10 p-value")
    ax.set_title(title or "Volcano plot")
    ax.legend(fontsize=8, frameon=False, loc="best")
    return ax


#: Offsets (points) tried, in order, for a label beside its point.
_LABEL_OFFSETS = ((4, 4), (4, -11), (-4, 4), (-4, -11), (4, 14), (-4, 14), (4, -21),
                  (-4, -21), (12, 24), (-12, 24), (12, -31), (-12, -31))


def place_labels(ax: Any, labels: Sequence[tuple[float, float, str]], fontsize: float = 7,
                 offsets: Sequence[tuple[float, float]] = _LABEL_OFFSETS) -> list:
    """Annotate points without overlapping labels (greedy placement).

    Labels are placed in the given order (most important first); each takes the first
    offset whose text box overlaps neither an earlier label nor leaves the axes, and is
    left out when none does.

    Parameters
    ----------
    ax : matplotlib Axes
    labels : sequence of (x, y, text)
        Data coordinates and text.
    fontsize : float
    offsets : sequence of (dx, dy)
        Candidate offsets in points; a negative ``dx`` puts the label left of the point.

    Returns
    -------
    list of matplotlib.text.Annotation
        The labels drawn.
    """
    fig = ax.figure
    fig.canvas.draw()                          # final limits and a renderer for the boxes
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed, boxes = [], []
    for x, y, text in labels:
        for dx, dy in offsets:
            ann = ax.annotate(text, (x, y), fontsize=fontsize, xytext=(dx, dy),
                              textcoords="offset points", ha="left" if dx >= 0 else "right",
                              va="bottom")
            box = ann.get_window_extent(renderer)
            inside = (box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0
                      and box.y1 <= frame.y1)
            if inside and not any(box.overlaps(b) for b in boxes):
                placed.append(ann)
                boxes.append(box)
                break
            ann.remove()
    return placed


def discovery_counts(data: Any, alpha: float = 0.05, padj_col: str = "padj",
                     key: str = "causarray") -> pd.Series:
    """Number of discoveries (``padj < alpha``) per perturbation, largest first.

    Perturbations without discoveries are included with 0.

    Returns
    -------
    pandas.Series
        Indexed by perturbation (``trt``; a single unnamed treatment is ``'treatment'``).
    """
    df = _results(data, key)
    _need(df, [padj_col])
    trt = df["trt"].astype(str) if "trt" in df.columns else pd.Series("treatment",
                                                                       index=df.index)
    sig = df[padj_col].to_numpy(dtype=float) < alpha
    counts = pd.Series(sig.astype(int), index=df.index).groupby(trt.to_numpy()).sum()
    counts.index.name = "trt"
    counts.name = "n_discoveries"
    return counts.sort_values(ascending=False, kind="mergesort")


def discoveries(data: Any, alpha: float = 0.05, padj_col: str = "padj", top_n: int = 30,
                ax: Any = None, key: str = "causarray", title: str | None = None):
    """Bar chart of the number of discoveries per perturbation (largest ``top_n``).

    Parameters
    ----------
    data : AnnData or DataFrame
    alpha : float
        Threshold on ``padj_col``.
    padj_col : str
    top_n : int
        Bars shown.
    ax : matplotlib Axes, optional
    key : str
    title : str, optional

    Returns
    -------
    matplotlib.axes.Axes
    """
    counts = discovery_counts(data, alpha, padj_col, key).head(int(top_n))
    ax = _axes(ax, (max(4.0, 0.3 * len(counts) + 2.0), 4.0))
    ax.bar(np.arange(len(counts)), counts.to_numpy(), color=BAR_COLOR, edgecolor="none")
    ax.set_xticks(np.arange(len(counts)), [str(i) for i in counts.index], rotation=45,
                  ha="right", fontsize=8)
    ax.set_ylabel(f"genes with {padj_col} < {alpha:g}")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))     # counts: whole numbers
    ax.set_title(title or f"Discoveries per perturbation (top {len(counts)})")
    return ax


def _jic_table(data: Any, key: str) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        df = data
    else:
        df = _uns(data, key).get("jic")
        if df is None:
            raise ValueError("no JIC table stored: r was fixed; run tl.lfc with r='auto'")
    _need(df, ["r", "deviance", "nu"])
    return df.sort_values("r").reset_index(drop=True)


def _draw_jic(ax_left: Any, ax_right: Any, df: pd.DataFrame, c: float) -> None:
    """The two panels of ``plot_r`` (SPEC §7.4) on given axes."""
    r = df["r"].to_numpy()
    dev = df["deviance"].to_numpy(dtype=float)
    pen = c * df["nu"].to_numpy(dtype=float)
    l1 = ax_left.plot(r, dev, "o-", color="C0", label="deviance")
    l3 = ax_left.plot(r, dev + pen, "s-", color="C2", label="JIC")
    twin = ax_left.twinx()
    l2 = twin.plot(r, pen, "^--", color="C1", label=f"{c:g}·nu")
    ax_left.set_xticks(r)
    ax_left.set_xlabel("r (latent factors)")
    ax_left.set_ylabel("deviance / JIC")
    twin.set_ylabel(f"{c:g}·nu")
    lines = l1 + l2 + l3
    leg = ax_left.legend(lines, [ln.get_label() for ln in lines], fontsize=8, frameon=False)
    for text, ln in zip(leg.get_texts(), lines):
        text.set_color(ln.get_color())
    best = int(np.argmin(dev + pen))
    ax_left.axvline(r[best], color="grey", ls=":", lw=0.8)
    ax_left.set_title(f"JIC: minimum at r = {r[best]}")
    if ax_right is not None and len(r) > 1:
        ax_right.plot(r[1:], -np.diff(dev), "o-", color="C0", label="-Δ deviance")
        tw = ax_right.twinx()
        tw.plot(r[1:], np.diff(pen), "^--", color="C1", label=f"{c:g}·Δnu")
        tw.set_ylim(ax_right.get_ylim())
        ax_right.set_xticks(r[1:])
        ax_right.set_xlabel("r")
        ax_right.set_title("gain in fit vs. added penalty")
        ax_right.legend(fontsize=8, frameon=False, loc="upper right")


def r_selection(data: Any, c: float = 1.0, ax: Any = None, key: str = "causarray"):
    """The JIC curve used to choose r (the figure of :func:`causarray.gcate.plot_r`).

    Parameters
    ----------
    data : AnnData or DataFrame
        JIC table with columns ``r, deviance, nu`` (``adata.uns[key]['jic']``).
    c : float
        Penalty weight.
    ax : matplotlib Axes or a pair of Axes, optional
        Without ``ax`` the two-panel figure of ``plot_r`` is returned. With one Axes the
        left panel (deviance, c·nu on a twin axis, JIC) is drawn into it; with two
        Axes both panels.
    key : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    df = _jic_table(data, key)
    if ax is None:
        from .gcate import plot_r

        return plot_r(df, c=c)
    axes = list(np.atleast_1d(ax).ravel()) if isinstance(ax, (list, tuple, np.ndarray)) \
        else [ax]
    _draw_jic(axes[0], axes[1] if len(axes) > 1 else None, df, c)
    return axes[0].figure


def has_propensity(adata: Any, key: str = "causarray") -> bool:
    """Whether ``adata`` holds propensity scores of a :func:`causarray.tl.lfc` run.

    Either the scores table ``obsm[key + '_propensity']`` (small screens) or the models
    ``uns[key]['propensity_coef']`` with the design ``obsm[key + '_propensity_design']``.
    """
    obsm = getattr(adata, "obsm", None)
    if obsm is None:
        return False
    if f"{key}_propensity" in obsm:
        return True
    store = getattr(adata, "uns", {}).get(key)
    return isinstance(store, dict) and store.get("propensity_coef") is not None \
        and f"{key}_propensity_design" in obsm


def _drawn_scores(adata: Any, settings: dict, treatments: list[str],
                  key: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Treatments and scores of the controls and the cells of ``treatments`` only."""
    from .tl import propensity_scores

    labels = adata.obs[settings["pert_col"]].astype(str).to_numpy()
    ctrl = labels == str(settings["ctrl_label"])
    cells = ctrl | np.isin(labels, treatments)
    scores = propensity_scores(adata, treatments, key=key)
    pi = scores.to_numpy()
    cells &= np.isfinite(pi).all(axis=1)              # cells left out of the run are NaN
    A = pd.DataFrame({t: (labels[cells] == t).astype(float) for t in treatments},
                     index=adata.obs_names[cells])
    return A, pi[cells]


def propensity(data: Any, pi_hat: Any = None, treatments: Sequence[Any] | None = None,
               order: str = "least_overlap", max_panels: int = 4, ax: Any = None,
               key: str = "causarray"):
    """Propensity-score overlap of treated and control cells per perturbation.

    Parameters
    ----------
    data : AnnData or array_like
        An AnnData processed by :func:`causarray.tl.lfc` (scores from
        ``adata.obsm[key + '_propensity']``, or on a large screen recomputed for the
        drawn perturbations from the stored models, see :func:`has_propensity`), or
        the n x a treatment matrix ``A``.
    pi_hat : array_like, optional
        n x a scores (required when ``data`` is ``A``).
    treatments : sequence, optional
        Perturbations to draw; default ``max_panels`` of them chosen by ``order``.
    order : {'least_overlap', 'first'}
        Default choice: the smallest histogram overlap first, or table order.
    max_panels : int
    ax : matplotlib Axes or sequence of Axes, optional
    key : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    from .diagnostics import plot_propensity_scores, summarize_propensity_scores

    if order not in ("least_overlap", "first"):
        raise ValueError(f"order must be 'least_overlap' or 'first', got {order!r}")
    if hasattr(data, "obsm") and hasattr(data, "uns"):
        store = _uns(data, key)
        name = f"{key}_propensity"
        if name not in data.obsm and has_propensity(data, key):
            # a large screen: no cells x perturbations table, scores of the drawn
            # perturbations only, from the stored models (tl.propensity_scores)
            if treatments is None:
                summary = store["propensity"]
                if order == "least_overlap":
                    summary = summary.sort_values("overlap_ratio", kind="mergesort")
                treatments = list(summary["treatment"].head(int(max_panels)))
            A, pi = _drawn_scores(data, store["settings"], [str(t) for t in treatments],
                                  key)
            fig, _, _ = plot_propensity_scores(A, pi, treatments=list(A.columns), axes=ax)
            return fig
        if name not in data.obsm:
            raise ValueError(f"adata.obsm has no {name!r}; run tl.lfc(adata, propensity=True)")
        from .preprocessing import treatment_matrix

        settings = store["settings"]
        scores = data.obsm[name]
        cols = [str(c) for c in scores.columns]
        A_all = treatment_matrix(data.obs[settings["pert_col"]].astype(str),
                                 settings["ctrl_label"], index=data.obs_names)
        pi = np.asarray(scores, dtype=float)
        scored = np.isfinite(pi).all(axis=1)          # cells left out of the fit are NaN
        A = A_all.reindex(columns=cols, fill_value=0.0).iloc[scored]
        pi = pi[scored]
    else:
        if pi_hat is None:
            raise ValueError("pi_hat is required when data is a treatment matrix")
        A, pi = data, pi_hat
    if treatments is None:
        summary = summarize_propensity_scores(A, pi)
        if order == "least_overlap":
            summary = summary.sort_values("overlap_ratio", kind="mergesort")
        treatments = list(summary["treatment"].head(int(max_panels)))
    fig, _, _ = plot_propensity_scores(A, pi, treatments=treatments, axes=ax)
    return fig


def _uniform_qq_band(n: int, level: float, band: str, n_sim: int = 500,
                     random_state: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expected uniform order statistics and a ``level`` band, all ascending in p.

    The i-th smallest of n uniform p-values is Beta(i, n - i + 1). ``'pointwise'``:
    its central ``level`` interval. ``'simultaneous'``: the same beta quantiles at a
    smaller pointwise level, calibrated by simulation so that all n points lie inside
    with probability ``level`` (the tail-sensitive band of Aldor-Noiman et al. 2013).
    """
    from scipy import stats

    i = np.arange(1, n + 1, dtype=float)
    expected = i / (n + 1.0)
    a = (1.0 - level) / 2.0
    if band == "simultaneous" and n > 1:
        rng = np.random.default_rng(random_state)
        worst = np.empty(n_sim)
        for s in range(n_sim):
            u = np.sort(rng.uniform(size=n))
            cdf = stats.beta.cdf(u, i, n - i + 1.0)
            worst[s] = np.min(np.minimum(cdf, 1.0 - cdf))
        a = float(np.quantile(worst, 1.0 - level))
    lower = stats.beta.ppf(a, i, n - i + 1.0)
    upper = stats.beta.ppf(1.0 - a, i, n - i + 1.0)
    return expected, lower, upper


def calibration_qq(result: Any, ax: Any = None, band: str = "pointwise", level: float = 0.95,
                   by_kind: bool = True, title: str | None = None):
    """QQ plot of the fake-perturbation p-values of a calibration check.

    Observed against expected ``-log10 p`` (expected: uniform order statistics
    ``i / (n + 1)``), with the ``level`` band of uniform p-values shaded in grey; a
    calibrated analysis keeps the points on the diagonal and inside the band.

    Parameters
    ----------
    result : CalibrationResult or pandas.DataFrame
        :func:`causarray.calibration_check` output, or a table with a ``pvalue``
        column (and optionally ``kind``).
    ax : matplotlib Axes, optional
    band : {'pointwise', 'simultaneous'}
        Beta band of each order statistic, or a band that holds all points at once with
        probability ``level`` (simulated; slower for many p-values).
    level : float
        Coverage of the band.
    by_kind : bool
        One series per kind of fake (random / guide), each against its own expected
        quantiles; the band is that of all p-values together.
    title : str, optional
        Default: the type-I rate and the number of calls.

    Returns
    -------
    matplotlib.axes.Axes
    """
    if band not in ("pointwise", "simultaneous"):
        raise ValueError(f"band must be 'pointwise' or 'simultaneous', got {band!r}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    table = result if isinstance(result, pd.DataFrame) else getattr(result, "pvalues", None)
    if not isinstance(table, pd.DataFrame):
        raise ValueError("result must be a CalibrationResult or a table with a 'pvalue' column")
    _need(table, ["pvalue"])
    p_all = table["pvalue"].to_numpy(dtype=float)
    keep = np.isfinite(p_all)
    if not keep.any():
        raise ValueError("no finite p-values to plot")
    ax = _axes(ax, (4.6, 4.4))
    floor = np.finfo(float).tiny
    n = int(keep.sum())
    expected, lower, upper = _uniform_qq_band(n, float(level), band)
    x = -np.log10(expected)
    ax.fill_between(x, -np.log10(np.maximum(upper, floor)), -np.log10(np.maximum(lower, floor)),
                    color="#cccccc", alpha=0.7, lw=0,
                    label=f"{level:.0%} {band} band")
    groups: list[tuple[str, np.ndarray]]
    if by_kind and "kind" in table.columns:
        kinds = table["kind"].astype(str).to_numpy()
        groups = [(k, p_all[keep & (kinds == k)]) for k in pd.unique(kinds[keep])]
    else:
        groups = [("all", p_all[keep])]
    colors = {"random": BAR_COLOR, "guide": "#ff7f0e", "all": "#333333"}
    top = x[0]
    for name, p in groups:
        p = np.sort(p)
        m = p.size
        ex = -np.log10(np.arange(1, m + 1) / (m + 1.0))
        ob = -np.log10(np.maximum(p, floor))
        ax.scatter(ex, ob, s=8, color=colors.get(name, None), label=f"{name} ({m:,})",
                   zorder=3, rasterized=m > 5000)
        top = max(top, float(ob.max()))
    ax.plot([0, x[0]], [0, x[0]], color="black", lw=0.8, ls="--", zorder=2)
    ax.set_xlabel("expected -log10 p")
    ax.set_ylabel("observed -log10 p")
    ax.set_ylim(0, top * 1.05 + 0.1)
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    if title is None and not isinstance(result, pd.DataFrame):
        title = (f"fake perturbations: type-I {result.type_I:.3f} at p < 0.05, "
                 f"{result.n_calls} call(s)")
    if title:
        ax.set_title(title, fontsize=9)
    return ax
