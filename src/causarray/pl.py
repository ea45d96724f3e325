"""Figures of causarray (``causarray.pl``): the one home of every plot.

As in ``scanpy.pl``, these functions only draw; the numbers they show are computed
elsewhere (``tl``, ``report``, ``diagnostics``, ``calibration``).  Each takes an AnnData
processed by :func:`causarray.tl.lfc` (read from ``adata.uns[key]``) or the table itself,
accepts ``ax=`` to draw into existing Axes, and returns what it drew on: the Axes for a
one-panel figure (:func:`volcano`, :func:`discoveries`, :func:`treatment_associations`,
:func:`calibration_qq`), the Figure for a several-panel one (:func:`r_selection`,
:func:`propensity`).

The names of causarray 0.1.1 are thin aliases at the end of this module, with the
original's signatures and return values: :func:`plot_r` (also ``causarray.plot_r`` and
``causarray.gcate.plot_r``), :func:`plot_propensity_scores` and
:func:`plot_treatment_associations` (also ``causarray.diagnostics.plot_*``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ._validation import (
    check_calibration_table,
    check_choice,
    check_enough_axes,
    check_jic_stored,
    check_known_labels,
    check_obsm_scores,
    check_open_unit,
    check_pi_hat_given,
    check_plot_treatments,
    check_some_finite,
    check_table_columns,
    check_uns_entry,
    check_vmax,
)

__all__ = ["calibration_qq", "discoveries", "guide_assignment", "place_labels", "propensity",
           "r_selection", "treatment_associations", "volcano"]

SIG_COLOR = "#d62728"
NS_COLOR = "#aaaaaa"
BAR_COLOR = "steelblue"


def _results(data: Any, key: str = "causarray") -> pd.DataFrame:
    """The result table: ``data`` itself, or ``data.uns[key]['results']``."""
    if isinstance(data, pd.DataFrame):
        return data
    return check_uns_entry(data, key)["results"]


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
    check_table_columns(df, [x, pcol, padj_col, "gene_names"])
    if trt is not None:
        check_table_columns(df, ["trt"])
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


def discoveries(data: Any, alpha: float = 0.05, padj_col: str = "padj", top_n: int = 30,
                ax: Any = None, key: str = "causarray", title: str | None = None):
    """Bar chart of the number of discoveries per perturbation (largest ``top_n``).

    The counts are :func:`causarray.report.discovery_counts`.

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
    from matplotlib.ticker import MaxNLocator

    from .summaries import discovery_counts

    counts = discovery_counts(_results(data, key), alpha, padj_col).head(int(top_n))
    ax = _axes(ax, (max(4.0, 0.3 * len(counts) + 2.0), 4.0))
    ax.bar(np.arange(len(counts)), counts.to_numpy(), color=BAR_COLOR, edgecolor="none")
    ax.set_xticks(np.arange(len(counts)), [str(i) for i in counts.index], rotation=45,
                  ha="right", fontsize=8)
    ax.set_ylabel(f"genes with {padj_col} < {alpha:g}")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))     # counts: whole numbers
    ax.set_title(title or f"Discoveries per perturbation (top {len(counts)})")
    return ax


# ----------------------------------------------------------------------------------
# choice of r (JIC)
# ----------------------------------------------------------------------------------
def _jic_table(data: Any, key: str) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        df = data
    else:
        df = check_uns_entry(data, key).get("jic")
        check_jic_stored(df)
    check_table_columns(df, ["r", "deviance", "nu"])
    return df.sort_values("r").reset_index(drop=True)


