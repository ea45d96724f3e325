"""Calibration check on fake perturbations cut from a screen's own control cells.

Control cells carry no perturbation, so any comparison between two groups of control
cells is a null comparison: every (fake perturbation, gene) p-value should be uniform,
about 5 % of them should fall below 0.05, and a per-perturbation BH procedure at level
``alpha`` should make a call on at most about ``alpha`` of the fake perturbations.
:func:`calibration_check` builds such null screens from the user's own data and runs
them through the user's own settings of :func:`causarray.tl.lfc`, in the spirit of
SCEPTRE's calibration check:

* **random fakes**: ``n_fake`` disjoint random groups of ``fake_size`` control cells,
  each a fake perturbation against the remaining control cells (one run);
* **guide fakes** (when guide identities are known): the cells of each non-targeting
  guide as a fake perturbation against the cells of the other non-targeting guides.
  Guides are packed into as few runs as possible such that in every run the fake
  perturbations hold at most half of the guided control cells; a guide's control arm
  is every guided control cell outside its run.

::

    import causarray as ca
    res = ca.calibration_check(adata, covariates=["bio_rep"], r=3)
    print(res.verdict)
    res.to_frame()                 # one row per fake perturbation
    ca.pl.calibration_qq(res)      # QQ plot of the fake p-values

Statistics (all fakes pooled, over the N tested fake pairs):

* type-I rate ``k / N`` with ``k`` the number of p-values below 0.05;
* its Clopper–Pearson 95 % interval and the 95 % binomial band of a calibrated test,
  ``[F^-1(0.025), F^-1(0.975)] / N`` for ``F`` the Binomial(N, 0.05) law. Genes of one
  fake perturbation share its cells, so their p-values are correlated; both intervals
  use the effective number of tests ``N / d`` with the design effect
  ``d = max(1, v_cluster / v_binomial)`` (between-fake variance of the rate over the
  binomial variance; ``d = 1`` for independent tests);
* calls (``padj < alpha``); under the null each fake perturbation makes a call with
  probability at most about ``alpha``, so up to the 95 % quantile of
  Binomial(n_fakes, alpha) calls are expected by chance.

Verdict: ``'miscalibrated'`` when the type-I rate is above the band or there are more
calls than expected by chance, ``'conservative'`` when it is below the band, else
``'calibrated'``.
"""
from __future__ import annotations

import base64
import html
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._validation import (
    check_choice,
    check_excluded_guides,
    check_fake_budget,
    check_fake_controls,
    check_guide_key,
    check_guide_matrix,
    check_guide_names,
    check_guide_targets,
    check_open_unit,
    check_positive_int,
    check_run_settings,
    check_runner_result,
    check_uns_key,
    resolve_screen_keys,
)
from .calibration_stats import (  # noqa: F401  (re-exported: the tests import them here)
    KINDS,
    LEVEL,
    CalibrationResult,
    _clopper_pearson,
    _design_effect,
    _summarise,
    nt_guide_calibration,
)

logger = logging.getLogger("causarray")

__all__ = ["CalibrationResult", "calibration_check", "calibration_html", "control_guides",
           "nt_guide_calibration", "run_settings", "wants_calibration"]

#: Default number of random fake perturbations.
DEFAULT_N_FAKE = 8
#: Smallest fake perturbation (cells); smaller guides are left out as fakes.
MIN_FAKE_CELLS = 10
#: Share of the control cells that must stay in the control arm of a run.
MIN_CONTROL_FRACTION = 0.5
#: ``obsm`` key of guide UMI counts (names in ``uns['grna_names']``).
GUIDE_COUNTS_KEY = "grna_counts"
#: ``obs`` columns tried, in order, for per-cell guide identities when ``guide_key=None``.
GUIDE_OBS_CANDIDATES = ("guide_id", "guide", "guide_identity", "sgRNA", "gRNA", "grna")
#: ``'auto'`` runs the check when the screen has at least this many control cells.
AUTO_MIN_CONTROLS = 1000

Runner = Callable[..., pd.DataFrame]


# ----------------------------------------------------------------------------------
# input
# ----------------------------------------------------------------------------------


