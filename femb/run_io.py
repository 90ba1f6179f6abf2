"""Everything a training run writes: the verification CSV, TensorBoard events, checkpoints.

The trainer loop talks only to :class:`RunWriter`, so the loop stays readable and every file is
written the same way: to a temporary file in the same folder first, then moved over the target
with :func:`os.replace`. A crash therefore leaves either the previous complete file or the new
complete one, never a half-written CSV or checkpoint.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CSV_NAME = "verification.csv"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
ROC_DIR = "roc"


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write a file so that readers never see a partial version.

    Args:
        path: Destination file. Its folder is created if needed.
        write: Called with a binary file object open on a temporary file beside ``path``.

    Raises:
        OSError: With the destination named, when the folder is not writable or the disk is full.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise OSError(
            f"cannot write {path}: {err.strerror or err}. Check that the output "
            "folder is writable and the disk has space."
        ) from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(
                f"cannot write {path}: {err.strerror or err}. Check that the output "
                "folder is writable and the disk has space."
            ) from err
        raise


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` a checkpoint dict atomically."""
    atomic_write(path, lambda f: torch.save(dict(state), f))


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write rows (dicts, possibly with different keys) as one CSV, atomically.

    Columns are the union of the keys in first-seen order; a missing value is an empty cell.
    """
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


class RunWriter:
    """Writes one run directory.

    Layout::

        out_dir/
          verification.csv      one row per evaluation
          tensorboard/          scalars and embedding projections (when enabled)
          checkpoints/          last.pt and best.pt
          roc/<set>/step_<N>.csv  the ROC points (fpr, tpr, threshold) of every evaluation

    Args:
        out_dir: The run directory; created if missing.
        tensorboard: Whether to write TensorBoard events.
        rows: Rows already written (for a resumed run); new rows are appended to them.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        tensorboard: bool,
        rows: list[dict[str, Any]] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(
                f"cannot create the run directory {self.out_dir}: {err.strerror}. "
                "Choose a writable output folder."
            ) from err
        self.rows: list[dict[str, Any]] = list(rows or [])
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out_dir / TENSORBOARD_DIR))

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard events are being written."""
        return self._tb is not None

    @property
    def csv_path(self) -> Path:
        return self.out_dir / CSV_NAME

    def checkpoint_path(self, name: str) -> Path:
        return self.out_dir / CHECKPOINT_DIR / f"{name}.pt"

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log scalars to TensorBoard (no-op when TensorBoard is off)."""
        if self._tb is None:
            return
        for tag, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self._tb.add_scalar(tag, float(value), global_step=step)

    def append_row(self, row: Mapping[str, Any]) -> None:
        """Add one evaluation row to ``verification.csv`` (the whole file is rewritten)."""
        self.rows.append(dict(row))
        write_csv(self.csv_path, self.rows)

    def embedding(
        self,
        embeddings: torch.Tensor,
        labels: list,
        images: torch.Tensor | None,
        step: int,
        tag: str,
    ) -> None:
        """Write an embedding projection with thumbnails.

        Args:
            embeddings: (N, D) embeddings.
            labels: N metadata entries (identity names or ids).
            images: (N, 3, H, W) thumbnails with values in [0, 1], or None.
            step: Global step.
            tag: Projection name, e.g. the validation set.
        """
        if self._tb is None:
            return
        self._tb.add_embedding(
            embeddings, metadata=labels, label_img=images, global_step=step, tag=tag
        )

    def roc(self, set_name: str, step: int, roc: Any) -> Path:
        """Write the ROC of one evaluation to ``roc/<set_name>/step_<step>.csv``.

        Args:
            set_name: Validation set name.
            step: Global step of the evaluation.
            roc: Has ``fpr``, ``tpr`` and ``thresholds`` arrays (a ``femb.evaluation.RocCurve``).
        """
        path = self.out_dir / ROC_DIR / set_name / f"step_{step:08d}.csv"
        rows = [
            {"fpr": float(f), "tpr": float(t), "threshold": float(h)}
            for f, t, h in zip(roc.fpr, roc.tpr, roc.thresholds, strict=True)
        ]
        write_csv(path, rows)
        return path

    def save_checkpoint(self, state: Mapping[str, Any], name: str) -> Path:
        path = self.checkpoint_path(name)
        save_checkpoint(state, path)
        return path

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
