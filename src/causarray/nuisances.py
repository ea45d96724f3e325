"""Nuisance store of ``gcate_lfc_batch(save_nuisances=True)`` (as in causarray 0.1.1).

The outcome model does not depend on the propensity design, so keeping each batch's
counterfactual predictions lets a user re-run :func:`causarray.LFC` with other
propensity scores (``Y_hat=..., pi_hat=...``) without the expensive GLM and GCATE fits
(the Replogle propensity-refit tutorial).  The store is an HDF5 file beside the result
cache, ``<cache_path without .h5>.nuisances.h5``, one group ``batch_NNNN`` per batch:

``Y_hat``      float32 (n_b, p_b, a_b, 2): outcome-model means without / with each
               treatment (offsets included), for the batch's cells, the genes with
               counts in the batch and the treatments with cells;
``pi_hat``     float32 (n_b, a_b): clipped propensity scores used by AIPW;
``pi_hat_raw`` float32 (n_b, a_b): the same before clipping;
``cell_idx``   int64 (n_b,): rows of the batch's cells in the full matrix;
``offset``     float64 (n_b,): log size factors of the batch;
``U``          float64 (n_b, r): the batch's latent factors;
``pert_names``, ``gene_names``: labels of the treatment and gene axes;
``shift_variance`` float64 (p_b, a_b) and ``recenter_genes`` bool (p_b, a_b), when GCATE
               gave them: pass them back to :func:`causarray.LFC` with the same names
               to reproduce the batch's estimates (``None`` when absent).

Budget about ``8 n_b p_b a_b`` bytes per batch before compression.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ._validation import check_nuisance_cache_path

KEYS = ("Y_hat", "pi_hat", "pi_hat_raw", "cell_idx", "offset", "U", "pert_names",
        "gene_names")


def nuisance_path(cache_path) -> str:
    """The nuisance file beside ``cache_path`` (``x.h5`` -> ``x.nuisances.h5``)."""
    check_nuisance_cache_path(cache_path)
    return f"{str(cache_path).removesuffix('.h5')}.nuisances.h5"


def save_batch_nuisances(path, batch: int, nuis: dict) -> None:
    """Write (or replace) the group ``batch_NNNN`` of the nuisance store ``path``."""
    import h5py

    with h5py.File(path, "a") as f:
        name = f"batch_{int(batch):04d}"
        if name in f:
            del f[name]
        g = f.create_group(name)
        for key in ("Y_hat", "pi_hat", "pi_hat_raw"):
            g.create_dataset(key, data=np.asarray(nuis[key], dtype=np.float32),
                             compression="gzip", compression_opts=1)
        g.create_dataset("cell_idx", data=np.asarray(nuis["cell_idx"], dtype=np.int64))
        g.create_dataset("offset", data=np.asarray(nuis["offset"], dtype=np.float64))
        g.create_dataset("U", data=np.asarray(nuis["U"], dtype=np.float64))
        # LFC inputs from GCATE beyond Y_hat / pi_hat (genes x treatments), when present
        for key, dtype in (("shift_variance", np.float64), ("recenter_genes", bool)):
            if nuis.get(key) is not None:
                g.create_dataset(key, data=np.asarray(nuis[key], dtype=dtype))
        text = h5py.string_dtype()
        for key in ("pert_names", "gene_names"):
            g.create_dataset(key, data=np.asarray([str(v) for v in nuis[key]], dtype=object),
                             dtype=text)


def stored_batches(path) -> list[int]:
    """Batch indices present in the nuisance store (empty if the file does not exist)."""
    import h5py

    if not Path(path).exists():
        return []
    with h5py.File(path, "r") as f:
        return sorted(int(k.split("_")[1]) for k in f if k.startswith("batch_"))


def load_nuisances(path, batch: int) -> dict:
    """One batch of the store as a dict of arrays (labels as lists of str).

    ``path`` may be the nuisance file itself or the result ``cache_path``.
    """
    import h5py

    path = str(path)
    if not path.endswith(".nuisances.h5"):
        path = nuisance_path(path)
    with h5py.File(path, "r") as f:
        name = f"batch_{int(batch):04d}"
        if name not in f:
            raise KeyError(f"batch {batch} is not in the nuisance store {path!r} "
                           f"(stored: {stored_batches(path)})")
        g = f[name]
        out = {key: g[key][()] for key in KEYS if key not in ("pert_names", "gene_names")}
        for key in ("shift_variance", "recenter_genes"):
            out[key] = g[key][()] if key in g else None
        for key in ("pert_names", "gene_names"):
            out[key] = [v.decode() if isinstance(v, bytes) else str(v) for v in g[key][()]]
    return out
