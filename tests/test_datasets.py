"""Bundled datasets (causarray.datasets)."""
from __future__ import annotations

import hashlib
import re
from importlib import resources

import numpy as np
import pytest
import scipy.sparse as sp

from causarray.datasets import DATASETS, dataset_path, list_datasets, load_dataset

# layout and checksums as documented in datasets/README.md
EXPECTED = {
    "schraivogel2020_ci": {
        "shape": (1500, 72), "n_perts": 6, "n_ctrl": 600,
        "sha256": "d0d0011173275989f89155749ca00994a063df5f123ea5d3bd3655e394e398e4"},
    "schraivogel2020_groundtruth": {
        "shape": (21052, 72), "n_perts": 14, "n_ctrl": 8609,
        "sha256": "92fce0f3fc94000798869be84f82f5c7a7db08b339ffdf51003875a084a52789"},
    "papalexi2021": {
        "shape": (19763, 299), "n_perts": 25, "n_ctrl": 2304,
        "sha256": "40f5d6b56b8695f1b8b03628abb5513ea0c94ac221e3ec6aa315f017de6e69da"},
    "hill2018": {
        "shape": (4063, 28), "n_perts": 29, "n_ctrl": 383,
        "sha256": "60d0049af8a3b974f597ae7ac36f765bd178eb6c158845954789c955bfca0b72"},
}


def test_list_datasets():
    assert list_datasets() == ["schraivogel2020_ci", "schraivogel2020_groundtruth",
                               "papalexi2021", "hill2018"]
    assert set(DATASETS) == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_path_and_checksum(name):
    path = dataset_path(name)
    assert path.is_file() and path.suffix == ".h5ad"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == EXPECTED[name]["sha256"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_load_layout(name):
    adata = load_dataset(name)
    exp = EXPECTED[name]
    assert adata.shape == exp["shape"]
    assert isinstance(adata.X, sp.csr_matrix) and np.issubdtype(adata.X.dtype, np.integer)
    assert adata.uns["pert_col"] == "perturbation"
    assert adata.uns["ctrl_label"] == "non-targeting"
    labels = adata.obs[adata.uns["pert_col"]].astype(str)
    assert int((labels == "non-targeting").sum()) == exp["n_ctrl"]
    assert labels.nunique() - 1 == exp["n_perts"]
    assert adata.X.min() >= 0


def test_unknown_name():
    with pytest.raises(ValueError, match=re.escape(
            "unknown dataset 'norman2019'; available datasets: schraivogel2020_ci, "
            "schraivogel2020_groundtruth, papalexi2021, hill2018")):
        load_dataset("norman2019")
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_path("hill")


def test_documentation_and_licences_shipped():
    folder = resources.files("causarray.datasets")
    readme = folder.joinpath("README.md").read_text(encoding="utf-8")
    licences = folder.joinpath("LICENSES.md").read_text(encoding="utf-8")
    for file_name, _ in DATASETS.values():
        assert file_name in readme and file_name in licences
    assert "Copyright (c) 2024 Jana M. Braunger" in licences
    assert "sceptredata authors" in licences
    assert "BSD 2-Clause" in licences and "MIT" in licences


def test_fixture_matches_loader(ci_adata):
    fresh = load_dataset("schraivogel2020_ci")
    assert (ci_adata.X != fresh.X).nnz == 0
    assert list(ci_adata.obs_names) == list(fresh.obs_names)
