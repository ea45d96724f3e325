"""Shared input checks (causarray._validation)."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from causarray._validation import (
    as_count_matrix,
    check_covariates,
    check_min_cells_per_treatment,
    check_no_empty_cells,
    check_no_empty_genes,
    check_treatment,
    col_sums,
    row_sums,
)


@pytest.fixture
def counts():
    rng = np.random.default_rng(1)
    return rng.poisson(2.0, size=(12, 5)).astype(np.int64) + 1


# ----------------------------------------------------------------------------- as_count_matrix
class TestAsCountMatrix:
    def test_dense_passthrough_keeps_dtype_and_no_names(self, counts):
        Y, names = as_count_matrix(counts)
        assert names is None
        assert Y.dtype == np.int64
        np.testing.assert_array_equal(Y, counts)

    def test_dataframe_gives_gene_names(self, counts):
        df = pd.DataFrame(counts, columns=[f"g{j}" for j in range(5)])
        Y, names = as_count_matrix(df)
        assert isinstance(Y, np.ndarray)
        assert list(names) == ["g0", "g1", "g2", "g3", "g4"]
        np.testing.assert_array_equal(Y, counts)

    @pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
    def test_sparse_becomes_csr(self, counts, fmt):
        Y, names = as_count_matrix(sp.random(30, 8, density=0.3, format=fmt, random_state=0,
                                             data_rvs=lambda k: np.arange(1, k + 1)))
        assert isinstance(Y, sp.csr_matrix)
        assert names is None

    def test_sparse_dataframe_becomes_csr(self, counts):
        df = pd.DataFrame.sparse.from_spmatrix(sp.csr_matrix(counts.astype(float)),
                                               columns=list("abcde"))
        Y, names = as_count_matrix(df)
        assert sp.issparse(Y)
        np.testing.assert_array_equal(Y.toarray(), counts)
        assert list(names) == list("abcde")

    def test_bool_becomes_integer(self):
        Y, _ = as_count_matrix(np.array([[True, False], [True, True]]))
        assert np.issubdtype(Y.dtype, np.integer)

    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    def test_nan_inf_dense(self, counts, bad):
        Y = counts.astype(float)
        Y[2, 3] = bad
        Y[0, 0] = bad
        with pytest.raises(ValueError, match=re.escape(
                "Y contains NaN or infinite values (2 entries); remove or impute them")):
            as_count_matrix(Y)

    def test_nan_sparse_uses_name(self, counts):
        Y = sp.csr_matrix(counts.astype(float))
        Y.data[0] = np.nan
        with pytest.raises(ValueError, match=re.escape(
                "counts contains NaN or infinite values (1 entries)")):
            as_count_matrix(Y, name="counts")

    def test_negative(self, counts):
        Y = counts.copy()
        Y[1, 1] = -3
        with pytest.raises(ValueError, match=re.escape(
                "Y contains negative values (1 entries, minimum -3); counts must be "
                "non-negative")):
            as_count_matrix(Y)
        with pytest.raises(ValueError, match="Y contains negative values"):
            as_count_matrix(sp.csr_matrix(Y.astype(float)))

    @pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
    def test_wrong_ndim(self, shape):
        with pytest.raises(ValueError, match=re.escape(
                f"Y must be a 2-D (cells x genes) matrix; got {len(shape)}-D input of shape "
                f"{shape}")):
            as_count_matrix(np.ones(shape))

    def test_empty_shape(self):
        with pytest.raises(ValueError, match=re.escape(
                "Y has shape (0, 4); it needs at least one cell and one gene")):
            as_count_matrix(np.ones((0, 4)))

    def test_non_numeric(self):
        with pytest.raises(TypeError, match="Y must hold numeric counts; got dtype <U1"):
            as_count_matrix(np.array([["a", "b"], ["c", "d"]]))
        df = pd.DataFrame({"g1": [1, 2], "g2": ["x", "y"]})
        with pytest.raises(TypeError, match=re.escape("Y must be numeric; non-numeric columns: "
                                                      "['g2']")):
            as_count_matrix(df)

    def test_anndata_rejected(self, ci_adata):
        with pytest.raises(TypeError, match="Y is an AnnData object; .*from_anndata"):
            as_count_matrix(ci_adata)

    def test_non_integer_rounded_with_count_in_warning(self, counts):
        Y = counts.astype(float)
        Y[0, 0] += 0.4
        Y[3, 2] += 0.6
        Y[4, 4] = 2.5  # half to even -> 2
        orig = Y.copy()
        with pytest.warns(UserWarning, match=re.escape(
                "Y contains 3 non-integer entries; they were rounded to the nearest integer")):
            out, _ = as_count_matrix(Y)
        np.testing.assert_array_equal(out, np.rint(orig))
        assert out[4, 4] == 2.0
        np.testing.assert_array_equal(Y, orig)  # input untouched

    def test_non_integer_sparse_rounded(self, counts):
        Y = sp.csr_matrix(counts.astype(float))
        Y.data[:2] += 0.3
        with pytest.warns(UserWarning, match="Y contains 2 non-integer entries"):
            out, _ = as_count_matrix(Y)
        np.testing.assert_array_equal(out.toarray(), counts)
        assert Y.data[0] % 1 != 0  # input untouched

    def test_non_integer_ignore_and_raise(self, counts):
        Y = counts.astype(float) + 0.5
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, _ = as_count_matrix(Y, non_integer="ignore")
        np.testing.assert_array_equal(out, Y)
        with pytest.raises(ValueError, match=re.escape(
                "Y contains 60 non-integer entries; raw integer counts are required")):
            as_count_matrix(Y, non_integer="raise")
        with pytest.raises(ValueError, match="non_integer must be 'round', 'ignore' or 'raise'"):
            as_count_matrix(Y, non_integer="floor")

    def test_large_dense_scan_in_blocks(self, monkeypatch):
        import causarray._validation as v

        monkeypatch.setattr(v, "_BLOCK_ENTRIES", 7)
        Y = np.ones((40, 3))
        Y[39, 2] = 0.5
        with pytest.warns(UserWarning, match="Y contains 1 non-integer entries"):
            as_count_matrix(Y)
        Y[38, 0] = np.nan
        with pytest.raises(ValueError, match=r"NaN or infinite values \(1 entries\)"):
            as_count_matrix(Y)


# ----------------------------------------------------------------------------- treatment
class TestCheckTreatment:
    def test_vector_becomes_column_and_dataframe_names(self):
        A, names = check_treatment(np.array([0, 1, 1, 0]), 4)
        assert A.shape == (4, 1) and A.dtype == np.float64 and names is None
        df = pd.DataFrame({"KO1": [True, False, False], "KO2": [False, True, False]})
        A, names = check_treatment(df, 3)
        assert list(names) == ["KO1", "KO2"]
        np.testing.assert_array_equal(A, [[1, 0], [0, 1], [0, 0]])

    def test_series_name(self):
        A, names = check_treatment(pd.Series([0, 1, 1], name="trt"), 3)
        assert A.shape == (3, 1) and list(names) == ["trt"]

    def test_shape_mismatch_names_both_shapes(self):
        with pytest.raises(ValueError, match=re.escape(
                "A has shape (4, 2) but Y has shape (5, 10): the numbers of rows (cells) "
                "must match")):
            check_treatment(np.zeros((4, 2)), (5, 10))
        with pytest.raises(ValueError, match=re.escape(
                "A has shape (4, 1) but 5 cells were expected")):
            check_treatment(np.zeros(4), 5)

    def test_non_binary(self):
        with pytest.raises(ValueError, match=re.escape(
                "A must contain only 0/1 indicators; found other values: [0.5, 2]")):
            check_treatment(np.array([[0, 1], [2, 0.5], [1, 1]]), 3)

    def test_nan_ndim_none_and_no_columns(self):
        with pytest.raises(ValueError, match="A contains NaN or infinite values"):
            check_treatment(np.array([0, np.nan, 1]), 3)
        with pytest.raises(ValueError, match=re.escape(
                "A must be a 2-D (cells x treatments) matrix or a 1-D vector; got 3-D")):
            check_treatment(np.zeros((3, 1, 1)), 3)
        with pytest.raises(TypeError, match="A .the treatment matrix. is required; got None"):
            check_treatment(None, 3)
        with pytest.raises(ValueError, match=re.escape(
                "A has shape (3, 0): it has no treatment columns")):
            check_treatment(np.zeros((3, 0)), 3)
        with pytest.raises(TypeError, match="A must be numeric; non-numeric columns: .'g'."):
            check_treatment(pd.DataFrame({"g": ["a", "b", "c"]}), 3)


# ----------------------------------------------------------------------------- covariates
class TestCheckCovariates:
    def test_none_gives_empty_design(self):
        X, names = check_covariates(None, 7)
        assert X.shape == (7, 0) and names is None

    def test_dataframe_with_bool_and_int(self):
        df = pd.DataFrame({"age": [1, 2, 3], "male": [True, False, True]})
        X, names = check_covariates(df, 3)
        assert X.dtype == np.float64 and list(names) == ["age", "male"]
        np.testing.assert_array_equal(X, [[1, 1], [2, 0], [3, 1]])

    def test_errors(self):
        with pytest.raises(ValueError, match=re.escape(
                "X_A has shape (3, 1) but Y has shape (4, 2): the numbers of rows")):
            check_covariates(np.ones(3), (4, 2), name="X_A")
        with pytest.raises(ValueError, match=re.escape(
                "X contains NaN or infinite values (1 entries)")):
            check_covariates(np.array([[1.0], [np.inf]]), 2)
        with pytest.raises(TypeError, match=re.escape(
                "X must be numeric; non-numeric columns: ['batch']")):
            check_covariates(pd.DataFrame({"batch": ["a", "b"]}), 2)


# ----------------------------------------------------------------------------- emptiness
class TestEmpty:
    def test_sums_dense_equal_sparse(self, counts):
        np.testing.assert_array_equal(row_sums(counts), row_sums(sp.csr_matrix(counts)))
        np.testing.assert_array_equal(col_sums(counts), col_sums(sp.csr_matrix(counts)))
        assert row_sums(counts).dtype == np.float64

    @pytest.mark.parametrize("sparse", [False, True])
    def test_empty_genes(self, counts, sparse):
        Y = counts.copy()
        Y[:, [1, 3]] = 0
        Y = sp.csr_matrix(Y) if sparse else Y
        with pytest.raises(ValueError, match=re.escape(
                "Y has 2 gene(s) with no non-zero count (non-expressed features), column "
                "indices [1, 3]; remove them before fitting")):
            check_no_empty_genes(Y)
        with pytest.raises(ValueError, match=re.escape("names ['g1', 'g3']")):
            check_no_empty_genes(Y, gene_names=[f"g{j}" for j in range(5)])
        check_no_empty_genes(counts)  # passes

    @pytest.mark.parametrize("sparse", [False, True])
    def test_empty_cells_lists_first_five(self, counts, sparse):
        Y = counts.copy()
        Y[[0, 2, 4, 6, 8, 10, 11]] = 0
        Y = sp.csr_matrix(Y) if sparse else Y
        with pytest.raises(ValueError, match=re.escape(
                "Y has 7 cell(s) with zero total count, row indices [0, 2, 4, 6, 8, ...]; "
                "remove them first")):
            check_no_empty_cells(Y)
        check_no_empty_cells(counts)


class TestMinCells:
    def test_treatments_and_controls(self):
        A = pd.DataFrame({"a": [1, 1, 1, 0, 0, 0, 0], "b": [0, 0, 0, 1, 0, 0, 0]})
        with pytest.raises(ValueError, match=re.escape(
                "1 treatment(s) have fewer than 2 treated cells: b (1)")):
            check_min_cells_per_treatment(A, 2)
        check_min_cells_per_treatment(A, 1)
        with pytest.raises(ValueError, match=re.escape(
                "only 1 control cells (rows of A with no treatment); at least 3 are needed")):
            check_min_cells_per_treatment(A.assign(b=[0, 0, 0, 1, 1, 1, 0]), 3)
        check_min_cells_per_treatment(A.assign(b=[0, 0, 0, 1, 1, 1, 0]), 3,
                                      check_controls=False)

    def test_unnamed_columns_reported_by_index(self):
        with pytest.raises(ValueError, match=re.escape(
                "2 treatment(s) have fewer than 5 treated cells: 0 (1), 1 (0)")):
            check_min_cells_per_treatment(np.array([[1, 0], [0, 0]]), 5)
