"""Data preparation (docs/math.md#data-preparation), size factors
(docs/math.md#size-factors) and the AnnData entry points."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from causarray.preprocessing import (
    cap_counts,
    comp_size_factor,
    count_cap,
    covariate_design,
    from_anndata,
    prep_causarray_data,
    subset_screen,
)

CI_PERTS = ["CPQ", "DSCC1", "FAM83A", "HS2", "MYC", "RIPK2"]


# ----------------------------------------------------------------------------- helpers
def nb_counts(n=300, p=150, seed=0, mean_range=(0.05, 20.0), return_depth=False):
    """NB counts with gene means spread log-uniformly and cell depths varying 4-fold."""
    rng = np.random.default_rng(seed)
    gene_mean = np.exp(rng.uniform(*np.log(mean_range), size=p))
    depth = np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=n))
    mu = depth[:, None] * gene_mean[None, :]
    size = 5.0
    Y = rng.negative_binomial(size, size / (size + mu)).astype(np.int64)
    return (Y, depth) if return_depth else Y


def reference_size_factors(Y, min_mean=2.0, min_genes=100):
    """docs/math.md#size-factors written out literally, with loops, on a dense array."""
    Y = np.asarray(Y, dtype=float)
    n, p = Y.shape
    gbar = Y.mean(axis=0)
    S = [j for j in range(p) if gbar[j] >= min_mean]
    if len(S) < min(min_genes, p):
        S = list(np.argsort(-gbar, kind="stable")[:min_genes])
    S = [j for j in S if gbar[j] > 0]
    G = {j: np.mean(np.log(Y[Y[:, j] > 0, j])) for j in S}
    L = np.full(n, np.nan)
    for i in range(n):
        ratios = [np.log(Y[i, j]) - G[j] for j in S if Y[i, j] > 0]
        if ratios:
            L[i] = np.median(ratios)
    totals = Y.sum(axis=1)
    defined = ~np.isnan(L)
    delta = np.median(L[defined] - np.log(totals[defined]))
    for i in range(n):
        if np.isnan(L[i]) and totals[i] > 0:
            L[i] = np.log(totals[i]) + delta
    s = np.zeros(n)
    ok = np.isfinite(L)
    s[ok] = np.exp(L[ok] - L[ok].mean())
    return s


