"""Convert an identity-folder tree into an insightface RecordIO training set.

    python scripts/folder_to_rec.py IN_DIR OUT_PREFIX [--quality 95] [--image-size N]
        [--pass-through] [-q]

IN_DIR holds one sub-folder per identity (``IN_DIR/<identity>/<image>``), scanned exactly as
``femb.data.IdentityFolderDataset`` scans it: identities sorted by name, images sorted by name,
label k = k-th non-empty identity folder. OUT_PREFIX is the output path without suffix, e.g.
``data/casia/train``: the script writes ``train.rec``, ``train.idx`` and ``property``
(``num_classes,height,width``) there, the layout insightface ships and
``femb.data.RecordIODataset`` reads (``dataset=recordio dataset.train.root=data/casia``).

Every image is decoded, converted to RGB, optionally resized to N x N (bilinear, antialiased;
the aspect ratio is not kept, as in femb's preprocessing) and stored as a JPEG of the given
quality. ``--pass-through`` stores the files' bytes unchanged instead (no re-encoding loss;
they must be JPEG or PNG that PIL and the training decoder can read).
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from femb.cli import run_tool, setup_logging
from femb.data import IdentityFolderDataset
from femb.data.base import load_image
from femb.data.recordio import write_property, write_recordio

log = logging.getLogger("folder_to_rec")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert IN_DIR/<identity>/<image> into insightface train.rec/.idx."
    )
    parser.add_argument("in_dir", type=Path, help="folder of identity sub-folders")
    parser.add_argument("out_prefix", type=Path, help="output path without suffix, e.g. out/train")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality, 1-100")
    parser.add_argument(
        "--image-size", type=int, default=None, help="resize every image to N x N pixels"
    )
    parser.add_argument(
        "--pass-through",
        action="store_true",
        help="store the image files unchanged (JPEG/PNG) instead of re-encoding them",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def encode(path: str, quality: int, image_size: int | None, sizes: Counter) -> bytes:
    """The stored bytes of one image file; counts the stored (height, width) in ``sizes``."""
    image = load_image(path)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image_size is not None:
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    sizes[(image.height, image.width)] += 1
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def passed_through(path: str, sizes: Counter) -> bytes:
    """The file's bytes, after checking that PIL can decode them."""
    image = load_image(path)
    if image.format not in ("JPEG", "PNG"):
        raise ValueError(
            f"--pass-through stores files as they are, but {path!r} is {image.format}; "
            "only JPEG and PNG are decodable by every RecordIO reader (drop --pass-through)"
        )
    sizes[(image.height, image.width)] += 1
    return Path(path).read_bytes()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    if not 1 <= args.quality <= 100:
        print(f"error: --quality must be in 1..100, got {args.quality}", file=sys.stderr)
        return 2
    if args.image_size is not None and args.image_size < 1:
        print(f"error: --image-size must be >= 1, got {args.image_size}", file=sys.stderr)
        return 2
    if args.pass_through and args.image_size is not None:
        print("error: --pass-through stores files unchanged; drop --image-size", file=sys.stderr)
        return 2

    # User errors (missing folder, unreadable image, bad layout) exit 1 with the message.
    return run_tool(lambda: convert(args), errors=(OSError, ValueError))


def convert(args: argparse.Namespace) -> int:
    folder = IdentityFolderDataset(args.in_dir)
    sizes: Counter = Counter()

    def samples() -> Iterator[tuple[bytes, int]]:
        items = zip(folder.paths, folder.labels.tolist(), strict=True)
        for path, label in tqdm(
            items, total=len(folder), desc="folder_to_rec", unit="img", disable=args.quiet
        ):
            if args.pass_through:
                yield passed_through(path, sizes), label
            else:
                yield encode(path, args.quality, args.image_size, sizes), label

    summary = write_recordio(args.out_prefix, samples())
    (height, width), count = sizes.most_common(1)[0]
    if count != summary.num_images:
        log.warning(
            "images have %d different sizes; property records the most common, %dx%d",
            len(sizes),
            height,
            width,
        )
    prop = write_property(summary.rec_path.parent, summary.num_classes, height, width)
    print(
        f"wrote {summary.num_images} images of {summary.num_classes} identities to "
        f"{summary.rec_path}, {summary.idx_path.name} and {prop.name}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