def _guide_names_from_uns(adata: Any, key: str,
                          n_cols: int) -> tuple[np.ndarray, np.ndarray | None]:
    mat = adata.obsm[key]
    if isinstance(mat, pd.DataFrame):
        names = np.asarray([str(c) for c in mat.columns], dtype=object)
    else:
        check_uns_key(adata, "grna_names", key)
        names = np.asarray([str(v) for v in np.asarray(adata.uns["grna_names"]).ravel()],
                           dtype=object)
    check_guide_names(names.size, n_cols, key)
    targets = None
    for tkey in ("grna_target", "grna_group"):
        if tkey in adata.uns:
            targets = np.asarray([str(v) for v in np.asarray(adata.uns[tkey]).ravel()],
                                 dtype=object)
            check_guide_targets(targets.size, n_cols, tkey, key)
            break
    return names, targets


def _guides_from_counts(adata: Any, key: str, rows: np.ndarray,
                        ctrl_label: str) -> tuple[np.ndarray, list[str]]:
    """Top non-targeting guide of each listed cell from a cells x guides count matrix."""
    mat = adata.obsm[key]
    values = mat.to_numpy() if isinstance(mat, pd.DataFrame) else mat
    values = values[rows]
    values = values.tocsr() if sp.issparse(values) else np.asarray(values)
    check_guide_matrix(values, key)
    names, targets = _guide_names_from_uns(adata, key, values.shape[1])
    notes: list[str] = []
    if targets is not None and np.any(targets == ctrl_label):
        nt = targets == ctrl_label
    else:
        nt = np.ones(names.size, dtype=bool)
        if targets is not None:
            notes.append(f"no guide has target {ctrl_label!r}; every guide seen in control "
                         "cells is taken as non-targeting")
    sub = values[:, np.flatnonzero(nt)]
    dense = sub.toarray() if sp.issparse(sub) else np.asarray(sub, dtype=float)
    top = np.argmax(dense, axis=1) if dense.shape[1] else np.zeros(len(rows), int)
    has = dense.max(axis=1) > 0 if dense.shape[1] else np.zeros(len(rows), bool)
    nt_names = names[np.flatnonzero(nt)]
    guides = np.where(has, nt_names[top] if nt_names.size else None, None).astype(object)
    n_none = int((~has).sum())
    if n_none:
        notes.append(f"{n_none} control cell(s) without non-targeting guide counts in "
                     f"obsm[{key!r}] are left out of the guide fakes")
    return guides, notes


def control_guides(adata: Any, ctrl_rows: np.ndarray, ctrl_label: str,
                   guide_key: str | bool | None = None) -> tuple[np.ndarray | None, str | None,
                                                                 list[str]]:
    """Non-targeting guide of each control cell, where guide identities are known.

    Parameters
    ----------
    adata : anndata.AnnData
    ctrl_rows : ndarray of int
        Positions of the control cells.
    ctrl_label : str
        Control label; with guide counts in ``obsm``, guides whose
        ``uns['grna_target']`` (or ``uns['grna_group']``) equals it are non-targeting.
    guide_key : str, False or None
        An ``obs`` column with one guide per cell, or an ``obsm`` key of cells x guides
        UMI counts (each cell's guide is its top non-targeting guide; names in
        ``uns['grna_names']`` unless the entry is a DataFrame). ``None``: use
        ``obsm['grna_counts']`` if present, else the first of
        :data:`GUIDE_OBS_CANDIDATES` in ``obs``, else no guides. ``False``: no guides.

    Returns
    -------
    guides : ndarray of object or None
        Guide name per control cell (None where unknown), or None without guide data.
    source : str or None
        Where the guides came from, e.g. ``"obsm['grna_counts']"``.
    notes : list of str
        Cells left out and why.

    Raises
    ------
    ValueError
        ``guide_key`` names neither an ``obs`` column nor an ``obsm`` entry; guide
        counts without names.
    """
    if guide_key is False:
        return None, None, []
    if guide_key is None:
        if GUIDE_COUNTS_KEY in adata.obsm:
            guide_key = GUIDE_COUNTS_KEY
        else:
            found = [c for c in GUIDE_OBS_CANDIDATES if c in adata.obs.columns]
            if not found:
                return None, None, []
            guide_key = found[0]
    check_guide_key(adata, guide_key)
    if guide_key in adata.obsm:
        guides, notes = _guides_from_counts(adata, guide_key, ctrl_rows, ctrl_label)
        return guides, f"obsm[{guide_key!r}]", notes
    col = adata.obs[guide_key].iloc[ctrl_rows]      # an obs column (check_guide_key)
    missing = col.isna().to_numpy()
    guides = np.where(missing, None, col.astype(str).to_numpy()).astype(object)
    notes = ([f"{int(missing.sum())} control cell(s) without a guide in "
              f"obs[{guide_key!r}] are left out of the guide fakes"] if missing.any() else [])
    return guides, f"obs[{guide_key!r}]", notes