def _draw_jic(ax_left: Any, ax_right: Any, df: pd.DataFrame, c: float) -> None:
    """The two panels of the JIC figure (docs/math.md#jic) on given axes.

    Left: deviance and JIC = deviance + c·ν against r, c·ν on a twin axis, the selected
    r (minimum JIC) marked.  Right (when given and there are two r or more): the decrease
    of the deviance and the increase of c·ν from one r to the next on one scale; where
    the curves cross, an extra factor stops paying for itself.
    """
    r = df["r"].to_numpy()
    dev = df["deviance"].to_numpy(dtype=float)
    pen = c * df["nu"].to_numpy(dtype=float)
    jic = dev + pen
    best = int(np.argmin(jic))
    l1 = ax_left.plot(r, dev, "o-", color="C0", label="deviance")
    l3 = ax_left.plot(r, jic, "s-", color="C2", label="JIC")
    twin = ax_left.twinx()
    l2 = twin.plot(r, pen, "^--", color="C1", label=f"{c:g}·ν")
    ax_left.axvline(r[best], color="grey", ls=":", lw=0.8)
    ax_left.annotate(f"selected r = {r[best]}", xy=(r[best], jic[best]), xytext=(5, 10),
                     textcoords="offset points", fontsize=8)
    ax_left.set_xticks(r)
    ax_left.set_xlabel("r (latent factors)")
    ax_left.set_ylabel("deviance / JIC")
    twin.set_ylabel(f"{c:g}·ν")
    lines = l1 + l2 + l3
    leg = ax_left.legend(lines, [ln.get_label() for ln in lines], fontsize=8, frameon=False)
    for text, ln in zip(leg.get_texts(), lines):
        text.set_color(ln.get_color())
    ax_left.set_title(f"JIC: minimum at r = {r[best]}")
    if ax_right is not None and len(r) > 1:
        ax_right.plot(r[1:], -np.diff(dev), "o-", color="C0", label="-Δ deviance")
        ax_right.plot(r[1:], np.diff(pen), "^--", color="C1", label=f"{c:g}·Δν")
        ax_right.set_xticks(r[1:])
        ax_right.set_xlabel("r")
        ax_right.set_title("gain in fit vs. added penalty")
        ax_right.legend(fontsize=8, frameon=False, loc="upper right")


