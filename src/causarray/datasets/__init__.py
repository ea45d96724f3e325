"""Small real single-cell CRISPR screens bundled with causarray.

Four ``.h5ad`` files converted from public data (see ``README.md`` in this folder
for their origin, design and conversion, and ``LICENSES.md`` for the licences of
the upstream sources). Every file stores raw UMI counts as a CSR matrix in ``X``,
the perturbation label in ``obs[uns['pert_col']]`` and the control label in
``uns['ctrl_label']``, so :func:`causarray.preprocessing.from_anndata` works on
each of them without further arguments.

=============================== ============== =========================================
name                            cells x genes  content
=============================== ============== =========================================
``schraivogel2020_ci``           1,500 x 72    TAP-seq CRISPRi, 6 targets x 150 cells +
                                               600 controls (quick tests)
``schraivogel2020_groundtruth`` 21,052 x 72    TAP-seq CRISPRi, 14 targets, 8,609 controls
``papalexi2021``                19,763 x 299   ECCITE-seq KO, 25 targets, covariate
                                               ``bio_rep``
``hill2018``                     4,063 x 28    CROP-seq KO, 29 targets, very sparse; has
                                               44 cells and 2 genes without counts
=============================== ============== =========================================
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["DATASETS", "dataset_path", "list_datasets", "load_dataset"]

#: Dataset name -> (file name, one-line description).
DATASETS: dict[str, tuple[str, str]] = {
    "schraivogel2020_ci": (
        "schraivogel2020_tapseq_ci.h5ad",
        (
            "Schraivogel et al. 2020 TAP-seq CRISPRi (K562), CI subset: 1,500 cells x 72 genes, "
            "6 perturbations x 150 cells + 600 non-targeting."
        ),
    ),
    "schraivogel2020_groundtruth": (
        "schraivogel2020_tapseq_groundtruth.h5ad",
        (
            "Schraivogel et al. 2020 TAP-seq CRISPRi (K562) ground-truth screen: 21,052 cells x "
            "72 genes, 14 perturbations, 8,609 non-targeting."
        ),
    ),
    "papalexi2021": (
        "papalexi2021_eccite_subset.h5ad",
        (
            "Papalexi et al. 2021 ECCITE-seq CRISPR KO (THP-1): 19,763 cells x 299 genes, "
            "25 perturbations, 2,304 non-targeting; obs['bio_rep']."
        ),
    ),
    "hill2018": (
        "hill2018_mcf10a_cropseq_28genes.h5ad",
        (
            "Hill et al. 2018 CROP-seq KO (MCF10A): 4,063 cells x 28 genes, 29 perturbations, "
            "383 non-targeting; very sparse (format/robustness tests only)."
        ),
    ),
}


def list_datasets() -> list[str]:
    """Names of the bundled datasets, in the order of :data:`DATASETS`.

    Returns
    -------
    list of str
        Valid arguments for :func:`load_dataset` and :func:`dataset_path`.
    """
    return list(DATASETS)


def _file_name(name: str) -> str:
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; available datasets: {', '.join(DATASETS)}"
        )
    return DATASETS[name][0]


def dataset_path(name: str) -> Path:
    """Filesystem path of a bundled dataset's ``.h5ad`` file.

    Parameters
    ----------
    name : str
        One of :func:`list_datasets`.

    Returns
    -------
    pathlib.Path
        Path to the file inside the installed package.

    Raises
    ------
    ValueError
        If ``name`` is not a bundled dataset, or the package is installed in a form
        (e.g. a zip archive) that does not expose the file on disk.
    """
    ref = resources.files(__name__).joinpath(_file_name(name))
    path = Path(str(ref))
    if not path.is_file():
        raise ValueError(
            f"dataset file {path} for {name!r} is not available on the filesystem; "
            "use load_dataset(name) instead"
        )
    return path


def load_dataset(name: str):
    """Load a bundled screen as an AnnData object.

    Parameters
    ----------
    name : str
        One of :func:`list_datasets` (``'schraivogel2020_ci'``,
        ``'schraivogel2020_groundtruth'``, ``'papalexi2021'``, ``'hill2018'``).

    Returns
    -------
    anndata.AnnData
        Raw counts in ``X`` (CSR, int32); ``obs['perturbation']``;
        ``uns['pert_col'] == 'perturbation'``, ``uns['ctrl_label'] == 'non-targeting'``.

    Examples
    --------
    >>> from causarray.datasets import load_dataset
    >>> adata = load_dataset("schraivogel2020_ci")
    >>> adata.shape
    (1500, 72)
    """
    import anndata

    ref = resources.files(__name__).joinpath(_file_name(name))
    with resources.as_file(ref) as path:
        return anndata.read_h5ad(path)
