"""causarray.calibration_check: fake perturbations from control cells, statistics, verdict."""
from __future__ import annotations

import base64
import re
import warnings

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

import causarray as ca
from causarray import pl
from causarray.calibration import (MIN_FAKE_CELLS, CalibrationResult, _clopper_pearson,
                                   _design_effect, calibration_html)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ----------------------------------------------------------------------------------
# runners used instead of tl.lfc
# ----------------------------------------------------------------------------------
def _log_normalised(adata):
    Y = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X, float)
    lib = Y.sum(axis=1, keepdims=True)
    return np.log1p(Y / np.maximum(lib, 1) * np.median(lib))


def welch_runner(adata, pert_col, ctrl_label, se_scale=1.0, **_):
    """Per-gene Welch t-test of each label against the controls, BH per label.

    Genes with fewer than 10 non-zero cells in an arm are not tested (NaN).

    ``se_scale < 1`` shrinks the standard error: a deliberately miscalibrated test.
    """
    Z = _log_normalised(adata)
    labels = adata.obs[pert_col].astype(str).to_numpy()
    ctrl = Z[labels == ctrl_label]
    frames = []
    for lab in sorted(set(labels) - {ctrl_label}):
        trt = Z[labels == lab]
        diff = trt.mean(0) - ctrl.mean(0)
        v1, v0 = trt.var(0, ddof=1) / len(trt), ctrl.var(0, ddof=1) / len(ctrl)
        se = np.sqrt(v1 + v0)
        with np.errstate(invalid="ignore", divide="ignore"):
            dof = (v1 + v0) ** 2 / (v1 ** 2 / (len(trt) - 1) + v0 ** 2 / (len(ctrl) - 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            t = diff / (se * se_scale)
            p = 2 * stats.t.sf(np.abs(t), dof)
        enough = (np.count_nonzero(trt, axis=0) >= 10) & (np.count_nonzero(ctrl, axis=0) >= 10)
        p = np.where((se > 0) & enough, p, np.nan)     # the t approximation needs counts
        padj = np.full_like(p, np.nan)
        ok = np.isfinite(p)
        padj[ok] = stats.false_discovery_control(p[ok])
        frames.append(pd.DataFrame(dict(gene_names=list(adata.var_names), pvalue=p, padj=padj,
                                        trt=lab)))
    return pd.concat(frames, ignore_index=True)


def broken_runner(adata, pert_col, ctrl_label, **kw):
    """Welch t with standard errors 1.5x too small (type-I about 0.19 instead of 0.05)."""
    return welch_runner(adata, pert_col, ctrl_label, se_scale=1 / 1.5)


class Recorder:
    """Runner that records what it is given and returns uniform p-values."""

    def __init__(self):
        self.calls = []

    def __call__(self, adata, pert_col, ctrl_label, **settings):
        self.calls.append(dict(obs_names=list(adata.obs_names),
                               labels=adata.obs[pert_col].astype(str).to_numpy(),
                               ctrl_label=ctrl_label, settings=settings))
        rng = np.random.default_rng(len(self.calls))
        labels = sorted(set(adata.obs[pert_col].astype(str)) - {ctrl_label})
        n = len(labels) * adata.n_vars
        return pd.DataFrame(dict(gene_names=list(adata.var_names) * len(labels),
                                 trt=np.repeat(labels, adata.n_vars),
                                 pvalue=rng.uniform(size=n), padj=np.ones(n)))


@pytest.fixture(scope="module")
def null_screen():
    return ca.simulate_screen(n_ctrl=1600, n_perts=3, cells_per_pert=100, n_genes=150, r=2,
                              null=True, baseline_mean=0.5, baseline_sd=1.0, random_state=0)


# ----------------------------------------------------------------------------------
# verdicts
# ----------------------------------------------------------------------------------
def test_null_screen_with_a_valid_test_is_calibrated(null_screen):
    res = ca.calibration_check(null_screen, runner=welch_runner)
    assert isinstance(res, CalibrationResult)
    assert res.status == "calibrated", res.verdict
    assert res.verdict.startswith("calibrated: ")
    assert res.band[0] <= res.type_I <= res.band[1]
    assert res.type_I_ci[0] <= 0.05 <= res.type_I_ci[1]
    assert res.n_calls <= res.calls_allowed
    # pooled rate and counts agree with the p-value table
    p = res.pvalues["pvalue"].to_numpy(float)
    p = p[np.isfinite(p)]
    assert res.n_tests == p.size == int(res.fakes["n_tested"].sum())
    assert res.type_I == pytest.approx(np.mean(p < 0.05), rel=0, abs=0)


def test_null_screen_with_tl_lfc_is_near_nominal(null_screen):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = ca.calibration_check(null_screen, n_fake=6, r=1, max_iters=20)
    assert res.settings["runner"] == "causarray.tl.lfc"
    assert res.settings["runner_settings"]["r"] == 1
    assert 0.025 <= res.type_I <= 0.075, res.verdict
    assert res.calibrated, res.verdict
    assert res.n_calls <= res.calls_allowed


def test_miscalibrated_runner_is_flagged(null_screen):
    res = ca.calibration_check(null_screen, runner=broken_runner)
    assert res.status == "miscalibrated"
    assert res.verdict.startswith("miscalibrated: ")
    assert res.type_I > res.band[1]
    # a z test with SE 1.5x too small rejects P(|Z| > 1.96 / 1.5) of the time
    expected = 2 * stats.norm.sf(1.959964 / 1.5)
    assert res.type_I_ci[0] <= expected <= res.type_I_ci[1]
    assert not res.calibrated


def test_conservative_runner_is_flagged(null_screen):
    res = ca.calibration_check(null_screen,
                               runner=lambda a, pert_col, ctrl_label, **k:
                               welch_runner(a, pert_col, ctrl_label, se_scale=1.5))
    assert res.status == "conservative"
    assert res.type_I < res.band[0]
    assert res.calibrated


# ----------------------------------------------------------------------------------
# how fakes are formed
# ----------------------------------------------------------------------------------
def test_random_fakes_are_disjoint_control_groups(ci_adata):
    rec = Recorder()
    res = ca.calibration_check(ci_adata, runner=rec, guide_key=False, n_fake=5)
    assert len(rec.calls) == 1
    call = rec.calls[0]
    ctrl = ci_adata.obs_names[ci_adata.obs["perturbation"] == "non-targeting"]
    assert call["obs_names"] == list(ctrl)            # only control cells, all of them
    n_ctrl, median_real = len(ctrl), 150              # 6 perturbations x 150 cells
    size = min(median_real, (n_ctrl - n_ctrl // 2) // 5)
    counts = pd.Series(call["labels"]).value_counts()
    assert sorted(counts.drop("non-targeting")) == [size] * 5
    assert counts["non-targeting"] == n_ctrl - 5 * size >= n_ctrl / 2
    assert list(res.fakes["n_cells"]) == [size] * 5
    assert set(res.fakes["n_control"]) == {n_ctrl - 5 * size}
    assert set(res.fakes["kind"]) == {"random"}
    assert res.settings["fake_size"] == size


def test_explicit_fake_size_and_seed(ci_adata):
    rec1, rec2, rec3 = Recorder(), Recorder(), Recorder()
    ca.calibration_check(ci_adata, runner=rec1, guide_key=False, n_fake=3, fake_size=40)
    ca.calibration_check(ci_adata, runner=rec2, guide_key=False, n_fake=3, fake_size=40)
    ca.calibration_check(ci_adata, runner=rec3, guide_key=False, n_fake=3, fake_size=40,
                         random_state=1)
    counts = pd.Series(rec1.calls[0]["labels"]).value_counts()
    assert sorted(counts.drop("non-targeting")) == [40, 40, 40]
    assert np.array_equal(rec1.calls[0]["labels"], rec2.calls[0]["labels"])
    assert not np.array_equal(rec1.calls[0]["labels"], rec3.calls[0]["labels"])


def test_guide_fakes_from_grna_counts(ci_adata):
    rec = Recorder()
    res = ca.calibration_check(ci_adata, runner=rec, n_fake=4)
    is_ctrl = (ci_adata.obs["perturbation"] == "non-targeting").to_numpy()
    # each control cell's guide, independently from the guide-count matrix
    G = ci_adata.obsm["grna_counts"][is_ctrl].toarray()
    names = np.asarray(ci_adata.uns["grna_names"], dtype=object)
    top = names[G.argmax(axis=1)]
    assert (np.asarray(ci_adata.uns["grna_target"])[G.argmax(axis=1)] == "non-targeting").all()
    per_guide = pd.Series(top).value_counts()
    # ... and from the obs column written at assignment time
    assert per_guide.sort_index().equals(
        ci_adata.obs.loc[is_ctrl, "guide_id"].value_counts().loc[lambda s: s > 0].sort_index()
        .rename(None).rename_axis(None))
    guide = res.fakes[res.fakes["kind"] == "guide"].set_index("guide")
    usable = per_guide[per_guide >= MIN_FAKE_CELLS]
    assert sorted(guide.index) == sorted(usable.index)
    assert (guide["n_cells"] == usable.reindex(guide.index)).all()
    assert res.settings["guide_source"] == "obsm['grna_counts']"
    small = per_guide[per_guide < MIN_FAKE_CELLS].index
    assert len(small) and all(any(g in note for note in res.notes) for g in small)
    # every guide fake is compared with the guided control cells outside its run only,
    # and those keep at least half of the controls
    ctrl_names = np.asarray(ci_adata.obs_names[is_ctrl])
    cell_guide = dict(zip(ctrl_names, top))
    for call in rec.calls[1:]:
        labels = call["labels"]
        cells = np.asarray(call["obs_names"])
        assert set(cells) == set(ctrl_names)
        for lab in set(labels) - {"non-targeting"}:
            g = lab.removeprefix("guide:")
            assert set(cells[labels == lab]) == {c for c in ctrl_names if cell_guide[c] == g}
        arm = cells[labels == "non-targeting"]
        assert len(arm) >= len(cells) / 2
        in_run = {lab.removeprefix("guide:") for lab in set(labels) - {"non-targeting"}}
        assert not {cell_guide[c] for c in arm} & in_run
    assert sum(len(set(c["labels"])) - 1 for c in rec.calls[1:]) == len(usable)


def test_guide_fakes_from_obs_column_match_obsm(ci_adata):
    r_obsm = ca.calibration_check(ci_adata, runner=Recorder(), guide_key="grna_counts")
    r_obs = ca.calibration_check(ci_adata, runner=Recorder(), guide_key="guide_id")
    a = r_obsm.fakes.loc[r_obsm.fakes["kind"] == "guide"].set_index("guide")["n_cells"]
    b = r_obs.fakes.loc[r_obs.fakes["kind"] == "guide"].set_index("guide")["n_cells"]
    assert a.sort_index().equals(b.sort_index())
    assert r_obs.settings["guide_source"] == "obs['guide_id']"


def test_guide_counts_as_dataframe_and_group_key():
    rng = np.random.default_rng(3)
    n_ctrl, n_pert, p = 240, 60, 20
    X = sp.csr_matrix(rng.poisson(3.0, size=(n_ctrl + n_pert, p)))
    labels = ["NT"] * n_ctrl + ["KO"] * n_pert
    guide_of = np.r_[rng.choice(3, size=n_ctrl), np.full(n_pert, 3)]
    G = np.zeros((n_ctrl + n_pert, 4))
    G[np.arange(len(G)), guide_of] = rng.integers(5, 30, size=len(G))
    G[:, 3] += (np.arange(len(G)) % 7 == 0)          # a little ambient targeting-guide signal
    cols = ["ntA", "ntB", "ntC", "koA"]
    adata = ad.AnnData(X=X, obs=pd.DataFrame({"lab": labels},
                                             index=[f"c{i}" for i in range(len(labels))]))
    adata.obsm["guides"] = pd.DataFrame(G, index=adata.obs_names, columns=cols)
    adata.uns["grna_group"] = np.array(["NT", "NT", "NT", "KO"], dtype=object)
    res = ca.calibration_check(adata, pert_col="lab", ctrl_label="NT", guide_key="guides",
                               n_fake=2, runner=Recorder())
    got = res.fakes[res.fakes["kind"] == "guide"].set_index("guide")["n_cells"].sort_index()
    want = pd.Series(np.bincount(guide_of[:n_ctrl], minlength=3), index=cols[:3])
    assert list(got.index) == cols[:3]
    assert got.to_numpy().tolist() == want.to_numpy().tolist()


def test_settings_are_passed_through(ci_adata):
    rec = Recorder()
    res = ca.calibration_check(ci_adata, runner=rec, guide_key=False, covariates=["batch"],
                               r=3, family="poisson", cache_path="/nonexistent/cache.h5")
    s = rec.calls[0]["settings"]
    assert s == dict(covariates=["batch"], r=3, family="poisson")    # no cache, no extras
    assert res.settings["runner_settings"] == s


# ----------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------
def test_error_no_control_cells(ci_adata):
    with pytest.raises(ValueError, match=re.escape(
            "control label 'NT' not found in obs['perturbation']")):
        ca.calibration_check(ci_adata, ctrl_label="NT", runner=Recorder())


def test_error_too_few_control_cells(ci_adata):
    keep = np.r_[np.flatnonzero(ci_adata.obs["perturbation"] != "non-targeting"),
                 np.flatnonzero(ci_adata.obs["perturbation"] == "non-targeting")[:100]]
    small = ci_adata[keep].copy()
    with pytest.raises(ValueError, match=re.escape(
            "too few control cells for the calibration check: 100 control cells, but "
            "n_fake=8 fake perturbations of at least 10 cells with half of the controls kept "
            "as the control arm need 160; lower n_fake")):
        ca.calibration_check(small, runner=Recorder())
    with pytest.raises(ValueError, match=re.escape(
            "n_fake=3 fake perturbations of fake_size=20 cells need 60 control cells, but "
            "only 50 of the 100 control cells can be used (at least 50 stay in the control "
            "arm); lower n_fake or fake_size")):
        ca.calibration_check(small, n_fake=3, fake_size=20, runner=Recorder())


def test_error_unknown_guide_key(ci_adata):
    with pytest.raises(ValueError, match=re.escape(
            "guide_key 'sgrna' is neither an obs column nor an obsm key; obs columns: "
            "['guide_id', 'perturbation',")):
        ca.calibration_check(ci_adata, guide_key="sgrna", runner=Recorder())


def test_error_guide_counts_without_names(ci_adata):
    del ci_adata.uns["grna_names"]
    with pytest.raises(ValueError, match=re.escape(
            "obsm['grna_counts'] holds guide counts without names; store the guide names in "
            "uns['grna_names'] (one per column)")):
        ca.calibration_check(ci_adata, runner=Recorder())


@pytest.mark.parametrize("kw, msg", [
    (dict(n_fake=0), "n_fake must be a positive integer, got 0"),
    (dict(alpha=1.5), "alpha must be in (0, 1), got 1.5"),
    (dict(fake_size=0), "fake_size must be a positive integer, got 0"),
])
def test_error_bad_arguments(ci_adata, kw, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        ca.calibration_check(ci_adata, runner=Recorder(), **kw)


def test_error_runner_without_columns(ci_adata):
    def bad(adata, pert_col, ctrl_label, **_):
        return pd.DataFrame(dict(trt=["x"], pvalue=[0.5]))

    with pytest.raises(ValueError, match=re.escape(
            "the runner's result table lacks column(s) ['padj']")):
        ca.calibration_check(ci_adata, runner=bad, guide_key=False)


# ----------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k, n", [(0, 50), (3, 50), (61, 1000), (50, 50)])
def test_clopper_pearson_matches_scipy(k, n):
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    lo, hi = _clopper_pearson(k, n)
    assert lo == pytest.approx(ci.low, rel=1e-9, abs=1e-12)
    assert hi == pytest.approx(ci.high, rel=1e-9, abs=1e-12)


def test_design_effect_detects_clustered_rates():
    n_k = np.full(10, 200)
    assert _design_effect(n_k, np.full(10, 10)) == 1.0          # identical rates
    clustered = np.array([0, 0, 0, 0, 0, 20, 20, 20, 20, 20])  # rates 0 or 0.1
    k, n = clustered.sum(), n_k.sum()
    v_cluster = 10 / 9 * np.sum((clustered - k / n * n_k) ** 2) / n ** 2
    assert _design_effect(n_k, clustered) == pytest.approx(v_cluster / (0.05 * 0.95 / n))
    assert _design_effect(n_k, clustered) > 5


# ----------------------------------------------------------------------------------
# QQ plot and HTML
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("band, level", [("pointwise", 0.95), ("simultaneous", 0.9)])
def test_qq_band_coverage(band, level):
    from causarray.pl import _uniform_qq_band

    n, n_rep = 40, 600
    _, lower, upper = _uniform_qq_band(n, level, band)
    rng = np.random.default_rng(11)
    u = np.sort(rng.uniform(size=(n_rep, n)), axis=1)
    inside = (u >= lower) & (u <= upper)
    if band == "pointwise":
        cover = inside.mean(axis=0)          # each order statistic alone
        se = np.sqrt(level * (1 - level) / n_rep)
        assert np.all(np.abs(cover - level) < 4.5 * se)
    else:
        cover = inside.all(axis=1).mean()    # all points at once
        se = np.sqrt(level * (1 - level) / n_rep)
        assert abs(cover - level) < 4 * se + 0.02   # + simulation error of the band itself


def test_calibration_qq_draws_every_pvalue(null_screen):
    res = ca.calibration_check(null_screen, runner=welch_runner)
    fig, ax = plt.subplots()
    out = pl.calibration_qq(res, ax=ax)
    assert out is ax
    n_points = sum(len(c.get_offsets()) for c in ax.collections
                   if hasattr(c, "get_offsets") and len(c.get_offsets()) and
                   type(c).__name__ == "PathCollection")
    assert n_points == res.n_tests
    with pytest.raises(ValueError, match=re.escape(
            "band must be 'pointwise' or 'simultaneous', got 'x'")):
        pl.calibration_qq(res, band="x")


def test_calibration_html(ci_adata):
    res = ca.calibration_check(ci_adata, runner=welch_runner, n_fake=4)
    text = calibration_html(res)
    assert text.startswith("<h2 id='calibration'>")
    assert res.verdict.split(":")[0] in text
    m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert m and base64.b64decode(m.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
    for fake in res.fakes["fake"]:
        assert f"<td>{fake}</td>" in text
    assert "<table" in text and text.count("<table") == 2


def test_summary_frame_per_kind(ci_adata):
    res = ca.calibration_check(ci_adata, runner=welch_runner, n_fake=4)
    sf = res.summary_frame().set_index("kind")
    assert list(sf.index) == ["random", "guide", "all"]
    for kind in ("random", "guide"):
        sel = res.pvalues[res.pvalues["kind"] == kind]
        p = sel["pvalue"].to_numpy(float)
        p = p[np.isfinite(p)]
        assert sf.loc[kind, "n_tests"] == p.size
        assert sf.loc[kind, "type_I"] == np.mean(p < 0.05)
        assert sf.loc[kind, "n_calls"] == int((sel["padj"] < res.alpha).sum())
    assert sf.loc["all", "n_tests"] == sf.loc[["random", "guide"], "n_tests"].sum()
    assert sf.loc["all", "status"] == res.status


def test_exclude_guides_and_concentration_note(ci_adata):
    is_ctrl = (ci_adata.obs["perturbation"] == "non-targeting").to_numpy()
    guide_of = ci_adata.obs.loc[is_ctrl, "guide_id"].astype(str)
    bad = guide_of.value_counts().index[0]            # the largest NT guide

    def runner(adata, pert_col, ctrl_label, **kw):      # calls 8 genes on the bad guide
        res = Recorder()(adata, pert_col, ctrl_label)
        hit = (res["trt"] == f"guide:{bad}") & res["gene_names"].isin(adata.var_names[:8])
        res.loc[hit, ["pvalue", "padj"]] = 1e-9
        return res

    res = ca.calibration_check(ci_adata, runner=runner, guide_key="guide_id")
    # the random fakes pass: the analysis is judged on them and the guide is named
    assert res.status == "calibrated" and res.n_calls == 0
    assert f"{bad} (8)" in res.verdict and "possible off-target guides" in res.verdict
    assert any(f"exclude_guides=[{bad!r}]" in n for n in res.notes)
    by_kind = res.summary_frame().set_index("kind")
    assert by_kind.loc["guide", "status"] == "miscalibrated"
    assert by_kind.loc["guide", "n_calls"] == 8
    res2 = ca.calibration_check(ci_adata, runner=runner, guide_key="guide_id",
                                exclude_guides=[bad])
    assert res2.n_calls == 0 and bad not in set(res2.fakes["guide"])
    n_bad = int((guide_of == bad).sum())
    guided = res2.fakes[res2.fakes["kind"] == "guide"]
    # the excluded guide's cells are in no guide run: its fakes + its control arm = the rest
    per_run = guided.groupby("run").agg(fake=("n_cells", "sum"), ctrl=("n_control", "first"))
    assert set(per_run["fake"] + per_run["ctrl"]) == {int(is_ctrl.sum()) - n_bad}
    with pytest.raises(ValueError, match=re.escape("exclude_guides: ['nope'] are not guides "
                                                   "of the control cells")):
        ca.calibration_check(ci_adata, runner=Recorder(), exclude_guides=["nope"])


def test_wants_calibration():
    from causarray.calibration import AUTO_MIN_CONTROLS, wants_calibration

    assert wants_calibration("auto", AUTO_MIN_CONTROLS) and not wants_calibration(
        "auto", AUTO_MIN_CONTROLS - 1)
    assert wants_calibration("on", 5) and not wants_calibration("off", 10 ** 6)
    assert wants_calibration(True, 0) and not wants_calibration(False, 10 ** 6)
    with pytest.raises(ValueError, match=re.escape(
            "calibration must be 'auto', 'on' or 'off', got 'yes'")):
        wants_calibration("yes", 10)


def test_controls_only_screen_uses_the_cap(ci_adata):
    ctrl = ci_adata[(ci_adata.obs["perturbation"] == "non-targeting").to_numpy()].copy()
    res = ca.calibration_check(ctrl, runner=Recorder(), guide_key=False, n_fake=6)
    assert res.settings["fake_size"] == (ctrl.n_obs // 2) // 6     # no real perturbation
    assert (res.fakes["n_control"] >= ctrl.n_obs / 2).all()


def test_run_settings_repeat_the_stored_analysis(ci_adata):
    import inspect

    from causarray.calibration import run_settings

    with pytest.raises(ValueError, match=re.escape(
            "adata.uns['causarray'] holds no run settings; run causarray.tl.lfc(adata) first")):
        run_settings(ci_adata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ca.tl.lfc(ci_adata, r="auto", r_grid=[1, 2], max_iters=5, propensity=False,
                  covariates=["grna_n_umis"])
    used = ci_adata.uns["causarray"]["settings"]["r"]
    s = run_settings(ci_adata)
    assert s["r"] == used and isinstance(s["r"], int)
    assert s["covariates"] == ["grna_n_umis"] and s["max_iters"] == 5
    assert not {"pert_col", "ctrl_label", "cache_path", "r_grid"} & set(s)
    assert set(s) <= set(inspect.signature(ca.tl.lfc).parameters)
    rec = Recorder()
    res = ca.calibration_check(ci_adata, runner=rec, guide_key=False, **s)
    # random_state seeds the fakes (and is passed on only to the default runner, tl.lfc)
    assert res.settings["random_state"] == s["random_state"]
    assert rec.calls[0]["settings"] == {k: v for k, v in s.items() if k != "random_state"}
