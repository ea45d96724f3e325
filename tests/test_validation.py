"""Shared input checks (causarray._validation)."""
from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import causarray._validation as V
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


# ----------------------------------------------------------------------------- one case per rule
def _screen():
    """A 4-cell AnnData screen: two control cells ('NT') and perturbations P1, P2."""
    import anndata as ad

    return ad.AnnData(X=np.ones((4, 3)),
                      obs=pd.DataFrame({"gene": ["NT", "NT", "P1", "P2"]},
                                       index=[f"c{i}" for i in range(4)]))


def _rule(func, call, exc, message):
    """One rule: ``call()`` raises ``exc`` with exactly ``message``; ``func`` names the rule."""
    return pytest.param(call, exc, message, id=func.__name__)


_T, _C = V.refit_resolver(["t"], 1, "treatment"), V.refit_resolver(["c"], 1, "covariate")

RULES = [
    # guides (high-MOI screens)
    _rule(V.check_control, lambda: V.check_control("others"), ValueError,
          "control must be 'non-targeting' (cells without any perturbation) or 'complement' "
          "(cells without the perturbation: high MOI), got 'others'"),
    _rule(V.check_no_mask_with_complement,
          lambda: V.check_no_mask_with_complement(np.ones((2, 1), bool)), ValueError,
          "lfc_kwargs['mask'] cannot be combined with control='complement', which sets each "
          "perturbation's comparison cells itself"),
    _rule(V.check_guide_source, lambda: V.check_guide_source(3), TypeError,
          "guides must be 'feature_types', 'obsm:KEY', an AnnData of guide counts (cells x "
          "guides) or the path of such an .h5ad file; got 3"),
    _rule(V.check_guide_feature_types,
          lambda: V.check_guide_feature_types(np.array(["Gene Expression"]),
                                              "CRISPR Guide Capture"), ValueError,
          "guides='feature_types': adata.var['feature_types'] has no 'CRISPR Guide Capture' "
          "feature"),
    _rule(V.check_obsm_key, lambda: V.check_obsm_key(_screen(), "grna"), ValueError,
          "guides='obsm:grna': adata.obsm has no key 'grna'; available: []"),
    _rule(V.check_guide_cells,
          lambda: V.check_guide_cells(np.array(["c0", "c1"]), np.array(["c0", "c9"])),
          ValueError, "guides: the guide matrix's cells do not match the expression cells: "
          "1 of 2 expression cells are not in it (first: ['c9'])"),
    _rule(V.check_guide_count_values,
          lambda: V.check_guide_count_values(np.array([1.0, 2.5])), ValueError,
          "guides: guide counts must be integer UMI counts; found non-integer values (pass "
          "the raw guide UMI matrix)"),
    _rule(V.check_guide_targets_complete,
          lambda: V.check_guide_targets_complete(np.array(["g1"], dtype=object)), ValueError,
          "guide_targets: 1 guide(s) have no target: ['g1']; give a guide-target table that "
          "lists every guide"),
    _rule(V.check_guide_target_table, lambda: V.check_guide_target_table(["name", "gene"]),
          ValueError, "guide_targets: the table needs columns 'guide,target' (or 'grna_id,"
          "grna_target', or Cell Ranger's 'id,target_gene_name'); got ['name', 'gene']"),
    _rule(V.check_guide_threshold, lambda: V.check_guide_threshold(0), ValueError,
          "guide_threshold must be a positive integer number of UMIs, got 0"),
    _rule(V.check_nt_label, lambda: V.check_nt_label(""), ValueError,
          "nt_label must be a non-empty string, got ''"),
    _rule(V.check_nt_guide_tests, lambda: V.check_nt_guide_tests("yes"), ValueError,
          "nt_guide_tests must be True, False or 'required', got 'yes'"),
    _rule(V.check_nt_guides, lambda: V.check_nt_guides(0, "NT"), ValueError,
          "nt_label: no guide targets 'NT', and the calibration needs non-targeting guides; "
          "set nt_label to their target label, or switch the calibration off"),
    _rule(V.check_pairs, lambda: V.check_pairs(pd.DataFrame({"target": ["t"]})), ValueError,
          "pairs: the table needs columns 'target' and 'gene'; got ['target']"),
    _rule(V.check_test_targets, lambda: V.check_test_targets("A,Z", ["A", "B"]), ValueError,
          "test_targets: 1 name(s) are not targets of the screen: ['Z']"),
    _rule(V.check_donor_design, lambda: V.check_donor_design(
        pd.Series([1, 1, 1], index=["a", "b", "c"]),
        pd.Series(["ctrl", "ctrl", "case"], index=["a", "b", "c"]), "ctrl", "donor",
        "status"), ValueError,
          "condition_key: each arm needs at least 2 donors; donors per condition: "
          "{'ctrl': 2, 'case': 1}"),
    _rule(V.check_donor_covariates_constant, lambda: V.check_donor_covariates_constant(
        pd.Series([1, 2], index=["a", "b"]), "age", "donor"), ValueError,
          "covariates: 'age' varies within 1 donor(s) of obs['donor'] (['b']); the donor "
          "route takes donor-level covariates only"),
    _rule(V.check_donor_route, lambda: V.check_donor_route("status", None, None), ValueError,
          "the donor route needs condition_key, control_condition and donor_key; missing: "
          "control_condition, donor_key"),
    _rule(V.check_donor_factors, lambda: V.check_donor_factors(False, "res/cache.h5"),
          ValueError, "the donor route's jackknife needs every donor's latent factors, "
          "which one batch of all conditions and donors provides; a cache written by an "
          "older causarray "
          "('res/cache.h5') does not hold them: delete it or pass another cache_path "
          "(--overwrite on the command line)"),
    _rule(V.check_cis_inputs, lambda: V.check_cis_inputs(False, True), ValueError,
          "pairs='cis' needs gene positions (var['chr'], var['tss'] or gene_positions=)"),
    # options
    _rule(V.check_choice, lambda: V.check_choice(
        "method", "m", ("geomeans", "libsize", "scale"), sep="; got"), ValueError,
        "method must be 'geomeans', 'libsize' or 'scale'; got 'm'"),
    _rule(V.check_one_of, lambda: V.check_one_of("backend", "x", ("auto", "fast")), ValueError,
          "backend must be one of ('auto', 'fast'), got 'x'"),
    _rule(V.check_family, lambda: V.check_family("gaussian"), ValueError,
          "family must be 'nb' or 'poisson', got 'gaussian'"),
    _rule(V.check_assignment, lambda: V.check_assignment("random"), ValueError,
          "assignment must be 'randomized' (CRISPR screens) or 'observational' "
          "(case-control studies), got 'random'"),
    _rule(V.check_positive_int, lambda: V.check_positive_int("n_ctrl", True, allow_none=True),
          ValueError, "n_ctrl must be a positive integer or None, got True"),
    _rule(V.check_all_at_least_one, lambda: V.check_all_at_least_one(n_ctrl=1, n_perts=0),
          ValueError, "n_ctrl and n_perts must all be >= 1"),
    _rule(V.check_nonnegative_int, lambda: V.check_nonnegative_int("seed", -1), ValueError,
          "seed must be a non-negative integer, got -1"),
    _rule(V.check_r, lambda: V.check_r(2.0), ValueError,
          "r must be a non-negative integer (0: no latent factors), got 2.0"),
    _rule(V.check_r_grid, lambda: V.check_r_grid([0, -1]), ValueError,
          "r_max must contain at least one positive number of factors"),
    _rule(V.check_open_unit, lambda: V.check_open_unit("shift_level", 1.0), ValueError,
          "shift_level must be in (0, 1), got 1.0"),
    _rule(V.check_positive, lambda: V.check_positive("lib_size", 0), ValueError,
          "lib_size must be positive; got 0"),
    _rule(V.check_at_least, lambda: V.check_at_least("n_ctrl", -1, 0, integer=True,
                                                     allow_none=True), ValueError,
          "n_ctrl must be >= 0 or None; got -1"),
    _rule(V.parse_memory, lambda: V.parse_memory("2 parsecs"), ValueError,
          "memory_budget must be a size such as '2GB' or '512MB', got '2 parsecs'"),
    _rule(V.check_not_both, lambda: V.check_not_both(True, "class_weight", "ps_class_weight"),
          TypeError, "pass 'ps_class_weight' only ('class_weight' is its deprecated alias)"),
    _rule(V.check_removed_keywords, lambda: V.check_removed_keywords(
        {"clip_pseudo_outcomes": True}), TypeError,
        "clip_pseudo_outcomes was removed: AIPW pseudo-outcomes are never clipped"),
    # shapes
    _rule(V.check_matrix_2d, lambda: V.check_matrix_2d(np.ones(3), "Y", "genes"), ValueError,
          "Y must be 2-D (cells x genes), got shape (3,)"),
    _rule(V.check_rows, lambda: V.check_rows(np.ones((2, 1)), 3, "X"), ValueError,
          "X has 2 rows but Y has 3 cells"),
    _rule(V.check_rows_2d, lambda: V.check_rows_2d(np.ones((2, 1)), 3, "W"), ValueError,
          "W must be 2-D with 3 rows (one per cell), got shape (2, 1)"),
    _rule(V.check_offset, lambda: V.check_offset(np.ones(2), 3), ValueError,
          "offset has length 2 but Y has 3 cells"),
    _rule(V.check_row_indices, lambda: V.check_row_indices(np.array([0.5]), "ctrl_idx"),
          ValueError, "ctrl_idx must be a 1-D array of integer row indices"),
    _rule(V.check_shape, lambda: V.check_shape("init", np.ones((2, 2)), (2, 3)), ValueError,
          "init must have shape (2, 3), got (2, 2)"),
    _rule(V.check_finite, lambda: V.check_finite(sp.csr_matrix(np.array([[1.0, np.nan]])), "A"),
          ValueError, "A contains NaN or infinite values"),
    _rule(V.check_size_factors, lambda: V.check_size_factors(np.array([1.0, 0.0]), 2),
          ValueError, "size factors must be finite, positive and one per cell (a cell with no "
          "counts has size factor 0: remove empty cells)"),
    _rule(V.check_mask_shape, lambda: V.check_mask_shape(np.ones((2, 1), bool), (2, 2)),
          ValueError, "mask must have the shape of A (2, 2), got (2, 1)"),
    _rule(V.check_1d, lambda: V.check_1d(np.ones((2, 2)), "stat"), ValueError,
          "stat must be 1-D, got shape (2, 2)"),
    _rule(V.check_same_shape, lambda: V.check_same_shape("tau", np.ones(2), (3,)), ValueError,
          "tau has shape (2,), expected (3,)"),
    _rule(V.as_float_array, lambda: V.as_float_array(object(), "stat"), TypeError,
          "stat must be numeric, got object"),
    # counts and the count model
    _rule(V.check_count_flags, lambda: V.check_count_flags(True, True), ValueError,
          "Y contains negative counts"),
    _rule(V.check_count_values, lambda: V.check_count_values(np.array([[1.0, np.inf]])),
          ValueError, "Y contains NaN or infinite values"),
    _rule(V.check_counts_scan, lambda: V.check_counts_scan(SimpleNamespace(
        dtype=np.dtype(float), n_bad=0, n_neg=0, vmin=0.0, n_frac=3), "Y", "raise"), ValueError,
        "Y does not hold raw counts: 3 non-integer entries (log-normalised data?); pass the "
        "layer with raw UMI counts"),
    _rule(V.check_raw_counts, lambda: V.check_raw_counts(np.array([[1.0, -2.0]])), ValueError,
          "adata.X has negative values (minimum -2); causarray needs raw counts, not "
          "normalised or scaled data"),
    _rule(V.check_genes_expressed, lambda: V.check_genes_expressed(np.array([1, 0, 2, 0])),
          ValueError, "Y has 2 gene(s) with no counts (e.g. columns [1, 3]); remove genes "
          "with no counts before fitting"),
    _rule(V.check_nb_alpha, lambda: V.check_nb_alpha(np.array([-1.0])), ValueError,
          "size must be positive (np.inf for Poisson)"),
    _rule(V.check_nb_size, lambda: V.check_nb_size(np.array([0.0])), ValueError,
          "disp_glm must be positive and finite (one NB size per gene)"),
    _rule(V.check_r_estimable, lambda: V.check_r_estimable(5, 10, 8, 3), ValueError,
          "r = 5 is too large: at most 4 latent factors can be estimated from 10 cells x 8 "
          "genes with 3 observed columns"),
    _rule(V.check_design_rank, lambda: V.check_design_rank(np.ones((5, 2))), ValueError,
          "the observed design [X | A] is (nearly) singular: check for duplicated or "
          "constant columns besides the intercept"),
    # treatments
    _rule(V.check_zero_one, lambda: V.check_zero_one(np.array([[0.5]]), for_lfc=True),
          ValueError, "A must contain only 0/1 treatment indicators: LFC estimates the "
          "contrast of treated and control arms, so a continuous treatment (dose, guide UMI) "
          "must be binarised first, e.g. (A > 0); fit_gcate accepts it continuous"),
    _rule(V.check_treatments_have_cells, lambda: V.check_treatments_have_cells(
        np.array([[1, 0], [0, 0]])), ValueError, "treatment column(s) [1] of A have no cells"),
    _rule(V.check_ps_treatments, lambda: V.check_ps_treatments(np.array([[0, 2]])), ValueError,
          "A must be binary (0/1)"),
    _rule(V.check_unique_treatment_names, lambda: V.check_unique_treatment_names(["a", "a"]),
          ValueError, "treatment names (columns of A) must be unique"),
    _rule(V.check_control_pool, lambda: V.check_control_pool(0), ValueError,
          "A has no control cells (all-zero rows); the batch pipeline compares every "
          "perturbation with a shared pool of control cells"),
    _rule(V.check_has_controls, lambda: V.check_has_controls(np.array([False])), ValueError,
          "A has no control cells (rows with all zeros)"),
    _rule(V.check_has_treated, lambda: V.check_has_treated(np.array([False]), "P1"),
          ValueError, "treatment 'P1' has no treated cells"),
    _rule(V.check_arms, lambda: V.check_arms(np.array([1.0, 1.0]), "P1",
                                             " in the training set of fold 0"), ValueError,
          "treatment 'P1' has no control cells in the training set of fold 0"),
    _rule(V.check_both_groups, lambda: V.check_both_groups(np.ones((3, 1))), ValueError,
          "fit_glm_ondisk needs both control and perturbed cells after dropping empty cells"),
    # AnnData keys and cells
    _rule(V.resolve_screen_keys, lambda: V.resolve_screen_keys(_screen(), "gene", "ctrl"),
          ValueError, "control label 'ctrl' not found in obs['gene']; available labels: "
          "['NT', 'P1', 'P2']"),
    _rule(V.check_layer, lambda: V.check_layer("counts", ["raw"]), ValueError,
          "adata has no layer 'counts'; available layers: ['raw']"),
    _rule(V.check_x_present, lambda: V.check_x_present(None), ValueError,
          "adata.X is empty (None); pass layer=<name of the counts layer>"),
    _rule(V.check_has_perturbed, lambda: V.check_has_perturbed(False, "gene", "NT"), ValueError,
          "obs['gene'] holds only the control label 'NT'; there are no perturbed cells"),
    _rule(V.check_cells_nonempty, lambda: V.check_cells_nonempty(
        np.array([False, True]), ["c0", "c1"]), ValueError,
        "1 cell(s) have zero total count, e.g. ['c1']; remove them or pass "
        "drop_empty_cells=True"),
    _rule(V.check_copy_in_memory, lambda: V.check_copy_in_memory(True), ValueError,
          "copy=True needs an in-memory AnnData; with backed='r' the results are stored in "
          "adata.uns of the backed object (use copy=False)"),
    _rule(V.check_obs_columns, lambda: V.check_obs_columns(
        pd.DataFrame({"a": [1.0, None]}), ["a"]), ValueError, "covariate 'a' has 1 missing values"),
    _rule(V.check_obs_column, lambda: V.check_obs_column(
        "perturbation_col", "x", pd.DataFrame({"gene": [1]})), ValueError,
        "perturbation_col 'x' is not a column of obs (columns: ['gene'])"),
    _rule(V.check_label_occurs, lambda: V.check_label_occurs(
        "control_label", "NT", np.array(["a"]), "gene"), ValueError,
        "control_label 'NT' does not occur in obs['gene']"),
    _rule(V.check_covariate_columns, lambda: V.check_covariate_columns(
        ["b"], pd.DataFrame({"a": [1]})), ValueError,
        "covariate_columns ['b'] are not columns of obs"),
    _rule(V.check_gene_indices, lambda: V.check_gene_indices(np.array([0, 5]), 5), ValueError,
          "gene_indices must be a non-empty 1-D array of indices in [0, 5)"),
    _rule(V.check_uns_key, lambda: V.check_uns_key(_screen(), "grna_names", "guides"),
          ValueError, "obsm['guides'] holds guide counts without names; store the guide names "
          "in uns['grna_names'] (one per column)"),
    _rule(V.check_guide_names, lambda: V.check_guide_names(2, 3, "guides"), ValueError,
          "uns['grna_names'] has 2 names but obsm['guides'] has 3 columns"),
    _rule(V.check_guide_targets, lambda: V.check_guide_targets(2, 3, "grna_target", "guides"),
          ValueError, "uns['grna_target'] has 2 entries but obsm['guides'] has 3 columns"),
    _rule(V.check_guide_matrix, lambda: V.check_guide_matrix(np.ones(3), "guides"), ValueError,
          "obsm['guides'] must be a cells x guides matrix"),
    _rule(V.check_guide_key, lambda: V.check_guide_key(_screen(), "guide"), ValueError,
          "guide_key 'guide' is neither an obs column nor an obsm key; obs columns: ['gene'], "
          "obsm keys: []"),
    _rule(V.check_excluded_guides, lambda: V.check_excluded_guides(
        ["g9"], np.array(["g1", None], dtype=object)), ValueError,
        "exclude_guides: ['g9'] are not guides of the control cells; known guides: ['g1']"),
    _rule(V.check_run_settings, lambda: V.check_run_settings({}, "causarray"), ValueError,
          "adata.uns['causarray'] holds no run settings; run causarray.tl.lfc(adata) first or "
          "pass the settings to calibration_check yourself"),
    # files
    _rule(V.check_file, lambda: V.check_file(Path("/nonexistent/screen.h5ad")), ValueError,
          "input file not found: /nonexistent/screen.h5ad"),
    _rule(V.check_h5_key, lambda: V.check_h5_key({}, "f.h5", "X"), ValueError,
          "f.h5 has no matrix 'X'"),
    _rule(V.check_h5_dense, lambda: V.check_h5_dense(SimpleNamespace(ndim=3, name="/X")),
          ValueError, "/X is a 3-D dataset, not a cells x genes matrix"),
    _rule(V.check_h5_sparse, lambda: V.check_h5_sparse(
        SimpleNamespace(keys=lambda: ["data"], name="/X"), (2, 2)), ValueError,
        "/X is neither a dense matrix nor a CSR/CSC sparse matrix"),
    _rule(V.check_h5_row_major, lambda: V.check_h5_row_major("csc", "f.h5", "X"), ValueError,
          "f.h5:X is stored column-wise (CSC); rows cannot be read lazily. Rewrite it as CSR, "
          "e.g. adata.X = adata.X.tocsr(); adata.write_h5ad(path)"),
    _rule(V.check_results_path, lambda: V.check_results_path("out.csv"), ValueError,
          "results_path must end in '.parquet', got 'out.csv'"),
    _rule(V.check_results_path, lambda: V.check_results_path(3), TypeError,
          "results_path must be a path (str or os.PathLike), got int"),
    _rule(V.check_results_path, lambda: V.check_results_path("/no/such/dir/r.parquet"),
          ValueError, "results_path '/no/such/dir/r.parquet': folder '/no/such/dir' does "
          "not exist"),
    _rule(V.check_results_path, lambda: V.check_results_path("/tmp/c.parquet",
                                                             "/tmp/c.parquet"), ValueError,
          "results_path '/tmp/c.parquet' is the cache_path; pass another file"),
    _rule(V.check_cache_path, lambda: V.check_cache_path(Path("/")), ValueError,
          "cache_path '/' is a directory; pass a file path such as 'results.h5'"),
    _rule(V.check_cache_format, lambda: V.check_cache_format(False, "r.h5"), ValueError,
          "'r.h5' is not a causarray batch cache"),
    _rule(V.check_cache_batches, lambda: V.check_cache_batches(0, "r.h5"), ValueError,
          "'r.h5' holds no batches"),
    _rule(V.check_nuisance_cache_path, lambda: V.check_nuisance_cache_path(None), ValueError,
          "save_nuisances=True requires cache_path (the nuisances are written beside the "
          "result cache)"),
    # propensity scores
    _rule(V.check_ps_design, lambda: V.check_ps_design(np.ones((2, 1)), 3), ValueError,
          "W_A must be an n x d matrix with n = 3 rows, got shape (2, 1)"),
    _rule(V.check_ps_mask, lambda: V.check_ps_mask(np.ones((3, 1)), (3, 2)), ValueError,
          "mask has shape (3, 1), expected the shape of A (3, 2)"),
    _rule(V.check_class_weight, lambda: V.check_class_weight({0: 1, 2: 1}), ValueError,
          "class_weight dict keys must be 0 and 1"),
    _rule(V.check_ps_clip_auto, lambda: V.check_ps_clip_auto("wide"), ValueError,
          "ps_clip must be 'auto', a (lower, upper) pair or None, got 'wide'"),
    _rule(V.check_ps_clip_bounds, lambda: V.check_ps_clip_bounds((0.5, 0.1), 2), ValueError,
          "ps_clip bounds must satisfy 0 <= lower < upper <= 1"),
    _rule(V.check_auto_clip_arms, lambda: V.check_auto_clip_arms(
        np.array([0]), np.array([5]), ["P1"]), ValueError,
        "treatment 'P1' needs both treated and control cells for ps_clip='auto'"),
    _rule(V.check_clip, lambda: V.check_clip((0.9, 0.1)), ValueError,
          "clip must be None or a pair (lower, upper) with 0 <= lower < upper <= 1 (or "
          "'auto'), got (0.9, 0.1)"),
    _rule(V.check_clipped_scores, lambda: V.check_clipped_scores(np.array([[0.5], [1.0]])),
          ValueError, "propensity scores must lie strictly inside (0, 1) after clipping; 1 do "
          "not (treatment columns [0])"),
    _rule(V.check_fold_count, lambda: V.check_fold_count(0), ValueError,
          "K must be a positive integer, got 0"),
    _rule(V.check_fold_range, lambda: V.check_fold_range(5, 3), ValueError,
          "K must be an integer between 1 and n = 3, got 5"),
    _rule(V.check_fold_ids, lambda: V.check_fold_ids(np.zeros(2), [0, 0], 3), ValueError,
          "folds must have one id per cell (n = 3), got shape (2,)"),
    _rule(V.check_positive_number, lambda: V.check_positive_number("C", -1.0), ValueError,
          "C must be a positive number, got -1.0"),
    _rule(V.check_scores, lambda: V.check_scores(np.array([[0.5], [np.nan]]), (2, 1)),
          ValueError, "pi_hat must hold finite scores in [0, 1]"),
    _rule(V.check_names, lambda: V.check_names(["a", "a"], 2, "treatment_names"), ValueError,
          "treatment_names must be unique; duplicated: ['a']"),
    _rule(V.check_unit_bounds, lambda: V.check_unit_bounds("overlap_bounds", (0.2, 0.1)),
          ValueError, "overlap_bounds must satisfy 0 <= low < high <= 1, got (0.2, 0.1)"),
    _rule(V.check_association_covariates, lambda: V.check_association_covariates(
        np.array([[np.nan]]), 1), ValueError, "Z must be finite"),
    # propensity refits
    _rule(V.refit_treatments, lambda: V.refit_treatments(np.array([[0, 1]]), ["a", "a"]),
          ValueError, "treatment_names must be unique"),
    _rule(V.refit_covariates, lambda: V.refit_covariates(np.ones((2, 1)), 3, None), ValueError,
          "X_A must be 2-D with 3 rows (the rows of A), got shape (2, 1)"),
    _rule(V.refit_resolver, lambda: V.refit_resolver(["a", "b"], 2, "covariate")("c"),
          ValueError, "Unknown covariate: 'c'"),
    _rule(V.refit_mask, lambda: V.refit_mask(np.ones((3, 1)), (3, 2)), ValueError,
          "mask must have the shape of A (3, 2), got (3, 1)"),
    _rule(V.parse_condition, lambda: V.parse_condition("auc_eq"), ValueError,
          "condition 'auc_eq' must be '<metric>_lt' or '<metric>_gt'"),
    _rule(V.check_conditions, lambda: V.check_conditions({}), ValueError,
          "trigger / target must be non-empty mappings like {'auc_gt': 0.9}"),
    _rule(V.check_refit_mappings, lambda: V.check_refit_mappings({}, {"a": {}}, "ensemble"),
          ValueError, "penalty_factors_by_treatment is supported only for logistic models (an "
          "L2 penalty), got ps_model='ensemble'"),
    _rule(V.refit_drops_and_factors, lambda: V.refit_drops_and_factors(
        {}, {0: {0: 0.5}}, _T, _C, ["t"], ["c"]), ValueError,
        "penalty factors must be finite numbers at least 1, got 0.5 for 'c'"),
    _rule(V.check_refit_pi_hat, lambda: V.check_refit_pi_hat(np.array([[1.5]]), (1, 1)),
          ValueError, "pi_hat must hold probabilities in [0, 1]"),
    _rule(V.check_pi_hat_shape, lambda: V.check_pi_hat_shape(np.ones((2, 1)), (2, 2)),
          ValueError, "pi_hat must have the shape of A (2, 2), got (2, 1)"),
    _rule(V.check_kept_covariates, lambda: V.check_kept_covariates([], "t"), ValueError,
          "dropping removes every covariate of treatment 't'"),
    _rule(V.check_bracket, lambda: V.check_bracket((2, 1)), ValueError,
          "bracket must satisfy 1 <= low < high < inf, got (2, 1)"),
    _rule(V.check_tol, lambda: V.check_tol(0), ValueError, "tol must be positive, got 0"),
    _rule(V.check_unique_candidates, lambda: V.check_unique_candidates([1, 1]), ValueError,
          "candidates must be unique"),
    # inference
    _rule(V.check_df, lambda: V.check_df(np.array([0.0, np.nan])), ValueError,
          "df must be positive (NaN marks an undefined df)"),
    _rule(V.check_df_shape, lambda: V.check_df_shape(np.ones((3, 3)), np.ones((3, 1)), (3,)),
          ValueError, "df has shape (3, 1), expected (3,) or a scalar"),
    _rule(V.check_pvalues, lambda: V.check_pvalues(np.array([1.5])), ValueError,
          "pvalues must lie in [0, 1] (NaN marks a test not performed)"),
    _rule(V.check_eta_finite, lambda: V.check_eta_finite(np.array([True]), np.array([False])),
          ValueError, "eta must be finite for every tested gene"),
    _rule(V.check_fdx_needs, lambda: V.check_fdx_needs(None, np.ones(2)), ValueError,
          "fdx=True needs eta and std"),
    _rule(V.check_fdx_inputs, lambda: V.check_fdx_inputs(
        np.ones(2), np.ones((3, 2)), np.ones(2), 3, 0.1, 1.0, 10), ValueError,
        "c must lie in [0, 1), got 1.0"),
    # LFC
    _rule(V.check_counterfactual_shape, lambda: V.check_counterfactual_shape((4, 3), 2, 3, 4, 1),
          ValueError, "Y_hat holds predictions for 3 cells x 4 genes x 2 treatments, expected "
          "3 x 4 x 1"),
    _rule(V.check_counterfactual_array, lambda: V.check_counterfactual_array(
        np.ones((3, 4, 1)), 3, 4, 1), ValueError,
        "Y_hat must be a CounterfactualMeans or an array of shape (3, 4, 1, 2)"),
    _rule(V.check_gene_fold_shape, lambda: V.check_gene_fold_shape(np.zeros(3), 4), ValueError,
          "W_gene_folds: the gene folds must have shape (4,), got (3,)"),
    _rule(V.check_gene_fold_ids, lambda: V.check_gene_fold_ids(np.array([0, 2]), 2), ValueError,
          "W_gene_folds: every gene's fold must be one of 0..1 (one design per fold)"),
    _rule(V.check_gene_fold_design, lambda: V.check_gene_fold_design(np.ones((2, 1)), 1, 3),
          ValueError, "W_gene_folds: design 1 has 2 rows, expected 3"),
    _rule(V.check_recenter_genes, lambda: V.check_recenter_genes(np.ones((2, 1)), 2, 1),
          ValueError, "recenter_genes must be a boolean (genes x treatments) array of shape "
          "(2, 1), got float64 (2, 1)"),
    _rule(V.check_shift_variance, lambda: V.check_shift_variance(-np.ones((2, 1)), 2, 1),
          ValueError, "shift_variance must be a finite, non-negative (genes x treatments) array "
          "of shape (2, 1), got shape (2, 1)"),
    # batch pipeline
    _rule(V.check_design_given, lambda: V.check_design_given(None, np.ones(1)), ValueError,
          "X and A are required with a count matrix Y; pass a path to an .h5ad file (or an "
          "AnnData opened with backed='r') as Y to build them from the file"),
    _rule(V.check_no_design_with_file, lambda: V.check_no_design_with_file(np.ones(1), None),
          ValueError, "with a file (or backed AnnData) as Y, X and A are built from it: leave "
          "them out and pass pert_col / ctrl_label / covariates"),
    _rule(V.check_design_columns, lambda: V.check_design_columns(np.ones((3, 0))), ValueError,
          "X has no columns; pass the design returned by prep_causarray_data (it includes the "
          "intercept)"),
    _rule(V.check_control_size_factors, lambda: V.check_control_size_factors(
        np.array([1.0, 0.0])), ValueError,
        "a control cell has no counts (size factor 0); remove empty cells"),
    _rule(V.check_executor_client, lambda: V.check_executor_client(object(), object()),
          ValueError, "pass either executor or client, not both"),
    _rule(V.check_lfc_kwargs, lambda: V.check_lfc_kwargs({"outcome_init": np.ones(1)}, ("Y",)),
          ValueError, "lfc_kwargs may set outcome_init only to None (no warm start): "
          "gcate_lfc_batch starts each batch's outcome GLM from its GCATE fit"),
    _rule(V.check_factor_fit, lambda: V.check_factor_fit("screen", ["r > 0"]), ValueError,
          "fit='screen' needs r > 0; use fit='per_batch' (or 'auto')"),
    _rule(V.check_warm_start, lambda: V.check_warm_start(True, object()), ValueError,
          "warm_start_U=True makes every batch depend on the previous one; it cannot run on an "
          "executor or client"),
    # calibration
    _rule(V.check_fake_budget, lambda: V.check_fake_budget(3, 10, 20, 40, 20), ValueError,
          "n_fake=3 fake perturbations of fake_size=10 cells need 30 control cells, but only 20 "
          "of the 40 control cells can be used (at least 20 stay in the control arm); lower "
          "n_fake or fake_size"),
    _rule(V.check_fake_controls, lambda: V.check_fake_controls(5, 40, 3, 10, 0.5), ValueError,
          "too few control cells for the calibration check: 40 control cells, but n_fake=3 fake "
          "perturbations of at least 10 cells with half of the controls kept as the control arm "
          "need 60; lower n_fake"),
    _rule(V.check_runner_result, lambda: V.check_runner_result(pd.DataFrame({"trt": [1]})),
          ValueError, "the runner's result table lacks column(s) ['pvalue', 'padj']"),
    # 0.1.1's fit_glm
    _rule(V.check_offset_rows, lambda: V.check_offset_rows(np.ones(2), 3), ValueError,
          "offset has length 2 but Y has 3 rows"),
    _rule(V.check_impute_needs_A, lambda: V.check_impute_needs_A(True), ValueError,
          "impute needs treatments A (predictions with each treatment on/off)"),
    _rule(V.check_impute_design, lambda: V.check_impute_design(np.ones((2, 3)), np.ones((2, 3)),
                                                               2), ValueError,
          "impute must be True or an array with 2 columns, got shape (2, 3)"),
    _rule(V.check_offset_test, lambda: V.check_offset_test(np.ones(2), None, 3), ValueError,
          "impute has different rows from X: pass offset_test"),
    # test masks
    _rule(V.check_bool_mask, lambda: V.check_bool_mask(np.array([2])), TypeError,
          "test_mask must be boolean (True/False or 0/1)"),
    _rule(V.check_labels, lambda: V.check_labels([None, "a"], "gene_names"), ValueError,
          "gene_names labels must not be missing (None or NaN; 1 found)"),
    _rule(V.check_unique_labels, lambda: V.check_unique_labels(["a", "a"], "gene"), ValueError,
          "duplicated gene labels in test_mask: ['a']"),
    _rule(V.check_results_column, lambda: V.check_results_column(
        pd.DataFrame({"a": [1]}), "gene_names"), ValueError, "results has no column 'gene_names'"),
    _rule(V.check_mask_multiindex, lambda: V.check_mask_multiindex(pd.Series([True])),
          ValueError, "a Series test_mask needs a 2-level (treatment, gene) MultiIndex"),
    _rule(V.check_mask_labels_given, lambda: V.check_mask_labels_given(None, ["g"]), ValueError,
          "an array test_mask needs treatment_names and gene_names"),
    _rule(V.check_test_mask_shape, lambda: V.check_test_mask_shape(np.ones((1, 2), bool), 1, 3),
          ValueError, "test_mask has shape (1, 2), expected (1, 3) treatments x genes"),
    _rule(V.check_treatment_column, lambda: V.check_treatment_column(
        pd.DataFrame({"gene_names": ["g"]}), "trt", 2), ValueError,
        "results has no column 'trt' but test_mask holds 2 treatments"),
    _rule(V.check_unique_result_rows, lambda: V.check_unique_result_rows(["t\x00g", "t\x00g"]),
          ValueError, "results has duplicated (treatment, gene) rows (duplicate treatment-gene "
          "tests), e.g. [('t', 'g')]: the mask cannot be aligned unambiguously"),
    _rule(V.check_mask_covers_results, lambda: V.check_mask_covers_results(
        pd.Series([np.nan]), np.array(["t"]), np.array(["g"])), ValueError,
        "1 result row(s) have no entry in test_mask (missing treatment-gene tests), e.g. "
        "[('t', 'g')]"),
    # plots
    _rule(V.check_uns_entry, lambda: V.check_uns_entry(SimpleNamespace(uns={}), "causarray"),
          ValueError, "adata.uns has no 'causarray' entry; run causarray.tl.lfc(adata) first"),
    _rule(V.check_table_columns, lambda: V.check_table_columns(
        pd.DataFrame({"padj": [0.1]}), ["trt", "padj", "covariate"], "summary"), ValueError,
        "summary lacks column(s) ['trt', 'covariate']"),
    _rule(V.check_jic_stored, lambda: V.check_jic_stored(None), ValueError,
          "no JIC table stored: r was fixed; run tl.lfc with r='auto'"),
    _rule(V.check_obsm_scores, lambda: V.check_obsm_scores(SimpleNamespace(obsm={}), "p"),
          ValueError, "adata.obsm has no 'p'; run tl.lfc(adata, propensity=True)"),
    _rule(V.check_pi_hat_given, lambda: V.check_pi_hat_given(None), ValueError,
          "pi_hat is required when data is a treatment matrix"),
    _rule(V.check_plot_treatments, lambda: V.check_plot_treatments(["a", "b"], [2]), ValueError,
          "treatment position 2 out of range 0..1"),
    _rule(V.check_enough_axes, lambda: V.check_enough_axes(3, 2), ValueError,
          "3 treatments to draw but 2 axes given"),
    _rule(V.check_known_labels, lambda: V.check_known_labels(["a", "z"], ["a"], "covariate"),
          ValueError, "unknown covariate(s) ['z']"),
    _rule(V.check_vmax, lambda: V.check_vmax(-1.0), ValueError,
          "vmax must be None or a finite number > 0 (the colour scale is [-vmax, vmax]), "
          "got -1.0"),
    _rule(V.check_calibration_table, lambda: V.check_calibration_table(None), ValueError,
          "result must be a CalibrationResult or a table with a 'pvalue' column"),
    _rule(V.check_some_finite, lambda: V.check_some_finite(np.array([False])), ValueError,
          "no finite p-values to plot"),
    # propensity per perturbation label
    _rule(V.check_one_label_per_cell, lambda: V.check_one_label_per_cell(np.array([1, 2, 3])),
          ValueError, "2 cell(s) carry more than one perturbation; per-label propensity "
          "models need one label per cell"),
    _rule(V.check_label_codes, lambda: V.check_label_codes(np.array([-1, 0, 3]), 2),
          ValueError, "codes must lie in -1 .. 1 (one per treatment name)"),
    _rule(V.check_propensity_design, lambda: V.check_propensity_design(np.ones((3, 2)), 3,
                                                                      ["a"]),
          ValueError, "design_names has 1 entries, W_A has 2 columns"),
    _rule(V.check_has_label_controls, lambda: V.check_has_label_controls(0), ValueError,
          "there are no control cells (code -1)"),
    _rule(V.check_propensity_models, lambda: V.check_propensity_models(False, "causarray"),
          ValueError, "adata holds no propensity models under 'causarray'; run "
          "causarray.tl.lfc(adata, propensity=True)"),
    _rule(V.check_treatments_known, lambda: V.check_treatments_known(["Z"], ["A", "B"]),
          ValueError, "unknown treatment(s) ['Z']; available: ['A', 'B']"),
    _rule(V.check_gene_folds, lambda: V.check_gene_folds("x"), ValueError,
          "gene_folds must be 'auto' or an integer >= 0, got 'x'"),
]


