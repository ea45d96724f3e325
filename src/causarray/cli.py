"""The ``causarray`` command line.

::

    causarray run screen.h5ad --out results/ --pert-col gene --ctrl-label non-targeting
    causarray simulate sim.h5ad --perts 5 --genes 200
    causarray demo --out causarray-demo
    causarray --version

``run`` writes ``results.parquet``, ``results.csv.gz``,
``jic.csv`` (when r is chosen automatically), ``volcano.png``, ``discoveries.png``,
``jic.png``, ``propensity.png`` and a self-contained ``report.html`` into the output
folder, plus the batch cache ``cache.h5`` from which a re-run resumes.

Exit status: 0 success, 1 failure during the computation, 2 command-line usage
error, 3 bad input (missing or unreadable file, unknown column or label, data that
are not raw counts). Errors are printed as one line on stderr.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._version import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3

DEMO_DATASET = "schraivogel2020_ci"
#: Small settings of ``causarray demo`` (a couple of minutes on a laptop at most).
DEMO_SETTINGS = dict(r_grid="1,2,3", batch_size=6, n_ctrl=600, max_cells=2000, max_iters=10)


class InputError(Exception):
    """Bad input detected before the computation (exit status 3)."""


# ----------------------------------------------------------------------------------
# argument parsing
# ----------------------------------------------------------------------------------
def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse ``type`` parsing an integer ``>= minimum``.

    Parameters
    ----------
    minimum : int
        Smallest value accepted.
    what : str
        What is expected, for the message (``'a positive integer'``): a non-integer or
        a smaller value raises ``argparse.ArgumentTypeError("expected <what>, got
        '<text>'")``, which argparse reports under the flag's name.

    Returns
    -------
    callable
        ``str -> int``.
    """
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _r_value(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _nonneg_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"--r must be 'auto' or an integer >= 0, "
                                         f"got {text!r}") from None


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, "
                                         f"got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return vals


def _memory(text: str) -> str:
    from .batch import parse_memory

    try:
        parse_memory(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB or 500MB, "
                                         f"got {text!r}") from None
    return text


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _add_run_options(p: argparse.ArgumentParser, demo: bool = False) -> None:
    p.add_argument("--out", required=True, type=Path, help="output folder")
    g = p.add_argument_group("model")
    if not demo:
        g.add_argument("--pert-col", default=None,
                       help="obs column with the perturbation labels (default uns['pert_col'])")
        g.add_argument("--ctrl-label", default=None,
                       help="label of control cells (default uns['ctrl_label'])")
        g.add_argument("--covariates", type=_names, default=[],
                       help="comma-separated obs columns to adjust for")
        g.add_argument("--layer", default=None, help="layer with the raw counts (default X)")
        g.add_argument("--drop-empty-cells", action="store_true",
                       help="leave out cells without any count instead of stopping")
    g.add_argument("--r", type=_r_value, default="auto",
                   help="number of latent factors, or 'auto' (minimum JIC; default)")
    g.add_argument("--r-grid", type=_int_list, default=None,
                   help="values of r tried by --r auto, e.g. 1,2,3,5 (default: a small grid)")
    g.add_argument("--family", choices=("nb", "poisson"), default="nb")
    g.add_argument("--batch-size", type=_positive_int, default=15,
                   help="largest number of perturbations per batch (default 15; fewer when "
                        "a batch would not fit --memory-budget)")
    g.add_argument("--n-ctrl", type=_positive_int, default=None,
                   help="cap on the control cells shared by all batches (default: every "
                        "control cell)")
    g.add_argument("--max-cells", type=_positive_int, default=None,
                   help="cap on the treated cells per batch and on the cells used to choose "
                        "r (default: every treated cell; r is chosen on 2000 cells)")
    g.add_argument("--memory-budget", type=_memory, default="2GB",
                   help="estimated memory one batch may use when no cap is given, e.g. "
                        "2GB (default) or 500MB")
    g.add_argument("--max-iters", type=_positive_int, default=None,
                   help="cap on the GCATE alternating-minimisation epochs")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--calibration", choices=("auto", "on", "off"), default="auto",
                   help="calibration check on fake perturbations cut from the control cells "
                        "(auto: on with >= 1,000 control cells)")
    g.add_argument("--assignment", choices=("randomized", "observational"),
                   default=None,
                   help="the design: randomized (CRISPR screens; the default: a "
                        "perturbation's shift of the cells' latent state beyond chance is "
                        "its effect) or observational (case-control studies, the default "
                        "of --donor-key: the shift is confounding)")
    g.add_argument("--fit", choices=("auto", "screen", "per_batch"), default="auto",
                   help="factor model: screen (the control pool once per screen, each "
                        "batch at its loadings), per_batch (the original: every batch "
                        "refits the pool), auto (default: screen for randomized screens of "
                        ">= 1,000 and >= 100 r genes)")
    g.add_argument("--alpha", type=float, default=0.05,
                   help="FDR level for the discovery counts in plots and report (default 0.05)")
    if not demo:
        _add_guide_options(p)
        c = p.add_argument_group("case-control studies: the donor route (docs/usage.md)")
        c.add_argument("--condition-key", default=None,
                       help="obs column with the condition (disease status) of each cell")
        c.add_argument("--control-condition", default=None,
                       help="the control value of --condition-key (e.g. healthy)")
        c.add_argument("--donor-key", default=None,
                       help="obs column with the donor of each cell: counts are summed per "
                            "donor and donors are the units (assignment observational)")
        c.add_argument("--groupby", default=None,
                       help="obs column (e.g. cell type): one donor analysis per group")
    d = p.add_argument_group("parallel (optional, needs dask[distributed])")
    x = d.add_mutually_exclusive_group()
    x.add_argument("--dask-scheduler", metavar="ADDRESS", default=None,
                   help="address of a running Dask scheduler, e.g. tcp://host:8786")
    x.add_argument("--workers", type=_positive_int, default=None,
                   help="start a local Dask cluster with N worker processes")
    p.add_argument("--overwrite", action="store_true",
                   help="discard the cache in the output folder instead of resuming from it")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log messages")