# ----------------------------------------------------------------------------------
# plans
# ----------------------------------------------------------------------------------
@dataclass
class _Run:
    """One null screen: a label per control cell of ``rows`` (ctrl_label = control arm)."""

    rows: np.ndarray            # positions (into adata) of the cells of this run
    labels: np.ndarray          # label per row
    fakes: list                 # (label, kind, guide) of the fakes of this run


def _random_run(ctrl_rows: np.ndarray, n_fake: int, fake_size: int, ctrl_label: str,
                rng: np.random.Generator) -> _Run:
    order = rng.permutation(ctrl_rows.size)
    labels = np.full(ctrl_rows.size, ctrl_label, dtype=object)
    width = len(str(n_fake))
    fakes = []
    for k in range(n_fake):
        name = f"fake_{k + 1:0{width}d}"
        labels[order[k * fake_size:(k + 1) * fake_size]] = name
        fakes.append((name, "random", None))
    return _Run(ctrl_rows, labels, fakes)


def _guide_runs(ctrl_rows: np.ndarray, guides: np.ndarray, ctrl_label: str,
                min_cells: int) -> tuple[list[_Run], list[str]]:
    known = np.array([g is not None for g in guides], dtype=bool)
    rows, g = ctrl_rows[known], guides[known]
    names, counts = np.unique(g.astype(str), return_counts=True)
    notes: list[str] = []
    small = names[counts < min_cells]
    if small.size:
        notes.append(f"{small.size} non-targeting guide(s) with fewer than {min_cells} cells "
                     f"are not used as fakes (their cells stay controls): "
                     f"{', '.join(map(str, small[:5]))}{', ...' if small.size > 5 else ''}")
    usable = [(int(c), str(n)) for n, c in zip(names, counts) if c >= min_cells]
    if len(names) < 2 or not usable:
        if names.size:
            notes.append("guide fakes need at least two non-targeting guides with cells; "
                         "none formed")
        return [], notes
    total = int(counts.sum())
    cap = int(math.floor(total * (1.0 - MIN_CONTROL_FRACTION)))
    bins: list[list[tuple[int, str]]] = []
    loads: list[int] = []
    for c, name in sorted(usable, key=lambda t: (-t[0], t[1])):   # first-fit decreasing
        for b, load in enumerate(loads):
            if load + c <= cap:
                bins[b].append((c, name))
                loads[b] += c
                break
        else:
            bins.append([(c, name)])
            loads.append(c)
    runs = []
    gs = g.astype(str)
    for members in bins:
        labels = np.full(rows.size, ctrl_label, dtype=object)
        fakes = []
        for _, name in sorted(members, key=lambda t: t[1]):
            label = f"guide:{name}"
            labels[gs == name] = label
            fakes.append((label, "guide", name))
        runs.append(_Run(rows, labels, fakes))
    return runs, notes


def _fake_size(n_ctrl: int, n_fake: int, fake_size: int | None, median_real: float | None) -> int:
    keep = int(math.ceil(n_ctrl * MIN_CONTROL_FRACTION))
    usable = n_ctrl - keep
    if fake_size is not None:
        fake_size = check_positive_int("fake_size", fake_size)
        check_fake_budget(n_fake, fake_size, usable, n_ctrl, keep)
        return fake_size
    cap = usable // n_fake
    size = cap if median_real is None else min(int(round(median_real)), cap)
    check_fake_controls(size, n_ctrl, n_fake, MIN_FAKE_CELLS, MIN_CONTROL_FRACTION)
    return size


def wants_calibration(mode: str | bool, n_control: int,
                      min_controls: int = AUTO_MIN_CONTROLS) -> bool:
    """Whether to run the calibration check for a front-door mode setting.

    Parameters
    ----------
    mode : {'auto', 'on', 'off'} or bool
        ``'auto'``: only with at least ``min_controls`` control cells (enough for fake
        perturbations of a realistic size and a control arm).
    n_control : int
        Control cells of the screen.
    min_controls : int

    Returns
    -------
    bool

    Raises
    ------
    ValueError
        Any other mode.
    """
    if isinstance(mode, bool):
        return mode
    if mode == "auto":
        return int(n_control) >= int(min_controls)
    return check_choice("calibration", mode, ("auto", "on", "off")) == "on"


