"""Shared dataset base class, image loading and identity-folder scanning.

Contract every femb dataset follows (the trainer relies on it):

- ``dataset[i]`` returns ``(image, label)``: ``image`` a float32 tensor ``(3, S, S)`` in
  ``[-1, 1]``, ``label`` a Python int;
- ``num_classes`` (int), ``labels`` (numpy int64 ``(N,)``, readable without decoding images),
  ``identities`` (list of str, ``identities[label]`` names the class) and ``paths`` (one str per
  sample);
- labels are contiguous ``0 .. num_classes - 1`` in sorted identity order;
- verification sets additionally carry ``pairs`` (int64 ``(P, 2)``, indices into the dataset),
  ``issame`` (bool ``(P,)``) and ``folds`` (int64 ``(P,)``). Sets without a pair protocol do not
  have these attributes at all, so ``hasattr(dataset, "pairs")`` tells them apart.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".pgm",
    ".ppm",
    ".tif",
    ".tiff",
    ".webp",
)

DATA_ROOT_HINT = (
    "Point femb at the data with the FEMB_DATA_ROOT environment variable or the `data_root` "
    "config key (e.g. `data_root=/path/to/data`)."
)


class ImageReadError(OSError):
    """An image file exists but cannot be opened or decoded (corrupt, truncated, not an image)."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file.

    Decoding happens here (not lazily inside the transform) so that a corrupt file fails with
    its path in the message rather than deep inside a DataLoader worker.

    Args:
        path: Image file.

    Returns:
        The decoded PIL image, in its stored mode (``L``, ``RGB``, ...).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImageReadError: The file cannot be decoded as an image.
    """
    try:
        # We own the file handle, so closing it after load() leaves the decoded image valid.
        with open(path, "rb") as handle:
            image = Image.open(handle)
            image.load()
        return image
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        # PIL reports bad data as UnidentifiedImageError/OSError, and some plugins as
        # SyntaxError or ValueError; all mean "this file is not a usable image".
        raise ImageReadError(f"cannot read image file {os.fspath(path)!r}: {err}") from err


def missing_layout_error(root: Path, layout: str, problem: str) -> FileNotFoundError:
    """Build the ``FileNotFoundError`` raised when a dataset folder is absent or empty.

    Args:
        root: The folder that was searched.
        layout: The expected layout, e.g. ``"root/<identity>/<image>.jpg"``.
        problem: What is wrong, e.g. ``"does not exist"``.
    """
    return FileNotFoundError(
        f"dataset folder {os.fspath(root)!r} {problem}; expected {layout}. {DATA_ROOT_HINT}"
    )


def list_images(folder: Path, extensions: Iterable[str]) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), hidden files skipped, unsorted."""
    suffixes = {e.lower() for e in extensions}
    return [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    ]


def scan_identity_folders(
    root: Path,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    layout: str = "root/<identity>/<image>.jpg (one sub-folder per identity)",
    identity_key: Callable[[str], object] | None = None,
    file_key: Callable[[Path], object] | None = None,
    include: Callable[[str], bool] | None = None,
) -> tuple[list[str], list[str], np.ndarray]:
    """Scan ``root/<identity>/<image>`` into sorted identities, paths and contiguous labels.

    Identity folders without images are skipped with a warning, so labels stay contiguous.

    Args:
        root: Folder holding one sub-folder per identity.
        extensions: Accepted image suffixes (case-insensitive).
        layout: Expected layout, quoted in error messages.
        identity_key: Sort key for identity folder names; plain string order if ``None``.
        file_key: Sort key for image paths within an identity; file-name order if ``None``.
        include: Predicate on identity names; folders for which it is false are ignored.

    Returns:
        ``(identities, paths, labels)`` with ``labels`` int64 ``(N,)`` and
        ``identities[labels[i]]`` the folder of ``paths[i]``.

    Raises:
        FileNotFoundError: ``root`` is missing, has no identity folders, or holds no images.
    """
    if isinstance(extensions, str):
        extensions = (extensions,)  # a bare ".jpg" would otherwise iterate per character
    extensions = tuple(extensions)
    root = Path(root)
    if not root.is_dir():
        raise missing_layout_error(root, layout, "does not exist or is not a directory")
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if include is not None:
        folders = [p for p in folders if include(p.name)]
    if not folders:
        raise missing_layout_error(root, layout, "contains no identity folders")
    folders.sort(key=(lambda p: identity_key(p.name)) if identity_key else (lambda p: p.name))

    identities: list[str] = []
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for folder in folders:
        files = list_images(folder, extensions)
        if not files:
            empty.append(folder.name)
            continue
        files.sort(key=file_key if file_key else (lambda p: p.name))
        label = len(identities)
        identities.append(folder.name)
        paths.extend(os.fspath(f) for f in files)
        labels.extend([label] * len(files))

    if empty:
        shown = ", ".join(empty[:10]) + (f", ... ({len(empty)} in all)" if len(empty) > 10 else "")
        log.warning(
            "Skipping %d identity folder(s) under %s with no images (%s): %s",
            len(empty),
            root,
            "/".join(sorted({e.lower() for e in extensions})),
            shown,
        )
    if not paths:
        raise missing_layout_error(
            root, layout, f"contains identity folders but no images with suffix in {extensions}"
        )
    return identities, paths, np.asarray(labels, dtype=np.int64)


