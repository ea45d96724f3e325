"""Doubly robust LFC: output schema, calibration on confounded nulls, FDR/power on
confounded signal, FDX, and real positive / negative controls."""
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from causarray import LFC, fit_gcate, from_anndata
from causarray.datasets import load_dataset
from causarray.dr import RESULT_COLUMNS
from causarray.glm import fit_glm
from causarray.inference import bh_adjust, t_pvalues
from causarray.preprocessing import comp_size_factor
from causarray.simulate import design_from_simulation, simulate_screen

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _xa(Y, X):
    lib = np.log2(Y.sum(axis=1))
    return np.column_stack([X, (lib - lib.mean()) / lib.std(ddof=1)])


def run_causarray(Y, X, A, r, max_iters=20, **lfc_kwargs):
    """The single-call path of SPEC §1: fit_gcate -> LFC(Y, [X|U], A, [X_A|U], offset)."""
    _, res_2 = fit_gcate(Y, X, A, r, kwargs_es_1=dict(max_iters=max_iters))
    U = res_2["U"]
    offset = np.log(res_2["kwargs_glm"]["size_factor"])
    return LFC(Y, np.hstack([X, U]), A, np.hstack([_xa(Y, X), U]), offset=offset, **lfc_kwargs)


def glm_wald_padj(Y, W, A, offset):
    """Per-gene NB GLM Wald tests of the treatment coefficients, BH per treatment."""
    fit = fit_glm(Y, W, A, offset=offset)
    z = fit.coef[:, W.shape[1]:] / fit.se[:, W.shape[1]:]
    p = t_pvalues(z.T.ravel()).reshape(A.shape[1], -1)
    return np.nan_to_num(np.vstack([bh_adjust(pk) for pk in p]).T, nan=1.0)  # genes x trts


def fdp_power(padj, truth, q=0.05):
    disc = padj < q
    nonnull = truth != 0
    return (disc & ~nonnull).sum() / max(disc.sum(), 1), (disc & nonnull).sum() / max(nonnull.sum(), 1)


def as_matrix(df, col, p, a):
    return df[col].to_numpy().reshape(a, p).T


def simulated(seed, null=False, **kw):
    args = dict(n_ctrl=1000, n_perts=8, cells_per_pert=250, n_genes=1000, r=5, confounding=0.5)
    args.update(kw)
    ad = simulate_screen(null=null, random_state=seed, **args)
    Y, X, A = design_from_simulation(ad)
    keep = Y.sum(axis=0) > 0
    return Y[:, keep], X, A, ad, keep


# ----------------------------------------------------------------------------------
# schema
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_run():
    Y, X, A, ad, keep = simulated(0, n_ctrl=300, n_perts=3, cells_per_pert=100, n_genes=150, r=2)
    Yd = pd.DataFrame(Y, columns=[f"g{j}" for j in range(Y.shape[1])])
    Ad = pd.DataFrame(A, columns=["KO1", "KO2", "KO3"])
    W = np.hstack([X, ad.obsm["U_true"]])
    df, est = LFC(Yd, W, Ad, np.hstack([_xa(Y, X), ad.obsm["U_true"]]), offset=True)
    return Yd, Ad, W, df, est, ad


def test_result_schema(small_run):
    Yd, Ad, W, df, est, _ = small_run
    assert list(df.columns) == RESULT_COLUMNS + ["trt"]
    assert len(df) == Yd.shape[1] * Ad.shape[1]
    assert list(df["trt"].unique()) == ["KO1", "KO2", "KO3"]
    assert list(df["gene_names"][: Yd.shape[1]]) == list(Yd.columns)
    ok = np.isfinite(df["stat"])
    np.testing.assert_allclose(df["log2fc"], df["tau"] / np.log(2))
    np.testing.assert_allclose(df["log2fc_se"], df["std"] / np.log(2))
    np.testing.assert_allclose(df.loc[ok, "log2fc"] / df.loc[ok, "log2fc_se"], df.loc[ok, "stat"])
    assert set(df["rej"].unique()) <= {0}
    assert (df.loc[ok, "pvalue"].between(0, 1)).all()
    assert est["pi_hat"].shape == Ad.shape and est["Y_hat"].to_array().shape == (*Yd.shape, 3, 2)
    # non-tested genes: tau 0, std inf, p NaN
    bad = ~df["estimable"]
    assert (df.loc[bad, "tau"] == 0).all() and np.isinf(df.loc[bad, "std"]).all()
    assert df.loc[bad, "pvalue"].isna().all()