def _add_guide_options(p: argparse.ArgumentParser) -> None:
    """The options of a screen given as guide counts (``tl.lfc(guides=...)``)."""
    g = p.add_argument_group("guides (high-MOI and multi-guide screens; docs/usage.md)")
    g.add_argument("--guides", default=None, metavar="SOURCE",
                   help="guide UMI counts instead of labels: feature_types (Cell Ranger "
                        "guide-capture features in the input), obsm:KEY (a cells x guides "
                        "matrix in obsm), or a cells x guides .h5ad (targets in var['target'])")
    g.add_argument("--guide-targets", default=None, metavar="CSV",
                   help="guide,target table (or Cell Ranger's feature reference)")
    g.add_argument("--nt-label", default="non-targeting",
                   help="target label of the non-targeting guides (default non-targeting)")
    g.add_argument("--guide-threshold", type=_positive_int, default=5,
                   help="UMIs for a guide to be assigned to a cell (default 5)")
    g.add_argument("--guide-assignment", choices=("threshold", "maximum", "mixture"),
                   default="threshold", help="guide-to-cell assignment (default threshold)")
    g.add_argument("--moi", choices=("auto", "low", "high"), default="auto",
                   help="auto: high when the median cell carries two or more guides")
    g.add_argument("--control", choices=("auto", "complement", "non-targeting"),
                   default="auto", help="high MOI: compare each target with the cells "
                                        "without its guides (complement, default) or without "
                                        "any targeting guide")
    g.add_argument("--pairs", default="all", metavar="all|cis|CSV",
                   help="pairs to report: all (default), cis (genes within --cis-window of "
                        "the target) or a target,gene CSV")
    g.add_argument("--gene-positions", default=None, metavar="CSV",
                   help="gene,chr,tss table for --pairs cis (default var['chr'], var['tss'])")
    g.add_argument("--test-targets", default=None, metavar="NAMES|FILE",
                   help="test only these targets (comma-separated, or a file with one per "
                        "line or a 'target' column): a slice of a large screen")
    g.add_argument("--cis-window", type=_positive_int, default=1_000_000,
                   help="bases between a target and a gene's TSS for --pairs cis "
                        "(default 1,000,000, Gasperini et al. 2019's window)")


