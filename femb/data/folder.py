"""Generic ``root/<identity>/<image>`` face dataset."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from PIL import Image

from femb.data.base import IMAGE_EXTENSIONS, FaceDataset, scan_identity_folders
from femb.data.transforms import face_transform

log = logging.getLogger(__name__)


class IdentityFolderDataset(FaceDataset):
    """Face images stored as ``root/<identity>/<image>``, one folder per identity.

    Identity folders are sorted by name (plain string order) and label ``k`` is the ``k``-th
    non-empty folder; files inside a folder are sorted by name, so the sample order does not
    depend on the file system. Only files directly inside an identity folder count (no
    recursion); hidden files and folders are ignored.

    Args:
        root: The dataset folder.
        transform: ``PIL.Image -> Tensor (3, S, S)``; defaults to
            ``face_transform(train, image_size, center_crop)``.
        train: Build the training transform (random flip); ignored if ``transform`` is given.
        image_size: Output side ``S``; ignored if ``transform`` is given.
        center_crop: Center crop in source pixels; ignored if ``transform`` is given.
        extensions: Accepted image suffixes, case-insensitive.

    Raises:
        FileNotFoundError: ``root`` is missing, has no identity folders, or has no images.
            Identity folders without images are skipped with a warning instead.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        train: bool = False,
        image_size: int = 112,
        center_crop: int | None = None,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        identities, paths, labels = scan_identity_folders(self.root, extensions)
        if transform is None:
            transform = face_transform(train, image_size, center_crop)
        super().__init__(paths, labels, identities, transform)
        log.info(
            "IdentityFolderDataset %s: %d images of %d identities",
            self.root,
            len(self),
            self.num_classes,
        )
