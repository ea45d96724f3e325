"""Standard errors of knock-down pairs: the NB GLM's model-based and sandwich SEs.

For each (perturbation, gene) pair of a bundled screen, fits the per-gene GLM
``y ~ 1 + A`` with the library-size offset on the perturbation's cells and the controls
(statsmodels: Poisson, NB at the NB2 MLE dispersion; model-based and HC0 sandwich
covariance), and the delta-method SE of the ratio of library-normalised means.  It
shows whether the NB GLM's small SEs on knocked-down genes are borne out by its own
sandwich (see ``docs/dr.md``, "Standard errors against the NB GLM's")::

    PYTHONPATH=src .venv/bin/python benchmarks/se_vs_nbglm.py papalexi STAT1:STAT1 JAK2:JAK2
    PYTHONPATH=src .venv/bin/python benchmarks/se_vs_nbglm.py schraivogel HS2:HBE1 CCNE2:CCNE2
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pair_ses(ad, trt: str, gene: str) -> dict[str, float]:
    """Effect and SEs of one pair (natural log)."""
    import statsmodels.api as sm

    lab = ad.obs[ad.uns["pert_col"]].astype(str).to_numpy()
    X = ad.X.tocsr() if hasattr(ad.X, "tocsr") else np.asarray(ad.X)
    lib = np.asarray(X.sum(axis=1)).ravel()
    s = lib / np.exp(np.mean(np.log(lib)))
    sel = (lab == trt) | (lab == str(ad.uns["ctrl_label"]))
    j = list(ad.var_names).index(gene)
    col = X[sel][:, j]
    y = np.asarray(col.todense()).ravel() if hasattr(col, "todense") else np.asarray(col)
    a = (lab[sel] == trt).astype(float)
    z = y / s[sel]
    m1, m0 = z[a == 1].mean(), z[a == 0].mean()
    D = np.column_stack([np.ones_like(a), a])
    off = np.log(s[sel])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alpha = float(sm.NegativeBinomial(y, D, offset=off).fit(disp=0).params[-1])
        fam = sm.families.NegativeBinomial(alpha=max(alpha, 1e-8))
        nb = sm.GLM(y, D, family=fam, offset=off).fit()
        nb_hc = sm.GLM(y, D, family=fam, offset=off).fit(cov_type="HC0")
    return {"n_treated": int(a.sum()), "naive": float(np.log(m1 / m0)),
            "se_ratio_of_means": float(np.sqrt(z[a == 1].var(ddof=1) / a.sum() / m1 ** 2
                                               + z[a == 0].var(ddof=1) / (1 - a).sum()
                                               / m0 ** 2)),
            "nb_effect": float(nb.params[1]), "nb_se_model": float(nb.bse[1]),
            "nb_se_sandwich": float(nb_hc.bse[1]), "nb_alpha": alpha}


def main(argv: list[str]) -> int:
    import real_data as rd

    ad = rd.load_screen(argv[0])
    print("| pair | cells | naive | NB effect | NB SE (model) | NB SE (sandwich) | "
          "SE ratio of means | NB alpha |\n|---|---|---|---|---|---|---|---|")
    for pair in argv[1:]:
        t, g = pair.split(":")
        r = pair_ses(ad, t, g)
        print(f"| {t}->{g} | {r['n_treated']} | {r['naive']:.3f} | {r['nb_effect']:.3f} | "
              f"{r['nb_se_model']:.3f} | {r['nb_se_sandwich']:.3f} | "
              f"{r['se_ratio_of_means']:.3f} | {r['nb_alpha']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