# ----------------------------------------------------------------------------- prep
class TestPrep:
    def test_seed_tutorial_shapes(self):
        rng = np.random.default_rng(0)
        Y_raw = nb_counts(n=120, p=40)
        labels = pd.Series(rng.choice(["non-targeting", "KO_b", "KO_a"], size=120),
                           index=[f"c{i}" for i in range(120)])
        Y = pd.DataFrame(Y_raw, columns=[f"g{j}" for j in range(40)])
        A = pd.get_dummies(labels.astype(str), drop_first=False).drop(columns=["non-targeting"])
        Y2, A2, X, X_A = prep_causarray_data(Y, A)
        assert isinstance(Y2, pd.DataFrame) and Y2.shape == (120, 40)
        assert list(Y2.columns) == list(Y.columns) and Y2.index.equals(Y.index)
        assert isinstance(A2, pd.DataFrame) and list(A2.columns) == ["KO_a", "KO_b"]
        assert A2.index.equals(A.index)
        np.testing.assert_array_equal(A2.to_numpy(), A.to_numpy().astype(float))
        assert X.shape == (120, 1) and X_A.shape == (120, 2)
        np.testing.assert_array_equal(X[:, 0], 1.0)
        np.testing.assert_array_equal(X_A[:, 0], 1.0)

    def test_cap_value(self):
        # gene maxima are 1, 1, 2, ..., 1000 -> 99.9th percentile = 999
        p = 1001
        Y = np.ones((3, p), dtype=np.int64)
        Y[0] = np.arange(p)
        Y[0, 0] = 1
        assert count_cap(Y) == 999.0
        assert count_cap(Y) == np.round(np.percentile(Y.max(axis=0), 99.9))
        Yc, *_ = prep_causarray_data(Y, np.array([0, 1, 0]))
        expected = Y.copy()
        expected[0, 1000] = 999
        np.testing.assert_array_equal(Yc, expected)
        assert Yc.dtype == Y.dtype

    def test_cap_rounds_percentile(self):
        # maxima 0 (499 genes), 2, 3 -> percentile ~2.5000000000001 -> 3
        Y = np.zeros((2, 501), dtype=np.int64)
        Y[0, -2], Y[0, -1] = 2, 3
        q = count_cap(Y)
        assert q == np.round(np.percentile(Y.max(axis=0), 99.9)) == 3.0
        capped, q2 = cap_counts(Y * 2)  # maxima 4, 6 -> ~5.0000000000001 -> 5
        assert q2 == 5.0 and capped.max() == 5 and capped.dtype == np.int64

    def test_log_library_size_standardised_on_capped_counts(self):
        Y = nb_counts(n=200, p=60, seed=3)
        Y[5, 7] = 10_000  # huge outlier that capping removes
        Yc, _, _, X_A = prep_causarray_data(Y, np.zeros(200))
        assert Yc[5, 7] < 10_000
        ell = np.log2(np.asarray(Yc, dtype=float).sum(axis=1))
        expected = (ell - ell.mean()) / np.std(ell, ddof=1)
        np.testing.assert_allclose(X_A[:, -1], expected, rtol=1e-12)
        assert abs(X_A[:, -1].mean()) < 1e-12
        assert np.std(X_A[:, -1], ddof=1) == pytest.approx(1.0, rel=1e-12)

    def test_covariates_and_intercept(self):
        Y = nb_counts(n=50, p=20)
        X0 = np.arange(100, dtype=float).reshape(50, 2)
        XA0 = pd.DataFrame({"z": np.linspace(0, 1, 50)})
        _, _, X, X_A = prep_causarray_data(Y, np.zeros(50), X0, XA0)
        assert X.shape == (50, 3) and X_A.shape == (50, 3)
        np.testing.assert_array_equal(X[:, 1:], X0)
        np.testing.assert_array_equal(X_A[:, 1], XA0["z"])
        # X_A defaults to X (before the intercept)
        _, _, X, X_A = prep_causarray_data(Y, np.zeros(50), X0)
        assert X_A.shape == (50, 4)
        np.testing.assert_array_equal(X_A[:, :3], X)
        # no intercept
        _, _, X, X_A = prep_causarray_data(Y, np.zeros(50), intercept=False)
        assert X.shape == (50, 0) and X_A.shape == (50, 1)

    def test_treatment_forms(self):
        Y = nb_counts(n=30, p=10)
        _, A, _, _ = prep_causarray_data(Y, np.r_[np.ones(10), np.zeros(20)])
        assert isinstance(A, np.ndarray) and A.shape == (30, 1) and A.dtype == np.float64
        _, A, _, _ = prep_causarray_data(Y, pd.Series(np.r_[np.ones(10), np.zeros(20)],
                                                       name="KO"))
        assert isinstance(A, pd.DataFrame) and list(A.columns) == ["KO"]

    def test_sparse_in_sparse_out_equals_dense(self):
        Y = nb_counts(n=80, p=30, seed=5)
        Y[3, 4] = 5000
        A = (np.arange(80) % 3 == 0).astype(int)
        dense = prep_causarray_data(Y, A)
        for fmt in ("csr", "csc"):
            out = prep_causarray_data(sp.csr_matrix(Y).asformat(fmt), A)
            assert isinstance(out[0], sp.csr_matrix)
            np.testing.assert_array_equal(out[0].toarray(), dense[0])
            for a, b in zip(out[1:], dense[1:]):
                np.testing.assert_allclose(a, b, rtol=1e-12)

    def test_input_not_modified(self):
        Y = nb_counts(n=40, p=15)
        Y[0, 0] = 10_000
        df = pd.DataFrame(Y.copy())
        S = sp.csr_matrix(Y)
        prep_causarray_data(Y, np.zeros(40))
        prep_causarray_data(df, np.zeros(40))
        prep_causarray_data(S, np.zeros(40))
        assert Y[0, 0] == 10_000 and df.iloc[0, 0] == 10_000 and S[0, 0] == 10_000

    def test_empty_cell_rejected(self):
        Y = nb_counts(n=20, p=8)
        Y[[3, 7]] = 0
        with pytest.raises(ValueError, match=re.escape(
                "Y has 2 cell(s) with zero total count, row indices [3, 7]; remove them "
                "first")):
            prep_causarray_data(Y, np.zeros(20))
        df = pd.DataFrame(Y, index=[f"cell{i}" for i in range(20)])
        with pytest.raises(ValueError, match=re.escape("names ['cell3', 'cell7']")):
            prep_causarray_data(df, np.zeros(20))

    def test_bad_inputs(self):
        Y = nb_counts(n=20, p=8).astype(float)
        with pytest.raises(ValueError, match=re.escape(
                "A has shape (19, 1) but Y has shape (20, 8): the numbers of rows (cells) "
                "must match")):
            prep_causarray_data(Y, np.zeros(19))
        with pytest.raises(ValueError, match=re.escape(
                "X has shape (21, 1) but Y has shape (20, 8)")):
            prep_causarray_data(Y, np.zeros(20), np.ones(21))
        with pytest.raises(ValueError, match="A must contain only 0/1 indicators"):
            prep_causarray_data(Y, np.full(20, 2))
        Y_nan = Y.copy()
        Y_nan[0, 0] = np.nan
        with pytest.raises(ValueError, match="Y contains NaN or infinite values"):
            prep_causarray_data(Y_nan, np.zeros(20))
        with pytest.raises(ValueError, match="Y must be a 2-D"):
            prep_causarray_data(Y[0], np.zeros(8))

    def test_non_integer_counts_rounded_with_warning(self):
        Y = nb_counts(n=20, p=8).astype(float) + 1
        Y[0, :3] += 0.25
        with pytest.warns(UserWarning, match="Y contains 3 non-integer entries; they were rounded"):
            Yc, *_ = prep_causarray_data(Y, np.zeros(20))
        np.testing.assert_array_equal(Yc, np.minimum(np.rint(Y), count_cap(np.rint(Y))))

    def test_equal_library_sizes_warn(self):
        with pytest.warns(UserWarning, match="all cells have the same library size"):
            *_, X_A = prep_causarray_data(np.ones((5, 4)), np.zeros(5))
        np.testing.assert_array_equal(X_A[:, -1], 0.0)