def run_settings(adata: Any, key: str = "causarray", runner: Runner | None = None) -> dict:
    """Settings of a finished :func:`causarray.tl.lfc` run, to check that same analysis.

    ``calibration_check(adata, **run_settings(adata))`` repeats the analysis stored in
    ``adata.uns[key]['settings']`` on the fake screens, with the number of factors
    that run *used* (not ``'auto'``, which could choose another r on the fake
    screens).

    Parameters
    ----------
    adata : anndata.AnnData
        Processed by :func:`causarray.tl.lfc`.
    key : str
        ``adata.uns`` key of the run.
    runner : callable, optional
        The function whose keyword arguments are kept (default :func:`causarray.tl.lfc`).

    Returns
    -------
    dict
        The stored settings that are keyword arguments of ``runner``, without
        ``pert_col``, ``ctrl_label``, ``cache_path``, ``r_grid`` and the guide options
        (:class:`causarray.tl.GuideOptions`); ``r`` is the r used;
        ``drop_empty_cells=True`` when the run dropped cells without counts.

    Raises
    ------
    ValueError
        ``adata.uns[key]`` holds no run settings.
    """
    import inspect

    store = getattr(adata, "uns", {}).get(key)
    check_run_settings(store, key)
    stored = dict(store["settings"])
    params = inspect.signature(_default_runner() if runner is None else runner).parameters
    from .tl import GuideOptions

    # the fake screens are labelled cells: a guide screen's guide options do not apply
    skip = {"pert_col", "ctrl_label", "cache_path", "r_grid", "client", "key_added"} \
        | set(GuideOptions.__dataclass_fields__)
    out = {k: v for k, v in stored.items() if k in params and k not in skip}
    if "r" in params and "r" in stored:
        out["r"] = int(stored["r"])
    if "drop_empty_cells" in params and int(stored.get("n_cells_dropped", 0) or 0) > 0:
        out["drop_empty_cells"] = True
    return out


# ----------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------
def _default_runner() -> Runner:
    """:func:`causarray.tl.lfc`, returning its result table (``tl.lfc`` stores it in
    ``adata.uns`` and returns None, as scanpy's tools do)."""
    import functools

    from .get import results
    from .tl import lfc

    @functools.wraps(lfc)
    def run(adata, **settings):
        lfc(adata, **settings)
        return results(adata, key=settings.get("key_added", "causarray"))

    return run


def _free_column(obs: pd.DataFrame, base: str = "causarray_fake") -> str:
    name = base
    while name in obs.columns:
        name = "_" + name
    return name


def _runner_settings(runner: Runner, settings: Mapping[str, Any], is_default: bool) -> dict:
    out = dict(settings)
    for key in ("pert_col", "ctrl_label"):
        out.pop(key, None)
    if out.pop("cache_path", None) is not None:
        logger.info("calibration check: cache_path is not used for the fake screens")
    if is_default:
        import inspect

        params = inspect.signature(runner).parameters
        if "propensity" in params:
            out.setdefault("propensity", False)     # a diagnostic of the real screen only
    return out


def _run(adata: Any, run: _Run, runner: Runner, ctrl_label: str,
         settings: Mapping[str, Any]) -> pd.DataFrame:
    view = adata[run.rows]
    # a backed AnnData (counts on disk): the fake screen's control cells are read in
    sub = view.to_memory() if getattr(adata, "isbacked", False) else view.copy()
    col = _free_column(sub.obs)
    sub.obs[col] = pd.Categorical(run.labels.astype(str))
    sub.uns["pert_col"], sub.uns["ctrl_label"] = col, ctrl_label
    with warnings.catch_warnings():
        # untested fake pairs are counted in the result (n_tested); no warning per run
        warnings.filterwarnings("ignore", message=r".*not estimable", category=RuntimeWarning)
        res = runner(sub, pert_col=col, ctrl_label=ctrl_label, **settings)
    check_runner_result(res)
    return res