def _guide_kwargs(args: argparse.Namespace) -> dict:
    """``tl.lfc``'s guide keywords from the command line (empty without --guides)."""
    if getattr(args, "guides", None) is None:
        return {}
    return dict(guides=args.guides, guide_targets=args.guide_targets, nt_label=args.nt_label,
                guide_threshold=args.guide_threshold, guide_assignment=args.guide_assignment,
                moi=args.moi, control=args.control, pairs=args.pairs,
                gene_positions=args.gene_positions, cis_window=args.cis_window,
                test_targets=args.test_targets,
                nt_guide_tests={"on": "required", "off": False}.get(
                    getattr(args, "calibration", "auto"), True))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``causarray`` command."""
    parser = argparse.ArgumentParser(
        prog="causarray",
        description="Causal differential expression for single-cell CRISPR screens.")
    parser.add_argument("--version", action="version", version=f"causarray {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="analyse a screen stored as .h5ad",
                         description="Run GCATE + doubly robust LFC on a screen (.h5ad with raw "
                                     "counts) and write tables, figures and report.html.")
    run.add_argument("input", type=Path, metavar="INPUT.h5ad")
    _add_run_options(run)

    sim = sub.add_parser("simulate", help="write a simulated screen to .h5ad",
                         description="Simulate a screen with latent confounding (ground truth in "
                                     "varm['true_lfc'] and obsm['U_true']).")
    sim.add_argument("output", type=Path, metavar="OUT.h5ad")
    sim.add_argument("--ctrl", type=_positive_int, default=500, help="control cells (500)")
    sim.add_argument("--cells", type=_positive_int, default=200,
                     help="cells per perturbation (200)")
    sim.add_argument("--perts", type=_positive_int, default=5, help="perturbations (5)")
    sim.add_argument("--genes", type=_positive_int, default=200, help="genes (200)")
    sim.add_argument("--factors", type=_nonneg_int, default=3,
                     help="latent confounders (3)")
    sim.add_argument("--confounding", type=float, default=1.0,
                     help="SD of the confounders' shift per perturbation (1.0)")
    sim.add_argument("--effect-frac", type=float, default=0.05,
                     help="share of genes with a direct effect (0.05)")
    sim.add_argument("--seed", type=int, default=0)

    demo = sub.add_parser("demo", help="run the pipeline on the bundled example screen",
                          description=f"Run 'causarray run' on the bundled dataset "
                                      f"{DEMO_DATASET!r} with small settings.")
    _add_run_options(demo, demo=True)
    demo.set_defaults(**{k: (_int_list(v) if k == "r_grid" else v)
                         for k, v in DEMO_SETTINGS.items()})
    return parser


# ----------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------
class _StderrHandler(logging.StreamHandler):
    """Log handler writing to whatever ``sys.stderr`` is at the time of the record."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("causarray")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("causarray: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _teardown_logging() -> None:
    """Remove the handler of :func:`_setup_logging` (main() may be called in-process)."""
    logger = logging.getLogger("causarray")
    for h in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(h)
    logger.setLevel(logging.NOTSET)