# ----------------------------------------------------------------------------- size factors
class TestSizeFactors:
    @pytest.mark.parametrize("min_genes", [10, 100, 1000])
    def test_matches_literal_spec(self, min_genes):
        Y = nb_counts()
        n_expressed = int((Y.mean(axis=0) >= 2).sum())
        assert 10 < n_expressed < 100  # both branches of step 1 are exercised
        s = comp_size_factor(Y, min_genes=min_genes)
        np.testing.assert_allclose(s, reference_size_factors(Y, min_genes=min_genes),
                                   rtol=1e-12)
        assert s.shape == (Y.shape[0],) and np.all(s > 0)
        assert np.mean(np.log(s)) == pytest.approx(0.0, abs=1e-12)

    def test_min_mean_zero_uses_all_expressed_genes(self):
        Y = nb_counts(seed=2)
        Y[:, 0] = 0  # a gene without counts is excluded
        np.testing.assert_allclose(comp_size_factor(Y, min_mean=0),
                                   reference_size_factors(Y, min_mean=0), rtol=1e-12)

    def test_tracks_depth(self):
        Y, depth = nb_counts(n=400, p=300, seed=4, return_depth=True)
        s = comp_size_factor(Y)
        assert np.corrcoef(np.log(s), np.log(depth))[0, 1] > 0.9

    def test_fallback_for_cells_without_counts_in_S(self):
        Y = nb_counts(seed=6)
        expressed = Y.mean(axis=0) >= 2
        Y = Y[:, np.argsort(~expressed, kind="stable")]  # expressed genes first
        k = int(expressed.sum())
        Y[:5, :k] = 0
        Y[:5, k:k + 3] = [1, 2, 1]  # counts only outside S
        s = comp_size_factor(Y, min_genes=10)
        ref = reference_size_factors(Y, min_genes=10)
        np.testing.assert_allclose(s, ref, rtol=1e-12)
        assert np.all(np.isfinite(s)) and np.all(s > 0)
        # s_i = exp(T_i + delta - mean L): same ratio to library size for the five cells
        ratio = s[:5] / Y[:5].sum(axis=1)
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)

    def test_empty_cell_gets_zero(self):
        Y = nb_counts(seed=7)
        Y[10] = 0
        s = comp_size_factor(Y)
        assert s[10] == 0.0
        np.testing.assert_allclose(s, reference_size_factors(Y), rtol=1e-12)
        assert np.mean(np.log(np.delete(s, 10))) == pytest.approx(0.0, abs=1e-12)

    @pytest.mark.parametrize("method", ["geomeans", "libsize", "scale"])
    def test_sparse_equals_dense_without_densifying(self, method, monkeypatch):
        Y = nb_counts(seed=8)
        Y[:3, :] = 0
        Y[:3, -1] = 1
        dense = comp_size_factor(Y, method=method, min_genes=10)

        def no_densify(self, *args, **kwargs):
            raise AssertionError("sparse matrix densified")

        S = sp.csr_matrix(Y)
        monkeypatch.setattr(sp.csr_matrix, "toarray", no_densify)
        monkeypatch.setattr(sp.csr_matrix, "todense", no_densify)
        sparse = comp_size_factor(S, method=method, min_genes=10)
        np.testing.assert_allclose(sparse, dense, rtol=1e-12)

    def test_libsize_and_scale(self):
        Y = nb_counts(seed=9)
        Y[0] = 0
        tot = Y.sum(axis=1).astype(float)
        gm = np.exp(np.mean(np.log(tot[1:])))
        np.testing.assert_allclose(comp_size_factor(Y, method="libsize"),
                                   np.r_[0.0, tot[1:] / gm], rtol=1e-12)
        np.testing.assert_allclose(comp_size_factor(Y, method="scale", lib_size=1e3),
                                   tot / 1e3, rtol=1e-12)

    def test_dataframe_and_float_input(self):
        Y = nb_counts(seed=10)
        s = comp_size_factor(Y)
        np.testing.assert_allclose(comp_size_factor(pd.DataFrame(Y)), s, rtol=1e-12)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # normalised (non-integer) input: no warning
            comp_size_factor(Y / 3.0)

    def test_bad_arguments(self):
        Y = nb_counts(n=10, p=5)
        with pytest.raises(ValueError, match=re.escape(
                "method must be 'geomeans', 'libsize' or 'scale'; got 'median'")):
            comp_size_factor(Y, method="median")
        with pytest.raises(ValueError, match="min_mean must be >= 0; got -1"):
            comp_size_factor(Y, min_mean=-1)
        with pytest.raises(ValueError, match="min_genes must be >= 1; got 0"):
            comp_size_factor(Y, min_genes=0)
        with pytest.raises(ValueError, match="lib_size must be positive; got 0"):
            comp_size_factor(Y, method="scale", lib_size=0)
        with pytest.raises(ValueError, match="counts contains negative values"):
            comp_size_factor(-Y)