def _collect(res: pd.DataFrame, run: _Run, run_id: int, alpha: float,
             genes: list[str]) -> tuple[list[dict], list[pd.DataFrame]]:
    rows, frames = [], []
    trt = res["trt"].astype(str).to_numpy()
    fake_labels = {f[0] for f in run.fakes}
    n_control = int(sum(lab not in fake_labels for lab in run.labels))
    for label, kind, guide in run.fakes:
        part = res.loc[trt == label]
        p = part["pvalue"].to_numpy(dtype=float)
        q = part["padj"].to_numpy(dtype=float)
        tested = np.isfinite(p)
        gene = (part["gene_names"].astype(str).to_numpy() if "gene_names" in part.columns
                else np.asarray(genes[:len(part)], dtype=object))
        used = {c: int(pd.to_numeric(part[c], errors="coerce").max())
                for c in ("n_treated", "n_control") if c in part.columns and len(part)
                and pd.to_numeric(part[c], errors="coerce").notna().any()}
        rows.append(dict(fake=label, kind=kind, guide=guide, run=run_id,
                         n_cells=int(np.sum(run.labels == label)), n_control=n_control,
                         n_cells_used=used.get("n_treated", np.nan),
                         n_control_used=used.get("n_control", np.nan),
                         n_tested=int(tested.sum()), n_p_below=int(np.sum(p[tested] < LEVEL)),
                         type_I=float(np.mean(p[tested] < LEVEL)) if tested.any() else np.nan,
                         n_calls=int(np.sum(q < alpha)),
                         min_padj=float(np.nanmin(q)) if np.isfinite(q).any() else np.nan))
        frames.append(pd.DataFrame(dict(fake=label, kind=kind, gene=gene, pvalue=p, padj=q)))
    return rows, frames


def _concentration_notes(fakes: pd.DataFrame) -> list[str]:
    """Name a guide fake that carries most of the calls (a guide with its own effect?)."""
    total = int(fakes["n_calls"].sum())
    guide = fakes[fakes["kind"] == "guide"]
    if total < 2 or guide.empty:
        return []
    worst = guide.loc[guide["n_calls"].idxmax()]
    if int(worst["n_calls"]) * 2 < total or int(worst["n_calls"]) < 2:
        return []
    return [f"{int(worst['n_calls'])} of the {total} calls come from the non-targeting guide "
            f"{worst['guide']}; a guide with an effect of its own (off-target) looks like this "
            f"- check it, and rerun with exclude_guides=[{str(worst['guide'])!r}] to see the "
            "others"]


def _random_reference(fakes: pd.DataFrame, alpha: float, summary: dict,
                      notes: list) -> dict:
    """Judge the analysis on the random fakes when only guide fakes fail.

    Random fakes (control cells drawn at random) are null by construction.  A
    non-targeting guide can have an effect of its own (off-target cutting or
    repression, on Schraivogel's panel guides 00006, 00013, 00022 move genes at
    padj < 1e-30 under every method), so guide fakes that fail while the random fakes
    pass point at the guides, not at the analysis: the verdict is then the random
    fakes', and the guides with calls are named.
    """
    rand = fakes[fakes["kind"] == "random"]
    guide = fakes[fakes["kind"] == "guide"]
    if rand.empty or guide.empty:
        return summary
    s_r, s_g = _summarise(rand, alpha), _summarise(guide, alpha)
    if s_r["status"] not in ("calibrated", "conservative") or s_g["status"] != "miscalibrated":
        return summary
    flagged = guide[guide["n_calls"] > 0].sort_values("n_calls", ascending=False)
    names = ", ".join(f"{g} ({int(c)})" for g, c in zip(flagged["guide"], flagged["n_calls"]))
    notes.append(f"non-targeting guide fakes: type-I {s_g['type_I']:.3f}, {s_g['n_calls']} "
                 f"call(s) on {names or 'no guide'}; random fakes pass, so these guides "
                 "probably have effects of their own (off-target)")
    out = dict(s_r)
    out["verdict"] = (f"{s_r['verdict']} [random fakes]; non-targeting guides: type-I "
                      f"{s_g['type_I']:.3f}, calls on {names or 'none'} - possible "
                      "off-target guides")
    return out


