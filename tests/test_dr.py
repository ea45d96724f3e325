"""Doubly robust LFC: output schema, calibration on confounded nulls, FDR/power on
confounded signal, FDX, and real positive / negative controls."""

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


def run_causarray(Y, X, A, r, max_iters=20, assignment="observational", **lfc_kwargs):
    """The single-call path of docs/math.md#pipeline:
    fit_gcate -> LFC(Y, [X|U], A, [X_A|U], offset).

    The simulations' assignment depends on the confounders: ``'observational'``."""
    _, res_2 = fit_gcate(Y, X, A, r, kwargs_es_1=dict(max_iters=max_iters),
                         assignment=assignment)
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
    # the t reference's degrees of freedom: the p-value is 2 P(T_df > |stat|), as scipy's
    assert (df.loc[ok, "df"] > 0).all() and df.loc[~ok, "df"].isna().all()
    np.testing.assert_allclose(df.loc[ok, "pvalue"],
                               2 * stats.t.sf(df.loc[ok, "stat"].abs(), df.loc[ok, "df"]),
                               rtol=1e-10)
    assert est["pi_hat"].shape == Ad.shape and est["Y_hat"].to_array().shape == (*Yd.shape, 3, 2)
    # non-tested pairs: no estimate at all (NaN), so sorting by effect never mixes them in
    bad = ~df["estimable"]
    assert bad.any()
    for col in ("tau", "std", "log2fc", "log2fc_se", "stat", "pvalue", "padj"):
        assert df.loc[bad, col].isna().all(), col
    assert df.loc[~bad, ["tau", "std", "pvalue"]].notna().all().all()
    means = df[["mean_control", "mean_treated"]].to_numpy()
    assert (means[np.isfinite(means)] >= 0).all()          # arm means clipped at 0


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


def _reference_estimand(Y, W, A, s, pi, cm, k):
    """One treatment's tau (no bias correction) and variance (with the outcome-model term
    and the floor), computed cell by cell from docs/math.md#doubly-robust-lfc and
    docs/dr.md (outcome-model estimation error)."""
    n = Y.shape[0]
    rows = np.flatnonzero((A.sum(axis=1) == 0) | (A[:, k] == 1))
    n_k = rows.size
    z = A[rows, k][:, None]
    inv_s = 1.0 / s[rows][:, None]
    mu0, mu1 = cm.arms(rows, slice(None), k)
    w1, w0 = z / pi[rows, k][:, None], (1 - z) / (1 - pi[rows, k][:, None])
    phi1 = (mu1 + w1 * (Y[rows] - mu1)) * inv_s
    phi0 = (mu0 + w0 * (Y[rows] - mu0)) * inv_s
    t1, t0 = np.maximum(phi1.mean(axis=0), 0.01), np.maximum(phi0.mean(axis=0), 0.01)
    eta = phi1 / t1 - phi0 / t0
    q = W.shape[1] + 1
    var = eta.var(axis=0, ddof=1) / n_k * n_k / (n_k - q)
    # outcome-model term: zeta_i = r_i (w_i' u_b + u_c[g(i)]), u = I^-1 d tau / d coef
    info, g = cm.info, np.argmax(A, axis=1) - (A.sum(axis=1) == 0) * (A.shape[1] + 1)
    mufit = cm.arms(np.arange(n), slice(None), 0)[0]
    for m in range(A.shape[1]):
        mufit[g == m] = cm.arms(np.flatnonzero(g == m), slice(None), m)[1]
    R = (Y - mufit) / (1 + info.alpha * mufit)
    r1 = (1 - w1) * mu1 * inv_s / (n_k * t1)
    r0 = (1 - w0) * mu0 * inv_s / (n_k * t0)
    g_w, g_c = (r1 - r0).T @ W[rows], r1.sum(axis=0)
    u_b = np.einsum("mqr,mr->mq", info.S_inv, g_w - g_c[:, None] * info.F[k])
    u_c = -np.einsum("amq,mq->am", info.F, u_b)
    u_c[k] += g_c / info.D[k]
    lever = W @ u_b.T + np.where(g[:, None] >= 0, u_c[np.maximum(g, 0)], 0.0)
    zeta = R * lever
    var += (zeta ** 2).sum(axis=0) + 2 * ((eta - eta.mean(axis=0)) / n_k * zeta[rows]).sum(axis=0)
    treated = z[:, 0] == 1
    floor = (inv_s[treated].sum() / treated.sum() ** 2 / t1
             + inv_s[~treated].sum() / (~treated).sum() ** 2 / t0)
    return np.log(t1 / t0), np.maximum(var, floor)


