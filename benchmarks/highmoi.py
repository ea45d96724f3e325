"""High-MOI screen side by side: causarray against an NB GLM and SCEPTRE (pysceptre).

Data: ``benchmarks/data/gasperini2019_highmoi.h5ad`` (Gasperini et al. 2019, sceptre's real
downsample; see ``benchmarks/data/README.md``).  Every method tests the same pairs:

* positive: the 10 TSS-targeting targets and their genes;
* discovery: the enhancer-gene cis pairs (``uns['cis_pairs']``, Gasperini's 1 Mb pairs);
* negative: every non-targeting gRNA, alone, against every gene.

One rule judges all methods: BH at q = 0.1 within each pair type (the negative pairs
pooled), type-I error = share of tested negative pairs with p < 0.05.  Each method runs in
its own process (pysceptre in its own venv, ``benchmarks/envs/pysceptre.sh``), so the
peak memory of each is its own; times are wall seconds on this machine, measured one
after the other, with the load average recorded.

Usage::

    python benchmarks/highmoi.py [--methods causarray,nbglm,pysceptre]
                                 [--pysceptre-python /tmp/peers/venv-pysceptre/bin/python]
                                 [--workdir /tmp/highmoi] [--r auto]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "gasperini2019_highmoi.h5ad"
Q = 0.1


def _bh(p: np.ndarray) -> np.ndarray:
    from scipy.stats import false_discovery_control

    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = false_discovery_control(p[ok])
    return out


def benchmark_pairs(adata) -> pd.DataFrame:
    """target, gene, pair_type of the three kinds of pairs."""
    pos = adata.uns["positive_control_pairs"][["target", "gene"]].assign(pair_type="positive")
    cis = adata.uns["cis_pairs"][["target", "gene"]].assign(pair_type="discovery")
    names = np.asarray(adata.uns["grna_names"], dtype=object)
    nt = names[np.asarray(adata.uns["grna_target"], dtype=object) == "non-targeting"]
    neg = pd.DataFrame([(g, gene, "negative") for g in nt for gene in adata.var_names],
                       columns=["target", "gene", "pair_type"])
    return pd.concat([pos, cis, neg], ignore_index=True).astype(str)


def write_problem(adata, workdir: Path) -> Path:
    """The exchange directory of ``highmoi_peers.py`` (counts, gRNAs, batch, pairs)."""
    from highmoi_peers import write_exchange

    return write_exchange(workdir / "problem", adata.X, adata.obsm["grna_counts"],
                          list(adata.var_names), list(adata.uns["grna_names"]),
                          list(adata.uns["grna_target"]), benchmark_pairs(adata),
                          covariates=adata.obs[["batch"]].astype(str).reset_index(drop=True),
                          categorical=["batch"])


def run_causarray(out_csv: Path, r: str) -> dict:
    """causarray through its command line on the file, then its rows in the common form."""
    out = out_csv.parent / "causarray_run"
    cmd = [sys.executable, "-m", "causarray.cli", "run", str(DATA), "--out", str(out),
           "--guides", "obsm:grna_counts", "--covariates", "batch", "--r", r,
           "--pairs", "cis", "--overwrite", "-q"]
    info = _timed(cmd)
    res = pd.read_csv(out / "results.csv.gz")
    neg = pd.read_csv(out / "negative_controls.csv")
    rows = pd.concat([
        res.assign(pair_type=np.where(res["on_target"], "positive", "discovery")),
        neg.assign(pair_type="negative")])
    table = pd.DataFrame({"target": rows["trt"].astype(str),
                          "gene": rows["gene_names"].astype(str),
                          "pair_type": rows["pair_type"], "log2fc": rows["log2fc"],
                          "pvalue": rows["pvalue"]})
    table.to_csv(out_csv, index=False)
    return info


def _timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under GNU time: wall seconds and peak RSS (MiB) of the process tree."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M"] + cmd, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{proc.stderr[-3000:]}")
    rss = [int(line.split()[1]) for line in proc.stderr.splitlines()
           if line.startswith("MAXRSS_KB")]
    return dict(wall_s=round(wall, 1), peak_rss_mib=round(rss[-1] / 1024, 1) if rss else None)


def score(table: pd.DataFrame, pairs: pd.DataFrame) -> dict:
    """Positive controls found, negative calls and type-I, discoveries: one rule for all."""
    t = pairs.merge(table, on=["target", "gene", "pair_type"], how="left")
    out: dict = {}
    for kind in ("positive", "discovery", "negative"):
        part = t[t["pair_type"] == kind]
        p = part["pvalue"].to_numpy(float)
        q = _bh(p)
        out[f"{kind}_pairs"] = int(len(part))
        out[f"{kind}_tested"] = int(np.isfinite(p).sum())
        out[f"{kind}_calls"] = int(np.sum(q < Q))
        if kind == "negative":
            out["negative_type_I"] = float(np.mean(p[np.isfinite(p)] < 0.05))
            out["negative_p_below_1e-3"] = float(np.mean(p[np.isfinite(p)] < 1e-3))
        if kind == "positive":
            out["positive_found"] = sorted(part.loc[q < Q, "target"].tolist())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="causarray,nbglm,pysceptre")
    ap.add_argument("--pysceptre-python", default="/tmp/peers/venv-pysceptre/bin/python")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/highmoi"))
    ap.add_argument("--r", default="auto")
    ap.add_argument("--name", default="highmoi_gasperini")
    args = ap.parse_args()
    import anndata as ad

    args.workdir.mkdir(parents=True, exist_ok=True)
    adata = ad.read_h5ad(DATA)
    pairs = benchmark_pairs(adata)
    problem = write_problem(adata, args.workdir)
    rows = []
    for method in args.methods.split(","):
        out_csv = args.workdir / f"{method}.csv"
        load = os.getloadavg()[0]
        if method == "causarray":
            info = run_causarray(out_csv, args.r)
        else:
            py = args.pysceptre_python if method == "pysceptre" else sys.executable
            info = _timed([py, str(HERE / "highmoi_peers.py"), method, str(problem),
                           str(out_csv)])
        s = score(pd.read_csv(out_csv, dtype={"target": str, "gene": str}), pairs)
        rows.append(dict(method=method, load_avg_1min=round(load, 2), **info,
                         **{k: v for k, v in s.items() if k != "positive_found"},
                         positive_found=", ".join(s["positive_found"])))
        print(json.dumps(rows[-1]), flush=True)
    write_result(args.name, dict(data=str(DATA.relative_to(HERE.parent)), q=Q, rows=rows))


if __name__ == "__main__":
    main()