def calibration_check(adata: Any, *, pert_col: str | None = None, ctrl_label: Any = None,
                      n_fake: int = DEFAULT_N_FAKE, fake_size: int | None = None,
                      guide_key: str | bool | None = None,
                      exclude_guides: Sequence[str] = (), random_state: int = 0,
                      alpha: float = 0.05, runner: Runner | None = None,
                      **lfc_settings: Any) -> CalibrationResult:
    """Check the calibration of an analysis on fake perturbations cut from control cells.

    The control cells of ``adata`` are relabelled into null screens (see the module
    docstring) and each null screen is analysed with ``runner`` — by default
    :func:`causarray.tl.lfc` — with the same settings as the real analysis. A
    calibrated analysis gives uniform p-values on these fake perturbations: about 5 %
    below 0.05 and calls (``padj < alpha``) on at most about ``alpha`` of them.

    Parameters
    ----------
    adata : anndata.AnnData
        The screen, as given to :func:`causarray.tl.lfc` (raw counts; only the control
        cells are used).
    pert_col, ctrl_label : optional
        Label column and control label (defaults ``uns['pert_col']``,
        ``uns['ctrl_label']``).
    n_fake : int
        Random fake perturbations.
    fake_size : int, optional
        Cells per random fake. Default: the median size of the real perturbations,
        capped so that at least half of the control cells stay in the control arm.
    guide_key : str, False or None
        Guide identities for the guide fakes: an ``obs`` column or an ``obsm`` key of
        guide counts (see :func:`control_guides`); ``None`` detects
        ``obsm['grna_counts']`` or a guide column; ``False`` skips guide fakes.
    exclude_guides : sequence of str
        Non-targeting guides whose cells are left out of the guide fakes (neither fake
        nor control arm), e.g. a guide found to have an effect of its own.
    random_state : int
        Seed of the random fakes (also passed to the runner unless given in
        ``lfc_settings``).
    alpha : float
        FDR level of a call (``padj < alpha``).
    runner : callable, optional
        ``runner(adata_fake, pert_col=..., ctrl_label=..., **lfc_settings)`` returning a
        result table with columns ``trt``, ``pvalue``, ``padj`` (and ``gene_names``);
        default :func:`causarray.tl.lfc`.
    **lfc_settings
        The settings of the real analysis (``covariates``, ``r``, ``family``, ...),
        passed to the runner unchanged; ``cache_path`` is dropped (the fake screens
        are not the real one).

    Returns
    -------
    CalibrationResult
        Per-fake table (:meth:`CalibrationResult.to_frame`), p-values (for
        :func:`causarray.pl.calibration_qq`), type-I rate with intervals, calls and a
        one-line :attr:`~CalibrationResult.verdict`.

    Raises
    ------
    ValueError
        Unknown label column or control label, too few control cells for ``n_fake``
        fakes, an unknown ``guide_key``, ``alpha`` outside (0, 1).
    """
    n_fake = check_positive_int("n_fake", n_fake)
    alpha = check_open_unit("alpha", alpha)
    pert_col, ctrl_label, labels = resolve_screen_keys(adata, pert_col, ctrl_label)
    is_ctrl = labels == ctrl_label
    ctrl_rows = np.flatnonzero(is_ctrl)
    n_ctrl = int(ctrl_rows.size)
    real = pd.Series(labels[~is_ctrl]).value_counts()
    median_real = float(real.median()) if len(real) else None
    size = _fake_size(n_ctrl, n_fake, fake_size, median_real)
    guides, source, notes = control_guides(adata, ctrl_rows, ctrl_label, guide_key)
    excluded = [str(g) for g in ([exclude_guides] if isinstance(exclude_guides, str)
                                 else exclude_guides)]
    if excluded:
        check_excluded_guides(excluded, guides)
        drop = np.array([g is not None and str(g) in excluded for g in guides])
        guides = np.where(drop, None, guides).astype(object)
        notes.append(f"{int(drop.sum())} control cell(s) of the excluded guide(s) "
                     f"{', '.join(excluded)} are left out of the guide fakes")

    rng = np.random.default_rng(random_state)
    runs = [_random_run(ctrl_rows, n_fake, size, ctrl_label, rng)]
    if guides is not None:
        g_runs, g_notes = _guide_runs(ctrl_rows, guides, ctrl_label, MIN_FAKE_CELLS)
        runs += g_runs
        notes += g_notes

    is_default = runner is None
    runner = _default_runner() if runner is None else runner
    settings = _runner_settings(runner, lfc_settings, is_default)
    if is_default:
        settings.setdefault("random_state", random_state)
    genes = [str(g) for g in adata.var_names]
    fake_rows: list[dict] = []
    frames: list[pd.DataFrame] = []
    for i, run in enumerate(runs):
        logger.info("calibration check: run %d of %d (%d fake perturbations, %d cells)",
                    i + 1, len(runs), len(run.fakes), run.rows.size)
        res = _run(adata, run, runner, ctrl_label, settings)
        rows, parts = _collect(res, run, i, alpha, genes)
        fake_rows += rows
        frames += parts
    fakes = pd.DataFrame(fake_rows)
    pvalues = pd.concat(frames, ignore_index=True)
    summary = _summarise(fakes, alpha)
    notes += _concentration_notes(fakes)
    summary = _random_reference(fakes, alpha, summary, notes)
    check_settings = dict(pert_col=pert_col, ctrl_label=ctrl_label, n_control=n_ctrl,
                          n_fake=n_fake, fake_size=size, guide_source=source,
                          exclude_guides=excluded,
                          n_runs=len(runs), random_state=random_state, alpha=alpha,
                          runner=getattr(runner, "__module__", "") + "."
                          + getattr(runner, "__qualname__", type(runner).__name__),
                          runner_settings={k: v for k, v in settings.items()
                                           if k != "client"})
    for note in notes:
        logger.info("calibration check: %s", note)
    return CalibrationResult(fakes=fakes, pvalues=pvalues, alpha=alpha, settings=check_settings,
                             notes=notes, **summary)


