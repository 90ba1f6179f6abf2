"""Embed every image of a folder tree with a trained run.

    python scripts/embed.py RUN_DIR IMAGES_DIR --out embeddings.npz [--batch-size 64]
        [--device auto] [--flip | --no-flip] [--num-workers 0] [--skip-unreadable]

RUN_DIR is a run directory (its checkpoints/last.pt is used) or a .pt checkpoint. Images
(.bmp .jpeg .jpg .pgm .png .ppm .webp, any depth, hidden files skipped) get the run's validation
preprocessing. The output holds ``embeddings`` (N, D) float32, L2-normalised, ``norms`` (N,)
(raw embedding norms, MagFace's quality score) and ``paths`` (N,) relative to IMAGES_DIR: a
NumPy .npz, or Parquet (columns path, norm, embedding) when --out ends with .parquet (needs
pyarrow). Read it back with ``femb.inference.load_embeddings``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from femb.inference import check_embeddings_path, embed_folder, load_run, save_embeddings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Embed every image under a folder with a trained femb run."
    )
    parser.add_argument("run", help="run directory or .pt checkpoint")
    parser.add_argument("images", help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="output file, .npz or .parquet")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flip test (default: as the run was evaluated, its flip_test)",
    )
    parser.add_argument("--num-workers", type=int, default=0, help="image decoding workers")
    parser.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="leave out files that cannot be decoded instead of stopping",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # femb's progress at INFO; other libraries (the ONNX exporters are chatty) at WARNING.
    logging.basicConfig(
        level=logging.WARNING, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
    )
    logging.getLogger("femb").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        check_embeddings_path(args.out)
        run = load_run(args.run)
        result = embed_folder(
            run,
            args.images,
            batch_size=args.batch_size,
            device=args.device,
            flip=args.flip,
            num_workers=args.num_workers,
            progress=not args.quiet,
            skip_unreadable=args.skip_unreadable,
        )
        path = save_embeddings(args.out, result)
    except (OSError, ValueError, NotImplementedError, ModuleNotFoundError) as err:
        # User errors only (OSError: missing files, unreadable images; ModuleNotFoundError:
        # no pyarrow for .parquet); anything else is a bug and keeps its traceback.
        print(f"error: {err}", file=sys.stderr)
        return 1
    n, dim = result.embeddings.shape
    skipped = f", {len(result.skipped)} unreadable left out" if result.skipped else ""
    print(f"wrote {n} embeddings of dimension {dim} from {args.images} to {path}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