@pytest.mark.parametrize("call, exc, message", RULES)
def test_rule_message(call, exc, message):
    """Each rule of _validation raises its exception with exactly its message."""
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        call()


#: Rules tested by the classes above (as_count_matrix ... check_min_cells_per_treatment)
#: or in the test file of the stage they serve (check_keywords: test_front_door.py,
#: check_targets: test_inference.py); helpers that check nothing.
_TESTED_ELSEWHERE = {
    "as_count_matrix", "check_treatment", "check_covariates", "check_no_empty_genes",
    "check_no_empty_cells", "check_min_cells_per_treatment", "check_keywords",
    "check_targets", "row_sums", "col_sums", "parameter_names",
}


def test_every_rule_has_a_case():
    """Every public function of _validation has its case in RULES (or a test above)."""
    import inspect

    public = {name for name, f in inspect.getmembers(V, inspect.isfunction)
              if not name.startswith("_") and f.__module__ == V.__name__}
    cased = {p.id for p in RULES}
    assert cased <= public
    assert public - cased - _TESTED_ELSEWHERE == set()


@pytest.mark.parametrize("value, expected", [
    (lambda: V.check_r("auto", allow_auto=True), "auto"),
    (lambda: V.check_r(np.int64(3)), 3),
    (lambda: V.check_positive_int("n", None, allow_none=True), None),
    (lambda: V.parse_memory("1.5GiB"), int(1.5 * 2**30)),
    (lambda: V.check_open_unit("level", 0.25), 0.25),
    (lambda: V.check_r_grid(3), [1, 2, 3]),
    (lambda: V.check_bracket([1, 4]), (1.0, 4.0)),
    (lambda: V.check_plot_treatments(["a", "1"], ["a", 1, 0]), [0, 1, 0]),  # a name wins
    (lambda: V.check_vmax("2"), 2.0),
])
def test_rules_return_the_canonical_value(value, expected):
    assert value() == expected


