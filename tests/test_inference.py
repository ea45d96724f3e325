"""Tests for causarray.inference: p-values, BH, empirical null, FDX."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from causarray.inference import (
    bh_adjust,
    bootstrap_abs_z,
    empirical_null_adjust,
    fdx_control,
    multiple_testing,
    t_pvalues,
)


def lfc_like(eta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tau, std, stat from influence values exactly as the pooled LFC does."""
    n = eta.shape[0]
    tau = eta.mean(axis=0)
    std = eta.std(axis=0, ddof=1) / np.sqrt(n)
    return tau, std, tau / std


def simulate_eta(seed: int, n: int = 400, p: int = 200, n_eff: int = 0, delta: float = 0.5):
    rng = np.random.default_rng(seed)
    eta = rng.standard_normal((n, p))
    eta[:, :n_eff] += delta  # stat of an effect gene ~ delta * sqrt(n) = 10
    return eta


# ----------------------------------------------------------------------------------
# p-values
# ----------------------------------------------------------------------------------
def test_t_pvalues_equal_scipy_per_entry_df():
    rng = np.random.default_rng(1)
    stat = rng.normal(scale=3, size=50)
    df = rng.uniform(1, 300, size=50)
    np.testing.assert_allclose(t_pvalues(stat, df), 2 * stats.t.sf(np.abs(stat), df),
                               rtol=1e-12)
    np.testing.assert_allclose(t_pvalues(stat, 7.0), 2 * stats.t.sf(np.abs(stat), 7.0))
    np.testing.assert_allclose(t_pvalues(stat), 2 * stats.norm.sf(np.abs(stat)), rtol=1e-12)
    # infinite df is the normal reference
    np.testing.assert_allclose(t_pvalues(stat, np.inf), t_pvalues(stat))


def test_t_pvalues_nan_propagates():
    p = t_pvalues([np.nan, 1.0, 2.0], [10.0, np.nan, 10.0])
    assert np.isnan(p[0]) and np.isnan(p[1])
    assert p[2] == pytest.approx(2 * stats.t.sf(2.0, 10))
    assert np.isnan(t_pvalues([np.nan])[0])
    with pytest.raises(ValueError, match="df must be positive"):
        t_pvalues([1.0], [0.0])


def test_pvalues_of_normal_stats_are_uniform():
    stat = np.random.default_rng(2).standard_normal(2000)
    assert stats.kstest(t_pvalues(stat), "uniform").pvalue > 0.05
    stat_t = np.random.default_rng(3).standard_t(5, size=2000)
    assert stats.kstest(t_pvalues(stat_t, 5), "uniform").pvalue > 0.05


# ----------------------------------------------------------------------------------
# BH
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bh_equals_statsmodels_on_finite_entries(seed):
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(size=80), rng.uniform(0, 1e-3, size=20),
                        [0.5, 0.5, 0.5, 0.0, 1.0]])  # ties and extremes
    p[rng.choice(p.size, 10, replace=False)] = np.nan
    adj = bh_adjust(p)
    ok = ~np.isnan(p)
    np.testing.assert_array_equal(np.isnan(adj), ~ok)
    np.testing.assert_allclose(adj[ok], multipletests(p[ok], method="fdr_bh")[1], rtol=1e-14)


def test_bh_edge_cases():
    assert np.isnan(bh_adjust([np.nan, np.nan])).all()
    assert bh_adjust([]).shape == (0,)
    np.testing.assert_allclose(bh_adjust([0.01]), [0.01])
    with pytest.raises(ValueError, match=r"pvalues must lie in \[0, 1\]"):
        bh_adjust([0.2, 1.5])


# ----------------------------------------------------------------------------------
# empirical null
# ----------------------------------------------------------------------------------
def test_empirical_null_makes_shifted_scaled_null_uniform():
    rng = np.random.default_rng(4)
    stat = 0.8 + 1.7 * rng.standard_normal(3000)
    raw = t_pvalues(stat)
    p_adj, padj_adj = empirical_null_adjust(stat)
    assert stats.kstest(raw, "uniform").pvalue < 1e-6
    assert stats.kstest(p_adj, "uniform").pvalue > 0.05
    np.testing.assert_allclose(padj_adj, bh_adjust(p_adj))
    # explicit formula with the normal-consistent MAD
    m = np.median(stat)
    s = 1.4826 * np.median(np.abs(stat - m))
    np.testing.assert_allclose(p_adj, 2 * stats.norm.sf(np.abs(stat - m) / s))


