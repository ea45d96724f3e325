"""A Dask cluster as a user starts one: scheduler and workers as separate processes.

The workers run in another working directory than the caller, so a path shipped as
given (``screen.h5ad``) is not found there: every path a job carries must be absolute
(docs/usage.md#large-screens-and-dask).  The caller works from the folder that holds the screen
and names it relatively, on the command line (``causarray run screen.h5ad
--dask-scheduler ADDR``) and through ``tl.lfc(..., client=Client(ADDR))``; both must
equal the serial run bit for bit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import pandas as pd
import pytest

from causarray import get, tl
from causarray.cli import EXIT_OK, main
from causarray.simulate import simulate_screen

distributed = pytest.importorskip("distributed", reason="the cluster test needs "
                                  "dask[distributed] (pip install 'causarray[dask]')")

START_TIMEOUT = 90          # seconds for the scheduler file and both workers
RUN = ["--r", "1", "--max-iters", "3", "--batch-size", "2", "--n-ctrl", "100",
       "--calibration", "off"]


def _dask_command(role: str) -> list[str]:
    script = Path(sys.executable).parent / "dask"
    if script.exists():
        return [str(script), role]
    return [sys.executable, "-m", f"distributed.cli.dask_{role}"]


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):            # workers first, the scheduler last
        if proc.poll() is None:
            proc.terminate()
    for proc in reversed(procs):
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    """``(address, folder)``: scheduler and two workers run in ``folder``."""
    elsewhere = tmp_path_factory.mktemp("workers_cwd")
    sched_file = elsewhere / "scheduler.json"
    procs: list[subprocess.Popen] = []
    request.addfinalizer(lambda: _stop(procs))
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    logs = open(elsewhere / "dask.log", "w")                # noqa: SIM115 (closed below)
    request.addfinalizer(logs.close)
    procs.append(subprocess.Popen(
        _dask_command("scheduler") + ["--host", "127.0.0.1", "--port", "0",
                                      "--dashboard-address", ":0",
                                      "--scheduler-file", str(sched_file)],
        cwd=elsewhere, env=env, stdout=logs, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + START_TIMEOUT
    while not sched_file.exists() or not sched_file.read_text().strip():
        if procs[0].poll() is not None or time.monotonic() > deadline:
            pytest.fail("the dask scheduler did not start: "
                        + (elsewhere / "dask.log").read_text()[-2000:])
        time.sleep(0.2)
    address = json.loads(sched_file.read_text())["address"]
    for i in range(2):
        procs.append(subprocess.Popen(
            _dask_command("worker") + [address, "--nworkers", "1", "--nthreads", "1",
                                       "--no-dashboard", "--name", f"w{i}",
                                       "--local-directory", str(elsewhere)],
            cwd=elsewhere, env=env, stdout=logs, stderr=subprocess.STDOUT))
    with distributed.Client(address, timeout="30s") as client:
        client.wait_for_workers(2, timeout=START_TIMEOUT)
        assert {w["name"] for w in client.scheduler_info()["workers"].values()} == {"w0", "w1"}
    return address, elsewhere


@pytest.fixture(scope="module")
def screen_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    simulate_screen(n_ctrl=150, n_perts=3, cells_per_pert=60, n_genes=30, r=2,
                    random_state=3).write_h5ad(folder / "screen.h5ad")
    return folder


def test_cli_on_separate_workers_with_a_relative_input_path(cluster, screen_dir,
                                                            monkeypatch, capsys):
    address, elsewhere = cluster
    monkeypatch.chdir(screen_dir)
    assert not (elsewhere / "screen.h5ad").exists()      # the workers cannot see it as given
    assert main(["run", "screen.h5ad", "--out", "serial", *RUN]) == EXIT_OK
    code = main(["run", "screen.h5ad", "--out", "cluster", "--dask-scheduler", address, *RUN])
    err = capsys.readouterr().err
    assert code == EXIT_OK, err
    serial = pd.read_parquet(screen_dir / "serial" / "results.parquet")
    par = pd.read_parquet(screen_dir / "cluster" / "results.parquet")
    assert len(par) == 90 and par["tested"].sum() > 30
    pd.testing.assert_frame_equal(par, serial, check_exact=True)


def test_tl_lfc_on_separate_workers_with_a_relative_input_path(cluster, screen_dir,
                                                               monkeypatch):
    address, _ = cluster
    monkeypatch.chdir(screen_dir)
    kw = dict(r=1, max_iters=3, batch_size=2, n_ctrl=100, propensity=False)
    first = ad.read_h5ad("screen.h5ad", backed="r")
    tl.lfc(first, **kw)
    serial = get.results(first)
    adata = ad.read_h5ad("screen.h5ad", backed="r")
    with distributed.Client(address, timeout="30s") as client:
        tl.lfc(adata, client=client, **kw)
    assert adata.uns["causarray"]["settings"]["dask"] is True
    pd.testing.assert_frame_equal(get.results(adata), serial, check_exact=True)
