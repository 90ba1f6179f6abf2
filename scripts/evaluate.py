"""Score a trained run on its validation sets again, e.g. with flip test.

    python scripts/evaluate.py RUN_DIR [--flip | --no-flip] [--data-root DIR] [--json]

The validation sets, their preprocessing and the evaluator are rebuilt from the config stored in
the checkpoint (``checkpoints/last.pt`` of a run directory, or the given ``.pt``), so the metrics
are those ``verification.csv`` reports, for any flip setting. Prints one ``key value`` line per
metric (or a JSON object with --json); errors exit 1 with a message on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from femb.cli import add_device, add_flip, add_json, add_quiet, run_tool, setup_logging
from femb.inference import evaluate_run, load_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a trained femb run on its val sets.")
    parser.add_argument("run", help="run directory or .pt checkpoint")
    add_flip(parser)
    parser.add_argument("--data-root", help="where the validation data lives now, if it moved")
    add_device(parser)
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    add_json(parser)
    add_quiet(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    return run_tool(lambda: evaluate(args))


def evaluate(args: argparse.Namespace) -> int:
    run = load_run(args.run)
    metrics = evaluate_run(
        run,
        flip=args.flip,
        batch_size=args.batch_size,
        device=args.device,
        data_root=args.data_root,
    )
    if args.json:
        clean = {k: (None if math.isnan(v) else v) for k, v in metrics.items()}
        print(json.dumps(clean))
    else:
        for key, value in metrics.items():
            print(f"{key} {value:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
