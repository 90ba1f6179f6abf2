"""Export a trained run's backbone + L2 normalisation to ONNX or TorchScript, parity-checked.

    python scripts/export.py RUN_DIR --format onnx|torchscript [--out FILE]
        [--exporter dynamo|legacy] [--opset N] [--flip | --no-flip]

The exported model has a dynamic batch size, one input ``images`` (B, 3, S, S) float32 in
[-1, 1] (the run's validation preprocessing, not included: RGB, optional centre crop, resize to
S x S, (x - 0.5) / 0.5; the values are stored in the file's metadata) and two outputs:
``embedding`` (B, D), L2-normalised, and ``norm`` (B,), the raw embedding norm (MagFace's
quality score). Before writing, the script runs the exported model (ONNX Runtime for ONNX) on
random batches of 1 and 5 images and fails, writing nothing, unless it matches PyTorch within
1e-4 (embeddings, absolute; norms, relative).

Default --out: <run>/export/<checkpoint>.onnx or <run>/export/<checkpoint>.torchscript.pt.
ONNX exporters: ``dynamo`` (default; PyTorch's torch.export-based exporter, needs onnxscript)
or ``legacy`` (the TorchScript-based one, deprecated by PyTorch, no extra dependency).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from femb.cli import USER_ERRORS, add_flip, add_json, add_quiet, run_tool, setup_logging
from femb.inference import (
    EXPORT_FORMATS,
    ONNX_EXPORTERS,
    ExportParityError,
    export_model,
    load_run,
)

_SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a trained femb run to ONNX or TorchScript (parity-checked)."
    )
    parser.add_argument("run", help="run directory or .pt checkpoint")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="file format")
    parser.add_argument("--out", help="output file (default: <run>/export/<checkpoint>.<ext>)")
    parser.add_argument(
        "--exporter", default="dynamo", choices=ONNX_EXPORTERS, help="ONNX exporter"
    )
    parser.add_argument("--opset", type=int, help="ONNX opset (default: torch's choice)")
    add_flip(parser, help="bake flip test into the graph (default: the run's flip_test)")
    add_json(parser, help="print the report as JSON")
    add_quiet(parser)
    return parser


def default_out(checkpoint: Path, fmt: str) -> Path:
    """``<run>/export/<checkpoint stem><ext>`` for ``<run>/checkpoints/<name>.pt``."""
    run_dir = (
        checkpoint.parent.parent
        if checkpoint.parent.name == "checkpoints"
        else (checkpoint.parent)
    )
    return run_dir / "export" / f"{checkpoint.stem}{_SUFFIX[fmt]}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    # A failed parity check is reported like a user error; anything else is a bug (of femb or
    # of the exporter) and keeps its traceback.
    return run_tool(lambda: export(args), errors=(*USER_ERRORS, ExportParityError))


def export(args: argparse.Namespace) -> int:
    run = load_run(args.run)
    out = Path(args.out) if args.out else default_out(run.checkpoint, args.format)
    report = export_model(
        run, out, args.format, exporter=args.exporter, opset=args.opset, flip=args.flip
    )
    if args.json:
        print(json.dumps({**asdict(report), "path": str(report.path)}))
    else:
        print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
