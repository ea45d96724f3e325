"""simulate.simulate_case_control: donor nesting, covariates, confounding, truth."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from causarray.simulate import simulate_case_control


@pytest.fixture(scope="module")
def sim():
    return simulate_case_control(n_donors=(12, 18), n_genes=400, n_cell_types=3,
                                 random_state=5)


def _per_donor(adata, column):
    return adata.obs.groupby("donor", observed=True)[column].nunique()


def _donor_log_cpm(adata):
    """Donors x genes log(CPM + 1) of the summed counts, and each donor's condition."""
    donors = adata.obs["donor"].cat.codes.to_numpy()
    D = adata.obs["donor"].cat.categories.size
    M = sp.csr_matrix((np.ones(donors.size), (donors, np.arange(donors.size))),
                      shape=(D, donors.size))
    pb = np.asarray((M @ adata.X).toarray(), dtype=float)
    cond = adata.obs.groupby("donor", observed=True)["condition"].first().astype(str)
    return np.log1p(1e6 * pb / pb.sum(axis=1, keepdims=True)), cond.to_numpy()


def test_shapes_types_and_keys(sim):
    n = sim.n_obs
    assert sim.n_vars == 400 and 30 * 100 <= n <= 30 * 300
    assert isinstance(sim.X, sp.csr_matrix) and sim.X.dtype == np.int64
    assert sim.X.data.min() >= 1
    for col in ("donor", "condition", "cell_type", "sex", "age"):
        assert col in sim.obs
    assert list(sim.obs["condition"].cat.categories) == ["control", "case"]
    donors = list(sim.obs["donor"].cat.categories)
    assert donors == [f"D{d:03d}" for d in range(1, 31)]
    assert all(isinstance(d, str) for d in donors)
    assert set(sim.obs["cell_type"].astype(str)) == {"CT1", "CT2", "CT3"}
    assert sim.uns["condition_key"] == "condition"
    assert sim.uns["control_condition"] == "control"
    assert sim.uns["donor_key"] == "donor"
    truth = sim.uns["true_lfc"]
    assert list(truth.columns) == ["gene", "cell_type", "lfc"]
    assert len(truth) == 400 * 3 and set(truth["gene"]) == set(sim.var_names)
    assert list(sim.uns["donor_trait"].index) == donors


def test_donors_nested_in_one_condition_with_constant_covariates(sim):
    for col in ("condition", "sex", "age"):
        assert (_per_donor(sim, col) == 1).all(), col
    cond = sim.obs.groupby("donor", observed=True)["condition"].first().astype(str)
    assert (cond == "control").sum() == 12 and (cond == "case").sum() == 18
    assert (sim.uns["donor_trait"]["condition"] == cond).all()
    sizes = sim.obs["donor"].value_counts()
    assert sizes.min() >= 100 and sizes.max() <= 300
    assert set(sim.obs["sex"].astype(str)) == {"F", "M"}
    # cell types vary in proportion between donors, every donor has several
    props = pd.crosstab(sim.obs["donor"], sim.obs["cell_type"], normalize="index")
    assert props.min().min() > 0 and props.std().min() > 0.02


def test_effects_per_cell_type(sim):
    truth = sim.uns["true_lfc"]
    for _, t in truth.groupby("cell_type"):
        nz = t["lfc"].to_numpy()[t["lfc"].to_numpy() != 0]
        assert nz.size == 20                                  # 5% of 400 genes
        assert np.all((np.abs(nz) >= 0.5) & (np.abs(nz) <= 1.0))
        assert (nz > 0).any() and (nz < 0).any()


