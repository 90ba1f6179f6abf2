"""Aggregate multirun folders: tables over seeds, metric curves and ROC plots.

    python scripts/aggregate.py outputs/multirun/2024-05-01/10-00-00 [more folders ...]
        [--out DIR] [--metric lfw/eer --metric lfw/accuracy] [--plot-metric eer] [--roc]
        [--device cpu] [--data-root PATH] [--strict]

Writes into --out (default: <first folder>/aggregate): runs.csv/.md (one row per run),
groups.csv/.md (mean, std and n over seeds of each configuration), problems.csv (incomplete
or failed runs), curves_<metric>.png and roc_<valset>.png. The logic lives in femb.analysis.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

from femb.analysis import write_report  # noqa: E402 (after choosing the backend)

log = logging.getLogger("aggregate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1],
    )
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        help="multirun folders, run directories, or folders above them",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="report folder (default: <first path>/aggregate)"
    )
    parser.add_argument(
        "--metric",
        action="append",
        default=None,
        help="metric for the tables, e.g. lfw/eer, or eer for every set; "
        "repeatable (default: every score column)",
    )
    parser.add_argument(
        "--plot-metric",
        action="append",
        default=None,
        help="metric to plot over steps; repeatable (default: --metric's); "
        "train_loss and lr work too",
    )
    parser.add_argument(
        "--roc",
        action="store_true",
        help="compute missing final ROCs from checkpoints/last.pt (slow: "
        "encodes each validation set once per run)",
    )
    parser.add_argument("--device", default="cpu", help="device for --roc (cpu, cuda, auto)")
    parser.add_argument(
        "--data-root", type=Path, default=None, help="replaces the runs' data_root for --roc"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a run is incomplete"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    out = args.out if args.out is not None else args.paths[0] / "aggregate"
    try:
        report = write_report(
            args.paths,
            out,
            metrics=args.metric,
            plot_metrics=args.plot_metric,
            roc=args.roc,
            device=args.device,
            data_root=args.data_root,
        )
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 1

    sweep = report["sweep"]
    print((out / "groups.md").read_text())
    if len(sweep.problems):
        print(f"{len(sweep.problems)} run(s) with problems (also in {out / 'problems.csv'}):")
        for _, row in sweep.problems.iterrows():
            print(f"  {row['run_dir']}: {row['problem']}")
    print(f"wrote {len(report['files'])} files to {out}")
    return 1 if args.strict and len(sweep.problems) else 0


if __name__ == "__main__":
    sys.exit(main())
