"""Self-contained HTML report of a causarray run.

The report is one HTML file without external resources: figures are PNGs embedded
as base64 ``data:`` URIs and the style sheet is inline, so it can be mailed or
archived as it is. Sections: run settings, discovery summary, top perturbations, a
sortable table of the top hits (with the cells used and an on-target column), volcano
plot, discoveries per perturbation, the JIC curve (when r was chosen
automatically) and the propensity overlap of the perturbations with the least
overlap.
"""
from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ._version import __version__
from .summaries import discovery_counts, discovery_summary, top_hits, top_perturbations

__all__ = ["discovery_counts", "discovery_summary", "figure_png", "render_report", "top_hits",
           "top_perturbations", "write_report"]

_STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.8em;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.muted { color: #666; font-size: 0.9em; } figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.85em; }
ul.summary li { margin: 0.15em 0; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; }
table.sortable th[aria-sort=descending]::after { content: " \\25BC"; }
"""

#: Inline script making every ``table.sortable`` sortable by clicking a header (numbers
#: numerically, text alphabetically; a second click reverses; empty cells last).
_SORT_SCRIPT = """
<script>
(function () {
  function key(td) {
    var t = td.textContent.trim();
    if (t === '' || t === '\u2013') return null;
    var v = Number(t.replace(/,/g, ''));
    return isNaN(v) ? t.toLowerCase() : v;
  }
  function sortBy(table, col, th) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    rows.sort(function (a, b) {
      var x = key(a.cells[col]), y = key(b.cells[col]);
      if (x === null) return y === null ? 0 : 1;
      if (y === null) return -1;
      var c = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0)
                                      : (typeof x === 'number' ? -1 : 1);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) {
      h.removeAttribute('aria-sort');
    });
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
  }
  Array.prototype.forEach.call(document.querySelectorAll('table.sortable'), function (t) {
    Array.prototype.forEach.call(t.tHead.rows[0].cells, function (th, i) {
      th.addEventListener('click', function () { sortBy(t, i, th); });
    });
  });
})();
</script>
"""


# ----------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------
def figure_png(fig: Any, dpi: int = 100, close: bool = True) -> bytes:
    """PNG bytes of a matplotlib Figure (closed afterwards unless ``close=False``)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    if close:
        plt.close(fig)
    return buf.getvalue()