# ----------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------
def _html_table(df: pd.DataFrame, float_format: str = "{:.3g}") -> str:
    return df.to_html(index=False, escape=True, border=0, na_rep="–",
                      float_format=lambda v: float_format.format(v))


def calibration_html(result: CalibrationResult, *, qq_png: bytes | None = None,
                     top_n: int = 40) -> str:
    """HTML section (``<h2 id='calibration'>`` ...) of a calibration check for the report.

    Parameters
    ----------
    result : CalibrationResult
    qq_png : bytes, optional
        A pre-rendered QQ plot; default :func:`causarray.pl.calibration_qq` at 100 dpi.
    top_n : int
        Rows of the per-fake table (most calls and highest type-I rate first).

    Returns
    -------
    str
        An HTML fragment: heading, explanation, verdict, summary table per kind, the
        QQ plot as an embedded base64 PNG and the per-fake table.
    """
    if qq_png is None:
        import io

        import matplotlib.pyplot as plt

        from .pl import calibration_qq

        ax = calibration_qq(result)
        buf = io.BytesIO()
        ax.figure.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(ax.figure)
        qq_png = buf.getvalue()
    s = result.settings
    guides = (", and each non-targeting guide against the others "
              f"({html.escape(str(s['guide_source']))})" if s.get("guide_source") else "")
    parts = ["<h2 id='calibration'>Calibration on fake perturbations</h2>",
             "<p class='muted'>Control cells relabelled as fake perturbations "
             f"({s.get('n_fake', '?')} random groups of {s.get('fake_size', '?')} cells"
             f"{guides}) and analysed with the same settings. No gene is affected, so about 5% of "
             "the p-values should fall below 0.05 and almost no gene should be called.</p>",
             f"<p><b>{html.escape(result.verdict)}</b></p>"]
    parts.append(_html_table(result.summary_frame()))
    data = base64.b64encode(qq_png).decode("ascii")
    parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="calibration QQ plot">'
                 "<figcaption>Observed against expected -log10 p-values of the fake "
                 "perturbations; grey: 95% band of uniform p-values.</figcaption></figure>")
    cols = ["fake", "kind", "n_cells", "n_control"]
    cols += [c for c in ("n_cells_used", "n_control_used")
             if c in result.fakes.columns and result.fakes[c].notna().any()]
    cols += ["n_tested", "type_I", "n_calls", "min_padj"]
    table = result.fakes.sort_values(["n_calls", "type_I"], ascending=False, kind="mergesort")
    parts.append(_html_table(table[cols].head(int(top_n))))
    if result.notes:
        parts.append("<ul class='muted'>" + "".join(f"<li>{html.escape(n)}</li>"
                                                     for n in result.notes) + "</ul>")
    return "\n".join(parts)
