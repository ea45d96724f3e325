"""Shared pytest fixtures."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def _ci_adata_session():
    from causarray.datasets import load_dataset

    return load_dataset("schraivogel2020_ci")


@pytest.fixture
def ci_adata(_ci_adata_session):
    """The bundled Schraivogel 2020 TAP-seq CI subset (1,500 cells x 72 genes).

    A fresh copy per test, so tests may modify it.
    """
    return _ci_adata_session.copy()