def _read_h5ad(path: Path, backed: bool = True):
    import anndata as ad

    if not path.exists():
        raise InputError(f"input file not found: {path}")
    if not path.is_file():
        raise InputError(f"input is not a file: {path}")
    try:
        # backed: obs / var / uns in memory, the counts stay on disk and every batch
        # reads only its rows (causarray.ondisk)
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as err:  # anndata/h5py raise many types for unreadable files
        raise InputError(f"cannot read {path} as .h5ad: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


#: Python-side phrases of error messages and their command-line spelling.
_FLAG_PHRASES = (
    ("pass pert_col=<obs column holding the perturbation labels>",
     "pass --pert-col <obs column holding the perturbation labels>"),
    ("pass ctrl_label=<label of the control cells>",
     "pass --ctrl-label <label of the control cells>"),
    ("pert_col was not given", "--pert-col was not given"),
    ("ctrl_label was not given", "--ctrl-label was not given"),
    ("pass drop_empty_cells=True", "pass --drop-empty-cells"),
    ("pass r=<number>", "pass --r <number>"),
    ("or r=0", "or --r 0"),
    ("to start fresh, or pass a new cache_path",
     "to start fresh: re-run with --overwrite, or choose another --out"),
    ("guides='feature_types'", "--guides feature_types"),
    ("guides='obsm:", "--guides 'obsm:"),
    ("guides:", "--guides:"),
    ("guide_targets:", "--guide-targets:"),
    ("guide_threshold", "--guide-threshold"),
    ("nt_label", "--nt-label"),
    ("pairs='cis' needs", "--pairs cis needs"),
    ("or gene_positions=", "or --gene-positions"),
    ("pairs must be", "--pairs must be"),
    ("pairs:", "--pairs:"),
    ("switch the calibration off", "pass --calibration off"),
    ("test_targets:", "--test-targets:"),
    ("condition_key:", "--condition-key:"),
    ("donor_key:", "--donor-key:"),
    ("covariates:", "--covariates:"),
    ("the donor route needs condition_key, control_condition and donor_key",
     "the donor route needs --condition-key, --control-condition and --donor-key"),
    ("control_condition ", "--control-condition "),
    ("condition_key ", "--condition-key "),
    ("donor_key ", "--donor-key "),
    ("groupby ", "--groupby "),
)
#: Messages of ValueErrors raised by the computation that mean bad input (exit 3).
_INPUT_PHRASES = ("r cannot be chosen automatically", "was written with different data",
                  "has no layer", "not in obs", "memory_budget must be",
                  "is (nearly) singular", "is too large: at most", "guides", "guide_targets",
                  "nt_label", "pairs", "test_targets", "condition_key", "donor_key",
                  "control_condition", "donor route", "groupby", "covariates:")


def _cli_message(text: str) -> str:
    """An error message with Python argument names replaced by the flags that set them."""
    for old, new in _FLAG_PHRASES:
        text = text.replace(old, new)
    return text


def _check_writable(out: Path) -> None:
    """Raise InputError unless ``out`` is (or can be made) a writable folder."""
    import tempfile

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".causarray-write-test-"):
            pass
    except OSError as err:
        raise InputError(f"--out {out} is not writable: {_one_line(err)}") from err


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` of the CLI: one line, no source line."""
    stream = file if file is not None else sys.stderr
    try:
        stream.write(f"causarray: warning: {category.__name__}: {_one_line(message)}\n")
    except (OSError, ValueError):
        pass


def _client(args: argparse.Namespace):
    if args.dask_scheduler is None and args.workers is None:
        return None, None
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise InputError("--dask-scheduler/--workers need dask[distributed]: "
                         "pip install 'causarray[dask]'") from None
    if args.dask_scheduler is not None:
        try:
            return Client(args.dask_scheduler, timeout="20s"), None
        except OSError as err:
            raise InputError(f"cannot connect to the Dask scheduler {args.dask_scheduler}: "
                             f"{_one_line(err)}") from err
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    return Client(cluster), cluster


#: gzip level 1: half the time of the default level 9 for an 8 % larger file (a
#: 257k-row table: 4.7 s against 9.8 s, most of the rest is formatting the numbers);
#: mtime 0 makes the file depend on the table only
CSV_GZIP = {"method": "gzip", "compresslevel": 1, "mtime": 0}


def _write_outputs(adata: Any, out: Path, alpha: float, quiet: bool,
                   calibration: Any = None) -> dict[str, Path]:
    from . import pl
    from .report import figure_png, write_report

    store = adata.uns["causarray"]
    results = store["results"]
    written: dict[str, Path] = {}
    results.to_parquet(out / "results.parquet", index=False)     # pyarrow is a dependency
    written["parquet"] = out / "results.parquet"
    results.to_csv(out / "results.csv.gz", index=False, compression=CSV_GZIP)
    written["csv"] = out / "results.csv.gz"
    images: dict[str, bytes] = {}
    figures = dict(volcano=lambda: pl.volcano(results, alpha).figure,
                   discoveries=lambda: pl.discoveries(results, alpha).figure)
    if store.get("jic") is not None:
        store["jic"].to_csv(out / "jic.csv", index=False)
        written["jic_csv"] = out / "jic.csv"
        figures["jic"] = lambda: pl.r_selection(store["jic"])
    if pl.has_propensity(adata):
        figures["propensity"] = lambda: pl.propensity(adata)
    if store.get("shift") is not None:
        store["shift"].to_csv(out / "shift.csv", index=False)
        written["shift"] = out / "shift.csv"
    if store.get("donors"):
        import pandas as pd

        pd.concat([t.assign(group=g) for g, t in store["donors"].items()]).to_csv(
            out / "donors.csv")
        written["donors"] = out / "donors.csv"
    if "targets" in store and "n_guides" in adata.obs:     # a screen given as guides
        for name in ("guides", "targets", "negative_controls"):
            if store.get(name) is not None:
                store[name].to_csv(out / f"{name}.csv", index=False)
                written[name] = out / f"{name}.csv"
        figures["guide_assignment"] = lambda: pl.guide_assignment(adata)
    if calibration is not None:
        calibration.to_frame().to_csv(out / "calibration.csv", index=False)
        calibration.pvalues.to_csv(out / "calibration_pvalues.csv.gz", index=False,
                                   compression=CSV_GZIP)
        written["calibration"] = out / "calibration.csv"
        figures["calibration_qq"] = lambda: pl.calibration_qq(calibration).figure
    for name, make in figures.items():
        images[name] = figure_png(make())
        (out / f"{name}.png").write_bytes(images[name])
        written[name] = out / f"{name}.png"
    written["report"] = write_report(adata, out / "report.html", images=images, alpha=alpha,
                                   calibration=calibration)
    return written


def _screen_info(tl: Any, adata: Any, pert_col, ctrl_label, covariates, layer, drop_empty,
                 guides: bool) -> dict:
    """The screen's size (and, for a labelled screen, its checked labels)."""
    if guides:      # the guides are read and checked by tl.lfc
        return dict(pert_col=pert_col, ctrl_label=ctrl_label, n_cells=int(adata.n_obs),
                    n_genes=int(adata.n_vars))
    return tl.validate_screen(adata, pert_col, ctrl_label, covariates, layer, drop_empty)


def _calibration(adata: Any, args: argparse.Namespace, client: Any) -> Any:
    """The run's calibration: a high-MOI guide screen's non-targeting guides tested
    against their complement (computed in the run), otherwise fake perturbations cut from
    the control cells (``calibration_check``), as ``--calibration`` asks."""
    from ._validation import check_nt_guides
    from .calibration import (
        calibration_check,
        nt_guide_calibration,
        run_settings,
        wants_calibration,
    )

    mode = getattr(args, "calibration", "auto")
    store = adata.uns["causarray"]
    settings = store["settings"]
    if settings.get("route") == "donor":     # fake perturbations are cut from cells
        logging.getLogger("causarray").info(
            "calibration: not on the donor route (the donors are the units)")
        return None
    if settings.get("moi") == "high":
        negatives = store.get("negative_controls")
        if mode == "off":
            return None
        if negatives is None or not len(negatives):
            if mode == "on":
                check_nt_guides(0, settings["nt_label"])
            return None
        cells = dict(zip(store["guides"]["guide"], store["guides"]["cells"]))
        return nt_guide_calibration(negatives, cells)
    if not wants_calibration(mode, settings["n_control"]):
        return None
    logging.getLogger("causarray").info(
        "calibration check on fake perturbations from %d control cells", settings["n_control"])
    return calibration_check(adata, **run_settings(adata), client=client,
                             verbose=not args.quiet)


def _run(args: argparse.Namespace, input_path: Path, adata: Any = None) -> int:
    from . import tl
    from .report import discovery_summary

    _setup_logging(args.quiet)
    out: Path = args.out
    if adata is None and not input_path.is_file():
        _read_h5ad(input_path)         # raises the missing-file error, creates nothing
    _check_writable(out)               # before reading the input or any model fit
    if adata is None:
        # guide features inside the counts: their columns are split off in memory
        adata = _read_h5ad(input_path,
                           backed=getattr(args, "guides", None) != "feature_types")
    pert_col = getattr(args, "pert_col", None)
    ctrl_label = getattr(args, "ctrl_label", None)
    covariates = getattr(args, "covariates", [])
    layer = getattr(args, "layer", None)
    drop_empty = getattr(args, "drop_empty_cells", False)
    guide_kw = _guide_kwargs(args)
    donor_kw = {k: getattr(args, k, None) for k in
                ("condition_key", "control_condition", "donor_key", "groupby")}
    donor_kw = donor_kw if any(v is not None for v in donor_kw.values()) else {}
    try:
        info = _screen_info(tl, adata, pert_col, ctrl_label, covariates, layer, drop_empty,
                            bool(guide_kw) or bool(donor_kw))
    except ValueError as err:
        raise InputError(_cli_message(_one_line(err))) from err
    cache = out / "cache.h5"
    log = logging.getLogger("causarray")
    parts = out / "cache.h5.parts"     # batches committed by an interrupted run
    if args.overwrite:
        for old in (cache, out / "cache.h5.jic.csv", out / "cache.h5.jic.json",
                    out / "cache.h5.jic.partial.csv", out / "cache.h5.jic.partial.json"):
            old.unlink(missing_ok=True)
        shutil.rmtree(parts, ignore_errors=True)
    log.info("%s: %d cells x %d genes, %s", input_path, info["n_cells"], info["n_genes"],
             f"guides from {guide_kw['guides']}" if guide_kw else
             f"donors in obs[{donor_kw['donor_key']!r}]" if donor_kw else
             f"{len(info['perturbations'])} perturbations, {info['n_control']} control cells")
    if cache.exists() or parts.exists():
        log.info("resuming from the cache in %s", out)
    client, cluster = _client(args)
    t0 = time.perf_counter()
    calibration = None
    try:
        tl.lfc(adata, pert_col=info["pert_col"], ctrl_label=info["ctrl_label"],
               covariates=covariates, layer=layer, r=args.r,
               family=args.family, batch_size=args.batch_size, n_ctrl=args.n_ctrl,
               max_cells=args.max_cells, memory_budget=getattr(args, "memory_budget", "2GB"),
               cache_path=cache, client=client,
               random_state=args.seed, verbose=not args.quiet, r_grid=args.r_grid,
               max_iters=args.max_iters, drop_empty_cells=drop_empty,
               assignment=getattr(args, "assignment", None), fit=getattr(args, "fit", "auto"),
               **guide_kw, **donor_kw)
        calibration = _calibration(adata, args, client)
    except ValueError as err:
        msg = _one_line(err)
        if any(phrase in msg for phrase in _INPUT_PHRASES):
            raise InputError(_cli_message(msg)) from err
        raise
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    written = _write_outputs(adata, out, args.alpha, args.quiet, calibration)
    s = discovery_summary(adata.uns["causarray"]["results"], args.alpha)
    settings = adata.uns["causarray"]["settings"]
    if not args.quiet:
        print(f"r = {settings['r']}; {s['n_significant']:,} gene x perturbation pairs with "
              f"padj < {args.alpha:g} in {s['n_perturbations_with_hit']} of "
              f"{s['n_perturbations']} perturbations ({time.perf_counter() - t0:.1f} s)")
    if calibration is not None and not args.quiet:
        print(f"calibration: {calibration.verdict}")
    print(f"report: {written['report'].resolve()}")
    return EXIT_OK


def _simulate(args: argparse.Namespace) -> int:
    from .simulate import simulate_screen

    if not 0 <= args.effect_frac <= 1:
        raise InputError(f"--effect-frac must lie in [0, 1], got {args.effect_frac}")
    if args.confounding < 0:
        raise InputError(f"--confounding must be >= 0, got {args.confounding}")
    adata = simulate_screen(n_ctrl=args.ctrl, n_perts=args.perts, cells_per_pert=args.cells,
                            n_genes=args.genes, r=args.factors, confounding=args.confounding,
                            effect_frac=args.effect_frac, random_state=args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(args.output)
    print(f"wrote {args.output} ({adata.n_obs} cells x {adata.n_vars} genes, "
          f"{args.perts} perturbations)")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from .datasets import dataset_path, load_dataset

    try:
        path = dataset_path(DEMO_DATASET)
        adata = None
    except ValueError:
        path, adata = Path(DEMO_DATASET), load_dataset(DEMO_DATASET)
    return _run(args, path, adata)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``causarray`` console script.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status (see the module docstring).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("causarray: error: a command is required (run, simulate or demo)",
              file=sys.stderr)
        return EXIT_USAGE
    showwarning = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        if args.command == "run":
            return _run(args, args.input)
        if args.command == "simulate":
            return _simulate(args)
        return _demo(args)
    except InputError as err:
        print(f"causarray: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("causarray: interrupted (re-run the same command to resume: finished batches "
              "and finished JIC fits are kept in --out)", file=sys.stderr)
        return 130
    except Exception as err:  # the CLI reports every failure in one line
        if args.debug:
            raise
        print(f"causarray: error: {type(err).__name__}: {_one_line(err)} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        warnings.showwarning = showwarning
        _teardown_logging()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
