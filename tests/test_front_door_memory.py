"""The front door (tl.lfc, causarray run, report) holds no cells x perturbations array:
sparse one-hot treatments, propensity models fitted one perturbation at a time, results
identical to the dense computations they replace."""
from __future__ import annotations

import tracemalloc

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from causarray import pl, tl
from causarray.diagnostics import (
    propensity_by_label,
    summarize_propensity_scores,
    treatment_codes,
)
from causarray.preprocessing import from_anndata
from causarray.propensity import estimate_propensity_scores
from causarray.simulate import simulate_screen


def _screen(n_ctrl=120, n_perts=5, cells=25, genes=30, seed=4):
    a = simulate_screen(n_ctrl=n_ctrl, n_perts=n_perts, cells_per_pert=cells, n_genes=genes,
                        r=1, random_state=seed)
    a.X = sp.csr_matrix(a.X)
    return a


def _labelled_screen(n_ctrl: int, n_perts: int, cells: int, genes: int, seed: int = 0):
    """Poisson counts with one label per cell and a covariate (fast to build at any a)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(["NT"] + [f"P{k:04d}" for k in range(n_perts)],
                       [n_ctrl] + [cells] * n_perts)
    n = labels.size
    X = sp.csr_matrix(rng.poisson(3.0, size=(n, genes)).astype(np.float32))
    obs = pd.DataFrame({"gene": pd.Categorical(labels),
                        "batch": np.where(rng.random(n) < 0.5, "b1", "b2")},
                       index=[f"c{i}" for i in range(n)])
    a = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(genes)]))
    a.uns.update(pert_col="gene", ctrl_label="NT")
    return a


# ----------------------------------------------------------------------------------
# per-perturbation propensity = the dense computation
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_table", [True, False])
def test_propensity_by_label_equals_dense_summary(keep_table):
    a = _labelled_screen(n_ctrl=150, n_perts=6, cells=30, genes=12, seed=2)
    _, A, _, X_A = from_anndata(a, covariates=["batch"])
    dense = summarize_propensity_scores(A, estimate_propensity_scores(A, X_A))
    fit = propensity_by_label(treatment_codes(A), X_A, list(A.columns), keep_table=keep_table)
    # same fits on the same rows; scores are float64 predictions of identical models
    pd.testing.assert_frame_equal(fit.summary, dense, check_exact=False, rtol=1e-12)
    assert (fit.table is not None) == keep_table
    if keep_table:
        np.testing.assert_array_equal(fit.table, estimate_propensity_scores(A, X_A))
    # the coefficients reproduce the scores: expit(x' coef_k)
    pi = estimate_propensity_scores(A, X_A)
    again = 1.0 / (1.0 + np.exp(-(X_A @ fit.coef.to_numpy().T)))
    np.testing.assert_allclose(again, pi, rtol=1e-12, atol=0)


def test_treatment_codes_rejects_two_perturbations_per_cell():
    A = sp.csc_matrix(np.array([[1, 0], [1, 1], [0, 0]], dtype=float))
    with pytest.raises(ValueError, match=r"1 cell\(s\) carry more than one perturbation"):
        treatment_codes(A)
    np.testing.assert_array_equal(treatment_codes(A[[0, 2]]), [0, -1])


def test_propensity_by_label_names_a_perturbation_without_cells():
    with pytest.raises(ValueError, match="treatment 'B' has no treated cells"):
        propensity_by_label(np.array([-1, -1, 0, 0]), np.ones((4, 1)), ["A", "B"])


# ----------------------------------------------------------------------------------
# tl.lfc: backed = in memory, sparse A = dense A
# ----------------------------------------------------------------------------------
def test_tl_lfc_backed_equals_in_memory_with_propensity(tmp_path):
    a = _screen()
    path = tmp_path / "s.h5ad"
    a.write_h5ad(path)
    mem, backed = ad.read_h5ad(path), ad.read_h5ad(path, backed="r")
    kw = dict(r=1, batch_size=2, max_iters=4, verbose=False)
    tl.lfc(mem, **kw)
    tl.lfc(backed, **kw)
    s_mem, s_bk = mem.uns["causarray"], backed.uns["causarray"]
    pd.testing.assert_frame_equal(s_bk["results"], s_mem["results"], check_exact=True)
    pd.testing.assert_frame_equal(s_bk["propensity"], s_mem["propensity"], check_exact=True)
    pd.testing.assert_frame_equal(s_bk["propensity_coef"], s_mem["propensity_coef"],
                                  check_exact=True)
    pd.testing.assert_frame_equal(backed.obsm["causarray_propensity"],
                                  mem.obsm["causarray_propensity"], check_exact=True)
    # the summary is that of the dense scores over the cells used
    _, A, _, X_A = from_anndata(mem)
    dense = summarize_propensity_scores(A, estimate_propensity_scores(A, X_A))
    pd.testing.assert_frame_equal(s_mem["propensity"], dense, check_exact=False, rtol=1e-12)
    assert list(s_mem["propensity"]["n_control"]) == [120] * 5
    assert list(s_mem["propensity"]["n_treated"]) == [25] * 5


def test_tl_lfc_results_equal_the_dense_treatment_path(monkeypatch):
    """The batch results with the sparse one-hot A equal those with a dense A."""
    from causarray import batch as bm

    a = _screen(seed=7)
    tl.lfc(a, r=1, batch_size=3, max_iters=4, propensity=False)
    sparse_res = a.uns["causarray"]["results"]
    seen = []
    real = bm.gcate_lfc_batch

    def dense_A(Y, X, A, *args, **kwargs):
        seen.append(type(A.dtypes.iloc[0]).__name__)
        return real(Y, X, pd.DataFrame(A.sparse.to_dense()), *args, **kwargs)

    monkeypatch.setattr(bm, "gcate_lfc_batch", dense_A)
    b = _screen(seed=7)
    tl.lfc(b, r=1, batch_size=3, max_iters=4, propensity=False)
    assert seen == ["SparseDtype"]
    pd.testing.assert_frame_equal(b.uns["causarray"]["results"], sparse_res, check_exact=True)


# ----------------------------------------------------------------------------------
# memory shape: nothing of n x a entries
# ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_tl_lfc_allocates_no_cells_by_perturbations_array(monkeypatch):
    """1,100 perturbations of 2 cells + 4,000 controls: one float64 n x a array is 55 MB,
    the cells x genes counts 0.4 MB.  The whole front door (validation, designs, layout,
    propensity models and summary, storage) stays below 2 bytes per (cell, perturbation)
    pair, a quarter of one float64 n x a array, so it holds no float or integer n x a
    array (the dense code it replaces peaked at over three of them); the batch
    fits are stubbed (their memory is one batch, checked elsewhere)."""
    from causarray import batch as bm

    n_perts, n_ctrl, genes = 1100, 4000, 8
    a = _labelled_screen(n_ctrl=n_ctrl, n_perts=n_perts, cells=2, genes=genes)
    n = a.n_obs
    frame = pd.DataFrame({"gene_names": ["g0"], "trt": ["P0000"], "batch": [0],
                          "padj": [1.0], "pvalue": [1.0], "tau": [0.0]})
    calls = []

    def stub(Y, X, A, *args, **kwargs):
        calls.append((A.shape, sp.issparse(A.sparse.to_coo())))
        shift = pd.DataFrame(columns=["trt", "batch", "d2", "pvalue", "adjusted",
                                      "tau_change", "agreement"])
        if kwargs.get("return_factors"):
            return frame.copy(), shift, None
        return (frame.copy(), shift) if kwargs.get("return_shift") else frame.copy()

    monkeypatch.setattr(bm, "gcate_lfc_batch", stub)
    assert n * n_perts > tl.PROPENSITY_TABLE_MAX      # no scores table is kept
    # warm-up on a tiny screen: the modules tl.lfc imports lazily are not counted
    tl.lfc(_labelled_screen(n_ctrl=20, n_perts=3, cells=5, genes=4), r=0,
           covariates=["batch"])
    calls.clear()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        tl.lfc(a, r=0, covariates=["batch"])
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert calls == [((n, n_perts), True)]
    assert peak < 2 * n * n_perts, (peak, n * n_perts)
    store = a.uns["causarray"]
    assert "causarray_propensity" not in a.obsm
    assert store["propensity_coef"].shape == (n_perts, 3)
    assert a.obsm["causarray_propensity_design"].shape == (n, 3)
    assert len(store["propensity"]) == n_perts
    assert (store["propensity"]["n_control"] == n_ctrl).all()


def test_large_screen_scores_and_plot_come_from_the_models(monkeypatch):
    """Without the scores table, tl.propensity_scores and pl.propensity recompute the
    scores of the drawn perturbations from the stored models."""
    a = _labelled_screen(n_ctrl=200, n_perts=8, cells=20, genes=10, seed=5)
    tl.lfc(a, r=0, covariates=["batch"])
    table = a.obsm["causarray_propensity"].copy()
    monkeypatch.setattr(tl, "PROPENSITY_TABLE_MAX", 10)
    b = a.copy()
    del b.obsm["causarray_propensity"], b.uns["causarray"]
    tl.lfc(b, r=0, covariates=["batch"])
    assert "causarray_propensity" not in b.obsm and pl.has_propensity(b)
    pd.testing.assert_frame_equal(b.uns["causarray"]["propensity"],
                                  a.uns["causarray"]["propensity"], check_exact=False,
                                  rtol=1e-12)
    again = tl.propensity_scores(b, ["P0003", "P0001"])
    np.testing.assert_allclose(again.to_numpy(), table[["P0003", "P0001"]].to_numpy(),
                               rtol=1e-12)
    fig = pl.propensity(b, max_panels=2)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    worst = a.uns["causarray"]["propensity"].sort_values("overlap_ratio", kind="mergesort")
    assert [t.split()[0] for t in titles] == list(worst["treatment"].head(2))
    with pytest.raises(ValueError, match=r"unknown treatment\(s\) \['nope'\]"):
        tl.propensity_scores(b, ["nope"])


def test_jic_cache_key_of_backed_counts_is_the_batch_digest(tmp_path):
    """On-disk counts are keyed by the digest the batch cache uses for them (their
    streamed pass), which equals that of the same counts read into memory."""
    from causarray.batch import _digest_counts
    from causarray.ondisk import H5Counts

    path = tmp_path / "s.h5ad"
    _screen().write_h5ad(path)
    mem, backed = ad.read_h5ad(path), ad.read_h5ad(path, backed="r")
    s_mem = tl._read_screen(mem, None, None, [], None, False)
    s_bk = tl._read_screen(backed, None, None, [], None, False)
    assert isinstance(s_bk.Y, H5Counts)
    assert _digest_counts(s_bk.Y) == _digest_counts(s_mem.Y)
    keys = [tl._data_fingerprint(s.Y, s.genes, s.A, s.X, s.X_A) for s in (s_mem, s_bk)]
    assert keys[0] == keys[1]
    other = s_mem.Y.copy()
    other[0, 0] += 1
    assert tl._data_fingerprint(other, s_mem.genes, s_mem.A, s_mem.X, s_mem.X_A) != keys[0]
