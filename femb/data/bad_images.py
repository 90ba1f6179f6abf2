"""Training through unreadable images: skip them, count them, stop past a stated fraction.

A hand-assembled training set of millions of files usually holds a few corrupt or truncated
images. By default femb fails on the first one (:class:`femb.data.ImageReadError` names the
file). Wrapping the training set in :class:`SkipBadImages` (config key
``skip_bad_images: true``) instead logs each bad file, substitutes the next readable sample,
and raises once the bad files exceed ``max_bad_fraction`` of the dataset, because by then the
data, not a stray file, is the problem.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import Dataset

from femb.data.base import ImageReadError

log = logging.getLogger(__name__)


class SkipBadImages(Dataset):
    """Wrap a dataset so that unreadable images are skipped and counted.

    Every attribute of the wrapped dataset (``num_classes``, ``labels``, ``identities``,
    ``paths``, ...) is available on the wrapper. A bad sample ``i`` is replaced by the next
    readable one (``i + 1``, ``i + 2``, ... modulo the length), with its own label, so batches
    keep their size.

    The count is kept per process: with DataLoader workers each worker counts the files it met,
    and each raises when its own count passes the limit. The limit is therefore a bound on the
    bad files any one process may skip, ``max_bad_fraction * len(dataset)`` (at least 1).

    Args:
        dataset: A femb dataset whose ``__getitem__`` raises :class:`ImageReadError` for an
            unreadable file.
        max_bad_fraction: Largest tolerated fraction of bad files, in [0, 1).

    Raises:
        RuntimeError: From ``__getitem__`` once more files than allowed were bad, naming the
            count, the limit and the last bad file.
    """

    def __init__(self, dataset: Dataset, max_bad_fraction: float = 0.01) -> None:
        if not 0.0 <= max_bad_fraction < 1.0:
            raise ValueError(
                f"max_bad_fraction={max_bad_fraction} must be in [0, 1) (e.g. 0.01 for 1%)."
            )
        self.dataset = dataset
        self.max_bad_fraction = max_bad_fraction
        self.max_bad = max(1, int(max_bad_fraction * len(dataset)))
        self.bad_paths: list[str] = []

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes the wrapper lacks: forward them to the dataset. Guard
        # "dataset" itself so that unpickling (before __init__ ran) cannot recurse.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.dataset)):
            candidate = (index + offset) % len(self.dataset)
            try:
                return self.dataset[candidate]
            except ImageReadError as err:
                self._record(candidate, err)
        raise RuntimeError("no readable image in the whole dataset")  # unreachable past max_bad

    def _record(self, index: int, err: ImageReadError) -> None:
        paths = getattr(self.dataset, "paths", None)
        path = paths[index] if paths is not None else f"sample {index}"
        self.bad_paths.append(path)
        count = len(self.bad_paths)
        log.warning("skipping unreadable image %s (%d skipped so far): %s", path, count, err)
        if count > self.max_bad:
            raise RuntimeError(
                f"{count} unreadable images, more than max_bad_fraction={self.max_bad_fraction}"
                f" of the {len(self.dataset)} images allows ({self.max_bad}); the last was "
                f"{path}. Repair or remove the bad files (the log lists each one), or raise "
                "max_bad_fraction."
            )