# ----------------------------------------------------------------------------- from_anndata
class TestFromAnnData:
    def test_ci_dataset(self, ci_adata):
        Y, A, X, X_A = from_anndata(ci_adata)
        assert isinstance(Y, sp.csr_matrix) and Y.shape == (1500, 72)
        assert isinstance(A, pd.DataFrame) and list(A.columns) == CI_PERTS
        assert A.index.equals(ci_adata.obs_names)
        np.testing.assert_array_equal(A.sum(axis=0), 150.0)
        assert int((A.sum(axis=1) == 0).sum()) == 600
        ctrl = (ci_adata.obs["perturbation"] == "non-targeting").to_numpy()
        np.testing.assert_array_equal(A.sum(axis=1).to_numpy() == 0, ctrl)
        assert A.loc[ci_adata.obs["perturbation"] == "MYC", "MYC"].eq(1).all()
        assert X.shape == (1500, 1) and X_A.shape == (1500, 2)
        ref = prep_causarray_data(ci_adata.X, A)
        np.testing.assert_array_equal(Y.toarray(), ref[0].toarray())
        np.testing.assert_allclose(X_A, ref[3])

    def test_dataframe_output(self, ci_adata):
        Ys, _, _, XAs = from_anndata(ci_adata)
        Yd, _, _, XAd = from_anndata(ci_adata, as_dataframe=True)
        assert isinstance(Yd, pd.DataFrame)
        assert list(Yd.columns) == list(ci_adata.var_names)
        assert Yd.index.equals(ci_adata.obs_names)
        np.testing.assert_array_equal(Yd.to_numpy(), Ys.toarray())
        np.testing.assert_allclose(XAd, XAs)
        # dense storage gives a DataFrame by default
        ci_adata.X = ci_adata.X.toarray()
        Y3, *_ = from_anndata(ci_adata)
        assert isinstance(Y3, pd.DataFrame)

    def test_explicit_keys_and_layer(self, ci_adata):
        ci_adata.layers["counts"] = ci_adata.X.copy()
        ci_adata.X = ci_adata.X * 0
        del ci_adata.uns["pert_col"], ci_adata.uns["ctrl_label"]
        Y, A, _, _ = from_anndata(ci_adata, pert_col="perturbation",
                                  ctrl_label="non-targeting", layer="counts")
        assert A.shape == (1500, 6) and Y.nnz > 0
        _, A2, _, _ = from_anndata(ci_adata, pert_col="perturbation", ctrl_label="CPQ",
                                    layer="counts")
        assert "CPQ" not in A2.columns and "non-targeting" in A2.columns

    def test_covariates(self, ci_adata):
        rng = np.random.default_rng(0)
        ci_adata.obs["depth"] = rng.normal(size=1500)
        ci_adata.obs["lane"] = pd.Categorical(np.array(["L1", "L2", "L3"])[np.arange(1500) % 3],
                                              categories=["L1", "L2", "L3", "unused"])
        ci_adata.obs["donor"] = np.array(["d2", "d1"])[np.arange(1500) % 2]
        design = covariate_design(ci_adata.obs, ["depth", "lane", "donor", "batch"])
        assert list(design.columns) == ["depth", "lane_L2", "lane_L3", "donor_d2"]
        _, _, X, X_A = from_anndata(ci_adata, covariates=["depth", "lane", "donor"])
        assert X.shape == (1500, 5) and X_A.shape == (1500, 6)
        np.testing.assert_array_equal(X[:, 1], ci_adata.obs["depth"])
        np.testing.assert_array_equal(X[:, 2], (ci_adata.obs["lane"] == "L2").astype(float))
        np.testing.assert_array_equal(X[:, 4], (ci_adata.obs["donor"] == "d2").astype(float))
        np.testing.assert_array_equal(X_A[:, :5], X)
        _, _, X1, _ = from_anndata(ci_adata, covariates="depth")
        assert X1.shape == (1500, 2)

    def test_errors(self, ci_adata):
        with pytest.raises(ValueError, match=re.escape(
                "obs has no column 'guide'; available columns: ['guide_id', 'perturbation'")):
            from_anndata(ci_adata, pert_col="guide")
        with pytest.raises(ValueError, match=re.escape(
                "control label 'control' not found in obs['perturbation']; available labels: "
                "['CPQ', 'DSCC1', 'FAM83A', 'HS2', 'MYC', 'RIPK2', 'non-targeting']")):
            from_anndata(ci_adata, ctrl_label="control")
        with pytest.raises(ValueError, match=re.escape(
                "adata has no layer 'counts'; available layers: []")):
            from_anndata(ci_adata, layer="counts")
        with pytest.raises(ValueError, match=re.escape(
                "covariate column(s) ['age'] not in obs; available columns:")):
            from_anndata(ci_adata, covariates=["age"])
        ci_adata.obs["cov"] = np.where(np.arange(1500) == 3, np.nan, 1.0)
        with pytest.raises(ValueError, match="covariate 'cov' has 1 missing values"):
            from_anndata(ci_adata, covariates=["cov"])
        del ci_adata.uns["pert_col"]
        with pytest.raises(ValueError, match=re.escape(
                "pert_col was not given and adata.uns has no 'pert_col' entry")):
            from_anndata(ci_adata)

    def test_only_controls(self, ci_adata):
        with pytest.raises(ValueError, match="holds only the control label"):
            from_anndata(ci_adata[ci_adata.obs["perturbation"] == "non-targeting"].copy())

    def test_empty_cells(self, ci_adata):
        X = ci_adata.X.tolil()
        X[[4, 9], :] = 0
        ci_adata.X = X.tocsr()
        name4 = ci_adata.obs_names[4]
        with pytest.raises(ValueError, match=re.escape(
                f"2 cell(s) have zero total count, e.g. ['{name4}'")):
            from_anndata(ci_adata)
        with pytest.warns(UserWarning, match="dropping 2 cells with zero total count"):
            Y, A, X, X_A = from_anndata(ci_adata, drop_empty_cells=True)
        assert Y.shape == (1498, 72) and A.shape == (1498, 6) and X_A.shape == (1498, 2)
        assert name4 not in A.index