class FaceDataset(Dataset):
    """Identity-labelled face images, decoded lazily from files.

    Subclasses fill ``paths``, ``labels`` and ``identities`` and call ``super().__init__``;
    verification subclasses also call :meth:`_set_pairs`.

    Args:
        paths: One image file per sample.
        labels: Class index per sample, ``(N,)``, contiguous in ``0 .. len(identities) - 1``.
        identities: Class names, ``identities[label]``.
        transform: ``PIL.Image -> Tensor (3, S, S)``; see :func:`femb.data.face_transform`.
            ``None`` only for subclasses that override ``__getitem__``.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: np.ndarray | Sequence[int],
        identities: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor] | None,
    ) -> None:
        self.paths: list[str] = list(paths)
        self.labels: np.ndarray = np.asarray(labels, dtype=np.int64)
        self.identities: list[str] = list(identities)
        self.num_classes: int = len(self.identities)
        self.transform = transform
        if self.labels.shape != (len(self.paths),):
            raise ValueError(
                f"labels must have shape ({len(self.paths)},) to match paths, "
                f"got {self.labels.shape}"
            )
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}) (one per identity), got range "
                f"[{self.labels.min()}, {self.labels.max()}]"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Return ``(image (3, S, S) float32 in [-1, 1], label)``."""
        return self.transform(self.load(index)), int(self.labels[index])

    def load(self, index: int) -> Image.Image:
        """Decode sample ``index`` to a PIL image, before any transform."""
        return load_image(self.paths[index])

    def _set_pairs(
        self,
        pairs: np.ndarray | Sequence[Sequence[int]],
        issame: np.ndarray | Sequence[bool],
        folds: np.ndarray | Sequence[int] | None = None,
    ) -> None:
        """Attach a verification protocol after validating shapes and index ranges.

        Args:
            pairs: ``(P, 2)`` indices into this dataset.
            issame: ``(P,)`` whether each pair shows one identity.
            folds: ``(P,)`` fold index per pair; all zeros if ``None``.
        """
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        issame = np.asarray(issame, dtype=bool).reshape(-1)
        folds = (
            np.zeros(len(pairs), dtype=np.int64)
            if folds is None
            else np.asarray(folds, dtype=np.int64).reshape(-1)
        )
        if not (len(pairs) == len(issame) == len(folds)):
            raise ValueError(
                f"pairs, issame and folds must have the same length, got {len(pairs)}, "
                f"{len(issame)}, {len(folds)}"
            )
        if len(pairs) and (pairs.min() < 0 or pairs.max() >= len(self)):
            raise ValueError(
                f"pair indices must lie in [0, {len(self)}), got range "
                f"[{pairs.min()}, {pairs.max()}]"
            )
        self.pairs: np.ndarray = pairs
        self.issame: np.ndarray = issame
        self.folds: np.ndarray = folds

    def __repr__(self) -> str:
        extra = f", pairs={len(self.pairs)}" if hasattr(self, "pairs") else ""
        return f"{type(self).__name__}(samples={len(self)}, num_classes={self.num_classes}{extra})"
