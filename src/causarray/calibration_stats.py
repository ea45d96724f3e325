"""The statistics of a null check: type-I rate, its band, calls, verdict.

A calibration check tests pairs that carry no effect (fake perturbations cut from
control cells, :func:`causarray.calibration.calibration_check`; a guide screen's
non-targeting guides, :func:`nt_guide_calibration`) and summarises their p-values in a
:class:`CalibrationResult`.  This module holds that summary and nothing that runs an
analysis, so that :mod:`causarray.tl` (which summarises a guide screen's non-targeting
guides) and :mod:`causarray.calibration` (which runs :func:`causarray.tl.lfc` on fakes)
both import it from below.  Both names are re-exported by :mod:`causarray.calibration`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["CalibrationResult", "nt_guide_calibration"]

#: Nominal level of the type-I check (p < LEVEL).
LEVEL = 0.05
#: Random / guide fake labels.
KINDS = ("random", "guide", "nt_guide")


# ----------------------------------------------------------------------------------
# result
# ----------------------------------------------------------------------------------
@dataclass
class CalibrationResult:
    """Outcome of :func:`calibration_check`.

    Attributes
    ----------
    fakes : pandas.DataFrame
        One row per fake perturbation: ``fake, kind, guide, run, n_cells, n_control``
        (cells in the fake and in the control arm of its run), ``n_cells_used,
        n_control_used`` (the cells the runner reports it used, from its ``n_treated``
        / ``n_control`` columns; NaN when it does not report them), ``n_tested,
        n_p_below, type_I, n_calls, min_padj``.
    pvalues : pandas.DataFrame
        One row per (fake perturbation, gene): ``fake, kind, gene, pvalue, padj``
        (NaN where the runner did not test the pair).
    alpha : float
        Threshold on ``padj`` for a call.
    n_tests, n_p_below : int
        Tested fake pairs and those with ``pvalue < 0.05``.
    type_I : float
        ``n_p_below / n_tests`` (NaN without tests).
    type_I_ci : tuple of float
        Clopper–Pearson 95 % interval of ``type_I`` (effective number of tests).
    band : tuple of float
        95 % band of the type-I rate of a calibrated test (effective number of tests).
    design_effect : float
        ``d >= 1`` used for the effective number of tests ``n_tests / d``.
    n_calls : int
        Fake pairs with ``padj < alpha``.
    calls_expected, calls_allowed : float, int
        ``alpha * n_fakes`` and the 95 % quantile of Binomial(n_fakes, alpha).
    status : str
        ``'calibrated'``, ``'conservative'``, ``'miscalibrated'`` or ``'untested'``.
    verdict : str
        One line summarising the above.
    settings : dict
        The check's own settings and the settings passed to the runner.
    notes : list of str
        What was left out and why (small guides, cells without a guide, ...).
    """

    fakes: pd.DataFrame
    pvalues: pd.DataFrame
    alpha: float
    n_tests: int
    n_p_below: int
    type_I: float
    type_I_ci: tuple[float, float]
    band: tuple[float, float]
    design_effect: float
    n_calls: int
    calls_expected: float
    calls_allowed: int
    status: str
    verdict: str
    settings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def calibrated(self) -> bool:
        """True when :attr:`status` is ``'calibrated'`` or ``'conservative'``."""
        return self.status in ("calibrated", "conservative")

    def to_frame(self) -> pd.DataFrame:
        """One row per fake perturbation (a copy of :attr:`fakes`)."""
        return self.fakes.copy()

    def summary_frame(self) -> pd.DataFrame:
        """Type-I rate, calls and status per kind of fake and for all fakes together.

        Returns
        -------
        pandas.DataFrame
            Columns ``kind, n_fakes, n_tests, type_I, ci_low, ci_high, band_low,
            band_high, n_calls, calls_allowed, status``; each row applies the rule of
            the verdict to its own fakes (the ``'all'`` row is the verdict).
        """
        rows = []
        groups = [(k, self.fakes[self.fakes["kind"] == k]) for k in KINDS]
        groups = [(k, g) for k, g in groups if not g.empty] + [("all", self.fakes)]
        for kind, sel in groups:
            s = _summarise(sel, self.alpha) if kind != "all" else dict(
                n_tests=self.n_tests, type_I=self.type_I, type_I_ci=self.type_I_ci,
                band=self.band, n_calls=self.n_calls, calls_allowed=self.calls_allowed,
                status=self.status)
            rows.append(dict(kind=kind, n_fakes=len(sel), n_tests=s["n_tests"],
                             type_I=s["type_I"], ci_low=s["type_I_ci"][0],
                             ci_high=s["type_I_ci"][1], band_low=s["band"][0],
                             band_high=s["band"][1], n_calls=s["n_calls"],
                             calls_allowed=s["calls_allowed"], status=s["status"]))
        return pd.DataFrame(rows)

    def __str__(self) -> str:
        return self.verdict


# ----------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------
def _clopper_pearson(k: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for k successes in n trials (k, n may be fractional)."""
    if n <= 0:
        return (np.nan, np.nan)
    a = (1.0 - level) / 2.0
    lo = 0.0 if k <= 0 else float(stats.beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k >= n else float(stats.beta.ppf(1.0 - a, k + 1, n - k))
    return (lo, hi)


def _null_band(n_eff: float, level: float = 0.95, p0: float = LEVEL) -> tuple[float, float]:
    """Central ``level`` range of the rate k/n for k ~ Binomial(n, p0), n = round(n_eff)."""
    n = max(int(round(n_eff)), 1)
    a = (1.0 - level) / 2.0
    return (float(stats.binom.ppf(a, n, p0)) / n, float(stats.binom.ppf(1.0 - a, n, p0)) / n)


def _design_effect(n_k: np.ndarray, k_k: np.ndarray) -> float:
    """Between-fake variance of the pooled rate over its binomial variance (>= 1)."""
    n_k, k_k = np.asarray(n_k, float), np.asarray(k_k, float)
    keep = n_k > 0
    n_k, k_k = n_k[keep], k_k[keep]
    K, N = n_k.size, n_k.sum()
    if K < 2 or N <= 0:
        return 1.0
    rate = k_k.sum() / N
    v_cluster = K / (K - 1) * np.sum((k_k - rate * n_k) ** 2) / N ** 2
    v_binom = LEVEL * (1.0 - LEVEL) / N
    return float(max(1.0, v_cluster / v_binom))


def _summarise(fakes: pd.DataFrame, alpha: float) -> dict[str, Any]:
    n_tests = int(fakes["n_tested"].sum())
    n_below = int(fakes["n_p_below"].sum())
    n_calls = int(fakes["n_calls"].sum())
    n_fakes = int(len(fakes))
    calls_expected = alpha * n_fakes
    calls_allowed = int(stats.binom.ppf(0.95, n_fakes, alpha)) if n_fakes else 0
    if n_tests == 0:
        verdict = ("untested: no fake perturbation x gene pair could be tested "
                   f"({n_fakes} fake perturbations)")
        return dict(n_tests=0, n_p_below=0, type_I=np.nan, type_I_ci=(np.nan, np.nan),
                    band=(np.nan, np.nan), design_effect=1.0, n_calls=n_calls,
                    calls_expected=calls_expected, calls_allowed=calls_allowed,
                    status="untested", verdict=verdict)
    d = _design_effect(fakes["n_tested"].to_numpy(), fakes["n_p_below"].to_numpy())
    n_eff = n_tests / d
    type_I = n_below / n_tests
    ci = _clopper_pearson(type_I * n_eff, n_eff)
    band = _null_band(n_eff)
    if type_I > band[1] or n_calls > calls_allowed:
        status = "miscalibrated"
    elif type_I < band[0]:
        status = "conservative"
    else:
        status = "calibrated"
    verdict = (f"{status}: type-I error {type_I:.3f} at p < {LEVEL:g} over {n_tests:,} fake "
               f"pairs (95% band of a calibrated test {band[0]:.3f}-{band[1]:.3f}); "
               f"{n_calls} call(s) at padj < {alpha:g} on {n_fakes} fake perturbations "
               f"(up to {calls_allowed} expected by chance)")
    return dict(n_tests=n_tests, n_p_below=n_below, type_I=type_I, type_I_ci=ci, band=band,
                design_effect=d, n_calls=n_calls, calls_expected=calls_expected,
                calls_allowed=calls_allowed, status=status, verdict=verdict)


def nt_guide_calibration(negatives: pd.DataFrame, guide_cells: Mapping[str, int] | None = None,
                         alpha: float = 0.05) -> CalibrationResult:
    """Calibration of a guide screen from its non-targeting guides' rows.

    In a high-MOI run every non-targeting guide is tested against its complement on the
    same genes with the same settings as the targets (:mod:`causarray.highmoi`), so
    its rows are the screen's own null pairs: a calibrated analysis puts about 5 % of
    their p-values below 0.05 and makes calls (``padj < alpha``) on at most about
    ``alpha`` of the guides.  Summarised as :func:`calibration_check` summarises its
    fake perturbations (``kind='nt_guide'``).

    Parameters
    ----------
    negatives : the result rows of the non-targeting guides (``trt`` the guide).
    guide_cells : guide -> cells assigned (``n_cells``), optional.
    alpha : threshold on ``padj`` for a call.
    """
    rows, frames = [], []
    guide_cells = dict(guide_cells or {})
    for guide, part in negatives.groupby(negatives["trt"].astype(str), sort=True):
        p = part["pvalue"].to_numpy(dtype=float)
        q = part["padj"].to_numpy(dtype=float)
        tested = np.isfinite(p)
        rows.append(dict(
            fake=guide, kind="nt_guide", guide=guide, run=0,
            n_cells=guide_cells.get(guide, int(part["n_treated"].max())),
            n_control=int(part["n_control"].max()),
            n_cells_used=int(part["n_treated"].max()),
            n_control_used=int(part["n_control"].max()), n_tested=int(tested.sum()),
            n_p_below=int(np.sum(p[tested] < LEVEL)),
            type_I=float(np.mean(p[tested] < LEVEL)) if tested.any() else np.nan,
            n_calls=int(np.sum(q < alpha)),
            min_padj=float(np.nanmin(q)) if np.isfinite(q).any() else np.nan))
        frames.append(pd.DataFrame(dict(fake=guide, kind="nt_guide",
                                        gene=part["gene_names"].astype(str).to_numpy(),
                                        pvalue=p, padj=q)))
    fakes = pd.DataFrame(rows)
    pvalues = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["fake", "kind", "gene", "pvalue", "padj"])
    if fakes.empty:
        fakes = pd.DataFrame(columns=["fake", "kind", "guide", "run", "n_cells", "n_control",
                                      "n_cells_used", "n_control_used", "n_tested",
                                      "n_p_below", "type_I", "n_calls", "min_padj"])
        fakes = fakes.astype({"n_tested": int, "n_p_below": int, "n_calls": int})
    summary = _summarise(fakes, alpha)
    return CalibrationResult(fakes=fakes, pvalues=pvalues, alpha=alpha,
                             settings=dict(source="non-targeting guides against their "
                                                  "complement", alpha=alpha),
                             notes=[], **summary)