def test_null_and_shuffle_have_no_true_effect():
    null = simulate_case_control(null=True, n_genes=100, random_state=1)
    assert (null.uns["true_lfc"]["lfc"] == 0).all()
    kw = {"n_donors": (10, 14), "n_genes": 100, "random_state": 2}
    real = simulate_case_control(**kw)
    shuf = simulate_case_control(shuffle_labels=True, **kw)
    assert (real.uns["true_lfc"]["lfc"] != 0).sum() == 5
    assert (shuf.uns["true_lfc"]["lfc"] == 0).all()
    # the same counts; only the recorded labels moved, arm sizes kept
    assert (real.X != shuf.X).nnz == 0
    table = shuf.uns["donor_trait"]
    assert (table["condition_simulated"] == real.uns["donor_trait"]["condition"]).all()
    assert (table["condition"] != table["condition_simulated"]).any()
    assert (table["condition"] == "case").sum() == 14
    assert (_per_donor(shuf, "condition") == 1).all()


def test_trait_confounding_separates_the_arms():
    n0, n1 = 40, 40
    # difference in mean trait under no confounding: SD sqrt(1/n0 + 1/n1)
    tol = 4.0 * np.sqrt(1 / n0 + 1 / n1)
    gaps = {}
    for tc in (0.0, 3.0):
        ad = simulate_case_control(n_donors=(n0, n1), cells_per_donor=(5, 10), n_genes=20,
                                   trait_confounding=tc, random_state=11)
        t = ad.uns["donor_trait"]
        gaps[tc] = (t.loc[t["condition"] == "case", "trait"].mean()
                    - t.loc[t["condition"] == "control", "trait"].mean())
    assert gaps[3.0] > tol
    assert abs(gaps[0.0]) < tol


def test_reproducible_by_seed():
    kw = {"n_donors": (4, 5), "n_genes": 60, "n_cell_types": 2, "trait_confounding": 1.0}
    a, b = simulate_case_control(random_state=9, **kw), simulate_case_control(random_state=9, **kw)
    c = simulate_case_control(random_state=10, **kw)
    assert (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.uns["true_lfc"], b.uns["true_lfc"])
    pd.testing.assert_frame_equal(a.uns["donor_trait"], b.uns["donor_trait"])
    assert a.shape != c.shape or (a.X != c.X).nnz > 0


def test_pseudobulk_log_ratio_recovers_the_sign():
    ad = simulate_case_control(n_donors=(15, 15), n_genes=600, effect_frac=0.1,
                               random_state=4)
    logcpm, cond = _donor_log_cpm(ad)
    diff = logcpm[cond == "case"].mean(axis=0) - logcpm[cond == "control"].mean(axis=0)
    lfc = ad.uns["true_lfc"]["lfc"].to_numpy()
    expressed = ad.var["baseline_log_mean"].to_numpy() > -1.0   # >~ 0.4 counts per cell
    hit = (lfc != 0) & expressed
    assert hit.sum() >= 20
    assert np.mean(np.sign(diff[hit]) == np.sign(lfc[hit])) >= 0.9
    # the affected genes move more than the others
    assert np.median(np.abs(diff[hit])) > 2 * np.median(np.abs(diff[(lfc == 0) & expressed]))


def test_donor_noise_adds_between_donor_variance():
    kw = {"n_donors": (20, 20), "n_genes": 300, "null": True, "trait_loading_sd": 0.0,
          "covariate_sd": 0.0, "random_state": 3}
    spread = {}
    for sd in (0.0, 0.5):
        ad = simulate_case_control(donor_sd=sd, **kw)
        logcpm, _ = _donor_log_cpm(ad)
        high = ad.var["baseline_log_mean"].to_numpy() > 1.0     # sampling noise small
        spread[sd] = np.median(logcpm[:, high].var(axis=0, ddof=1))
    assert spread[0.0] < 0.05
    assert 0.5 * 0.25 < spread[0.5] - spread[0.0] < 1.5 * 0.25


def test_invalid_settings_raise():
    with pytest.raises(ValueError):
        simulate_case_control(n_donors=(1, 5))
    with pytest.raises(ValueError):
        simulate_case_control(cells_per_donor=(50, 10))
    with pytest.raises(ValueError):
        simulate_case_control(effect_frac=1.5)