def test_plot_rules_other_messages():
    """The remaining messages of the plot rules with more than one."""
    with pytest.raises(ValueError, match=re.escape(
            "unknown treatment 'c'; available: ['a', 'b']")):
        V.check_plot_treatments(["a", "b"], ["a", "c"])
    with pytest.raises(ValueError, match="^no treatment to plot$"):
        V.check_plot_treatments(["a"], [])
    with pytest.raises(TypeError, match=re.escape(
            "vmax must be None or a positive number, got 'big'")):
        V.check_vmax("big")
    assert V.check_vmax(None) is None


def test_ps_clip_bounds_broadcast_per_treatment():
    lower, upper = V.check_ps_clip_bounds((0.1, [0.8, 0.9]), 2)
    np.testing.assert_array_equal(lower, [0.1, 0.1])
    np.testing.assert_array_equal(upper, [0.8, 0.9])


def test_check_treatment_keeps_sparse_input_sparse():
    A = sp.csr_matrix(np.array([[0, 1], [1, 0], [0, 0]], dtype=float))
    out, names = check_treatment(A, (3, 5), keep_sparse=True)
    assert sp.issparse(out) and out.format == "csc" and names is None
    np.testing.assert_array_equal(out.toarray(), A.toarray())
    with pytest.raises(ValueError, match=re.escape("A has shape (3, 2) but Y has shape (4, 5)")):
        check_treatment(A, (4, 5), keep_sparse=True)
    with pytest.raises(ValueError, match=re.escape(
            "A must contain only 0/1 indicators; found other values: [2]")):
        check_treatment(sp.csr_matrix(np.array([[2.0], [0.0]])), 2, keep_sparse=True)
    df = pd.DataFrame.sparse.from_spmatrix(A, columns=["p1", "p2"])
    out, names = check_treatment(df, 3, keep_sparse=True)
    assert sp.issparse(out) and list(names) == ["p1", "p2"]