def test_reusing_nuisances_reproduces_estimates(small_run):
    Yd, Ad, W, df, est, ad = small_run
    df2, _ = LFC(Yd, W, Ad, offset=est["offset"], Y_hat=est["Y_hat"], pi_hat=est["pi_hat_raw"])
    np.testing.assert_allclose(df2["tau"], df["tau"], atol=1e-6)
    np.testing.assert_allclose(df2["stat"], df["stat"], atol=1e-6)
    # and the n x p x a x 2 tensor form is accepted too
    df3, _ = LFC(Yd, W, Ad, offset=est["offset"], Y_hat=est["Y_hat"].to_array(),
                 pi_hat=est["pi_hat_raw"], nuisance_variance=False)
    df4, _ = LFC(Yd, W, Ad, offset=est["offset"], Y_hat=est["Y_hat"], pi_hat=est["pi_hat_raw"],
                 nuisance_variance=False)
    np.testing.assert_allclose(df3["tau"], df4["tau"], atol=1e-8)


def test_offset_true_equals_explicit_size_factors(small_run):
    Yd, Ad, W, df, est, _ = small_run
    df2, _ = LFC(Yd, W, Ad, np.hstack([_xa(Yd.to_numpy(), W[:, :1]), W[:, 1:]]),
                 offset=np.log(est["size_factors"]))
    np.testing.assert_allclose(df2["tau"], df["tau"], atol=1e-10)


def test_all_zero_gene_is_not_estimable_with_warning():
    Y, X, A, ad, keep = simulated(1, n_ctrl=200, n_perts=1, cells_per_pert=80, n_genes=60, r=0)
    Y[:, 0] = 0
    with pytest.warns(RuntimeWarning, match="not estimable"):
        df, _ = LFC(Y, X, A)
    assert not df["estimable"].iloc[0] and np.isnan(df["pvalue"].iloc[0])
    assert "trt" not in df.columns


def test_threshold_floor_is_not_a_filter():
    """thres_diff floors the arm means before the log; the reported means stay raw."""
    n, p = 400, 3
    rng = np.random.default_rng(0)
    A = np.zeros((n, 1))
    A[:200, 0] = 1
    Y = rng.poisson(5.0, size=(n, p)).astype(float)
    X = np.ones((n, 1))
    # counterfactual means: control 0.001, treated 0.02 for gene 0
    Y_hat = np.full((n, p, 1, 2), 5.0)
    Y_hat[:, 0, 0, 0], Y_hat[:, 0, 0, 1] = 0.001, 0.02
    Y[:200, 0] = 0.02   # treated cells sit exactly on their counterfactual mean
    Y[200:, 0] = 0.001
    df, _ = LFC(Y, X, A, Y_hat=Y_hat, pi_hat=np.full((n, 1), 0.5), thres_min=0.0)
    assert df["mean_control"].iloc[0] == pytest.approx(0.001)
    assert df["mean_treated"].iloc[0] == pytest.approx(0.02)
    assert df["tau"].iloc[0] == pytest.approx(np.log(2.0))


