"""report.html: content, self-containment, and rendering in a real headless browser.

The browser test uses Debian's ``chromium``. When it is missing the session fixture
tries ``apt-get update && apt-get install -y chromium`` once (as root) and skips with
the reason if that fails.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import base64
import os
import re
import shutil
import struct
import subprocess

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from causarray.report import discovery_summary, top_hits, top_perturbations, write_report

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def _find_chromium() -> str | None:
    for cand in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and os.path.exists(cand):
            return cand
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a chromium binary, installed with apt-get when missing (once per session)."""
    path = _find_chromium()
    if path:
        return path
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be installed here "
                    "(needs apt-get as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        proc = subprocess.run("apt-get update && apt-get install -y chromium", shell=True,
                              env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("installing chromium with apt-get timed out")
    path = _find_chromium()
    if proc.returncode != 0 or path is None:
        tail = " ".join((proc.stderr or proc.stdout).split()[-30:])
        pytest.skip(f"chromium could not be installed with apt-get: {tail}")
    return path


def _results() -> pd.DataFrame:
    rng = np.random.default_rng(5)
    perts, genes = ["KO_A", "KO_B", "KO_C", "KO_D"], [f"G{j}" for j in range(30)]
    df = pd.DataFrame({"gene_names": genes * 4, "trt": np.repeat(perts, 30)})
    df["log2fc"] = rng.normal(0, 0.4, len(df))
    df["tau"] = df["log2fc"] * np.log(2)
    df["pvalue"] = rng.uniform(0.01, 1.0, size=len(df))
    df.loc[:6, "pvalue"] = 1e-9                 # KO_A: 7 hits
    df.loc[30:31, "pvalue"] = 1e-7              # KO_B: 2 hits
    df.loc[[3, 4], "log2fc"] = [1.5, 2.0]       # two KO_A hits go up
    df.loc[[0, 1, 2, 5, 6], "log2fc"] = -1.2
    df.loc[100, "pvalue"] = np.nan
    df["padj"] = np.where(df["pvalue"] < 1e-5, 1e-3, 0.6)
    df.loc[100, "padj"] = np.nan
    df["padj_emp_null_adj"] = np.where(df["pvalue"] < 1e-8, 1e-3, 0.7)
    df["n_treated"] = np.repeat([150, 140, 130, 120], 30)
    return df


@pytest.fixture
def processed_adata():
    """An AnnData carrying what tl.lfc stores (results, JIC, propensity), built by hand."""
    from causarray.diagnostics import summarize_propensity_scores

    rng = np.random.default_rng(1)
    labels = np.repeat(["nt", "KO_A", "KO_B", "KO_C", "KO_D"], [200, 50, 50, 50, 50])
    n = labels.size
    A = pd.DataFrame({p: (labels == p).astype(float) for p in ["KO_A", "KO_B", "KO_C", "KO_D"]})
    pi = rng.beta(2, 9, size=(n, 4))
    pi[labels == "KO_C", 2] = rng.beta(9, 2, size=50)
    adata = ad.AnnData(np.ones((n, 3)), obs=pd.DataFrame({"perturbation": labels},
                                                         index=[f"c{i}" for i in range(n)]))
    adata.obsm["causarray_propensity"] = pd.DataFrame(pi, index=adata.obs_names,
                                                      columns=list(A.columns))
    r = np.arange(4)
    dev = np.array([2.0, 1.8, 1.75, 1.74])
    adata.uns["causarray"] = dict(
        results=_results(),
        jic=pd.DataFrame({"r": r, "deviance": dev, "nu": 0.05 * (2 + r),
                          "JIC": dev + 0.05 * (2 + r), "time_s": np.ones(4)}),
        propensity=summarize_propensity_scores(A, pi),
        settings=dict(pert_col="perturbation", ctrl_label="nt", r=1, family="nb"),
    )
    return adata


def test_discovery_summary_and_top_table():
    df = _results()
    s = discovery_summary(df, alpha=0.05)
    sig = df[df["padj"] < 0.05]
    assert s["n_significant"] == len(sig) == 9
    assert s["n_perturbations_with_hit"] == sig["trt"].nunique() == 2
    assert s["n_genes_affected"] == sig["gene_names"].nunique() == 7
    assert s["n_tests"] == 119 and s["n_rows"] == 120 and s["n_perturbations"] == 4
    assert s["n_significant_emp_null"] == 7
    top = top_perturbations(df, top_n=3)
    assert list(top["trt"]) == ["KO_A", "KO_B", "KO_C"]   # tie: KO_D has 1 untested gene
    a = top.iloc[0]
    assert (a["n_discoveries"], a["n_up"], a["n_down"]) == (7, 2, 5)
    assert a["median_log2fc_hits"] == pytest.approx(-1.2)
    assert a["n_treated"] == 150


def _pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in
            re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def test_report_is_self_contained(processed_adata, tmp_path):
    path = write_report(processed_adata, tmp_path / "report.html")
    text = path.read_text()
    pngs = _pngs(text)
    assert len(pngs) == 4 == text.count("<img ")        # volcano, discoveries, jic, propensity
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert not re.search(r'(src|href)="(https?:|//|file:)', text)
    assert "<b>9</b> gene × perturbation pairs" in text
    assert "Perturbations with ≥ 1 hit: <b>2</b> of 4" in text
    # the least-overlapping perturbation is listed first in the propensity table
    prop = text[text.index("id='propensity'"):]
    assert prop.index("KO_C") < prop.index("KO_A")


def test_report_from_bare_table(tmp_path):
    path = write_report(_results(), tmp_path / "r.html", alpha=0.01)
    text = path.read_text()
    assert len(_pngs(text)) == 2 and "id='jic'" not in text and "padj &lt; 0.01" in text


