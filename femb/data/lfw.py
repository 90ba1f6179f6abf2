"""Labeled Faces in the Wild (deep-funneled), split into identity-disjoint train and val."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from femb.data.base import FaceDataset, missing_layout_error, scan_identity_folders
from femb.data.data_root import resolve_root
from femb.data.pairs import PairsProtocol, read_pairs_file
from femb.data.transforms import face_transform

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
MISSING_POLICIES = ("error", "skip")
_LAYOUT = "lfw/images/<Name>/<Name>_NNNN.jpg plus a pairs file such as lfw/pairs_fold1.txt"

# Deep-funneled LFW images are 250x250 with the face centred: LFW cut each one from an
# enlarged Viola-Jones detection, and the fixed face box used by LFWcrop, (83, 92)-(166, 175),
# shows the inner face spans only the central ~85 px. A 150 px centre crop keeps the whole
# face with forehead, chin and cheeks (a framing close to the common 112x112 aligned crops,
# whose eyes sit about a third of the width apart) and drops most of the background, which
# would otherwise let a model match people by scene instead of face.
DEFAULT_CENTER_CROP = 150


def lfw_image_path(images_dir: Path, name: str, index: int) -> Path:
    """``images/<name>/<name>_<index:04d>.jpg``, the LFW file name convention."""
    return images_dir / name / f"{name}_{index:04d}.jpg"


class LFWDataset(FaceDataset):
    """LFW (deep-funneled): train on identities outside a pairs file, verify on its pairs.

    ``split="train"``: every identity folder under ``root/images/`` whose name appears nowhere
    in ``pairs_file`` (neither side of any pair), with all of its images; labels follow sorted
    folder names. With the staged subset and ``pairs_fold1.txt`` that is 547 identities and
    4077 images.

    ``split="val"``: exactly the distinct images referenced by ``pairs_file``, sorted by
    (name, index), labelled by identity in sorted name order, with ``pairs``, ``issame`` and
    ``folds`` taken from the file (``pairs_fold1.txt``: 600 pairs, 300 same, 807 images of 435
    identities). The two splits never share an identity.

    Both splits use the same preprocessing, by default a 150 px centre crop (see
    ``DEFAULT_CENTER_CROP``) resized to ``image_size``.

    Args:
        root: The ``lfw/`` folder; ``None`` uses ``default_data_root() / "lfw"``.
        split: ``"train"`` or ``"val"``.
        pairs_file: Pairs file, relative to ``root`` or absolute.
        missing: For ``split="val"``: ``"error"`` raises if a referenced image is absent;
            ``"skip"`` drops the pairs that use absent images, with a warning.
        transform: Defaults to ``face_transform(train, image_size, center_crop)``.
        train: Training augmentation; ``None`` means ``split == "train"``.
        image_size: Output side ``S``.
        center_crop: Center crop in source pixels; ``None`` keeps the full 250x250 image.

    Raises:
        FileNotFoundError: ``root/images`` or the pairs file is missing, or (``missing=
            "error"``) a pair references an absent image.
        ValueError: Unknown ``split`` or ``missing``; malformed pairs file; no pairs left.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        pairs_file: str | os.PathLike = "pairs_fold1.txt",
        missing: str = "error",
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        train: bool | None = None,
        image_size: int = 112,
        center_crop: int | tuple[int, int] | None = DEFAULT_CENTER_CROP,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if missing not in MISSING_POLICIES:
            raise ValueError(f"missing must be one of {sorted(MISSING_POLICIES)}, got {missing!r}")
        self.root = resolve_root(root, "lfw")
        self.split = split
        images_dir = self.root / "images"
        if not images_dir.is_dir():
            raise missing_layout_error(images_dir, _LAYOUT, "does not exist")
        pairs_path = Path(pairs_file)
        if not pairs_path.is_absolute():
            pairs_path = self.root / pairs_path
        if not pairs_path.is_file():
            raise missing_layout_error(pairs_path, _LAYOUT, "(pairs file) does not exist")
        self.pairs_file = pairs_path
        protocol = read_pairs_file(pairs_path)

        if split == "train":
            excluded = protocol.names
            identities, paths, labels = scan_identity_folders(
                images_dir,
                extensions=(".jpg", ".jpeg"),
                layout=_LAYOUT,
                include=lambda name: name not in excluded,
            )
        else:
            identities, paths, labels, pair_arrays = self._val_split(images_dir, protocol, missing)

        if transform is None:
            is_train = split == "train" if train is None else train
            transform = face_transform(is_train, image_size, center_crop)
        super().__init__(paths, labels, identities, transform)
        if split == "val":
            self._set_pairs(*pair_arrays)
        log.info(
            "LFW %s split (%s): %d images of %d identities%s",
            split,
            pairs_path.name,
            len(self),
            self.num_classes,
            f", {len(self.pairs)} pairs" if split == "val" else "",
        )

    @staticmethod
    def _val_split(
        images_dir: Path, protocol: PairsProtocol, missing: str
    ) -> tuple[list[str], list[str], np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Images referenced by ``protocol``: identities, paths, labels, (pairs, issame, folds)."""
        records = list(protocol.records)
        exists = {key: lfw_image_path(images_dir, *key).is_file() for key in protocol.image_keys()}
        absent = sorted(key for key, ok in exists.items() if not ok)
        if absent:
            shown = ", ".join(str(lfw_image_path(images_dir, *k)) for k in absent[:5])
            if missing == "error":
                raise FileNotFoundError(
                    f"{len(absent)} image(s) referenced by {protocol.path} are missing, e.g. "
                    f"{shown}. Stage them under {images_dir}, use a pairs file whose images "
                    "are all present (e.g. pairs_fold1.txt), or pass missing='skip'"
                )
            before = len(records)
            records = [r for r in records if all(exists[k] for k in r.keys)]
            log.warning(
                "LFW: %d image(s) of %s are missing (e.g. %s); skipped %d of %d pairs",
                len(absent),
                protocol.path,
                shown,
                before - len(records),
                before,
            )
        if not records:
            raise ValueError(f"no pair of {protocol.path} has both images under {images_dir}")

        keys = sorted({k for r in records for k in r.keys})
        index_of = {key: i for i, key in enumerate(keys)}
        identities = sorted({name for name, _ in keys})
        label_of = {name: i for i, name in enumerate(identities)}
        paths = [os.fspath(lfw_image_path(images_dir, *key)) for key in keys]
        labels = np.array([label_of[name] for name, _ in keys], dtype=np.int64)
        pairs = np.array([[index_of[k] for k in r.keys] for r in records], dtype=np.int64)
        issame = np.array([r.issame for r in records], dtype=bool)
        folds = np.array([r.fold for r in records], dtype=np.int64)
        return identities, paths, labels, (pairs, issame, folds)