def test_empirical_null_uses_df_and_ignores_nan():
    rng = np.random.default_rng(5)
    stat = rng.standard_t(6, size=500) * 1.3 - 0.4
    stat[:7] = np.nan
    df = np.full(500, 6.0)
    p_adj, padj_adj = empirical_null_adjust(stat, df)
    ok = ~np.isnan(stat)
    assert np.isnan(p_adj[~ok]).all() and np.isnan(padj_adj[~ok]).all()
    m = np.median(stat[ok])
    s = 1.4826 * np.median(np.abs(stat[ok] - m))
    np.testing.assert_allclose(p_adj[ok], 2 * stats.t.sf(np.abs(stat[ok] - m) / s, 6))


def test_empirical_null_zero_mad_gives_nan_columns():
    stat = np.array([2.0, 2.0, 2.0, 2.0, 5.0, np.nan])
    p_adj, padj_adj = empirical_null_adjust(stat)
    assert np.isnan(p_adj).all() and np.isnan(padj_adj).all()
    out = multiple_testing(stat, df=None)
    assert np.isnan(out["pvalue_emp_null_adj"]).all()
    raw = out["pvalue"][:5]
    assert np.all((raw > 0) & (raw <= 1))


# ----------------------------------------------------------------------------------
# FDX
# ----------------------------------------------------------------------------------
def test_bootstrap_is_unit_variance_and_chunking_invariant():
    eta = simulate_eta(6, n=300, p=40) * 3.0 + 2.0
    _, std, _ = lfc_like(eta)
    genes = np.arange(40)
    z = bootstrap_abs_z(eta, std, 300, genes, B=2000, random_state=1)
    assert z.shape == (2000, 40)
    np.testing.assert_allclose((z**2).mean(axis=0).mean(), 1.0, atol=0.05)
    z_small = bootstrap_abs_z(eta, std, 300, genes, B=2000, random_state=1, chunk_floats=1000)
    np.testing.assert_allclose(z_small, z, rtol=1e-10)
    # legacy statistic: variance ~ n Var(eta)/std^2 ~ n^2 (uncentred: sum of eta^2 / std^2)
    z_old = bootstrap_abs_z(eta, std, 300, genes, B=500, random_state=1,
                            legacy_fdx_scaling=True)
    ratio = (z_old**2).mean(axis=0) / ((eta**2).sum(axis=0) / std**2)
    np.testing.assert_allclose(ratio.mean(), 1.0, atol=0.1)


def test_fdx_global_null_controls_false_rejections():
    n_seeds = 40
    any_rej, shares = 0, []
    for seed in range(n_seeds):
        eta = simulate_eta(seed)
        _, std, stat = lfc_like(eta)
        rej = fdx_control(stat, eta, std, eta.shape[0], B=200, random_state=seed)
        any_rej += rej.any()  # under the global null FDP > c iff anything is rejected
        shares.append(rej.mean())
    assert np.mean(shares) <= 0.10
    assert any_rej / n_seeds <= 0.05 + 0.075  # alpha + ~2 binomial SE


def test_fdx_rejects_strong_effects_and_controls_fdx():
    n_seeds, alpha, c = 40, 0.05, 0.1
    exceed, power = 0, []
    for seed in range(n_seeds):
        eta = simulate_eta(100 + seed, n_eff=30)
        _, std, stat = lfc_like(eta)
        rej = fdx_control(stat, eta, std, eta.shape[0], alpha=alpha, c=c, B=200,
                          random_state=seed)
        fdp = rej[30:].sum() / max(rej.sum(), 1)
        exceed += fdp > c
        power.append(rej[:30].mean())
        if seed < 3:  # the original's mis-scaled bootstrap rejects none of them
            legacy = fdx_control(stat, eta, std, eta.shape[0], B=200, random_state=seed,
                                 legacy_fdx_scaling=True)
            assert legacy.sum() == 0
    assert np.mean(power) >= 0.9
    assert exceed / n_seeds <= alpha + 0.075


def test_legacy_scaling_is_a_deprecated_alias_of_legacy_fdx_scaling():
    eta = simulate_eta(5, n=200, p=30, n_eff=10, delta=1.0)
    _, std, stat = lfc_like(eta)
    genes = np.arange(30)
    z_new = bootstrap_abs_z(eta, std, 200, genes, B=50, random_state=2, legacy_fdx_scaling=True)
    msg = "'legacy_scaling' is deprecated; use 'legacy_fdx_scaling'"
    with pytest.warns(FutureWarning, match=msg):
        z_old = bootstrap_abs_z(eta, std, 200, genes, B=50, random_state=2, legacy_scaling=True)
    np.testing.assert_array_equal(z_old, z_new)
    # the legacy statistic differs from the default one, so the alias really switches it
    assert not np.allclose(z_new, bootstrap_abs_z(eta, std, 200, genes, B=50, random_state=2))
    rej_new = fdx_control(stat, eta, std, 200, B=50, random_state=2, legacy_fdx_scaling=True)
    with pytest.warns(FutureWarning, match="'legacy_scaling' is deprecated"):
        rej_old = fdx_control(stat, eta, std, 200, B=50, random_state=2, legacy_scaling=True)
    np.testing.assert_array_equal(rej_old, rej_new)
    with pytest.raises(TypeError, match="pass 'legacy_fdx_scaling' only"):
        fdx_control(stat, eta, std, 200, B=50, legacy_fdx_scaling=True, legacy_scaling=True)