def _png_size(png: bytes) -> tuple[int, int]:
    return struct.unpack(">II", png[16:24])


CHECK_SCRIPT = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-loaded', String(ok.length));
  document.body.setAttribute('data-image-widths',
      imgs.map(function (i) { return i.naturalWidth + 'x' + i.naturalHeight; }).join(','));
});
</script>
"""


def test_report_renders_in_headless_chromium(processed_adata, tmp_path, chromium):
    path = write_report(processed_adata, tmp_path / "report.html")
    text = path.read_text()
    checked = tmp_path / "report_checked.html"
    checked.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>"))
    shot = tmp_path / "report.png"
    base = [chromium, *CHROMIUM_FLAGS, "--window-size=1200,3000"]
    dom = subprocess.run([*base, "--virtual-time-budget=10000", "--dump-dom",
                          checked.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:500]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    assert attrs.get("data-images-total") == "4", attrs
    assert attrs.get("data-images-loaded") == "4", attrs
    # the decoded sizes equal the PNG headers: the browser really decoded our images
    want = [f"{w}x{h}" for w, h in map(_png_size, _pngs(text))]
    assert attrs["data-image-widths"].split(",") == want
    assert "Discovery summary" in dom.stdout and "Top perturbations" in dom.stdout
    res = subprocess.run([*base, f"--screenshot={shot}", path.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG") and _png_size(png) == (1200, 3000)
    print(f"report screenshot: {shot}")


def test_top_hits_table_with_cells_and_on_target():
    df = _results()
    df.loc[df["trt"] == "KO_A", "trt"] = "G3"        # a perturbation named after a gene
    df["n_control"] = 400
    hits = top_hits(df, alpha=0.05)
    sig = df[df["padj"] < 0.05]
    assert len(hits) == len(sig) == 9
    assert list(hits.columns) == ["gene", "perturbation", "log2fc", "padj", "n_treated",
                                  "n_control", "on_target"]
    assert hits["padj"].is_monotonic_increasing
    own = hits[hits["perturbation"] == "G3"]
    assert own.loc[own["gene"] == "G3", "on_target"].tolist() == [True]
    assert (own.loc[own["gene"] != "G3", "on_target"] == False).all()   # noqa: E712
    assert hits.loc[hits["perturbation"] == "KO_B", "on_target"].isna().all()
    assert set(hits.loc[hits["perturbation"] == "G3", "n_treated"]) == {150}
    top = top_perturbations(df)
    row = top.set_index("trt").loc["G3"]
    assert row["on_target_hit"] is True or row["on_target_hit"] == True   # noqa: E712
    assert row["on_target_log2fc"] == pytest.approx(df.loc[3, "log2fc"])
    assert np.isnan(top.set_index("trt").loc["KO_B", "on_target_log2fc"])


SORT_SCRIPT = """
<script>
window.addEventListener('load', function () {
  var t = document.querySelectorAll('table.sortable')[1];
  var heads = Array.prototype.map.call(t.tHead.rows[0].cells, function (h) {
    return h.textContent.trim(); });
  var col = heads.indexOf('log2fc');
  t.tHead.rows[0].cells[col].click();
  var asc = Array.prototype.map.call(t.tBodies[0].rows, function (r) {
    return r.cells[col].textContent.trim(); });
  t.tHead.rows[0].cells[col].click();
  var desc = Array.prototype.map.call(t.tBodies[0].rows, function (r) {
    return r.cells[col].textContent.trim(); });
  document.body.setAttribute('data-asc', asc.join(';'));
  document.body.setAttribute('data-desc', desc.join(';'));
});
</script>
"""


def test_hits_table_sorts_in_the_browser(processed_adata, tmp_path, chromium):
    path = write_report(processed_adata, tmp_path / "report.html")
    checked = tmp_path / "sorted.html"
    checked.write_text(path.read_text().replace("</body>", SORT_SCRIPT + "</body>"))
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, "--virtual-time-budget=10000",
                          "--dump-dom", checked.as_uri()], capture_output=True, text=True,
                         timeout=120, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', re.search(r"<body([^>]*)>",
                                                            dom.stdout).group(1)))
    asc = [float(v) for v in attrs["data-asc"].split(";")]
    desc = [float(v) for v in attrs["data-desc"].split(";")]
    assert len(asc) == 9 and asc == sorted(asc) and desc == sorted(asc, reverse=True)


def test_calibration_section_renders_in_the_browser(tmp_path, chromium):
    """`causarray run --calibration on` adds the calibration section (table + QQ plot) to
    report.html, and a real browser decodes every image in it."""
    from causarray.cli import main
    from causarray.datasets import load_dataset

    path = tmp_path / "ci.h5ad"
    load_dataset("schraivogel2020_ci").write_h5ad(path)
    out = tmp_path / "out"
    code = main(["run", str(path), "--out", str(out), "--r", "1", "--max-iters", "5",
                 "--calibration", "on", "-q"])
    assert code == 0
    assert (out / "calibration.csv").exists() and (out / "calibration_qq.png").exists()
    text = (out / "report.html").read_text()
    assert "id='calibration'" in text or 'id="calibration"' in text
    checked = tmp_path / "report_checked.html"
    checked.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, "--window-size=1200,3000",
                          "--virtual-time-budget=10000", "--dump-dom", checked.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', re.search(r"<body([^>]*)>",
                                                               dom.stdout).group(1)))
    n_png = len(_pngs(text))
    assert attrs.get("data-images-total") == str(n_png) == attrs.get("data-images-loaded")
    assert re.search(r'id="calibration"', dom.stdout)
