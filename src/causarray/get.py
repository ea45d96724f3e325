"""Accessors for what :func:`causarray.tl.lfc` stores in an AnnData (as ``scanpy.get``).

::

    import causarray as ca
    ca.tl.lfc(adata, pert_col="gene", ctrl_label="non-targeting")
    df = ca.get.results(adata)
"""
from __future__ import annotations

from typing import Any

import pandas as pd

__all__ = ["results", "settings"]


def _store(adata: Any, key: str) -> dict:
    uns = getattr(adata, "uns", None)
    if uns is None or key not in uns:
        raise KeyError(f"adata.uns has no {key!r} entry; run causarray.tl.lfc(adata"
                       + (f", key_added={key!r}" if key != "causarray" else "") + ") first")
    return uns[key]


def results(adata: Any, key: str = "causarray") -> pd.DataFrame:
    """The result table of :func:`causarray.tl.lfc`.

    Parameters
    ----------
    adata : anndata.AnnData
        Processed by :func:`causarray.tl.lfc`.
    key : str
        Its ``key_added``.

    Returns
    -------
    pandas.DataFrame
        One row per (perturbation, gene); see ``docs/results.md`` for the columns.

    Raises
    ------
    KeyError
        ``adata`` has not been processed (under ``key``).
    """
    res = _store(adata, key).get("results")
    if res is None:
        raise KeyError(f"adata.uns[{key!r}] holds no 'results'")
    return res if isinstance(res, pd.DataFrame) else pd.DataFrame(res)


def settings(adata: Any, key: str = "causarray") -> dict:
    """The settings :func:`causarray.tl.lfc` ran with (``adata.uns[key]['settings']``)."""
    return dict(_store(adata, key).get("settings", {}))
