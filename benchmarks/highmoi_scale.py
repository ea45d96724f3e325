"""A Gasperini-shaped high-MOI screen on disk through ``causarray run --guides``: peak
memory and the cost per target, and the projected whole-screen time.

The screen (simulated, written in row blocks so that it never sits in memory): 207,324
cells x 13,000 genes, 6,000 targets x 2 guides + 50 non-targeting guides, a Poisson(28)
number of guides per cell, about 3,000 UMIs per cell with library size rising with the
number of guides, and a knockdown of one cis gene by the first targets.  Counts are CSR
int32 in ``X``; guide UMIs in ``obsm['grna_counts']``.

Usage::

    python benchmarks/highmoi_scale.py --generate-only /tmp/scale/gasperini_shape.h5ad
    python benchmarks/highmoi_scale.py --data /tmp/scale/gasperini_shape.h5ad \\
        --slices 2,6 --r 10

Each slice runs ``causarray run FILE --guides obsm:grna_counts --test-targets T1,..,Tk
--calibration off --r R`` in its own process (wall time and peak RSS of that process);
two slice sizes give the fixed cost (reading, checks, size factors, dispersion) and the
cost per target by a line through the two points.  Results: ``benchmarks/results/
highmoi_scale.{json,md}`` with the load average and the reference-pass time of
``../shared/bench/ref_pass.py`` taken just before.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

SHAPE = dict(n_cells=207_324, n_genes=13_000, n_targets=6_000, guides_per_target=2,
             n_nt=50, moi=28.0, umis_per_cell=3_000.0)


def generate(path: Path, seed: int = 0, block: int = 4_000, **shape) -> None:
    """Write the simulated screen to ``path`` (h5ad), counts streamed in row blocks."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    s = {**SHAPE, **shape}
    n, p, T = s["n_cells"], s["n_genes"], s["n_targets"]
    G = T * s["guides_per_target"] + s["n_nt"]
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 1.5, p)
    prob = np.exp(base) / np.exp(base).sum()
    m = rng.poisson(s["moi"], n)
    lib = s["umis_per_cell"] * np.exp(rng.normal(0, 0.35, n) + 0.3 * (m - s["moi"]) / s["moi"])
    # guides: m_i distinct guides per cell, UMIs ~ NB(mean 30) + 1
    rows = np.repeat(np.arange(n), np.minimum(m, G))
    cols = np.concatenate([rng.choice(G, size=min(k, G), replace=False) for k in m])
    umis = rng.negative_binomial(2, 2 / 32, rows.size) + 1
    grna = sp.csr_matrix((umis.astype(np.int32), (rows, cols)), shape=(n, G))
    names = [f"T{t:05d}_g{j + 1}" for t in range(T) for j in range(s["guides_per_target"])]
    names += [f"NT_g{j + 1}" for j in range(s["n_nt"])]
    targets = [f"T{t:05d}" for t in range(T) for _ in range(s["guides_per_target"])]
    targets += ["non-targeting"] * s["n_nt"]
    # knockdown of gene t by target t for the first 100 targets (a visible positive control)
    guide_target = np.array([int(t[1:]) if t != "non-targeting" else -1 for t in targets])
    shell = ad.AnnData(obs=pd.DataFrame(index=[f"c{i:06d}" for i in range(n)]),
                       var=pd.DataFrame(index=[f"G{j:05d}" for j in range(p)]))
    shell.obsm["grna_counts"] = grna
    shell.uns.update(grna_names=names, grna_target=targets, layout="high-moi",
                     ctrl_label="non-targeting")
    shell.write_h5ad(path)
    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        g = f.create_group("X")
        g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                        "shape": np.array([n, p])})
        data = g.create_dataset("data", (0,), maxshape=(None,), dtype="int32",
                                chunks=(1 << 20,))
        idx = g.create_dataset("indices", (0,), maxshape=(None,), dtype="int32",
                               chunks=(1 << 20,))
        indptr = np.zeros(n + 1, np.int64)
        for a in range(0, n, block):
            b = min(n, a + block)
            counts = rng.multinomial(lib[a:b].astype(np.int64), prob).astype(np.int32)
            carried = grna[a:b].tocsr()
            for t in range(100):      # knockdowns: 70 % of gene t's UMIs lost in carriers
                gcols = np.flatnonzero(guide_target == t)
                hit = np.asarray(carried[:, gcols].sum(axis=1)).ravel() > 0
                counts[hit, t] = rng.binomial(counts[hit, t], 0.3)
            blk = sp.csr_matrix(counts)
            k0, k1 = data.shape[0], data.shape[0] + blk.nnz
            data.resize((k1,))
            idx.resize((k1,))
            data[k0:k1] = blk.data
            idx[k0:k1] = blk.indices
            indptr[a + 1:b + 1] = k0 + blk.indptr[1:]
            print(f"rows {b:,} of {n:,}, {k1:,} entries", flush=True)
        g.create_dataset("indptr", data=indptr)


def run_slice(data: Path, out: Path, targets: list[str], r: str) -> dict:
    cmd = ["/usr/bin/time", "-f", "MAXRSS_KB %M", sys.executable, "-m", "causarray.cli",
           "run", str(data), "--out", str(out), "--guides", "obsm:grna_counts",
           "--test-targets", ",".join(targets), "--calibration", "off", "--r", r,
           "--overwrite", "-q"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    rss = [int(x.split()[1]) for x in proc.stderr.splitlines() if x.startswith("MAXRSS_KB")]
    return dict(n_targets=len(targets), wall_s=round(wall, 1),
                peak_rss_gib=round(rss[-1] / 2**20, 3))


def ref_pass_seconds() -> float | None:
    ref = Path(__file__).resolve().parents[2] / "shared" / "bench" / "ref_pass.py"
    if not ref.exists():
        return None
    proc = subprocess.run([sys.executable, str(ref)], capture_output=True, text=True)
    for tok in proc.stdout.split():
        try:
            return float(tok)
        except ValueError:
            continue
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generate-only", type=Path, default=None, metavar="PATH")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--slices", default="2,6")
    ap.add_argument("--r", default="10")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/highmoi_scale"))
    args = ap.parse_args()
    if args.generate_only is not None:
        args.generate_only.parent.mkdir(parents=True, exist_ok=True)
        generate(args.generate_only)
        return
    ref = ref_pass_seconds()
    load = os.getloadavg()
    rows = []
    for k in (int(v) for v in args.slices.split(",")):
        targets = [f"T{t:05d}" for t in range(k)]
        res = run_slice(args.data, args.workdir / f"slice{k}", targets, args.r)
        rows.append(dict(res, load_avg_1min=round(os.getloadavg()[0], 2)))
        print(rows[-1], flush=True)
    (k1, w1), (k2, w2) = [(r["n_targets"], r["wall_s"]) for r in rows[:2]]
    per_target = (w2 - w1) / (k2 - k1)
    fixed = w1 - per_target * k1
    n_all = SHAPE["n_targets"] + SHAPE["n_nt"]
    write_result("highmoi_scale", dict(
        shape=SHAPE, r=args.r, ref_pass_s=ref, load_avg_start=load, rows=rows,
        per_target_s=round(per_target, 2), fixed_s=round(fixed, 1),
        per_target_ref_passes=None if not ref else round(per_target / ref, 1),
        projected_whole_screen_h_one_process=round((fixed + per_target * n_all) / 3600, 1)))


if __name__ == "__main__":
    main()