def test_streamed_sums_match_cell_by_cell_reference(small_run):
    """tau and std (incl. the outcome-model variance term) equal a plain per-cell
    computation; the information blocks equal the inverse of the full Fisher information."""
    Yd, Ad, W, _, est, _ = small_run
    Y, A = Yd.to_numpy(), Ad.to_numpy()
    df, _ = LFC(Yd, W, Ad, offset=est["offset"], Y_hat=est["Y_hat"], pi_hat=est["pi_hat_raw"],
                recenter=False, bias_correction=False, thres_min=0.0)
    cm, p = est["Y_hat"], Y.shape[1]
    for k in range(A.shape[1]):
        tau, var = _reference_estimand(Y, W, A, est["size_factors"], est["pi_hat"], cm, k)
        got = df.iloc[k * p:(k + 1) * p]
        ok = got["estimable"].to_numpy()
        assert ok.sum() > 100
        np.testing.assert_allclose(got["tau"].to_numpy()[ok], tau[ok], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got["std"].to_numpy()[ok], np.sqrt(var[ok]), rtol=1e-8)
    info, q = cm.info, W.shape[1]
    D = np.hstack([W, A])
    mu = np.exp(cm.log_mu0 + A @ cm.effect[0].T)
    for j in (0, 7, 42):
        wj = mu[:, j] / (1 + info.alpha[j] * mu[:, j])
        cov = np.linalg.inv(D.T @ (wj[:, None] * D))
        np.testing.assert_allclose(info.S_inv[j], cov[:q, :q], rtol=1e-6, atol=1e-10)
        r2 = ((Y[:, j] - mu[:, j]) / (1 + info.alpha[j] * mu[:, j])) ** 2
        meat = D.T @ (r2[:, None] * D)
        iu = np.triu_indices(q)
        np.testing.assert_allclose(info.meat_WW[j], meat[:q, :q][iu], rtol=1e-9)
        np.testing.assert_allclose(info.meat_WG[:, j], meat[q:, :q], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(info.meat_GG[:, j], np.diag(meat[q:, q:]), rtol=1e-9)


def test_shared_control_products_equal_per_treatment_sums():
    """The product form of the control sums (no mask) equals the cell-by-cell sums (an
    explicit mask equal to the default cell sets), also where the 1e5 cap binds."""
    Y, X, A, ad, _ = simulated(3, n_ctrl=300, n_perts=3, cells_per_pert=80, n_genes=120, r=2)
    W = np.hstack([X, ad.obsm["U_true"]])
    off = np.log(comp_size_factor(Y))
    off[::9] += 9.0                      # means above the cap for every 9th cell
    elig = (A.sum(axis=1) == 0)[:, None] | (A == 1)
    for kw in (dict(), dict(usevar="unequal"), dict(nuisance_variance=False)):
        d1, e1 = LFC(Y, W, A, offset=off, **kw)
        d2, _ = LFC(Y, W, A, offset=off, mask=elig, Y_hat=e1["Y_hat"], pi_hat=e1["pi_hat_raw"],
                    **kw)
        assert (d1["estimable"] == d2["estimable"]).all()
        for col in ("tau", "std", "mean_control", "mean_treated"):
            np.testing.assert_allclose(d1[col], d2[col], rtol=1e-10, atol=1e-12)


def test_outcome_init_is_only_a_starting_point(small_run):
    Yd, Ad, W, _, est, _ = small_run
    a = Ad.shape[1]
    size = np.full(Yd.shape[1], 4.0)
    fit = fit_glm(Yd.to_numpy(), W, Ad.to_numpy(), size=size, offset=est["offset"])
    kw = dict(offset=est["offset"], pi_hat=est["pi_hat_raw"], disp_glm=size)
    cold, _ = LFC(Yd, W, Ad, **kw)
    warm, _ = LFC(Yd, W, Ad, outcome_init=fit.coef, **kw)
    np.testing.assert_allclose(warm["tau"], cold["tau"], atol=1e-6)
    np.testing.assert_allclose(warm["std"], cold["std"], rtol=1e-6)
    with pytest.raises(ValueError, match="outcome_init must have shape"):
        LFC(Yd, W, Ad, outcome_init=fit.coef[:, :-1], **kw)
    assert fit.coef.shape[1] == W.shape[1] + a


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
    # tested: a finite p-value; only estimable pairs are tested
    assert df["tested"].dtype == bool and not df["tested"].iloc[0]
    assert (df["tested"] == np.isfinite(df["pvalue"])).all() and df["tested"].sum() > 30
    assert not (df["tested"] & ~df["estimable"]).any()


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
        U = ad.obsm["U_true"]
        oracle = glm_wald_padj(Y, np.hstack([X, U]), A, off)
        # the same doubly robust estimator and inference, given the true U
        df_dr, _ = LFC(Y, np.hstack([X, U]), A, np.hstack([_xa(Y, X), U]), offset=off)
        oracle_dr = np.nan_to_num(as_matrix(df_dr, "padj", p, a), nan=1.0)
        out.append(dict(df=df, truth=truth, oracle=oracle, oracle_dr=oracle_dr, p=p, a=a))
    return out


def fdr_matched_power(runs, key, level=0.05):
    """Power of ``runs[i][key]`` at the largest BH level whose FDR (mean FDP over the
    runs) is at most ``level``: an oracle's power at the FDR the method is held to."""
    best = 0.0
    for q in np.linspace(0.001, level, 50):
        fp = np.array([fdp_power(run[key], run["truth"], q) for run in runs])
        if fp[:, 0].mean() <= level:
            best = max(best, fp[:, 1].mean())
    return best


@pytest.mark.slow
def test_confounded_signal_fdr_and_power(signal_runs):
    fdps, fdps10, powers = [], [], []
    for run in signal_runs:
        padj = np.nan_to_num(as_matrix(run["df"], "padj", run["p"], run["a"]), nan=1.0)
        fdp, power = fdp_power(padj, run["truth"])
        fdps10.append(fdp_power(padj, run["truth"], q=0.1)[0])
        fdps.append(fdp)
        powers.append(power)
    glm_nominal = np.mean([fdp_power(run["oracle"], run["truth"]) for run in signal_runs], 0)
    dr_oracle = np.mean([fdp_power(run["oracle_dr"], run["truth"]) for run in signal_runs], 0)
    glm_matched = fdr_matched_power(signal_runs, "oracle")
    print("FDP", np.round(fdps, 3), "FDP at q = 0.1", np.round(fdps10, 3),
          "power", np.round(powers, 3), "mean", round(np.mean(powers), 4),
          "| true-U oracles: DR (FDR, power)", np.round(dr_oracle, 4),
          "NB GLM at q = 0.05", np.round(glm_nominal, 4),
          "NB GLM at FDR 0.05", round(glm_matched, 4))
    # measured: FDR 0.049, power 0.789; the same estimator given the true U 0.801 (0.985x);
    # the NB GLM given the true U 0.879 at q = 0.05 but with FDR 0.070 there, so the fair
    # comparison holds it to FDR 0.05 too (docs/dr.md, "Power against oracles")
    assert np.mean(fdps) <= 0.05
    assert np.mean(fdps10) <= 0.10
    assert np.mean(powers) >= 0.9 * dr_oracle[1]
    assert np.mean(powers) >= 0.9 * glm_matched


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ----------------------------------------------------------------------------------
# effects stay effects under randomized assignment (the default): the factors, the
# confounder shift and the propensity design must not absorb a perturbation's own effect
# ----------------------------------------------------------------------------------
def _naive_log_ratio(ad, trt: str, gene: str) -> float:
    """log ratio of library-size-normalised means, perturbation vs controls."""
    import scipy.sparse as sps

    Y = ad.X.tocsr() if sps.issparse(ad.X) else np.asarray(ad.X)
    lib = np.asarray(Y.sum(axis=1)).ravel()
    j = list(ad.var_names).index(gene)
    col = np.asarray(Y[:, j].todense()).ravel() / lib if sps.issparse(Y) else Y[:, j] / lib
    lab = ad.obs[ad.uns["pert_col"]].astype(str).to_numpy()
    return float(np.log(col[lab == trt].mean() / col[lab == ad.uns["ctrl_label"]].mean()))


@pytest.mark.slow
@pytest.mark.parametrize("r", [1, 3, 5])
def test_seed_call_keeps_schraivogel_targets_at_every_r(schraivogel, r):
    """The seed tutorial's call on all cells: the factors must not take the knock-downs.
    Before the randomized-assignment changes: 13 / 12 / 11 of 14 targets, MYC 0.25 x
    naive at r = 3, HS2 -> HBE1 -2.45 +- 2.39 at r = 5.  CCNE2 (-0.59 +- 0.21, as the NB
    GLM) missed through BH within its perturbation until on-target pairs became a family
    of their own."""
    from causarray import gcate_lfc_batch

    Y, A, X, X_A = from_anndata(schraivogel, as_dataframe=True)
    df = gcate_lfc_batch(Y, X, A, r, W_A=X_A, batch_size=15, n_ctrl=None, max_cells=None)
    pairs = [(t, t) for t in A.columns if t in Y.columns] + [("HS2", "HBE1")]
    hits = 0
    for t, g in pairs:
        row = df[(df["trt"] == t) & (df["gene_names"] == g)].iloc[0]
        assert row["estimable"], (t, g)
        hits += (row["tau"] < 0) and (row["padj"] < 0.05)
        naive = _naive_log_ratio(schraivogel, t, g)
        if naive < -0.1:
            assert row["tau"] / naive >= 0.8, (t, g, row["tau"], naive)
    assert hits == len(pairs) == 14
    hbe1 = df[(df["trt"] == "HS2") & (df["gene_names"] == "HBE1")].iloc[0]
    assert hbe1["std"] < 0.15 and hbe1["tau"] < 0.9 * _naive_log_ratio(schraivogel, "HS2", "HBE1")


@pytest.mark.slow
def test_papalexi_programme_knockouts_are_not_taken_for_confounding():
    """JAK2 / STAT1 / IFNGR2 knock-outs move the whole IFN-gamma programme, which looks like
    a confounder shift along the factors; under random assignment it stays an effect
    (before: STAT1 0.55 x naive, JAK2 0.49 x at r = 5)."""
    from causarray import gcate_lfc_batch

    ad = load_dataset("papalexi2021")
    keep = ad.obs["perturbation"].isin(["non-targeting", "STAT1", "JAK2", "IFNGR2", "IRF1",
                                        "CUL3", "SMAD4"])
    ad = ad[keep].copy()
    Y, A, X, X_A = from_anndata(ad, covariates=("bio_rep",), as_dataframe=True)
    Y = Y.loc[:, Y.sum(axis=0) > 0]
    df = gcate_lfc_batch(Y, X, A, 5, W_A=X_A, batch_size=15, n_ctrl=None, max_cells=None)
    for t in ("STAT1", "JAK2", "IFNGR2"):
        row = df[(df["trt"] == t) & (df["gene_names"] == t)].iloc[0]
        assert row["padj"] < 0.05 and row["tau"] / _naive_log_ratio(ad, t, t) >= 0.8, row


def test_no_confounding_factors_do_not_add_error():
    """The original's end-to-end design without confounding (n = 300, 30 genes, r = 2,
    half the genes affected by +-U(0.5, 1.5), random assignment): the LFC error with U
    is at most 1.1 x the error without U (2 x on this design when every shift was taken
    for confounding)."""
    from causarray import gcate_lfc_batch

    mse = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        n, p, r = 300, 30, 2
        U = rng.normal(size=(n, r))
        G = rng.normal(0, 1.5, size=(p, r)) / np.sqrt(r)
        a = rng.uniform(size=n) < 0.5
        beta = np.zeros(p)
        idx = rng.choice(p, p // 2, replace=False)
        beta[idx] = rng.choice([-1, 1], idx.size) * rng.uniform(0.5, 1.5, idx.size)
        mu = np.exp(np.log(10) + 0.5 * U @ G.T + np.outer(a, beta))
        Y = rng.negative_binomial(5, 5 / (5 + mu))
        keep = Y.sum(axis=0) > 0
        Y, beta = Y[:, keep], beta[keep]
        A = pd.DataFrame(a.astype(float)[:, None], columns=["t"])
        X = np.ones((n, 1))
        row = []
        for rr in (0, r):
            tau = gcate_lfc_batch(Y, X, A, rr, n_ctrl=None, max_cells=None)["tau"].to_numpy()
            ok = np.isfinite(tau)
            row.append(np.mean((tau[ok] - beta[ok]) ** 2))
        mse.append(row)
    mse = np.mean(mse, axis=0)
    print("MSE without / with U:", np.round(mse, 4))
    assert mse[1] <= 1.1 * mse[0]


def test_gene_fold_designs_equal_one_design_when_identical():
    """LFC with one design per fold of genes: identical designs give exactly the one-design
    result (the per-fold fits are stitched by gene before filters and BH); a fold without
    a design is refused."""
    Y, X, A, ad, keep = simulated(7, n_ctrl=200, n_perts=2, cells_per_pert=100, n_genes=120,
                                  r=2)
    W = np.hstack([X, ad.obsm["U_true"]])
    off = np.log(ad.obs["size_factor_true"].to_numpy())
    ref, _ = LFC(Y, W, A, X, offset=off)
    fold = np.arange(Y.shape[1]) % 3
    got, _ = LFC(Y, W, A, X, offset=off, W_gene_folds=(fold, [W, W, W]))
    # each gene's GLM is its own fit (converged to tol 1e-8 whatever the chunk it sits
    # in); another BLAS may sum a chunk in another order: equal to well within 1e-6
    pd.testing.assert_frame_equal(got, ref, check_exact=False, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match=r"W_gene_folds: every gene's fold must be one of 0\.\.1"):
        LFC(Y, W, A, X, offset=off, W_gene_folds=(fold, [W, W]))


def test_weighted_df_is_welch_under_equal_weights_and_small_under_extreme_ones():
    """Satterthwaite df of the AIPW variance: with equal weights within each arm it is
    Welch's df of the arms' influence values; one dominant weight makes it small."""
    from causarray.dr import weighted_df

    rng = np.random.default_rng(0)
    e1, e0 = rng.normal(0, 2.0, (3, 40)), rng.normal(0, 1.0, (3, 300))

    def block(e, w):
        return dict(n=e.shape[1], w1=float(np.sum(w)), w2=float(np.sum(np.square(w))),
                    s1=e.sum(axis=1), s0=np.zeros(e.shape[0]), s11=(e * e).sum(axis=1),
                    s00=np.zeros(e.shape[0]), s10=np.zeros(e.shape[0]))

    def moments(b):
        return b["s1"], b["s11"]

    df = weighted_df(block(e1, np.full(40, 5.0)), block(e0, np.full(300, 1.2)), moments)
    v1 = e1.var(axis=1) * 40                 # the arms' centred sums of squares
    v0 = e0.var(axis=1) * 300
    welch = (v1 + v0) ** 2 / (v1 ** 2 / 39 + v0 ** 2 / 299)
    np.testing.assert_allclose(df, welch, rtol=1e-10)
    w = np.ones(40)
    w[0] = 200.0                             # one cell carries the treated arm
    df_x = weighted_df(block(e1, w), block(e0, np.ones(300)), moments)
    nu1 = w.sum() ** 2 / np.sum(w * w)
    # df <= (V1 + V0)^2 / (V1^2 / max(nu1 - 1, 1)) = max(nu1 - 1, 1) (1 + V0 / V1)^2
    assert np.all(df_x < df) and np.all(df_x <= max(nu1 - 1, 1) * (1 + v0 / v1) ** 2 * (1 + 1e-12))


# ----------------------------------------------------------------------------------
# multi-hot treatments (high MOI): the outcome-model term and the degrees of freedom
# ----------------------------------------------------------------------------------
def _multihot_problem(seed=5, n=1500, p=60, a=3):
    """Cells carrying several treatments (a Poisson number of them, as in high MOI), a
    covariate that predicts how many, NB counts with effects of every treatment."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    prob = 1.0 / (1.0 + np.exp(-(-1.2 + 0.8 * x)))
    A = (rng.random((n, a)) < prob[:, None]).astype(float)
    assert (A.sum(axis=1) > 1).any()
    W = np.column_stack([np.ones(n), x])
    b = np.column_stack([rng.normal(0.0, 1.0, p), rng.normal(0.0, 0.3, p)])
    eff = rng.normal(0.0, 0.3, (p, a))
    mu = np.exp(W @ b.T + A @ eff.T)
    Y = rng.negative_binomial(5.0, 5.0 / (5.0 + mu)).astype(float)
    return Y, W, A


def test_multihot_outcome_term_matches_a_cell_by_cell_reference():
    """With multi-hot A and comparison sets (high MOI), each treatment's variance gains
    the outcome-model term of the design [W | A_k] (docs/math.md#high-moi), computed
    here from its definition: zeta_i = r_i x_i' I^-1 d tau / d(b, c_k) with x_i =
    [w_i, a_ik], r_i the NB scores and I the Fisher information at the fitted means."""
    Y, W, A = _multihot_problem()
    n, p = Y.shape
    mask = np.ones(A.shape, bool)
    _, est = LFC(Y, W, A, W, offset=True, mask=mask)
    cm, s, pi = est["Y_hat"], est["size_factors"], est["pi_hat"]
    got, _ = LFC(Y, W, A, W, offset=est["offset"], mask=mask, Y_hat=cm,
                 pi_hat=est["pi_hat_raw"], recenter=False, bias_correction=False,
                 thres_min=0.0)
    plain, _ = LFC(Y, W, A, W, offset=est["offset"], mask=mask, Y_hat=cm,
                   pi_hat=est["pi_hat_raw"], recenter=False, bias_correction=False,
                   thres_min=0.0, nuisance_variance=False)
    mufit = np.minimum(np.exp(cm.log_mu0 + A @ cm.effect[0].T), 1e5)
    alpha = cm.alpha
    R = (Y - mufit) / (1 + alpha * mufit)
    w = mufit / (1 + alpha * mufit)
    inv_s = (1.0 / s)[:, None]
    q = W.shape[1] + 1
    for k in range(A.shape[1]):
        mu0, mu1 = cm.arms(np.arange(n), slice(None), k)
        z = A[:, k][:, None]
        w1, w0 = z / pi[:, k][:, None], (1 - z) / (1 - pi[:, k][:, None])
        phi1 = (mu1 + w1 * (Y - mu1)) * inv_s
        phi0 = (mu0 + w0 * (Y - mu0)) * inv_s
        t1, t0 = np.maximum(phi1.mean(axis=0), 0.01), np.maximum(phi0.mean(axis=0), 0.01)
        eta = phi1 / t1 - phi0 / t0
        var = eta.var(axis=0, ddof=1) / n * n / (n - q)
        r1 = (1 - w1) * mu1 * inv_s / (n * t1)
        r0 = (1 - w0) * mu0 * inv_s / (n * t0)
        D = np.column_stack([W, A[:, k]])
        grad = np.column_stack([(r1 - r0).T @ W, r1.sum(axis=0)])       # p x (q)
        term = np.empty(p)
        for j in range(p):
            u = np.linalg.solve(D.T @ (w[:, j:j + 1] * D), grad[j])
            zeta = R[:, j] * (D @ u)
            term[j] = np.sum(zeta ** 2) + 2 * np.sum((eta[:, j] - eta[:, j].mean()) / n * zeta)
        g = got.iloc[k * p:(k + 1) * p]
        ok = g["estimable"].to_numpy()
        assert ok.sum() > 40
        np.testing.assert_allclose(g["tau"].to_numpy()[ok], np.log(t1 / t0)[ok], rtol=1e-9,
                                   atol=1e-12)
        floor = (inv_s[z[:, 0] == 1].sum() / (z == 1).sum() ** 2 / t1
                 + inv_s[z[:, 0] == 0].sum() / (z == 0).sum() ** 2 / t0)
        np.testing.assert_allclose(g["std"].to_numpy()[ok],
                                   np.sqrt(np.maximum(var + term, floor))[ok], rtol=1e-7)
        # without the term: the influence-function variance alone
        np.testing.assert_allclose(plain["std"].to_numpy()[k * p:(k + 1) * p][ok],
                                   np.sqrt(np.maximum(var, floor))[ok], rtol=1e-7)
        # and the term matters: it moves most standard errors by far more than rtol
        moved = np.abs(np.sqrt(var + term) / np.sqrt(var) - 1)[ok & (var > floor)]
        assert np.median(moved) > 1e-3


def test_fourth_moment_sums_give_the_central_moment():
    """The power sums of a treated block give sum_i (eta_i - mean eta)^4 for any
    (a1, a0), equal to numpy on the influence values themselves."""
    from causarray.dr import _cross_power_sums, _eta_central4

    rng = np.random.default_rng(2)
    phi1 = rng.gamma(0.5, 2.0, (4, 300))
    phi0 = phi1 * rng.uniform(0.5, 1.5, (4, 300))
    b = dict(n=300, s1=phi1.sum(axis=1), s0=phi0.sum(axis=1),
             s11=(phi1 * phi1).sum(axis=1), s00=(phi0 * phi0).sum(axis=1),
             s10=(phi1 * phi0).sum(axis=1), power=_cross_power_sums(phi1, phi0))
    a1, a0 = rng.uniform(0.5, 2.0, 4), rng.uniform(0.5, 2.0, 4)
    eta = a1[:, None] * phi1 - a0[:, None] * phi0
    ref = ((eta - eta.mean(axis=1, keepdims=True)) ** 4).sum(axis=1)
    # the expansion cancels terms of size ~ sum eta^4: relative error ~ 1e-15 times that
    np.testing.assert_allclose(_eta_central4(b, a1, a0), ref,
                               rtol=1e-10 * (eta ** 4).sum(axis=1).max() / ref.min())
    assert _eta_central4({k: v for k, v in b.items() if k != "power"}, a1, a0) is None


def test_weighted_df_uses_the_fourth_moment_of_heavy_tailed_values():
    """Satterthwaite df with a treated block's fourth moment: about Welch's for normal
    influence values (never above it), far smaller for heavy-tailed ones, whose
    variance estimate is much noisier than Kish's nu assumes."""
    from causarray.dr import _cross_power_sums, weighted_df

    rng = np.random.default_rng(3)

    def block(e, power=True):
        out = dict(n=e.shape[1], w1=float(e.shape[1]), w2=float(e.shape[1]),
                   s1=e.sum(axis=1), s0=np.zeros(e.shape[0]), s11=(e * e).sum(axis=1),
                   s00=np.zeros(e.shape[0]), s10=np.zeros(e.shape[0]))
        if power:
            out["power"] = _cross_power_sums(e, np.zeros_like(e))
        return out

    def moments(b):
        return b["s1"], b["s11"]

    ones = (np.ones(200), np.ones(200))
    e0 = rng.normal(0, 0.2, (200, 3000))
    normal = rng.normal(0, 1.0, (200, 400))
    welch = weighted_df(block(normal, False), block(e0, False), moments)
    df_n = weighted_df(block(normal), block(e0, False), moments, ones)
    assert np.all(df_n <= welch * (1 + 1e-12))
    assert 0.7 < np.median(df_n / welch) <= 1.0
    heavy = rng.standard_t(3, (200, 400))
    df_h = weighted_df(block(heavy), block(e0, False), moments, ones)
    assert np.median(df_h) < 0.3 * np.median(welch)