def test_fdx_augmentation_count_and_ties():
    eta = simulate_eta(7, n=400, p=100, n_eff=20, delta=1.0)
    _, std, stat = lfc_like(eta)
    plain = fdx_control(stat, eta, std, 400, c=0.0, B=200)
    k = int(plain.sum())
    assert k == 20 and plain[:20].all()
    for c in (0.1, 0.2, 0.3, 0.5):
        aug = fdx_control(stat, eta, std, 400, c=c, B=200)
        extra = np.flatnonzero(aug & ~plain)
        assert extra.size == int(np.floor(c * k / (1 - c) + 1e-12))
        # the added genes are the non-rejected ones with the largest |stat|
        rest = np.flatnonzero(~plain.astype(bool))
        top = rest[np.argsort(-np.abs(stat[rest]))[: extra.size]]
        assert set(extra) == set(top)
    # ties at the cut value are all added
    stat_t = stat.copy()
    rest = np.flatnonzero(~plain.astype(bool))
    stat_t[rest[:3]] = 2.0
    stat_t[rest[3:]] = 0.5
    aug = fdx_control(stat_t, eta, std, 400, c=0.1, B=200)  # floor(0.1*20/0.9) = 2
    assert aug.sum() == 20 + 3


def test_fdx_monotone_in_c_and_alpha():
    eta = simulate_eta(8, n=400, p=150, n_eff=15, delta=0.25)
    _, std, stat = lfc_like(eta)
    counts = [fdx_control(stat, eta, std, 400, c=c, B=200).sum() for c in (0.0, 0.1, 0.3)]
    assert counts == sorted(counts) and counts[2] > counts[0]
    by_alpha = [fdx_control(stat, eta, std, 400, alpha=a, c=0.0, B=200).sum()
                for a in (0.01, 0.05, 0.2)]
    assert by_alpha == sorted(by_alpha)


def test_fdx_edge_cases():
    eta = simulate_eta(9, n=100, p=20)
    tau, std, stat = lfc_like(eta)
    # zero stats -> nothing; NaN / infinite-std (filtered) genes never rejected
    assert fdx_control(np.zeros(20), eta, std, 100, B=200).sum() == 0
    stat2, std2 = stat.copy(), std.copy()
    stat2[0], std2[0] = np.nan, np.inf
    stat2[1] = 50.0
    rej = fdx_control(stat2, eta, std2, 100, B=200)
    assert rej[0] == 0 and rej[1] == 1
    # tiny std: rejected only with |tau| > min_diff
    std3 = std.copy()
    std3[2] = 1e-10
    tau3 = tau.copy()
    tau3[2] = 0.05
    assert fdx_control(stat, eta, std3, 100, B=200, tau=tau3)[2] == 0
    tau3[2] = 0.5
    assert fdx_control(stat, eta, std3, 100, B=200, tau=tau3)[2] == 1
    # non-finite influence values are allowed only in untested columns
    eta_nan = eta.copy()
    eta_nan[:, 0] = np.nan
    np.testing.assert_array_equal(fdx_control(stat2, eta_nan, std2, 100, B=200), rej)
    with pytest.raises(ValueError, match="eta must be finite for every tested gene"):
        fdx_control(stat, eta_nan, std, 100, B=200)
    with pytest.raises(ValueError, match="eta must be n x p with p = 20"):
        fdx_control(stat, eta[:, :5], std, 100)
    with pytest.raises(ValueError, match=r"c must lie in \[0, 1\)"):
        fdx_control(stat, eta, std, 100, c=1.0)
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\)"):
        fdx_control(stat, eta, std, 100, alpha=0.0)


def test_fdx_reproducible_with_seed():
    eta = simulate_eta(10, n=200, p=50, n_eff=5, delta=0.3)
    _, std, stat = lfc_like(eta)
    a = fdx_control(stat, eta, std, 200, B=200, random_state=3)
    b = fdx_control(stat, eta, std, 200, B=200, random_state=3)
    np.testing.assert_array_equal(a, b)
    assert a.dtype.kind == "i"