# ----------------------------------------------------------------------------- no rule elsewhere
#: Raises of ValueError / TypeError outside _validation that are not input rules, by
#: (module, function).  Each says why it stays; everything else must call _validation.
ALLOWED_RAISES = {
    # the package's own stub file: an error is a packaging bug, not a user's input
    ("__init__.py", "_read_exports"),
    # result frames the pipeline built itself (an internal invariant, not an input)
    ("cache.py", "_column_kind"),
    # integrity of a stored batch (dtype, rows, checksum): BatchCache catches the error,
    # distrusts the record and refits the batch
    ("cache.py", "read_record"),
}
#: Modules not scanned: the rules' home, and the CLI, whose argparse layer maps errors to
#: flags (InputError) rather than checking inputs itself.
_NOT_SCANNED = {"_validation.py", "cli.py"}


def _raises(path: Path) -> list[tuple[str, int]]:
    """(enclosing function, line) of each ``raise ValueError/TypeError`` in a module."""
    found = []

    def visit(node, qual):
        for child in ast.iter_child_nodes(node):
            name = qual
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{qual}.{child.name}" if qual else child.name
            if isinstance(child, ast.Raise) and child.exc is not None:
                exc = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                if isinstance(exc, ast.Name) and exc.id in ("ValueError", "TypeError"):
                    found.append((qual, child.lineno))
            visit(child, name)

    visit(ast.parse(path.read_text()), "")
    return found