def test_bad_input_messages(small_run):
    Yd, Ad, W, *_ = small_run
    Y = Yd.to_numpy()
    A = Ad.to_numpy()
    with pytest.raises(ValueError, match="W must be 2-D with 600 rows"):
        LFC(Y, W[:10], A)
    with pytest.raises(ValueError, match="A must contain only 0/1"):
        LFC(Y, W, A * 2)
    Yn = Y.copy()
    Yn[0, 0] = np.nan
    with pytest.raises(ValueError, match="Y contains NaN or infinite values"):
        LFC(Yn, W, A)
    with pytest.raises(ValueError, match="Y contains negative counts"):
        LFC(-Y, W, A)
    with pytest.raises(ValueError, match="mask must have the shape of A"):
        LFC(Y, W, A, mask=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="usevar must be 'pooled' or 'unequal'"):
        LFC(Y, W, A, usevar="welch")
    with pytest.raises(ValueError, match="family must be 'nb' or 'poisson'"):
        LFC(Y, W, A, family="binomial")
    with pytest.raises(TypeError, match="never clipped"):
        LFC(Y, W, A, clip_pseudo_outcomes=True)


# ----------------------------------------------------------------------------------
# calibration and FDR on confounded simulations
# ----------------------------------------------------------------------------------
def test_confounded_null_is_calibrated_and_naive_is_not():
    Y, X, A, ad, keep = simulated(21, null=True)
    df, _ = run_causarray(Y, X, A, 5)
    share = (df["padj"] < 0.05).mean()
    p = df["pvalue"].dropna()
    ks = stats.kstest(p, "uniform").statistic
    print(f"confounded null: share padj<0.05 = {share:.4f}, KS = {ks:.3f}")
    assert share <= 0.001
    assert ks < 0.1
    # the naive NB GLM on the same data is fooled by the confounding
    naive = glm_wald_padj(Y, X, A, np.log(comp_size_factor(Y)))
    assert (naive < 0.05).mean() > 20 * max(share, 1e-4)


@pytest.fixture(scope="module")
def signal_runs():
    out = []
    for seed in (1, 2, 3, 4, 5):
        Y, X, A, ad, keep = simulated(seed)
        df, est = run_causarray(Y, X, A, 5)
        truth = ad.varm["true_lfc"][keep]
        p, a = truth.shape
        off = np.log(est["size_factors"])   # the oracle gets the true U, the same size factors
        oracle = glm_wald_padj(Y, np.hstack([X, ad.obsm["U_true"]]), A, off)
        out.append(dict(df=df, truth=truth, oracle=oracle, p=p, a=a))
    return out


def test_confounded_signal_fdr_and_power(signal_runs):
    fdps, powers, oracle_powers = [], [], []
    for run in signal_runs:
        padj = np.nan_to_num(as_matrix(run["df"], "padj", run["p"], run["a"]), nan=1.0)
        fdp, power = fdp_power(padj, run["truth"])
        _, opower = fdp_power(run["oracle"], run["truth"])
        fdps.append(fdp)
        powers.append(power)
        oracle_powers.append(opower)
    print("FDP", np.round(fdps, 3), "power", np.round(powers, 3), "oracle power", np.round(oracle_powers, 3))
    assert np.mean(fdps) <= 0.06
    assert np.mean(powers) >= 0.9 * np.mean(oracle_powers)


def test_lfc_estimates_track_truth(signal_runs):
    run = signal_runs[0]
    tau = as_matrix(run["df"], "tau", run["p"], run["a"])
    est = as_matrix(run["df"], "estimable", run["p"], run["a"]).astype(bool)
    nonnull = (run["truth"] != 0) & est
    assert np.corrcoef(tau[nonnull], run["truth"][nonnull])[0, 1] > 0.8


