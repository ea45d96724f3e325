"""The donor route of a case-control study: counts summed per donor, donors as the units
(``tl.lfc(condition_key=, control_condition=, donor_key=, groupby=)``, ``causarray run
--condition-key --control-condition --donor-key --groupby``).

On simulated donor studies with random donor effects: labels shuffled across donors give
(almost) no discovery through the donor route while a cell-level analysis calls many
genes; sparse true effects are found with the FDR controlled; bad designs are refused
with exact messages; a cell-level run on data with a donor column warns.
"""
from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import causarray as ca
from causarray.cli import EXIT_BAD_INPUT, EXIT_OK, main
from causarray.pseudobulk import jackknife_tests, pseudobulk

N_GENES, N_AFFECTED = 400, 20


def donor_study(seed: int, effect: float = 0.8, donors: int = 30, shuffle: bool = False,
                cell_types: int = 1):
    """Cells of ``donors`` donors (half cases), 60-150 cells each, NB counts with a random
    log-normal donor effect per gene (SD 0.3); the first ``N_AFFECTED`` genes move by
    +-``effect`` in cases; ``shuffle`` permutes the labels across donors afterwards."""
    rng = np.random.default_rng(seed)
    cond = np.array(["control"] * (donors // 2) + ["case"] * (donors - donors // 2))
    rng.shuffle(cond)
    beta = np.zeros(N_GENES)
    beta[:N_AFFECTED] = rng.choice([-1.0, 1.0], N_AFFECTED) * effect
    base = rng.normal(-1.0, 1.2, N_GENES)
    sex = rng.integers(0, 2, donors)
    rows, obs = [], []
    for d in range(donors):
        n = int(rng.integers(60, 150))
        lib = np.exp(rng.normal(0, 0.3, n))
        mu = lib[:, None] * np.exp(base + rng.normal(0, 0.3, N_GENES)
                                   + (cond[d] == "case") * beta)
        rows.append(sp.csr_matrix(rng.negative_binomial(5, 5 / (5 + mu))))
        obs += [dict(donor=f"D{d:02d}", condition=cond[d], sex=int(sex[d]),
                     cell_type=f"T{i % cell_types}") for i in range(n)]
    if shuffle:
        perm = dict(zip([f"D{d:02d}" for d in range(donors)], rng.permutation(cond)))
        for o in obs:
            o["condition"] = perm[o["donor"]]
    adata = ad.AnnData(sp.vstack(rows).tocsr(),
                       obs=pd.DataFrame(obs, index=[f"c{i}" for i in range(len(obs))]))
    adata.var_names = [f"g{j}" for j in range(N_GENES)]
    return adata


def _donor_run(adata, **kw):
    ca.tl.lfc(adata, condition_key="condition", control_condition="control",
              donor_key="donor", covariates=["sex"], verbose=False, **kw)
    return adata.uns["causarray"]


def test_pseudobulk_sums_each_donors_counts():
    a = donor_study(0, donors=6)
    pb = pseudobulk(a, "condition", "control", "donor", ["sex"])
    donors = a.obs["donor"].astype(str).to_numpy()
    for d in pb.obs_names:
        np.testing.assert_array_equal(pb[d].X.toarray().ravel(),
                                      np.asarray(a.X[donors == d].sum(axis=0)).ravel())
    assert pb.obs["n_cells"].sum() == a.n_obs and set(pb.obs["condition"]) == {"case",
                                                                               "control"}


def test_jackknife_tests_by_hand():
    """Wu's weighted jackknife with the donors' own leverages, Bell and McCaffrey's df
    with the genes on one scale (no arm means: a flat trend), by numpy."""
    rng = np.random.default_rng(0)
    res = pd.DataFrame({"gene_names": ["a", "b", "c"], "tau": [0.5, 0.1, 0.2],
                        "std": [0.1, 0.1, 0.1], "estimable": [True, True, True],
                        "on_target": [False, False, False], "trt": "case"})
    reps = rng.normal(0.2, 0.1, (6, 3))
    reps[2, 2] = np.nan                                   # gene c fails in one replicate
    Z = np.column_stack([np.ones(6), [0.1, 2.0, -0.3, 0.4, -1.0, 0.2],
                         [0, 0, 0, 1, 1, 1]])
    out = jackknife_tests(res, reps, Z, moderate=False)
    H = Z @ np.linalg.inv(Z.T @ Z) @ Z.T
    h, M = np.diag(H), np.eye(6) - H
    terms = (1 - h)[:, None] * (reps[:, :2] - res["tau"].to_numpy()[:2]) ** 2
    var = terms.sum(axis=0)
    np.testing.assert_allclose(out["std"].to_numpy()[:2], np.sqrt(var), rtol=1e-12)
    # the genes' common scale is the geometric mean of their variances (a flat trend)
    D = (terms / np.exp(np.log(var).mean())).mean(axis=1) / np.diag(M)
    df = min(max((D @ np.diag(M)) ** 2 / (D @ M ** 2 @ D), 1.0), 6 - 3)
    from scipy import stats

    p = 2 * stats.t.sf(np.abs(res["tau"].to_numpy()[:2] / np.sqrt(var)), df=df)
    np.testing.assert_allclose(out["pvalue"].to_numpy()[:2], p, rtol=1e-10)
    assert np.isnan(out["pvalue"].iloc[2]) and (out["std_influence"] == 0.1).all()
    # gene c keeps its estimate (estimable) but got no test
    assert out["estimable"].tolist() == [True, True, True]
    assert out["tested"].tolist() == [True, True, False]
    np.testing.assert_allclose(out["df"].to_numpy()[:2], [df, df], rtol=1e-12)
    assert np.isnan(out["df"].iloc[2]) and df < 3
    # fewer than 50 genes: the moderation leaves them as they are, on the same df
    pd.testing.assert_frame_equal(jackknife_tests(res, reps, Z, moderate=True), out)


def test_the_donor_route_reports_jackknife_errors():
    st = _donor_run(donor_study(6, donors=8), r=0)
    assert st["settings"]["donor_variance"] == "jackknife"
    assert "std_influence" in st["results"]
    infl = _donor_run(donor_study(6, donors=8), r=0, donor_variance="influence")
    assert "std_influence" not in infl["results"]
    np.testing.assert_allclose(st["results"]["tau"], infl["results"]["tau"])
    # moderated (default): 400 genes share their variances' scale, so every tested gene
    # gets more than the jackknife's 8 - 3 degrees of freedom (k = intercept, sex, the
    # condition; r = 0); 'jackknife_raw' keeps the jackknife's own variance and df
    res = st["results"]
    tested = res["tested"].to_numpy(bool)
    assert tested.sum() > 100 and (res.loc[tested, "df"] > 5).all()
    raw = _donor_run(donor_study(6, donors=8), r=0, donor_variance="jackknife_raw")
    r_t = raw["results"]["tested"].to_numpy(bool)
    df_raw = raw["results"].loc[r_t, "df"].to_numpy()     # Bell-McCaffrey, at most n - k
    assert (df_raw == df_raw[0]).all() and 1 <= df_raw[0] <= 5
    np.testing.assert_allclose(raw["results"]["std"], res["std_jackknife"], rtol=1e-12)


@pytest.mark.slow
def test_shuffled_labels_give_no_discoveries_through_donors_but_many_per_cell():
    """Three null studies (labels shuffled across donors): at most 1 discovery per 1,000
    genes through the donor route; the cell-level analysis calls many more."""
    donor_calls, cell_calls = 0, 0
    for seed in range(3):
        a = donor_study(seed, shuffle=True)
        st = _donor_run(a)
        assert st["settings"]["assignment"] == "observational"
        assert st["settings"]["route"] == "donor"
        donor_calls += int((st["results"]["padj"] < 0.05).sum())
        b = donor_study(seed, shuffle=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ca.tl.lfc(b, pert_col="condition", ctrl_label="control", r=0, verbose=False)
        cell_calls += int((b.uns["causarray"]["results"]["padj"] < 0.05).sum())
    assert donor_calls <= 3 * N_GENES / 1000
    assert cell_calls >= 10 * max(donor_calls, 1)


@pytest.mark.slow
def test_sparse_effects_are_found_with_the_fdr_controlled():
    R = V = T = 0
    for seed in range(3):
        res = _donor_run(donor_study(seed))["results"]
        disc = (res["padj"] < 0.05).to_numpy()
        true = res["gene_names"].isin([f"g{j}" for j in range(N_AFFECTED)]).to_numpy()
        R, V, T = R + disc.sum(), V + (disc & ~true).sum(), T + (disc & true).sum()
    from scipy.stats import binom

    assert V <= binom.ppf(0.99, R, 0.05)          # FDR 0.05, 99 % binomial tolerance
    assert T / (3 * N_AFFECTED) >= 0.7


def test_groupby_runs_each_group_and_labels_the_rows():
    a = donor_study(1, donors=8, cell_types=2)
    st = _donor_run(a, groupby="cell_type", r=0)
    assert sorted(st["results"]["group"].unique()) == ["T0", "T1"]
    assert len(st["results"]) == 2 * N_GENES
    assert set(st["donors"]) == {"T0", "T1"}


def test_a_donor_in_both_conditions_is_refused():
    a = donor_study(2, donors=8)
    first = a.obs.loc[a.obs["condition"] == "control", "donor"].iloc[0]
    cells = a.obs.index[(a.obs["donor"] == first).to_numpy()][::2]
    a.obs["condition"] = a.obs["condition"].astype(str)
    a.obs.loc[cells, "condition"] = "case"
    with pytest.raises(ValueError) as err:
        _donor_run(a, r=0)
    assert str(err.value) == (
        f"donor_key: 1 donor(s) of obs['donor'] appear in more than one condition of "
        f"obs['condition'] (['{first}']); a donor must belong to one arm")


def test_a_covariate_varying_within_a_donor_is_refused():
    a = donor_study(2, donors=8)
    a.obs["sex"] = np.arange(a.n_obs) % 2
    with pytest.raises(ValueError, match=r"^covariates: 'sex' varies within 8 donor\(s\) "
                                         r"of obs\['donor'\]"):
        _donor_run(a, r=0)


def test_exact_messages_for_missing_keys_and_small_arms():
    a = donor_study(3, donors=8)
    with pytest.raises(ValueError, match=r"^control_condition 'healthy' does not occur in "
                                         r"obs\['condition'\]$"):
        ca.tl.lfc(a, condition_key="condition", control_condition="healthy",
                  donor_key="donor", r=0)
    with pytest.raises(ValueError, match=r"^the donor route needs condition_key, "
                                         r"control_condition and donor_key; missing: "
                                         r"donor_key$"):
        ca.tl.lfc(a, condition_key="condition", control_condition="control", r=0)
    keep = (a.obs["condition"] == "control") | (a.obs["donor"] == a.obs.loc[
        a.obs["condition"] == "case", "donor"].iloc[0])
    small = a[keep.to_numpy()].copy()
    with pytest.raises(ValueError, match=r"^condition_key: each arm needs at least 2 "
                                         r"donors; donors per condition: "):
        ca.tl.lfc(small, condition_key="condition", control_condition="control",
                  donor_key="donor", r=0)


def test_a_cell_level_run_on_donor_data_warns():
    a = donor_study(4, donors=8)
    with pytest.warns(UserWarning, match=r"constant within each of the 8 levels of "
                                         r"obs\['donor'\].*use the donor route"):
        ca.tl.lfc(a, pert_col="condition", ctrl_label="control", r=0, verbose=False)


def test_the_donors_table_holds_the_factors_that_found_the_trait(monkeypatch):
    """A latent donor trait confounds the condition (simulate_case_control): the donor
    route's donors table carries the factor it estimated (``factor_1``), which is the
    trait up to sign (|correlation| > 0.9 over the 20 donors), and the jackknife's
    design is intercept, covariates, that factor and the condition."""
    import causarray.pseudobulk as pb_module
    from causarray.simulate import simulate_case_control

    designs = []
    original = pb_module.jackknife_tests
    monkeypatch.setattr(pb_module, "jackknife_tests", lambda res, reps, design, **kw: (
        designs.append(np.array(design)), original(res, reps, design, **kw))[1])
    a = simulate_case_control(n_donors=(10, 10), cells_per_donor=(50, 100), n_genes=300,
                              random_state=1, trait_confounding=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ca.tl.lfc(a, condition_key="condition", control_condition="control",
                  donor_key="donor", covariates=["sex", "age"], r=1, verbose=False)
    donors = a.uns["causarray"]["donors"]["all"]
    trait = a.uns["donor_trait"].reindex(donors.index)["trait"]
    assert list(donors.columns) == ["condition", "n_cells", "sex", "age", "factor_1"]
    assert abs(np.corrcoef(donors["factor_1"], trait)[0, 1]) > 0.9
    (design,) = designs
    expected = np.column_stack([np.ones(20), donors["sex"] == "M", donors["age"],
                                donors["factor_1"], donors["condition"] != "control"])
    np.testing.assert_array_equal(design, expected.astype(float))


def test_cli_donor_route(tmp_path, capsys):
    path = tmp_path / "d.h5ad"
    donor_study(5, donors=8, cell_types=2).write_h5ad(path)
    out = tmp_path / "out"
    code = main(["run", str(path), "--out", str(out), "--condition-key", "condition",
                 "--control-condition", "control", "--donor-key", "donor", "--groupby",
                 "cell_type", "--covariates", "sex", "--r", "0", "-q"])
    assert code == EXIT_OK
    donors = pd.read_csv(out / "donors.csv")
    assert len(donors) == 16 and set(donors["group"]) == {"T0", "T1"}
    assert {"results.csv.gz", "shift.csv", "report.html"} <= {p.name for p in out.iterdir()}
    code = main(["run", str(path), "--out", str(tmp_path / "o2"), "--condition-key",
                 "condition", "--control-condition", "healthy", "--donor-key", "donor"])
    assert code == EXIT_BAD_INPUT
    assert "--control-condition 'healthy' does not occur" in capsys.readouterr().err


def _ols_jackknife(Z: np.ndarray, Y: np.ndarray, level: np.ndarray | None = None):
    """Delete-one replicates of the last coefficient of OLS on ``Z`` for every column
    of ``Y``, and :func:`jackknife_tests` on them (raw)."""
    def last_coef(Zs, Ys):
        return np.linalg.solve(Zs.T @ Zs, Zs.T @ Ys)[-1]

    n, genes = Y.shape
    reps = np.stack([last_coef(np.delete(Z, d, 0), np.delete(Y, d, 0)) for d in range(n)])
    res = pd.DataFrame({"gene_names": [f"g{i}" for i in range(genes)],
                        "tau": last_coef(Z, Y), "std": 1.0, "estimable": True,
                        "on_target": False, "trt": "case"})
    if level is not None:
        res["mean_control"] = res["mean_treated"] = np.exp(level)
    return reps, jackknife_tests(res, reps, Z, moderate=False)


def _bell_mccaffrey_df(Z: np.ndarray) -> float:
    """Bell and McCaffrey's df of HC2 for the last coefficient of OLS on ``Z``:
    tr(DM)^2 / tr(DMDM), D = diag(a_i^2 / (1 - h_i)), M = I - H."""
    A = np.linalg.inv(Z.T @ Z) @ Z.T
    M = np.eye(len(Z)) - Z @ A
    D = A[-1] ** 2 / np.diag(M)
    return float((D @ np.diag(M)) ** 2 / (D @ M ** 2 @ D))


def test_weighted_jackknife_is_hc2_for_a_regression_adjusted_difference():
    """OLS of 4,000 homoscedastic genes on [1, x, condition] over 20 donors: the
    weighted jackknife of the condition's coefficient is statsmodels' HC2 (to rounding),
    unbiased for the exact variance (the plain jackknife, (n - 1)/n sum, is HC3-like:
    1.13x here); its df is Bell and McCaffrey's, and its t test holds the type-I error
    at 0.05 (99 % band)."""
    import statsmodels.api as sm

    rng = np.random.default_rng(0)
    n, genes = 20, 4000
    x = rng.standard_normal(n)
    Z = np.column_stack([np.ones(n), x, np.r_[np.zeros(10), np.ones(10)]])
    Y = 0.3 * x[:, None] + rng.standard_normal((n, genes))
    reps, out = _ols_jackknife(Z, Y)
    for g in range(3):
        hc2 = sm.OLS(Y[:, g], Z).fit(cov_type="HC2").bse[-1]
        np.testing.assert_allclose(out["std"].iloc[g], hc2, rtol=1e-8)
    exact = np.linalg.inv(Z.T @ Z)[-1, -1]
    plain = (n - 1) / n * ((reps - reps.mean(axis=0)) ** 2).sum(axis=0)
    assert plain.mean() / exact > 1.1
    # HC2 has relative SD about sqrt(2 / df) per gene; 4 SE of the mean over the genes
    assert abs(float((out["std"] ** 2).mean()) / exact - 1) < 4 * np.sqrt(2 / 10 / genes)
    bm = _bell_mccaffrey_df(Z)
    assert bm < n - 3
    np.testing.assert_allclose(out["df"].to_numpy(), bm, rtol=0.05)
    band = 2.576 * np.sqrt(0.05 * 0.95 / genes)
    assert abs(float((out["pvalue"] < 0.05).mean()) - 0.05) < band


def test_bell_mccaffrey_df_when_a_trait_nearly_separates_the_arms():
    """A donor trait that nearly separates the arms, one donor far out: the condition's
    coefficient rests on a few donors.  On n - k df the t test rejects 1.3x too often
    at 0.05 and 1.7x at 0.01; on Bell and McCaffrey's df (estimated from 4,000 genes
    whose scales differ 50-fold along their mean expression) it does not exceed either
    level beyond the 99 % band."""
    rng = np.random.default_rng(1)
    n, genes = 20, 4000
    cond = np.r_[np.zeros(10), np.ones(10)]
    u = 1.5 * (cond - 0.5) + 0.5 * rng.standard_normal(n)
    u[0] = 4.0
    Z = np.column_stack([np.ones(n), u, cond])
    level = rng.uniform(-2, 2, genes)
    Y = np.exp(level)[None, :] * rng.standard_normal((n, genes))
    _, out = _ols_jackknife(Z, Y, level)
    np.testing.assert_allclose(out["df"].to_numpy(), _bell_mccaffrey_df(Z), rtol=0.05)
    from scipy import stats

    nominal = 2 * stats.t.sf(np.abs(out["stat"].to_numpy()), n - 3)
    for alpha in (0.05, 0.01):
        band = 2.576 * np.sqrt(alpha * (1 - alpha) / genes)
        assert float((nominal < alpha).mean()) > alpha + band
        assert float((out["pvalue"] < alpha).mean()) < alpha + band


def _dominated_design(n: int = 20, seed: int = 1) -> np.ndarray:
    """[1, trait, condition]: a trait that nearly separates the arms, one donor far out."""
    rng = np.random.default_rng(seed)
    cond = np.r_[np.zeros(n // 2), np.ones(n - n // 2)]
    u = 1.5 * (cond - 0.5) + 0.5 * rng.standard_normal(n)
    u[0] = 4.0
    return np.column_stack([np.ones(n), u, cond])


def test_log_scale_df_matches_the_jackknifes_log_variance():
    """The weighted jackknife variance of OLS's last coefficient, V = e' M D M e, drawn
    directly (200,000 normal vectors, not through the eigenvalues): the log-scale df d
    has trigamma(d/2) = Var log V to Monte-Carlo precision, and exceeds Satterthwaite's
    df when one donor dominates; with equal weights both are n - k."""
    from scipy.special import polygamma

    from causarray.pseudobulk import log_scale_df, residual_maker, satterthwaite_df

    Z = _dominated_design()
    M, k = residual_maker(Z)
    A = np.linalg.pinv(Z)
    D = A[-1] ** 2 / np.diag(M)
    eps = np.random.default_rng(5).standard_normal((200_000, len(Z))) @ M
    log_v = np.log((eps ** 2) @ D)
    d = log_scale_df(D, M, k)
    # the variance of a sample variance of log chi-squares: relative SE about
    # sqrt((kurtosis - 1) / draws) with kurtosis below 6 here; both estimates carry it
    tol = 4 * np.sqrt(5 / 200_000 + 5 / (1 << 15))
    assert abs(float(polygamma(1, d / 2)) / float(np.var(log_v)) - 1) < tol
    assert d > satterthwaite_df(D, M, k) + 1
    eq = np.ones(len(Z))
    M0, k0 = residual_maker(np.column_stack([np.ones(20), np.r_[np.zeros(10), np.ones(10)]]))
    assert satterthwaite_df(eq, M0, k0) == pytest.approx(18, rel=1e-12)
    assert log_scale_df(eq, M0, k0) == pytest.approx(18, rel=0.05)


def test_moderation_on_the_log_scale_df_recovers_the_prior():
    """4,000 OLS genes on the dominated design, their variances drawn around a trend in
    expression from a scaled inverse chi-square with d0 = 20: moderating on the
    log-scale df recovers d0 (4 SE, about +-9) and keeps the type-I error at 0.05, 0.01
    and 0.001 (99 % bands); on Satterthwaite's df the sampling part of the log
    variances is overstated and d0 comes out several times too large."""
    from causarray.inference import moderated_variances
    from causarray.pseudobulk import jackknife_variance

    rng = np.random.default_rng(0)
    Z = _dominated_design()
    n, genes = len(Z), 4000
    level = rng.uniform(-2, 2, genes)
    sigma2 = np.exp(level) * 20 / rng.chisquare(20, genes)
    Y = np.sqrt(sigma2)[None, :] * rng.standard_normal((n, genes))
    reps, _ = _ols_jackknife(Z, Y, level)
    res = pd.DataFrame({"gene_names": [f"g{i}" for i in range(genes)],
                        "tau": np.linalg.lstsq(Z, Y, rcond=None)[0][-1], "std": 1.0,
                        "estimable": True, "on_target": False, "trt": "case",
                        "mean_control": np.exp(level), "mean_treated": np.exp(level)})
    var, df, df_log = jackknife_variance(res, reps, Z)
    d0_log = moderated_variances(var, float(df_log[0]), level)[2]
    d0_bm = moderated_variances(var, float(df[0]), level)[2]
    assert abs(d0_log - 20) < 9 and d0_bm > 60
    out = jackknife_tests(res, reps, Z)
    for alpha in (0.05, 0.01, 0.001):
        band = 2.576 * np.sqrt(alpha * (1 - alpha) / genes)
        assert abs(float((out["pvalue"] < alpha).mean()) - alpha) < band