def test_no_input_rule_outside_validation():
    """Every ValueError / TypeError raised on an input comes from _validation."""
    src = Path(V.__file__).parent
    stray = [f"{path.name}:{line} in {func or '<module>'}"
             for path in sorted(src.glob("*.py")) if path.name not in _NOT_SCANNED
             for func, line in _raises(path) if (path.name, func) not in ALLOWED_RAISES]
    assert stray == [], "input rules outside _validation (move them, or explain them in " \
                        "ALLOWED_RAISES): " + ", ".join(stray)


def test_allow_list_is_current():
    """Every allowed entry still raises (a stale entry would hide a new rule)."""
    src = Path(V.__file__).parent
    present = {(path.name, func) for path in src.glob("*.py")
               for func, _ in _raises(path)}
    assert ALLOWED_RAISES - present == set()


def test_scanner_finds_a_stray_rule(tmp_path):
    """The scanner sees a raise inside a method and inside a plain function."""
    mod = tmp_path / "m.py"
    mod.write_text("class K:\n    def f(self, x):\n        raise ValueError('x')\n\n"
                   "def g(y):\n    if y:\n        raise TypeError(f'{y}')\n"
                   "    raise RuntimeError('not an input rule')\n")
    assert _raises(mod) == [("K.f", 3), ("g", 7)]

