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
    rng = np.random.default_rng(0)
    res = pd.DataFrame({"gene_names": ["a", "b", "c"], "tau": [0.5, 0.1, 0.2],
                        "std": [0.1, 0.1, 0.1], "estimable": [True, True, True],
                        "on_target": [False, False, False], "trt": "case"})
    reps = rng.normal(0.2, 0.1, (6, 3))
    reps[2, 2] = np.nan                                   # gene c fails in one replicate
    out = jackknife_tests(res, reps, n_params=3, moderate=False)
    # Wu's weighted jackknife at the mean leverage k/n = 3/6, on n - k = 3 df
    var = (1 - 3 / 6) * ((reps[:, :2] - reps[:, :2].mean(axis=0)) ** 2).sum(axis=0)
    np.testing.assert_allclose(out["std"].to_numpy()[:2], np.sqrt(var), rtol=1e-12)
    from scipy import stats

    p = 2 * stats.t.sf(np.abs(res["tau"].to_numpy()[:2] / np.sqrt(var)), df=6 - 3)
    np.testing.assert_allclose(out["pvalue"].to_numpy()[:2], p, rtol=1e-10)
    assert np.isnan(out["pvalue"].iloc[2]) and (out["std_influence"] == 0.1).all()
    # gene c keeps its estimate (estimable) but got no test
    assert out["estimable"].tolist() == [True, True, True]
    assert out["tested"].tolist() == [True, True, False]
    np.testing.assert_array_equal(out["df"].to_numpy(), [3.0, 3.0, np.nan])


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
    assert (raw["results"].loc[r_t, "df"] == 5).all()
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


def test_leverage_jackknife_is_unbiased_for_a_regression_adjusted_difference():
    """OLS of 4,000 homoscedastic genes on [1, x, condition] over 20 donors: the delete-
    one jackknife of the condition's coefficient overstates its variance (HC3-like,
    (n - 1)/n sum: 1.13x the exact variance here), the leverage-corrected one (Wu's
    weighted jackknife at the mean leverage, (1 - k/n) sum) is unbiased within a few
    per cent, and its t test on n - k df holds the type-I error at 0.05 (99 % band)."""
    rng = np.random.default_rng(0)
    n, genes = 20, 4000
    x = rng.standard_normal(n)
    Z = np.column_stack([np.ones(n), x, np.r_[np.zeros(10), np.ones(10)]])
    Y = 0.3 * x[:, None] + rng.standard_normal((n, genes))

    def condition_coef(Zs, Ys):
        return np.linalg.solve(Zs.T @ Zs, Zs.T @ Ys)[2]

    reps = np.stack([condition_coef(np.delete(Z, d, 0), np.delete(Y, d, 0))
                     for d in range(n)])
    res = pd.DataFrame({"gene_names": [f"g{i}" for i in range(genes)],
                        "tau": condition_coef(Z, Y), "std": 1.0, "estimable": True,
                        "on_target": False, "trt": "case"})
    out = jackknife_tests(res, reps, n_params=3, moderate=False)
    exact = np.linalg.inv(Z.T @ Z)[2, 2]
    plain = (n - 1) / n * ((reps - reps.mean(axis=0)) ** 2).sum(axis=0)
    assert plain.mean() / exact > 1.1
    assert 0.97 <= float((out["std"] ** 2).mean()) / exact <= 1.06
    band = 2.576 * np.sqrt(0.05 * 0.95 / genes)
    assert abs(float((out["pvalue"] < 0.05).mean()) - 0.05) < band
    assert (out["df"] == n - 3).all()