# ----------------------------------------------------------------------------------
# multiple_testing
# ----------------------------------------------------------------------------------
def test_multiple_testing_columns():
    eta = simulate_eta(11, n=300, p=60, n_eff=10, delta=0.5)
    tau, std, stat = lfc_like(eta)
    stat[-3:] = np.nan
    std[-3:] = np.inf
    df = np.full(60, 298.0)
    out = multiple_testing(stat, df, eta=eta, std=std, fdx=True, tau=tau, fdx_B=200)
    assert list(out) == ["pvalue", "padj", "pvalue_emp_null_adj", "padj_emp_null_adj", "rej"]
    ok = ~np.isnan(stat)
    np.testing.assert_allclose(out["pvalue"][ok], 2 * stats.t.sf(np.abs(stat[ok]), 298))
    np.testing.assert_allclose(out["padj"][ok],
                               multipletests(out["pvalue"][ok], method="fdr_bh")[1])
    for col in ("pvalue", "padj", "pvalue_emp_null_adj", "padj_emp_null_adj"):
        assert np.isnan(out[col][~ok]).all()
    assert out["rej"][:10].all() and out["rej"][-3:].sum() == 0
    off = multiple_testing(stat, df)
    np.testing.assert_array_equal(off["rej"], np.zeros(60, dtype=int))
    with pytest.raises(ValueError, match="fdx=True needs eta and std"):
        multiple_testing(stat, df, fdx=True)


def test_fdx_memory_stays_near_one_bootstrap_matrix():
    import tracemalloc

    eta = simulate_eta(12, n=600, p=500)
    _, std, stat = lfc_like(eta)
    B = 400
    tracemalloc.start()
    fdx_control(stat, eta, std, 600, B=B)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # no n x p (centred eta) or second B x p copy: peak well below 2 x (B x p) floats
    assert peak < 1.5 * B * 500 * 8


# ----------------------------------------------------------------------------------
# on-target (cis) and trans families
# ----------------------------------------------------------------------------------
def _screen_pvalues(seed: int = 0, a: int = 6, p: int = 40):
    rng = np.random.default_rng(seed)
    trt = np.repeat([f"G{k}" for k in range(a)], p)
    genes = np.tile([f"G{j}" for j in range(p)], a)
    pv = rng.uniform(size=a * p)
    pv[rng.choice(a * p, 15, replace=False)] = np.nan          # untested pairs
    pv[trt == genes] = rng.uniform(0, 0.01, size=a)           # the knock-downs
    return pv, trt, genes


def test_family_bh_equals_statsmodels_per_family():
    from causarray.inference import family_bh, on_target_pairs

    pv, trt, genes = _screen_pvalues()
    cis = on_target_pairs(trt, genes, "auto")
    assert cis.sum() == 6 and np.all(trt[cis] == genes[cis])
    padj = family_bh(pv, trt, cis)
    ok = ~np.isnan(pv)
    np.testing.assert_allclose(padj[cis], multipletests(pv[cis], method="fdr_bh")[1],
                               rtol=1e-12)
    for t in np.unique(trt):
        rows = (trt == t) & ~cis & ok
        np.testing.assert_allclose(padj[rows], multipletests(pv[rows], method="fdr_bh")[1],
                                   rtol=1e-12)
    assert np.all(np.isnan(padj[~ok]))
    # no on-target family: one BH family per perturbation over all its genes
    plain = family_bh(pv, trt, on_target_pairs(trt, genes, None))
    for t in np.unique(trt):
        rows = (trt == t) & ok
        np.testing.assert_allclose(plain[rows], multipletests(pv[rows], method="fdr_bh")[1],
                                   rtol=1e-12)


def test_on_target_pairs_from_a_mapping():
    from causarray.inference import on_target_pairs

    trt = np.array(["HS2", "HS2", "MYC", "MYC", "MYC"])
    genes = np.array(["HBE1", "MYC", "MYC", "HBG1", "HBE1"])
    m = on_target_pairs(trt, genes, {"HS2": ("HBE1", "HBG1"), "MYC": ("MYC",)})
    assert m.tolist() == [True, False, True, False, False]


