"""The 0.1.1 tutorials besides the batch one, run in their small (CI) mode."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from causarray.dr import RESULT_COLUMNS

EXAMPLES = Path(__file__).parents[1] / "examples"


def _run(script: str, workdir: Path) -> str:
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1"}
    src = str(Path(__file__).parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--small", "--workdir",
                           str(workdir)], capture_output=True, text=True, timeout=600, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _num(pattern: str, text: str) -> float:
    return float(re.search(pattern, text).group(1))


def test_perturbseq_tutorial_small(tmp_path):
    out = _run("perturbseq_tutorial.py", tmp_path)
    # 6 perts x 300 genes; LFC's columns plus trt
    assert f"Result shape : (1800, {len(RESULT_COLUMNS) + 1})" in out
    assert _num(r"First pass: \d+ discoveries \(padj < 0.05\), FDP ([\d.]+)", out) < 0.2
    assert _num(r"First pass: .* power ([\d.]+)", out) > 0.3
    assert "select_propensity_factors:" in out and "Refit:" in out
    assert {"perturbseq_lfc.csv", "perturbseq_lfc_refit.csv", "perturbseq_propensity.csv",
            "perturbseq_propensity.png"} <= set(os.listdir(tmp_path))
    diag = pd.read_csv(tmp_path / "perturbseq_propensity.csv")
    assert set(diag["stage"]) == {"first pass", "refit"} and "brier_score" in diag


def test_case_control_tutorial_small(tmp_path):
    out = _run("case_control_tutorial.py", tmp_path)
    assert "Pseudobulk: 85 donors x" in out
    fdp_f = _num(r"With 4 latent factors : \d+ discoveries, FDP ([\d.]+)", out)
    fdp_0 = _num(r"Recorded covariates only: \d+ discoveries, FDP ([\d.]+)", out)
    # the unrecorded donor trait confounds the analysis without latent factors
    assert fdp_f < 0.2 < fdp_0
    # the donor route from the cells gives the same protection
    fdp_d = _num(r"Donor route \(tl.lfc, jackknife SEs\): \d+ discoveries, FDP ([\d.]+)", out)
    assert fdp_d < 0.2
    donor = pd.read_csv(tmp_path / "case_control_lfc_donor_route.csv")
    assert donor["n_treated"].iloc[0] + donor["n_control"].iloc[0] == 85
    pb = pd.read_csv(tmp_path / "case_control_pseudobulk.csv.gz", index_col=0)
    assert pb.shape[0] == 85
    res = pd.read_csv(tmp_path / "case_control_lfc.csv")
    assert {"n_treated", "n_control"} <= set(res.columns)
    assert res["n_treated"].iloc[0] + res["n_control"].iloc[0] == 85


@pytest.mark.slow
def test_replogle_propensity_refit_small(tmp_path):
    out = _run("replogle_propensity_refit.py", tmp_path)
    assert "Settings evaluated: 7" in out
    assert {"results.h5", "results.nuisances.h5", "propensity_summary.csv",
            "propensity_tuning.csv"} <= set(os.listdir(tmp_path))
    tun = pd.read_csv(tmp_path / "propensity_tuning.csv")
    stored = tun[tun["setting"].str.startswith("stored")]
    # re-estimating with the stored nuisances reproduces the baseline exactly
    assert (stored["discoveries"] == stored["baseline_discoveries"]).all()
    assert (stored["median_std_ratio"] == 1.0).all()
    assert (stored["tau_pearson_vs_baseline"] > 1 - 1e-9).all()
