"""0.1.1 result columns of LFC and the batch pipeline: arm sizes, arm count sums, the
variance-floor flag and the pre-floor standard error."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from causarray import LFC, gcate_lfc_batch
from causarray.batch import plan_batches
from causarray.cache import read_cache
from causarray.simulate import simulate_screen

sys.path.insert(0, str(Path(__file__).parent))
from _batch_child import RUN_KW, R, make_problem

NEW = ["n_treated", "n_control", "count_treated", "count_control", "var_floored", "std_raw"]


@pytest.fixture(scope="module")
def lfc_run():
    ad = simulate_screen(n_ctrl=200, n_perts=3, cells_per_pert=40, n_genes=120, r=2,
                         random_state=3)
    Y, X, A = _design(ad)
    W = np.hstack([X, ad.obsm["U_true"]])
    df, _ = LFC(Y, W, A, offset=True)
    return Y, A, df


def _design(ad):
    labels = ad.obs[ad.uns["pert_col"]].astype(str)
    A = pd.get_dummies(labels).drop(columns=[ad.uns["ctrl_label"]]).astype(float)
    Y = pd.DataFrame(np.asarray(ad.X.todense() if hasattr(ad.X, "todense") else ad.X),
                     columns=[f"g{j}" for j in range(ad.n_vars)])
    X = np.ones((ad.n_obs, 1))
    return Y, X, A


def test_arm_sizes_and_count_sums_are_those_of_the_cells_used(lfc_run):
    Y, A, df = lfc_run
    ctrl = A.to_numpy().sum(axis=1) == 0
    for name in A.columns:
        rows = df[df["trt"] == name]
        trt = A[name].to_numpy() == 1
        assert (rows["n_treated"] == trt.sum()).all()
        assert (rows["n_control"] == ctrl.sum()).all()
        np.testing.assert_allclose(rows["count_treated"], Y.to_numpy()[trt].sum(axis=0))
        np.testing.assert_allclose(rows["count_control"], Y.to_numpy()[ctrl].sum(axis=0))
    assert df["n_treated"].dtype == np.int64 and df["var_floored"].dtype == bool


def test_var_floored_and_std_raw(lfc_run):
    _, _, df = lfc_run
    tested = df["estimable"].to_numpy()
    fl = df["var_floored"].to_numpy()
    assert not fl[~tested].any()                       # only tested pairs are floored
    assert np.isinf(df.loc[~tested, "std_raw"]).all()
    keep = tested & ~fl
    np.testing.assert_array_equal(df.loc[keep, "std_raw"], df.loc[keep, "std"])
    # where floored, the reported SE is the floor, strictly above the raw SE
    assert (df.loc[fl, "std"] > df.loc[fl, "std_raw"]).all()


def test_batch_table_and_cache_carry_the_new_columns(tmp_path):
    Y, X, A, X_A = make_problem()
    cache = tmp_path / "res.h5"
    df = gcate_lfc_batch(Y, X, A, R, W_A=X_A, cache_path=cache, **RUN_KW)
    for c in NEW:
        assert c in df.columns
    Yd = Y.toarray() if hasattr(Y, "toarray") else np.asarray(Y)
    An = A.to_numpy()
    plans = plan_batches(An, RUN_KW["batch_size"], None, RUN_KW["max_cells"],
                         RUN_KW["n_ctrl"], RUN_KW["random_state"])
    for pl in plans:
        rows_b = pl.cell_idx                           # the batch's cells (capped subsample)
        for k in pl.trt_idx:
            rows = df[df["trt"] == A.columns[k]]
            trt = rows_b[An[rows_b, k] == 1]
            assert (rows["n_treated"] == trt.size).all()
            assert (rows["n_control"] == pl.ctrl_idx.size).all()
            np.testing.assert_allclose(rows["count_treated"], Yd[trt].sum(axis=0))
            np.testing.assert_allclose(rows["count_control"], Yd[pl.ctrl_idx].sum(axis=0))
    back = read_cache(cache)
    pd.testing.assert_frame_equal(back[df.columns].reset_index(drop=True), df,
                                  check_dtype=False)


def test_sparse_gene_in_a_small_arm_is_floored():
    """A gene with a chance all-zero treated arm gets the Poisson floor, flagged."""
    rng = np.random.default_rng(0)
    n_c, n_t, p = 300, 30, 60
    Y = rng.poisson(5.0, size=(n_c + n_t, p)).astype(float)
    Y[:, 0] = rng.poisson(0.4, size=n_c + n_t)
    Y[n_c:, 0] = 0.0                                   # no counts in the treated arm
    A = np.r_[np.zeros(n_c), np.ones(n_t)][:, None]
    W = np.ones((n_c + n_t, 1))
    df, _ = LFC(Y, W, A, offset=False, recenter=False)
    row = df.iloc[0]
    assert row["estimable"] and row["var_floored"] and row["count_treated"] == 0
    assert row["std"] > row["std_raw"]


@pytest.mark.parametrize("r", [0, 1])
def test_tl_lfc_tables_carry_the_new_columns(r):
    import causarray as ca

    ad = simulate_screen(n_ctrl=150, n_perts=3, cells_per_pert=40, n_genes=60, r=1,
                         random_state=1)
    ca.tl.lfc(ad, r=r, max_iters=3, batch_size=2, n_ctrl=150)
    df = ca.get.results(ad)
    for c in NEW:
        assert c in df.columns
    sizes = ad.obs[ad.uns["pert_col"]].astype(str).value_counts()
    for t, rows in df.groupby("trt"):
        assert (rows["n_treated"] == sizes[t]).all()
