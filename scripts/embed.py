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
import sys

from femb.cli import add_device, add_flip, add_quiet, run_tool, setup_logging
from femb.inference import check_embeddings_path, embed_folder, load_run, save_embeddings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Embed every image under a folder with a trained femb run."
    )
    parser.add_argument("run", help="run directory or .pt checkpoint")
    parser.add_argument("images", help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="output file, .npz or .parquet")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    add_device(parser)
    add_flip(parser)
    parser.add_argument("--num-workers", type=int, default=0, help="image decoding workers")
    parser.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="leave out files that cannot be decoded instead of stopping",
    )
    add_quiet(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    return run_tool(lambda: embed(args))


def embed(args: argparse.Namespace) -> int:
    check_embeddings_path(args.out)  # a bad output path fails before any image is read
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
    n, dim = result.embeddings.shape
    skipped = f", {len(result.skipped)} unreadable left out" if result.skipped else ""
    print(f"wrote {n} embeddings of dimension {dim} from {args.images} to {path}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