# ----------------------------------------------------------------------------- subset_screen
class TestSubsetScreen:
    @pytest.fixture
    def uneven(self, ci_adata):
        labels = ci_adata.obs["perturbation"].to_numpy()
        drop = np.zeros(1500, dtype=bool)
        drop[np.flatnonzero(labels == "MYC")[:50]] = True
        drop[np.flatnonzero(labels == "HS2")[:20]] = True
        return ci_adata[~drop].copy()  # HS2 130, MYC 100, others 150

    def test_counts(self, uneven):
        out = subset_screen(uneven, n_perts=5, n_ctrl=100)
        vc = out.obs["perturbation"].value_counts()
        assert out.n_obs == 4 * 150 + 130 + 100
        assert vc["non-targeting"] == 100 and vc["HS2"] == 130
        assert "MYC" not in out.obs["perturbation"].cat.categories
        assert not out.is_view and out.n_vars == 72
        assert set(out.uns.keys()) == set(uneven.uns.keys())
        assert uneven.n_obs == 1500 - 70  # input untouched

    def test_controls_are_a_reproducible_sample(self, uneven):
        ctrl = set(uneven.obs_names[uneven.obs["perturbation"] == "non-targeting"])
        a = subset_screen(uneven, n_perts=1, n_ctrl=50, random_state=1)
        b = subset_screen(uneven, n_perts=1, n_ctrl=50, random_state=1)
        c = subset_screen(uneven, n_perts=1, n_ctrl=50, random_state=2)

        def names(ad):
            return set(ad.obs_names[ad.obs["perturbation"] == "non-targeting"])

        assert names(a) == names(b) and names(a) != names(c)
        assert names(a) <= ctrl and len(names(a)) == 50
        # cells keep their original order
        pos = uneven.obs_names.get_indexer(a.obs_names)
        assert np.all(np.diff(pos) > 0)

    def test_ties_broken_by_name_and_all_controls(self, ci_adata):
        out = subset_screen(ci_adata, n_perts=2, n_ctrl=10_000)
        vc = out.obs["perturbation"].value_counts()
        assert set(vc.index) == {"CPQ", "DSCC1", "non-targeting"}
        assert vc["non-targeting"] == 600
        out = subset_screen(ci_adata, n_perts=None, n_ctrl=None)
        assert out.n_obs == 1500

    def test_bad_arguments(self, ci_adata):
        with pytest.raises(ValueError, match="n_perts must be >= 1 or None; got 0"):
            subset_screen(ci_adata, n_perts=0)
        with pytest.raises(ValueError, match="n_ctrl must be >= 0 or None; got -1"):
            subset_screen(ci_adata, n_ctrl=-1)
        with pytest.raises(ValueError, match="control label 'ctrl' not found"):
            subset_screen(ci_adata, ctrl_label="ctrl")