# ----------------------------------------------------------------------------------
# FDX
# ----------------------------------------------------------------------------------
def test_fdx_rejects_strong_signals_and_controls_exceedance():
    exceed, powers = [], []
    for seed in range(20):
        Y, X, A, ad, keep = simulated(200 + seed, n_ctrl=300, n_perts=1, cells_per_pert=300,
                                      n_genes=200, r=2, effect_frac=0.1, effect_size=(1.0, 2.0))
        W = np.hstack([X, ad.obsm["U_true"]])
        df, _ = LFC(Y, W, A, np.hstack([_xa(Y, X), ad.obsm["U_true"]]),
                    offset=np.log(ad.obs["size_factor_true"].to_numpy()), fdx=True, fdx_B=300,
                    random_state=seed)
        truth = ad.varm["true_lfc"][keep][:, 0] != 0
        rej = df["rej"].to_numpy() == 1
        fdp = (rej & ~truth).sum() / max(rej.sum(), 1)
        exceed.append(fdp > 0.1)
        powers.append((rej & truth).sum() / truth.sum())
    print("P(FDP > 0.1) =", np.mean(exceed), "mean power", np.mean(powers))
    assert np.mean(exceed) <= 0.05 + 1e-9
    assert np.mean(powers) > 0.5


# ----------------------------------------------------------------------------------
# real data
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def schraivogel():
    return load_dataset("schraivogel2020_groundtruth")


def test_schraivogel_positive_controls(schraivogel):
    Y, A, X, X_A = from_anndata(schraivogel, as_dataframe=True)
    _, res_2 = fit_gcate(Y, X, A, 2, kwargs_es_1=dict(max_iters=20))
    U = res_2["U"]
    df, _ = LFC(Y, np.hstack([X, U]), A, np.hstack([X_A, U]),
                offset=np.log(res_2["kwargs_glm"]["size_factor"]))
    hits = 0
    promoters = [t for t in A.columns if t in Y.columns]
    assert len(promoters) == 13
    for t in promoters:
        row = df[(df["trt"] == t) & (df["gene_names"] == t)].iloc[0]
        hits += (row["tau"] < 0) and (row["padj"] < 0.05)
    assert hits >= 12
    hbe1 = df[(df["trt"] == "HS2") & (df["gene_names"] == "HBE1")].iloc[0]
    assert hbe1["tau"] < 0 and hbe1["padj"] < 0.05


def test_schraivogel_negative_control(schraivogel):
    """10 fake perturbations of 300 non-targeting cells each against the remaining ones."""
    ad = schraivogel[schraivogel.obs["perturbation"] == "non-targeting"].copy()
    rng = np.random.default_rng(0)
    labels = np.array(["non-targeting"] * ad.n_obs, dtype=object)
    pick = rng.choice(ad.n_obs, 3000, replace=False)
    for g in range(10):
        labels[pick[g * 300:(g + 1) * 300]] = f"FAKE{g}"
    ad.obs["perturbation"] = pd.Categorical(labels)
    Y, A, X, X_A = from_anndata(ad, as_dataframe=True)
    keep = Y.sum(axis=0) > 0
    Y = Y.loc[:, keep]
    _, res_2 = fit_gcate(Y, X, A, 2, kwargs_es_1=dict(max_iters=20))
    U = res_2["U"]
    df, _ = LFC(Y, np.hstack([X, U]), A, np.hstack([X_A, U]),
                offset=np.log(res_2["kwargs_glm"]["size_factor"]))
    n_disc = int((df["padj"] < 0.05).sum())
    print("negative control discoveries:", n_disc)
    assert n_disc <= 5


def test_papalexi_stat1_jak2_knockdown():
    ad = load_dataset("papalexi2021")
    keep = ad.obs["perturbation"].isin(["non-targeting", "STAT1", "JAK2", "IFNGR1", "IRF1"])
    ad = ad[keep].copy()
    Y, A, X, X_A = from_anndata(ad, covariates=("bio_rep",), as_dataframe=True)
    Y = Y.loc[:, Y.sum(axis=0) > 0]
    _, res_2 = fit_gcate(Y, X, A, 2, kwargs_es_1=dict(max_iters=15))
    U = res_2["U"]
    df, _ = LFC(Y, np.hstack([X, U]), A, np.hstack([X_A, U]),
                offset=np.log(res_2["kwargs_glm"]["size_factor"]))
    for t in ("STAT1", "JAK2"):
        row = df[(df["trt"] == t) & (df["gene_names"] == t)].iloc[0]
        assert row["tau"] < 0 and row["padj"] < 0.05, row
