"""Everything a training run writes: the verification CSV, TensorBoard events, checkpoints.

The trainer loop talks only to :class:`RunWriter`, so the loop stays readable and every file is
written the same way: to a temporary file in the same folder first, then moved over the target
with :func:`os.replace`. A crash therefore leaves either the previous complete file or the new
complete one, never a half-written CSV or checkpoint.
"""

from __future__ import annotations

import csv
import functools
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
#: A failed job's error message, a blank line, then its traceback (written by scripts/train.py).
ERROR_NAME = "error.txt"


@functools.cache
def _umask() -> int:
    # os.umask can only be read by setting it; do that once, not at every write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(fd: int) -> None:
    """Give a file from ``tempfile.mkstemp`` (always 0600) the mode ``open`` would give it
    (0666 minus the umask), so that run folders and datasets stay readable by others."""
    os.fchmod(fd, 0o666 & ~_umask())


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write a file so that readers never see a partial version.

    The file gets the usual mode (0666 minus the umask), as if written with ``open``.

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
        apply_umask(fd)
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


def resume_checkpoint_path(resume: str | os.PathLike, out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint that ``fit(resume_from=...)`` continues from.

    Args:
        resume: ``"auto"``: ``<out_dir>/checkpoints/last.pt`` if it exists, else None (start
            fresh); a ``.pt`` file; or a run directory (its ``checkpoints/last.pt``).
        out_dir: The run directory of the resuming run.

    Raises:
        FileNotFoundError: A path (not ``"auto"``) that holds no checkpoint.
    """
    if str(resume) == "auto":
        path = Path(out_dir) / CHECKPOINT_DIR / "last.pt"
        return path if path.is_file() else None
    path = Path(resume)
    if path.is_file():
        return path
    for candidate in (path / CHECKPOINT_DIR / "last.pt", path / "last.pt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"resume={str(resume)!r}: no checkpoint at {path}. Pass a checkpoint file, a run "
        "directory holding checkpoints/last.pt, or resume=auto (continue the run directory's "
        "own last checkpoint if there is one, else start fresh)."
    )


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint to resume from (``weights_only``: no code in the file is run).

    Raises:
        ValueError: Not a torch file, or a checkpoint without the training state needed to
            resume (written by a femb version before resuming existed).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({err}).") from err
    if not isinstance(state, Mapping) or state.get("resume") is None or "backbone" not in state:
        raise ValueError(
            f"{path} holds no training state to resume from (no 'resume' entry). To start a "
            "new run from its weights, load them with model.load_checkpoint_state(...) and "
            "call fit without resume_from."
        )
    return dict(state)


def carry_run_files(resumed: str | os.PathLike, out_dir: str | os.PathLike, step: int) -> None:
    """Copy a resumed run's ``best.pt`` and ROC files into the new run directory.

    A run resumed from another run's checkpoint writes into its own directory, which then
    holds the whole run: the CSV rows travel in the checkpoint; this copies ``best.pt`` and
    ``roc/<set>/step_<N>.csv`` of the other run, if those are from at most ``step`` (the
    resumed global step; later ones belong to the abandoned part of the other run).
    TensorBoard events are not copied.
    """
    checkpoints = Path(resumed).parent
    target = Path(out_dir) / CHECKPOINT_DIR
    if target.exists() and checkpoints.resolve() == target.resolve():
        return
    best = checkpoints / "best.pt"
    if best.is_file():
        best_state = torch.load(best, map_location="cpu", weights_only=True, mmap=True)
        if best_state["global_step"] <= step:
            atomic_write(target / "best.pt", lambda f: f.write(best.read_bytes()))
    if checkpoints.name == CHECKPOINT_DIR:
        for roc in (checkpoints.parent / ROC_DIR).glob("*/step_*.csv"):
            if int(roc.stem.split("_")[1]) <= step:
                destination = Path(out_dir) / ROC_DIR / roc.parent.name / roc.name
                atomic_write(destination, lambda f, roc=roc: f.write(roc.read_bytes()))


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
        active: False makes every write a no-op (ranks > 0 of a multi-process run).
        purge_step: Resuming from a checkpoint of this global step: TensorBoard hides the
            events of later steps that the interrupted run had written, and ROC files of later
            evaluations are deleted (they are written again as the run catches up).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        tensorboard: bool,
        rows: list[dict[str, Any]] | None = None,
        active: bool = True,
        purge_step: int | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.active = active
        self.rows: list[dict[str, Any]] = list(rows or [])
        self._tb = None
        if not active:
            return
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(
                f"cannot create the run directory {self.out_dir}: {err.strerror}. "
                "Choose a writable output folder."
            ) from err
        if purge_step is not None:
            self._drop_roc_after(purge_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                log_dir=str(self.out_dir / TENSORBOARD_DIR),
                purge_step=None if purge_step is None else purge_step + 1,
            )

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard events are being written."""
        return self._tb is not None

    def write_rows(self) -> None:
        """Rewrite ``verification.csv`` from :attr:`rows` (on resume: drops newer rows; with
        no rows, there is no CSV)."""
        if not self.active:
            return
        if self.rows:
            write_csv(self.csv_path, self.rows)
        else:
            self.csv_path.unlink(missing_ok=True)

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
        self.write_rows()

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
        if not self.active:
            return path
        rows = [
            {"fpr": float(f), "tpr": float(t), "threshold": float(h)}
            for f, t, h in zip(roc.fpr, roc.tpr, roc.thresholds, strict=True)
        ]
        write_csv(path, rows)
        return path

    def save_checkpoint(self, state: Mapping[str, Any], name: str) -> Path:
        path = self.checkpoint_path(name)
        if self.active:
            save_checkpoint(state, path)
        return path

    def _drop_roc_after(self, step: int) -> None:
        for path in (self.out_dir / ROC_DIR).glob("*/step_*.csv"):
            if int(path.stem.split("_")[1]) > step:
                path.unlink()

    def flush(self) -> None:
        """Flush TensorBoard events to disk (the CSV and checkpoints are always complete)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
