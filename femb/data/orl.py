"""ORL / AT&T face database (40 identities x 10 grey 92x112 PGM images)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from femb.data.base import FaceDataset, missing_layout_error, scan_identity_folders
from femb.data.data_root import resolve_root
from femb.data.pairs import PROTOCOLS, pairs_from_labels
from femb.data.transforms import face_transform

log = logging.getLogger(__name__)

SPLITS = ("all", "train", "val")
_LAYOUT = "orl/sN/Y.pgm (folders s1 ... s40, images 1.pgm ... 10.pgm)"
_SUBJECT = re.compile(r"s(\d+)")
_NUMBER = re.compile(r"(\d+)")


def _subject_number(name: str) -> int:
    match = _SUBJECT.fullmatch(name)
    assert match is not None, name  # filtered by `include` before sorting
    return int(match.group(1))


def _file_key(path: Path) -> tuple[int, str]:
    # Numeric order 1, 2, ..., 10 rather than the string order 1, 10, 2, ...
    match = _NUMBER.fullmatch(path.stem)
    return (int(match.group(1)) if match else 1 << 30, path.name)


class ORLDataset(FaceDataset):
    """The ORL (AT&T) faces: ``root/sN/Y.pgm``, grey images repeated to 3 channels.

    Identities are the folders ``s1 ... s40`` sorted by their **number** (``s1, s2, ..., s10,
    ..., s40``, not string order ``s1, s10, s11, ...``); images inside a folder are sorted by
    number too. Labels restart at 0 within each split and follow that order, so in
    ``split="val"`` label 0 is ``s31``.

    Splits are identity-disjoint: ``train`` is the first ``num_train_identities`` subjects
    (s1..s30 by default, 300 images), ``val`` the rest (s31..s40, 100 images), ``all`` every
    subject. By default a validation split is scored on all its genuine and impostor pairs
    (``protocol="all_pairs"``: 450 + 4500 pairs for s31..s40); ``protocol="balanced_pairs"``
    gives ``val`` a pair list built by :func:`femb.data.pairs_from_labels` instead (every
    same-subject pair, an equal number of seeded different-subject pairs, 10 folds), for
    k-fold accuracy.

    Args:
        root: The ``orl/`` folder; ``None`` uses ``default_data_root() / "orl"``.
        split: ``"train"``, ``"val"`` or ``"all"``.
        transform: Defaults to ``face_transform(train, image_size, center_crop)``.
        train: Training augmentation; ``None`` means ``split == "train"``.
        image_size: Output side ``S``.
        center_crop: Center crop in source pixels (images are 92 wide, 112 high); ``None``
            keeps the whole image (stretched to square).
        num_train_identities: Split boundary: subjects ranked ``< num_train_identities`` (in
            numeric order) form ``train``.
        protocol: ``"all_pairs"`` (no pair list: score every pair of the split) or
            ``"balanced_pairs"`` (a seeded balanced pair list on ``split="val"``).
        pair_seed: Seed for the negative pairs of ``protocol="balanced_pairs"``.

    Raises:
        FileNotFoundError: ``root`` is missing or has no ``sN`` folders with images.
        ValueError: Unknown ``split`` or ``protocol``, or a ``num_train_identities`` that
            leaves a split empty.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        train: bool | None = None,
        image_size: int = 112,
        center_crop: int | tuple[int, int] | None = None,
        num_train_identities: int = 30,
        protocol: str = "all_pairs",
        pair_seed: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
        self.root = resolve_root(root, "orl")
        self.split = split

        identities, paths, labels = scan_identity_folders(
            self.root,
            extensions=(".pgm",),
            layout=_LAYOUT,
            identity_key=_subject_number,
            file_key=_file_key,
            include=lambda name: _SUBJECT.fullmatch(name) is not None,
        )
        total = len(identities)
        if not 0 < num_train_identities < total:
            raise ValueError(
                f"num_train_identities must be in [1, {total - 1}] so that both train and val "
                f"have identities ({total} found under {self.root}), got {num_train_identities}"
            )
        if split == "train":
            keep = labels < num_train_identities
            first = 0
            identities = identities[:num_train_identities]
        elif split == "val":
            keep = labels >= num_train_identities
            first = num_train_identities
            identities = identities[num_train_identities:]
        else:
            keep = np.ones(len(labels), dtype=bool)
            first = 0
        if not keep.any():
            raise missing_layout_error(self.root, _LAYOUT, f"has no images for split {split!r}")
        paths = [p for p, k in zip(paths, keep, strict=True) if k]
        labels = labels[keep] - first

        if transform is None:
            is_train = split == "train" if train is None else train
            transform = face_transform(is_train, image_size, center_crop)
        super().__init__(paths, labels, identities, transform)
        if split == "val" and protocol == "balanced_pairs":
            self._set_pairs(*pairs_from_labels(self.labels, num_folds=10, seed=pair_seed))
        log.info(
            "ORL %s split: %d images of %d identities (%s..%s)",
            split,
            len(self),
            self.num_classes,
            self.identities[0],
            self.identities[-1],
        )
