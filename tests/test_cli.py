"""The ``causarray`` command line and the AnnData front door ``causarray.tl.lfc``.

Bad-input paths need no model fit; end-to-end runs use tiny simulated screens
(3 perturbations, 30-40 genes, r <= 2, at most 3 GCATE epochs).
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from causarray import __version__, get, tl
from causarray.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_USAGE, main
from causarray.simulate import simulate_screen


@pytest.fixture(scope="module")
def sim_path(tmp_path_factory) -> Path:
    adata = simulate_screen(n_ctrl=150, n_perts=3, cells_per_pert=60, n_genes=30, r=2,
                            random_state=3)
    path = tmp_path_factory.mktemp("sim") / "sim.h5ad"
    adata.write_h5ad(path)
    return path


def _run(capsys, argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("causarray: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------------
# version, usage
# ----------------------------------------------------------------------------------
def test_version_from_console_script():
    res = subprocess.run([sys.executable, "-m", "causarray.cli", "--version"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0
    assert res.stdout.strip() == f"causarray {__version__}"
    script = Path(sys.executable).parent / "causarray"
    if script.exists():   # the installed entry point causarray = causarray.cli:main
        res = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                             timeout=60, check=False)
        assert res.returncode == 0 and res.stdout.strip() == f"causarray {__version__}"


def test_usage_errors(capsys, sim_path, tmp_path):
    code, _, err = _run(capsys, [])
    assert code == EXIT_USAGE and "a command is required" in err
    code, _, err = _run(capsys, ["run", sim_path])                        # no --out
    assert code == EXIT_USAGE and "--out" in err
    code, _, err = _run(capsys, ["run", sim_path, "--out", tmp_path, "--r", "many"])
    assert code == EXIT_USAGE and "--r must be 'auto' or an integer >= 0" in err
    code, _, err = _run(capsys, ["run", sim_path, "--out", tmp_path, "--workers", "2",
                                 "--dask-scheduler", "tcp://x:1"])
    assert code == EXIT_USAGE and "not allowed with argument" in err
    code, _, err = _run(capsys, ["run", sim_path, "--out", tmp_path, "--family", "gaussian"])
    assert code == EXIT_USAGE
    code, _, err = _run(capsys, ["run", sim_path, "--out", tmp_path, "--batch-size", "0"])
    assert code == EXIT_USAGE and "expected a positive integer, got '0'" in err


# ----------------------------------------------------------------------------------
# bad input: exit 3 and one line on stderr
# ----------------------------------------------------------------------------------
def _write(adata, path: Path) -> Path:
    adata.write_h5ad(path)
    return path


def test_missing_file(capsys, tmp_path):
    code, out, err = _run(capsys, ["run", tmp_path / "nope.h5ad", "--out", tmp_path / "o"])
    assert code == EXIT_BAD_INPUT and out == ""
    assert _error_line(err) == f"causarray: error: input file not found: {tmp_path / 'nope.h5ad'}"
    assert not (tmp_path / "o").exists()


def test_unreadable_file(capsys, tmp_path):
    bad = tmp_path / "bad.h5ad"
    bad.write_text("this is not HDF5\n")
    code, _, err = _run(capsys, ["run", bad, "--out", tmp_path / "o"])
    assert code == EXIT_BAD_INPUT
    assert _error_line(err).startswith(f"causarray: error: cannot read {bad} as .h5ad:")


@pytest.mark.parametrize("extra, message", [
    (["--pert-col", "guide"], "obs has no column 'guide'; available columns: "),
    (["--ctrl-label", "NT"], "control label 'NT' not found in obs['perturbation']; available "
                             "labels: ['PERT001', 'PERT002', 'PERT003', 'non-targeting']"),
    (["--covariates", "batch,age"], "covariate column(s) ['batch', 'age'] not in obs"),
    (["--layer", "counts"], "adata has no layer 'counts'"),
])
def test_wrong_column_label_layer(capsys, sim_path, tmp_path, extra, message):
    code, _, err = _run(capsys, ["run", sim_path, "--out", tmp_path / "o", *extra])
    assert code == EXIT_BAD_INPUT
    assert _error_line(err).startswith(f"causarray: error: {message}")


def test_not_counts(capsys, sim_path, tmp_path):
    adata = ad.read_h5ad(sim_path)
    X = adata.X.toarray().astype(float)
    logged = adata.copy()
    logged.X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    n_frac = int(np.count_nonzero(logged.X != np.rint(logged.X)))
    code, _, err = _run(capsys, ["run", _write(logged, tmp_path / "log.h5ad"), "--out",
                                 tmp_path / "o"])
    assert code == EXIT_BAD_INPUT
    assert _error_line(err) == (f"causarray: error: adata.X does not hold raw counts: {n_frac} "
                                "non-integer entries (log-normalised data?); pass the layer "
                                "with raw UMI counts")
    scaled = adata.copy()
    scaled.X = X - X.mean(axis=0)
    code, _, err = _run(capsys, ["run", _write(scaled, tmp_path / "scaled.h5ad"), "--out",
                                 tmp_path / "o"])
    assert code == EXIT_BAD_INPUT and "adata.X has negative values" in _error_line(err)
    # a layer with counts next to a normalised X is accepted by the check
    logged.layers["counts"] = sp.csr_matrix(X)
    assert tl.validate_screen(logged, layer="counts")["n_genes"] == 30


def test_only_controls(capsys, sim_path, tmp_path):
    adata = ad.read_h5ad(sim_path)
    only = adata[adata.obs["perturbation"] == "non-targeting"].copy()
    code, _, err = _run(capsys, ["run", _write(only, tmp_path / "ctrl.h5ad"), "--out",
                                 tmp_path / "o"])
    assert code == EXIT_BAD_INPUT and "there are no perturbed cells" in _error_line(err)


def test_empty_cells_stop_or_are_dropped(capsys, sim_path, tmp_path):
    adata = ad.read_h5ad(sim_path)
    X = adata.X.toarray()
    X[[0, 200]] = 0                      # a control cell and a PERT002 cell without counts
    adata.X = sp.csr_matrix(X)
    path = _write(adata, tmp_path / "empty.h5ad")
    code, _, err = _run(capsys, ["run", path, "--out", tmp_path / "o", "--r", "0"])
    assert code == EXIT_BAD_INPUT
    assert _error_line(err) == ("causarray: error: 2 cell(s) have zero total count, e.g. "
                                "['cell000000', 'cell000200']; remove them or pass "
                                "--drop-empty-cells")
    code, _, err = _run(capsys, ["run", path, "--out", tmp_path / "o", "--r", "0",
                                 "--drop-empty-cells"])
    assert code == EXIT_OK, err
    assert "dropped 2 cell(s) with zero total count" in err
    assert tl.lfc(adata, r=0, drop_empty_cells=True) is None
    df = get.results(adata)
    pi = adata.obsm["causarray_propensity"]
    assert pi.shape == (330, 3) and pi.isna().all(axis=1).sum() == 2
    assert np.isnan(pi.loc["cell000200"]).all() and np.isfinite(pi.iloc[1]).all()
    assert adata.uns["causarray"]["settings"]["n_cells_dropped"] == 2
    assert len(df) == 90


def test_auto_r_on_a_panel_too_small_for_every_perturbation(caplog):
    """8 genes cannot hold a factor beside all 6 perturbations at once (Hill's case); r is
    chosen on the controls and the largest perturbations, and the run goes through."""
    adata = simulate_screen(n_ctrl=60, n_perts=6, cells_per_pert=10, n_genes=8, r=1,
                            random_state=0)
    with caplog.at_level("INFO", logger="causarray"):
        tl.lfc(adata, r="auto")
    assert "r is chosen on the controls and the" in caplog.text
    r_used = adata.uns["causarray"]["settings"]["r"]
    assert 0 <= int(r_used) <= 8 - 1 - 1 - 1


def test_auto_r_without_room_for_any_factor_uses_r0(caplog):
    adata = simulate_screen(n_ctrl=60, n_perts=2, cells_per_pert=10, n_genes=2, r=1,
                            random_state=0)
    with caplog.at_level("WARNING", logger="causarray"):
        r, df_r = tl.select_r(adata.X, np.ones((adata.n_obs, 1)),
                              pd.get_dummies(adata.obs["perturbation"]).drop(
                                  columns=adata.uns["ctrl_label"]).to_numpy(float))
    assert r == 0 and list(df_r["r"]) == [0]
    assert "using r = 0" in caplog.text


# ----------------------------------------------------------------------------------
# simulate
# ----------------------------------------------------------------------------------
def test_simulate_writes_screen(capsys, tmp_path):
    out = tmp_path / "sub" / "s.h5ad"
    code, stdout, _ = _run(capsys, ["simulate", out, "--ctrl", 50, "--cells", 20, "--perts", 4,
                                    "--genes", 25, "--factors", 2, "--seed", 7])
    assert code == EXIT_OK and stdout.startswith(f"wrote {out} (130 cells x 25 genes")
    adata = ad.read_h5ad(out)
    assert adata.shape == (130, 25)
    counts = adata.obs["perturbation"].value_counts()
    assert counts["non-targeting"] == 50 and (counts.drop("non-targeting") == 20).all()
    assert adata.obsm["U_true"].shape == (130, 2) and adata.varm["true_lfc"].shape == (25, 4)
    ref = simulate_screen(n_ctrl=50, n_perts=4, cells_per_pert=20, n_genes=25, r=2,
                          random_state=7)
    np.testing.assert_array_equal(adata.X.toarray(), ref.X.toarray())
    code, _, err = _run(capsys, ["simulate", out, "--effect-frac", "2"])
    assert code == EXIT_BAD_INPUT and "--effect-frac must lie in [0, 1]" in err


# ----------------------------------------------------------------------------------
# run, end to end
# ----------------------------------------------------------------------------------
def _check_outputs(out: Path, n_rows: int, jic: bool) -> pd.DataFrame:
    res = pd.read_csv(out / "results.csv.gz")
    assert len(res) == n_rows
    assert {"gene_names", "trt", "tau", "log2fc", "pvalue", "padj", "batch"} <= set(res.columns)
    pq = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(pq.reset_index(drop=True), res, check_dtype=False)
    for name in ("volcano.png", "discoveries.png", "propensity.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    assert (out / "jic.csv").exists() == jic and (out / "jic.png").exists() == jic
    html = (out / "report.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == 3 + jic
    return res


def test_run_without_factors(capsys, sim_path, tmp_path):
    out = tmp_path / "r0"
    code, stdout, err = _run(capsys, ["run", sim_path, "--out", out, "--r", "0"])
    assert code == EXIT_OK, err
    assert stdout.strip().splitlines()[-1] == f"report: {(out / 'report.html').resolve()}"
    res = _check_outputs(out, 3 * 30, jic=False)
    assert (out / "cache.h5").is_file()                 # cached as for any r
    assert sorted(res["trt"].unique()) == ["PERT001", "PERT002", "PERT003"]
    # each perturbation knocks its own target gene (GENE00000..2) down
    for k in range(3):
        row = res[(res["trt"] == f"PERT00{k + 1}") & (res["gene_names"] == f"GENE0000{k}")]
        assert row["log2fc"].iloc[0] < -1 and row["padj"].iloc[0] < 0.05


def test_run_resumes_from_cache(capsys, sim_path, tmp_path):
    out = tmp_path / "r1"
    argv = ["run", sim_path, "--out", out, "--r", "1", "--max-iters", "3"]
    code, _, err = _run(capsys, argv)
    assert code == EXIT_OK, err
    first = _check_outputs(out, 90, jic=False)
    assert "resuming" not in err
    code, _, err = _run(capsys, argv)
    assert code == EXIT_OK and f"resuming from the cache in {out}" in err
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv.gz"), first)
    # other settings never mix with the cache ...
    code, _, err = _run(capsys, [*argv[:5], "2", *argv[6:]])
    assert code == EXIT_BAD_INPUT
    line = _error_line(err)
    assert "written with different data or settings (differs in: r)" in line
    assert line.endswith("to start fresh: re-run with --overwrite, or choose another --out")
    # ... unless asked to start afresh
    code, _, err = _run(capsys, [*argv[:5], "2", *argv[6:], "--overwrite", "-q"])
    assert code == EXIT_OK, err


def test_run_auto_r_caches_jic(capsys, sim_path, tmp_path):
    out = tmp_path / "auto"
    argv = ["run", sim_path, "--out", out, "--r-grid", "1,2", "--max-iters", "3",
            "--n-ctrl", "100", "--max-cells", "200"]
    code, _, err = _run(capsys, argv)
    assert code == EXIT_OK, err
    _check_outputs(out, 90, jic=True)
    jic = pd.read_csv(out / "jic.csv")
    assert list(jic["r"]) == [0, 1, 2]
    np.testing.assert_allclose(jic["JIC"], jic["deviance"] + jic["nu"])
    code, _, err = _run(capsys, argv)
    assert code == EXIT_OK and "re-using the JIC table" in err
    pd.testing.assert_frame_equal(pd.read_csv(out / "jic.csv"), jic)


def test_demo_writes_its_report(capsys, tmp_path):
    # its wall time is measured by benchmarks/demo.py, not asserted here
    code, stdout, err = _run(capsys, ["demo", "--out", tmp_path / "demo", "-q"])
    assert code == EXIT_OK, err
    assert stdout.strip() == f"report: {(tmp_path / 'demo' / 'report.html').resolve()}"
    res = pd.read_csv(tmp_path / "demo" / "results.csv.gz")
    assert res["trt"].nunique() == 6 and res["gene_names"].nunique() == 72


# ----------------------------------------------------------------------------------
# the Python front door
# ----------------------------------------------------------------------------------
@pytest.fixture
def sim_adata(sim_path):
    return ad.read_h5ad(sim_path)


def test_tl_lfc_stores_results_and_settings(sim_adata, tmp_path):
    assert tl.lfc(sim_adata, r=1, max_iters=3, batch_size=2, n_ctrl=100) is None
    df = get.results(sim_adata)
    store = sim_adata.uns["causarray"]
    assert store["results"] is df and store["jic"] is None
    assert len(df) == 90 and df["batch"].nunique() == 2       # 3 perturbations, batches of 2
    assert list(df["gene_names"].iloc[:30]) == list(sim_adata.var_names)
    s = store["settings"]
    assert (s["r"], s["r_requested"], s["batch_size"], s["n_ctrl"], s["max_iters"]) == \
        (1, "1", 2, 100, 3)
    assert (s["n_cells"], s["n_genes"], s["n_perturbations"], s["n_control"]) == (330, 30, 3, 150)
    pi = sim_adata.obsm["causarray_propensity"]
    assert pi.shape == (330, 3) and list(pi.columns) == ["PERT001", "PERT002", "PERT003"]
    assert list(store["propensity"]["treatment"]) == list(pi.columns)
    sim_adata.write_h5ad(tmp_path / "processed.h5ad")       # uns stays writable
    back = ad.read_h5ad(tmp_path / "processed.h5ad")
    assert len(back.uns["causarray"]["results"]) == 90


@pytest.mark.slow
def test_tl_lfc_dask_client_matches_serial(sim_adata):
    distributed = pytest.importorskip("distributed")
    serial = get.results(tl.lfc(sim_adata, r=1, max_iters=3, batch_size=2, propensity=False,
                                copy=True))
    with distributed.Client(processes=False, n_workers=2, threads_per_worker=1,
                            dashboard_address=None) as client:
        tl.lfc(sim_adata, r=1, max_iters=3, batch_size=2, client=client, propensity=False)
    par = get.results(sim_adata)
    assert sim_adata.uns["causarray"]["settings"]["dask"] is True
    pd.testing.assert_frame_equal(par, serial)


def test_tl_lfc_argument_errors(sim_adata):
    with pytest.raises(ValueError, match="r must be 'auto' or a non-negative integer, got 'x'"):
        tl.lfc(sim_adata, r="x")
    with pytest.raises(ValueError, match="family must be 'nb' or 'poisson', got 'gaussian'"):
        tl.lfc(sim_adata, family="gaussian")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        tl.lfc(sim_adata, batch_size=0)
    sim_adata.X = sim_adata.X.astype(float) * 0.5
    with pytest.raises(ValueError, match="adata.X does not hold raw counts"):
        tl.lfc(sim_adata)


def test_default_r_grid():
    assert tl.default_r_grid(72) == [1, 2, 3, 5, 8, 10]
    assert tl.default_r_grid(8563, 2000) == [1, 2, 3, 5, 8, 10, 15, 20, 30]
    assert tl.default_r_grid(4) == [1]