def test_size_factors_against_a_reference_put_new_cells_on_its_scale():
    """The reference's own cells get exactly comp_size_factor's factors; a new cell whose
    counts are a reference cell's times 3 gets 3 times its factor; a cell with no count
    in the reference genes falls back to its library size shifted as in the reference."""
    from causarray.preprocessing import (
        comp_size_factor,
        size_factor_reference,
        size_factors_against,
    )

    rng = np.random.default_rng(0)
    Y = rng.poisson(rng.gamma(2.0, 2.0, size=(1, 300)) * rng.uniform(0.5, 2, (80, 1)))
    s_ref, ref = size_factor_reference(Y)
    np.testing.assert_array_equal(s_ref, comp_size_factor(Y))
    np.testing.assert_array_equal(size_factors_against(Y, ref), s_ref)
    new = np.vstack([3 * Y[:5], np.zeros((1, 300))])
    new[5, np.setdiff1d(np.arange(300), ref.S)[:1]] = 7          # no count in S
    s_new = size_factors_against(sp.csr_matrix(new), ref)
    # log 3 added to every log ratio: the medians move by exactly log 3 (float64 rounding)
    np.testing.assert_allclose(s_new[:5], 3 * s_ref[:5], rtol=1e-12)
    assert s_new[5] == pytest.approx(np.exp(np.log(7.0) + ref.delta - ref.mean_L), rel=1e-12)