def test_on_target_family_keeps_a_lone_knockdown_and_fdr_on_nulls():
    """A knock-down at p = 0.004 in a perturbation with no other effect: BH over its 100
    genes misses it (0.4), the on-target family of 10 knock-downs calls it.  The trans
    families keep FDR: over 200 screens of null trans pairs, each perturbation's family
    makes a call with probability <= 0.05."""
    from causarray.inference import family_bh, on_target_pairs

    rng = np.random.default_rng(1)
    a, p = 10, 100
    trt = np.repeat([f"G{k}" for k in range(a)], p)
    genes = np.tile([f"G{j}" for j in range(p)], a)
    cis = on_target_pairs(trt, genes, "auto")
    false_calls = 0
    for _ in range(200):
        pv = rng.uniform(size=a * p)
        pv[cis] = 1e-6
        pv[(trt == "G0") & cis] = 0.004
        padj = family_bh(pv, trt, cis)
        assert padj[(trt == "G0") & cis][0] < 0.05
        plain = family_bh(pv, trt, np.zeros_like(cis))
        assert plain[(trt == "G0") & cis][0] > 0.05
        # every trans pair is null, so a family's FDR is P(any call) (BH: = 0.05)
        false_calls += sum(np.any(padj[(trt == t) & ~cis] < 0.05) for t in np.unique(trt))
    assert false_calls / (200 * a) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / (200 * a))


@pytest.mark.parametrize("bad, exc, msg", [
    ("cis", ValueError, r"targets must be 'auto', None or a mapping perturbation -> gene\(s\), got 'cis'"),
    (3, TypeError, r"targets must be 'auto', None or a mapping perturbation -> gene\(s\), got int"),
    ({"MYC": [1]}, TypeError, r"targets\['MYC'\] must be a gene name or a list of gene names"),
])
def test_check_targets_errors(bad, exc, msg):
    from causarray._validation import check_targets

    with pytest.raises(exc, match=msg):
        check_targets(bad)


# ----------------------------------------------------------------------------------
# empirical-Bayes variances (the donor route's jackknife)
# ----------------------------------------------------------------------------------
def _hierarchical_variances(seed: int, n: int = 4000, d: float = 15.0, d0: float = 10.0):
    """True variances from a scaled inverse chi-square around a quadratic trend in x,
    estimates var ~ sigma² chi²_d / d, and null effects tau ~ N(0, sigma²)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, n)
    s0 = np.exp(0.5 - 0.3 * x + 0.1 * x ** 2)
    sigma2 = s0 * d0 / rng.chisquare(d0, n)
    var = sigma2 * rng.chisquare(d, n) / d
    tau = rng.normal(0.0, np.sqrt(sigma2))
    return x, sigma2, var, tau


def test_moderated_variances_recover_the_prior_and_give_exact_t_tests():
    """Under limma's model the prior degrees of freedom are recovered (4,000 genes: the
    band is about four standard errors of the moment estimate), the posterior variances
    are closer to the true ones than the raw estimates, and the moderated t on d + d0
    degrees of freedom is exact: its type-I error at 0.05 is in the 99 % binomial band."""
    from causarray.inference import moderated_variances

    x, sigma2, var, tau = _hierarchical_variances(0)
    post, df, d0 = moderated_variances(var, 15.0, x)
    assert 8.0 <= d0 <= 12.5
    np.testing.assert_allclose(df, 15.0 + d0)
    assert np.mean(np.log(post / sigma2) ** 2) < 0.7 * np.mean(np.log(var / sigma2) ** 2)
    p = t_pvalues(tau / np.sqrt(post), df)
    half = stats.norm.ppf(0.995) * np.sqrt(0.05 * 0.95 / p.size)
    assert abs(np.mean(p < 0.05) - 0.05) <= half


def test_moderated_variances_edge_cases():
    """Variances on their trend exactly: d0 = inf, the trend itself on the pooled degrees
    of freedom; too few genes, or unusable entries: returned as given."""
    from causarray.inference import MODERATION_MIN_GENES, moderated_variances

    x = np.linspace(-1.0, 1.0, 200)
    var = np.exp(0.2 + 0.5 * x)
    post, df, d0 = moderated_variances(var, 10.0, x)
    assert np.isinf(d0) and (df == 10.0 * 200).all()
    # the trend fits log var exactly; the posterior is it less E[log chi²_10 / 10]
    from scipy.special import digamma

    np.testing.assert_allclose(np.log(post), np.log(var) - (digamma(5.0) - np.log(5.0)),
                               rtol=1e-10)
    few = var[:MODERATION_MIN_GENES - 1]
    out, df_few, d0_few = moderated_variances(few, 10.0, x[:few.size])
    assert d0_few == 0.0 and (out == few).all() and (df_few == 10.0).all()
    bad = var.copy()
    bad[:3] = [np.nan, 0.0, -1.0]
    out, df_bad, _ = moderated_variances(bad, 10.0, x)
    np.testing.assert_array_equal(out[:3], bad[:3])
    assert (df_bad[:3] == 10.0).all()