def r_selection(data: Any, c: float = 1.0, ax: Any = None, key: str = "causarray"):
    """The JIC curve used to choose r (docs/math.md#jic).

    Parameters
    ----------
    data : AnnData or DataFrame
        JIC table with columns ``r, deviance, nu`` (``adata.uns[key]['jic']``, or the
        table of :func:`causarray.estimate_r`).
    c : float
        Penalty weight.
    ax : matplotlib Axes or a pair of Axes, optional
        Without ``ax`` a new two-panel figure. With one Axes the left panel (deviance,
        c·ν on a twin axis, JIC) is drawn into it; with two Axes both panels.
    key : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    df = _jic_table(data, key)
    if ax is None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        _draw_jic(axes[0], axes[1], df, c)
        fig.tight_layout()
        return fig
    axes = list(np.atleast_1d(ax).ravel()) if isinstance(ax, (list, tuple, np.ndarray)) \
        else [ax]
    _draw_jic(axes[0], axes[1] if len(axes) > 1 else None, df, c)
    return axes[0].figure


# ----------------------------------------------------------------------------------
# propensity overlap
# ----------------------------------------------------------------------------------
def _as_2d(values: Any) -> np.ndarray:
    """An already validated matrix (dense, sparse or pandas) as a 2-D float array."""
    if hasattr(values, "toarray"):
        values = values.toarray()
    arr = np.asarray(values.to_numpy() if hasattr(values, "to_numpy") else values, dtype=float)
    return arr[:, None] if arr.ndim == 1 else arr


def _chosen_panels(names: list[str], treatments: Sequence[Any] | None,
                   max_panels: int) -> list[int]:
    """Positions of the treatments to draw: names, or column positions not also names."""
    if treatments is None:
        return list(range(min(int(max_panels), len(names))))
    return check_plot_treatments(names, treatments)


def _propensity_panels(A: Any, pi_hat: Any, treatments: Sequence[Any] | None,
                       treatment_names: Sequence[Any] | None,
                       overlap_bounds: tuple[float, float],
                       clip_bounds: tuple[float, float] | None, bins: int, max_panels: int,
                       axes: Any) -> tuple[Any, np.ndarray, pd.DataFrame]:
    """One histogram panel per chosen treatment: ``(fig, axes array, summary)``.

    Panel k shows the scores of treatment k's cells against those of the shared controls
    (docs/math.md#diagnostics), the ``overlap_bounds`` dashed, and the histogram overlap
    and treated Kish ESS share of :func:`causarray.summarize_propensity_scores` in the
    title.
    """
    import matplotlib.pyplot as plt

    from .diagnostics import summarize_propensity_scores

    summary = summarize_propensity_scores(A, pi_hat, treatment_names, overlap_bounds,
                                          clip_bounds, bins)      # validates A and pi_hat
    A_arr, pi = _as_2d(A), _as_2d(pi_hat)
    chosen = _chosen_panels(list(summary["treatment"]), treatments, max_panels)
    if axes is None:
        ncol = min(len(chosen), 4)
        nrow = int(np.ceil(len(chosen) / ncol))
        fig, ax_grid = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.8 * nrow), squeeze=False)
        ax_list = list(ax_grid.ravel())
        for extra in ax_list[len(chosen):]:
            extra.set_visible(False)
        ax_out = ax_grid
    else:
        ax_out = np.atleast_1d(np.asarray(axes, dtype=object))
        ax_list = list(ax_out.ravel())
        check_enough_axes(len(chosen), len(ax_list))
        fig = ax_list[0].figure
    control = ~np.any(A_arr != 0, axis=1)
    edges = np.linspace(0.0, 1.0, int(bins) + 1)
    for ax, k in zip(ax_list, chosen):
        row = summary.iloc[k]
        ax.hist(pi[control, k], bins=edges, density=True, histtype="step", color="#555555",
                label="control")
        ax.hist(pi[A_arr[:, k] == 1, k], bins=edges, density=True, histtype="step",
                color=SIG_COLOR, label="treated")
        for b in overlap_bounds:
            ax.axvline(b, color="#1f77b4", ls="--", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("propensity score")
        ax.set_title(f"{row['treatment']}\noverlap {row['overlap_ratio']:.2f}, "
                     f"ESS(T) {row['ess_treated_fraction']:.0%}", fontsize=9)
    ax_list[0].set_ylabel("density")
    ax_list[0].legend(fontsize=7, frameon=False)
    return fig, ax_out, summary


def _scores_from_adata(adata: Any, key: str) -> tuple[pd.DataFrame, np.ndarray]:
    """``(A, pi)`` of the cells that :func:`causarray.tl.lfc` scored (``obsm[key_propensity]``)."""
    from .preprocessing import treatment_matrix

    settings = check_uns_entry(adata, key)["settings"]
    name = f"{key}_propensity"
    check_obsm_scores(adata, name)
    scores = adata.obsm[name]
    cols = [str(c) for c in scores.columns]
    A_all = treatment_matrix(adata.obs[settings["pert_col"]].astype(str),
                             settings["ctrl_label"], index=adata.obs_names)
    pi = np.asarray(scores, dtype=float)
    scored = np.isfinite(pi).all(axis=1)          # cells left out of the fit are NaN
    return A_all.reindex(columns=cols, fill_value=0.0).iloc[scored], pi[scored]


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
    from .diagnostics import summarize_propensity_scores

    check_choice("order", order, ("least_overlap", "first"))
    if hasattr(data, "obsm") and hasattr(data, "uns"):
        store = check_uns_entry(data, key)
        if f"{key}_propensity" not in data.obsm and has_propensity(data, key):
            # a large screen: no cells x perturbations table, scores of the drawn
            # perturbations only, from the stored models (tl.propensity_scores)
            if treatments is None:
                summary = store["propensity"]
                if order == "least_overlap":
                    summary = summary.sort_values("overlap_ratio", kind="mergesort")
                treatments = list(summary["treatment"].head(int(max_panels)))
            A, pi = _drawn_scores(data, store["settings"], [str(t) for t in treatments], key)
            treatments = list(A.columns)
        else:
            A, pi = _scores_from_adata(data, key)
    else:
        check_pi_hat_given(pi_hat)
        A, pi = data, pi_hat
    if treatments is None and order == "least_overlap":
        summary = summarize_propensity_scores(A, pi).sort_values("overlap_ratio",
                                                                 kind="mergesort")
        treatments = list(summary["treatment"].head(int(max_panels)))
    fig, _, _ = _propensity_panels(A, pi, treatments, None, (0.05, 0.95), (0.01, 0.99), 40,
                                   max_panels, ax)
    return fig


# ----------------------------------------------------------------------------------
# treatment-covariate association
# ----------------------------------------------------------------------------------
def treatment_associations(summary: pd.DataFrame, value: str = "spearman_rho",
                           treatments: Sequence[Any] | None = None,
                           covariates: Sequence[Any] | None = None,
                           alpha: float | None = None, vmax: float | None = None,
                           ax: Any = None):
    """Heat map of treatment-covariate associations (docs/math.md#diagnostics).

    Parameters
    ----------
    summary : pandas.DataFrame
        Output of :func:`causarray.summarize_treatment_associations`.
    value : {'spearman_rho', 'standardized_mean_difference'}
        Cell colour. The diverging scale is symmetric: ±``vmax``; by default ±1 for ρ
        and ± the largest finite |value| for the SMD.
    treatments, covariates : sequence, optional
        Rows / columns to show (default all, in table order).
    alpha : float, optional
        Mark cells with ``padj <= alpha`` by '*'.
    vmax : float, optional
        Colour limit; a finite number > 0.
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
    """
    vmax_f = check_vmax(vmax)
    check_choice("value", value, ("spearman_rho", "standardized_mean_difference"))
    check_table_columns(summary, sorted({"treatment", "covariate", value, "padj"}), "summary")
    t_order = list(dict.fromkeys(summary["treatment"].astype(str))) if treatments is None \
        else [str(t) for t in treatments]
    z_order = list(dict.fromkeys(summary["covariate"].astype(str))) if covariates is None \
        else [str(c) for c in covariates]
    s = summary.assign(treatment=summary["treatment"].astype(str),
                       covariate=summary["covariate"].astype(str))
    grid = s.pivot(index="treatment", columns="covariate", values=value)
    padj = s.pivot(index="treatment", columns="covariate", values="padj")
    check_known_labels(t_order, grid.index, "treatment")
    check_known_labels(z_order, grid.columns, "covariate")
    vals = grid.loc[t_order, z_order].to_numpy(dtype=float)
    if vmax_f is not None:
        lim = vmax_f
    elif value == "spearman_rho":
        lim = 1.0
    else:
        finite = np.abs(vals[np.isfinite(vals)])
        lim = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    ax = _axes(ax, (1.0 + 0.5 * len(z_order), 1.0 + 0.35 * len(t_order)))
    im = ax.imshow(np.ma.masked_invalid(vals), cmap="RdBu_r", vmin=-lim, vmax=lim,
                   aspect="auto")
    ax.set_xticks(range(len(z_order)), z_order, rotation=90, fontsize=8)
    ax.set_yticks(range(len(t_order)), t_order, fontsize=8)
    if alpha is not None:
        pv = padj.loc[t_order, z_order].to_numpy(dtype=float)
        for i, j in zip(*np.nonzero(np.nan_to_num(pv, nan=np.inf) <= alpha)):
            ax.text(j, i, "*", ha="center", va="center", fontsize=10)
    ax.figure.colorbar(im, ax=ax, label=value.replace("_", " "))
    return ax


# ----------------------------------------------------------------------------------
# calibration on fake perturbations
# ----------------------------------------------------------------------------------
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


def guide_assignment(data: Any, key: str = "causarray"):
    """Guide assignment of a guide screen: guides per cell and cells per target.

    Parameters
    ----------
    data : AnnData processed by :func:`causarray.tl.lfc` with ``guides=`` (reads
        ``obs['n_guides']`` and ``uns[key]['targets']``), or a pair
        ``(guides per cell, targets table)``.

    Returns
    -------
    matplotlib.figure.Figure
        Two panels: histogram of the guides assigned per cell, histogram of the cells
        carrying each target (untested targets, below the threshold, in grey).
    """
    import matplotlib.pyplot as plt

    if isinstance(data, tuple):
        n_guides, targets = data
    else:
        n_guides, targets = data.obs["n_guides"], check_uns_entry(data, key)["targets"]
    n_guides = np.asarray(n_guides, dtype=int)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.hist(n_guides, bins=np.arange(n_guides.max() + 2) - 0.5, color=BAR_COLOR)
    a1.set(xlabel="guides assigned per cell", ylabel="cells",
           title=f"median {np.median(n_guides):g} guides per cell")
    cells = np.asarray(targets["cells"], dtype=float)
    tested = np.asarray(targets.get("tested", pd.Series(True, index=targets.index)), bool)
    bins = np.histogram_bin_edges(cells, bins=30) if cells.size else 10
    a2.hist([cells[tested], cells[~tested]], bins=bins, stacked=True,
            color=[BAR_COLOR, NS_COLOR], label=["tested", "not tested"])
    a2.set(xlabel="cells carrying the target", ylabel="targets",
           title=f"{int(tested.sum())} of {cells.size} targets tested")
    if (~tested).any():
        a2.legend(frameon=False)
    fig.tight_layout()
    return fig


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
    check_choice("band", band, ("pointwise", "simultaneous"))
    check_open_unit("level", level)
    table = check_calibration_table(
        result if isinstance(result, pd.DataFrame) else getattr(result, "pvalues", None))
    check_table_columns(table, ["pvalue"])
    p_all = table["pvalue"].to_numpy(dtype=float)
    keep = np.isfinite(p_all)
    check_some_finite(keep)
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


# ----------------------------------------------------------------------------------
# names of causarray 0.1.1: thin aliases of the functions above (same figures), with
# the original's signatures and return values.  ``causarray.plot_r`` /
# ``causarray.gcate.plot_r`` and ``causarray.plot_propensity_scores`` /
# ``causarray.diagnostics.plot_*`` resolve to these.
# ----------------------------------------------------------------------------------
def plot_r(df_r: pd.DataFrame, c: float = 1.0):
    """The JIC figure of :func:`causarray.estimate_r`'s table (0.1.1's name for :func:`r_selection`).

    Parameters
    ----------
    df_r : pandas.DataFrame
        Columns ``r, deviance, nu``.
    c : float
        Penalty weight.

    Returns
    -------
    matplotlib.figure.Figure
        Two panels, as :func:`r_selection` draws them.
    """
    return r_selection(df_r, c=c)


def plot_propensity_scores(
    A: Any,
    pi_hat: Any,
    treatments: Sequence[Any] | None = None,
    treatment_names: Sequence[Any] | None = None,
    overlap_bounds: tuple[float, float] = (0.05, 0.95),
    bins: int = 40,
    max_panels: int = 4,
    axes: Any = None,
    clip_bounds: tuple[float, float] | None = (0.01, 0.99),
):
    """Histograms of treated vs control propensity scores, one panel per treatment.

    0.1.1's name and signature; the panels are those of :func:`propensity`.

    Parameters
    ----------
    A, pi_hat, treatment_names, overlap_bounds, clip_bounds, bins
        As for :func:`causarray.summarize_propensity_scores`.
    treatments : sequence, optional
        Treatments to draw (names or column positions); default the first
        ``max_panels``.
    max_panels : int
        Most panels drawn when ``treatments`` is None.
    axes : matplotlib Axes or sequence of Axes, optional
        Where to draw (one per treatment); a new figure otherwise.

    Returns
    -------
    fig : matplotlib.figure.Figure
    axes : numpy.ndarray of matplotlib.axes.Axes
        As in 0.1.1: the (rows x columns) grid of a new figure (panels beyond the
        selected treatments hidden), or the ``axes`` passed in as an array; panel i of
        ``axes.ravel()`` shows the i-th selected treatment.
    summary : pandas.DataFrame
        :func:`causarray.summarize_propensity_scores` for all treatments.
    """
    return _propensity_panels(A, pi_hat, treatments, treatment_names, overlap_bounds,
                              clip_bounds, bins, max_panels, axes)


def plot_treatment_associations(
    summary: pd.DataFrame,
    value: str = "spearman_rho",
    treatments: Sequence[Any] | None = None,
    covariates: Sequence[Any] | None = None,
    alpha: float | None = None,
    vmax: float | None = None,
    ax: Any = None,
):
    """Heat map of a :func:`causarray.summarize_treatment_associations` table.

    0.1.1's name and signature for :func:`treatment_associations` (same parameters).

    Returns
    -------
    fig, ax : matplotlib Figure and Axes
    """
    ax = treatment_associations(summary, value, treatments, covariates, alpha, vmax, ax)
    return ax.figure, ax


def discovery_counts(data: Any, alpha: float = 0.05, padj_col: str = "padj",
                     key: str = "causarray") -> pd.Series:
    """Deprecated: use :func:`causarray.report.discovery_counts` (a table, not a figure).

    Returns
    -------
    pandas.Series
        Discoveries per perturbation, largest first.
    """
    import warnings

    from .summaries import discovery_counts as _counts

    warnings.warn("causarray.pl.discovery_counts is deprecated (pl draws figures); use "
                  "causarray.report.discovery_counts", FutureWarning, stacklevel=2)
    return _counts(_results(data, key), alpha, padj_col)
