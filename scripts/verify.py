"""Are two face images the same person? Decide with a trained run at its validated threshold.

    python scripts/verify.py RUN_DIR IMAGE_A IMAGE_B [--far 1e-3 | --threshold T]
        [--valset NAME] [--data-root DIR] [--device auto] [--flip | --no-flip] [--json]

The similarity is the run's evaluator similarity (``evaluator.similarity``, ``cos`` by default)
of the two L2-normalised embeddings, computed with the run's validation preprocessing. The
pair is judged "same" when similarity >= threshold, where the threshold is, by rule:

- default: the EER threshold of the evaluation stored in the checkpoint
  (``metrics["<valset>/eer_threshold"]``, the first validation set unless --valset);
- ``--far F``: recomputed by encoding the run's validation set (rebuilt from the checkpoint
  config; --data-root if the data moved): among thresholds whose FAR on that set is <= F,
  the one with the highest TAR;
- ``--threshold T``: T itself, in the similarity's unit.

Prints one line (or a JSON object with --json) and exits 0 for either decision; errors
(missing or unreadable files, no stored threshold) exit 1 with a message on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from femb.cli import add_device, add_flip, add_json, add_quiet, run_tool, setup_logging
from femb.data import load_image
from femb.inference import compare_images, load_run, stored_eer_threshold, threshold_at_far


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Compare two face images with a trained femb run."
    )
    parser.add_argument("run", help="run directory or .pt checkpoint")
    parser.add_argument("image_a", help="first image")
    parser.add_argument("image_b", help="second image")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument(
        "--far",
        type=float,
        help="use the threshold at this false accept rate on the validation set (recomputed)",
    )
    rule.add_argument("--threshold", type=float, help="use this threshold (similarity units)")
    parser.add_argument("--valset", help="validation set of the threshold (default: the first)")
    parser.add_argument(
        "--data-root", help="where the validation data lives now, if it moved (--far only)"
    )
    add_device(parser)
    parser.add_argument(
        "--batch-size", type=int, default=64, help="batch size for encoding the validation set"
    )
    add_flip(parser)
    add_json(parser)
    add_quiet(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    return run_tool(lambda: verify(args))


def verify(args: argparse.Namespace) -> int:
    # Fail on a bad image before the (slower) model load and validation-set encoding.
    for image in (args.image_a, args.image_b):
        load_image(image)
    run = load_run(args.run)
    if args.far is not None:
        threshold = threshold_at_far(
            run,
            args.far,
            valset=args.valset,
            batch_size=args.batch_size,
            device=args.device,
            flip=args.flip,
            data_root=args.data_root,
        )
    elif args.threshold is not None:
        threshold = args.threshold
    else:
        threshold = stored_eer_threshold(run, args.valset)
    result = compare_images(
        run, args.image_a, args.image_b, threshold, device=args.device, flip=args.flip
    )
    print(json.dumps(result.to_dict(), allow_nan=False) if args.json else result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