def _img(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(df: pd.DataFrame, float_format: str = "{:.3g}", sortable: bool = False) -> str:
    return df.to_html(index=False, escape=True, border=0, na_rep="–",
                      float_format=lambda v: float_format.format(v),
                      classes="sortable" if sortable else None)


# ----------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------
def _shift_section(shift: pd.DataFrame, assignment: str | None, warning: str | None,
                   top_n: int) -> str:
    """The design section: the assignment model, what it made of each perturbation's
    shift of the latent state, the perturbations shifted beyond chance."""
    beyond = shift[shift["pvalue"] < 0.01].sort_values("pvalue", kind="mergesort")
    parts = ["<h2 id='design'>Design and latent shifts</h2>",
             f"<p>assignment = <b>{html.escape(str(assignment))}</b>. "
             + ("Randomized (a CRISPR screen): a perturbation that moves the cells' latent "
                "state beyond what chance imbalance allows keeps that movement in its "
                "effects; a smaller shift is removed as chance imbalance."
                if assignment == "randomized" else
                "Observational (a case-control study): every shift of the latent state "
                "between the perturbed and the control cells is confounding and removed.")
             + f" {int(shift['adjusted'].sum())} of {len(shift)} perturbations were "
             "adjusted.</p>"]
    if warning:
        parts.append(f"<p><b>Warning:</b> {html.escape(warning)}</p>")
    if len(beyond):
        parts.append("<p class='muted'>Shifted beyond chance (p &lt; 0.01). Read as "
                     "randomized: the perturbation changes the cells' state (a programme), "
                     "kept in its effects. Read as observational: its cells were selected "
                     "on that state, which would be removed. <code>tau_change</code>: "
                     "median |change| of the LFCs by the adjustment.</p>")
        parts.append(_table(beyond.head(int(top_n))))
    return "\n".join(parts)


def _guide_section(guides: Mapping[str, Any], png: bytes | None, top_n: int) -> str:
    """The guide-assignment section of a screen given as guides: the design it ran
    under (MOI, control arm, assignment rule), guides per cell and cells per target."""
    st, targets = guides["settings"], guides["targets"]
    tested = targets["tested"] if "tested" in targets else pd.Series(True, index=targets.index)
    control = ("the cells without its guides (complement)" if st.get("control") == "complement"
               else "the cells without any targeting guide")
    parts = ["<h2 id='guides'>Guide assignment</h2>",
             f"<p>{html.escape(str(st.get('moi')))} MOI screen: {st.get('n_guides')} guides "
             f"({st.get('n_nt_guides')} non-targeting) assigned by the "
             f"{html.escape(str(st.get('guide_assignment')))} rule (threshold "
             f"{st.get('guide_threshold')} UMIs); each target is compared with "
             f"{html.escape(control)}. {int(tested.sum())} of {len(targets)} targets tested "
             f"(at least {st.get('min_target_cells')} cells). Covariates: "
             f"{html.escape(', '.join(map(str, st.get('covariates', []))) or 'none')}.</p>"]
    if png is not None:
        parts.append(_img(png, "guide assignment",
                          "Guides assigned per cell; cells carrying each target."))
    fewest = targets.sort_values("cells", kind="mergesort").head(int(top_n))
    parts.append("<p class='muted'>Targets with the fewest cells:</p>")
    parts.append(_table(fewest))
    return "\n".join(parts)


def render_report(results: pd.DataFrame, *, images: Mapping[str, bytes] | None = None,
                  settings: Mapping[str, Any] | None = None, jic: pd.DataFrame | None = None,
                  propensity_summary: pd.DataFrame | None = None, alpha: float = 0.05,
                  padj_col: str = "padj", top_n: int = 20,
                  title: str = "causarray report", calibration: Any = None,
                  guides: Mapping[str, Any] | None = None, shift: pd.DataFrame | None = None,
                  design_warning: str | None = None) -> str:
    """HTML text of the report.

    Parameters
    ----------
    results : pandas.DataFrame
        Result table.
    images : mapping, optional
        PNG bytes under the keys ``'volcano'``, ``'discoveries'``, ``'jic'``,
        ``'propensity'`` (missing keys are left out).
    settings : mapping, optional
        Run settings shown as a table.
    jic : pandas.DataFrame, optional
        JIC table (``r, deviance, nu, JIC``).
    propensity_summary : pandas.DataFrame, optional
        :func:`causarray.diagnostics.summarize_propensity_scores`; the rows with the
        least overlap are shown.
    alpha, padj_col, top_n
        Discovery threshold, adjusted p-value column, rows of the tables.
    title : str
    calibration : CalibrationResult, optional
        Its section (:func:`causarray.calibration.calibration_html`).
    guides : mapping, optional
        A guide screen's ``settings`` and ``targets`` table: the guide-assignment
        section (with the ``'guide_assignment'`` image).
    shift, design_warning : DataFrame and str, optional
        The run's per-perturbation latent shifts (``adata.uns[key]['shift']``) and the
        design warning: the design section.

    Returns
    -------
    str
    """
    images = dict(images or {})
    s = discovery_summary(results, alpha, padj_col)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='muted'>causarray {html.escape(__version__)} · generated "
             f"{html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>"]

    parts.append("<h2 id='summary'>Discovery summary</h2><ul class='summary'>")
    parts.append(f"<li>Significant ({html.escape(padj_col)} &lt; {alpha:g}): "
                 f"<b>{s['n_significant']:,}</b> gene × perturbation pairs "
                 f"(of {s['n_tests']:,} tested, {s['n_rows']:,} in total)</li>")
    parts.append(f"<li>Perturbations with ≥ 1 hit: <b>{s['n_perturbations_with_hit']:,}</b> "
                 f"of {s['n_perturbations']:,}</li>")
    parts.append(f"<li>Unique genes affected: <b>{s['n_genes_affected']:,}</b> of "
                 f"{s['n_genes']:,}</li>")
    if "n_significant_emp_null" in s:
        parts.append(f"<li>With the empirical-null adjustment (padj_emp_null_adj &lt; "
                     f"{alpha:g}): {s['n_significant_emp_null']:,} pairs</li>")
    parts.append("</ul>")

    parts.append("<h2 id='top'>Top perturbations</h2>")
    parts.append(_table(top_perturbations(results, alpha, padj_col, top_n), sortable=True))
    hits = top_hits(results, alpha, padj_col, top_n=max(int(top_n), 50))
    parts.append("<h2 id='hits'>Top hits</h2>")
    parts.append("<p class='muted'>The most significant gene × perturbation pairs "
                 f"({html.escape(padj_col)} &lt; {alpha:g}); click a column header to sort. "
                 "<code>on_target</code>: the gene is the perturbation's own target (empty "
                 "when the perturbation names no measured gene); <code>n_treated</code>, "
                 "<code>n_control</code>: the cells behind the estimate.</p>")
    if len(hits):
        parts.append(_table(hits, sortable=True))
    else:
        parts.append("<p>No discoveries.</p>")
    if "volcano" in images:
        parts.append("<h2 id='volcano'>Volcano plot</h2>")
        parts.append(_img(images["volcano"], "volcano plot",
                          f"All perturbations; red: {padj_col} < {alpha:g}."))
    if "discoveries" in images:
        parts.append("<h2 id='discoveries'>Discoveries per perturbation</h2>")
        parts.append(_img(images["discoveries"], "discoveries per perturbation",
                          f"Number of genes with {padj_col} < {alpha:g} per perturbation."))
    if jic is not None or "jic" in images:
        parts.append("<h2 id='jic'>Number of latent factors</h2>")
        if "jic" in images:
            parts.append(_img(images["jic"], "JIC curve",
                              "Deviance, penalty and JIC against r; r is the minimum of JIC."))
        if jic is not None:
            cols = [c for c in ("r", "deviance", "nu", "JIC", "time_s") if c in jic.columns]
            parts.append(_table(jic[cols], "{:.6g}"))
    if propensity_summary is not None or "propensity" in images:
        parts.append("<h2 id='propensity'>Propensity overlap</h2>")
        parts.append("<p class='muted'>Scores of each perturbation against the shared "
                     "controls on the observed design (intercept, covariates, log library "
                     "size). Low overlap or a small effective sample size (ESS) means the "
                     "comparison rests on few, heavily weighted cells.</p>")
        if "propensity" in images:
            parts.append(_img(images["propensity"], "propensity overlap",
                              "Perturbations with the least overlap."))
        if propensity_summary is not None:
            cols = [c for c in ("treatment", "n_treated", "n_control", "overlap_ratio", "auc",
                                "ess_treated_fraction", "ess_control_fraction",
                                "outside_overlap_fraction") if c in propensity_summary.columns]
            least = propensity_summary.sort_values("overlap_ratio", kind="mergesort")
            parts.append(_table(least[cols].head(int(top_n))))
    if shift is not None:
        parts.append(_shift_section(shift, (settings or {}).get("assignment"), design_warning,
                                    top_n))
    if guides is not None:
        parts.append(_guide_section(guides, images.get("guide_assignment"), top_n))
    if calibration is not None:
        from .calibration import calibration_html

        parts.append(calibration_html(calibration, qq_png=images.get("calibration_qq")))
    if settings:
        parts.append("<h2 id='settings'>Settings</h2>")
        rows = pd.DataFrame({"setting": list(settings), "value": [str(v) for v in
                                                                  settings.values()]})
        parts.append(_table(rows))
    parts.append("<h2 id='columns'>Reading the results</h2><p class='muted'>"
                 "<code>log2fc</code>: doubly robust log2 fold change of the mean expression "
                 "under perturbation vs. control; <code>pvalue</code>/<code>padj</code>: "
                 "t-test and Benjamini–Hochberg adjustment; <code>padj_emp_null_adj</code>: "
                 "after re-centring the test statistics on their empirical null; NaN marks "
                 "genes too sparsely expressed to test.</p>")
    parts.append(_SORT_SCRIPT)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(data: Any, path: str | Path, *, images: Mapping[str, bytes] | None = None,
                 alpha: float = 0.05, padj_col: str = "padj", top_n: int = 20,
                 key: str = "causarray", title: str = "causarray report",
                 calibration: Any = None) -> Path:
    """Write ``report.html`` for an AnnData processed by :func:`causarray.tl.lfc`.

    Parameters
    ----------
    data : AnnData or pandas.DataFrame
        Processed AnnData (results, JIC table, propensity scores read from
        ``adata.uns[key]``) or a bare result table.
    path : str or Path
        Output file.
    images : mapping, optional
        Pre-rendered PNGs (see :func:`render_report`); the missing ones are drawn.
    alpha, padj_col, top_n, key, title
        See :func:`render_report`.

    Returns
    -------
    pathlib.Path
    """
    from . import pl

    images = dict(images or {})
    if isinstance(data, pd.DataFrame):
        results, store = data, {}
    else:
        store = data.uns[key]
        results = store["results"]
    if "volcano" not in images:
        images["volcano"] = figure_png(pl.volcano(results, alpha, padj_col).figure)
    if "discoveries" not in images:
        images["discoveries"] = figure_png(pl.discoveries(results, alpha, padj_col).figure)
    jic = store.get("jic")
    if jic is not None and "jic" not in images:
        images["jic"] = figure_png(pl.r_selection(jic))
    summary = store.get("propensity")
    if summary is not None and "propensity" not in images and not isinstance(data, pd.DataFrame) \
            and pl.has_propensity(data, key):
        images["propensity"] = figure_png(pl.propensity(data, key=key))
    guides = None
    if store.get("targets") is not None and "guide_threshold" in store.get("settings", {}):
        guides = dict(settings=store["settings"], targets=store["targets"])
        if "guide_assignment" not in images and "n_guides" in data.obs:
            images["guide_assignment"] = figure_png(pl.guide_assignment(data, key=key))
    text = render_report(results, images=images, settings=store.get("settings"), jic=jic,
                         propensity_summary=summary, alpha=alpha, padj_col=padj_col,
                         top_n=top_n, title=title, calibration=calibration, guides=guides,
                         shift=store.get("shift"), design_warning=store.get("design_warning"))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
