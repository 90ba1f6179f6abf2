"""Verification pair protocols: the LFW ``pairs.txt`` format and label-derived pair lists.

LFW ``pairs.txt`` format (also used by ``pairsDevTrain.txt``, ``pairsDevTest.txt`` and femb's
derived ``pairs_fold1.txt``):

- first line ``n_folds<TAB>n_per_fold`` (View 2, e.g. ``10 300``): each fold is ``n_per_fold``
  matched lines followed by ``n_per_fold`` mismatched lines;
- or a single count ``n`` (View 1, e.g. ``1100``): ``n`` matched then ``n`` mismatched lines,
  read as one fold;
- matched line: ``name i j`` (same person, images ``i`` and ``j``);
- mismatched line: ``name1 i name2 j``.

Fields are separated by any whitespace; image indices are 1-based as in the LFW file names
(``<name>_<iiii>.jpg``). Blank lines are ignored.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from femb.data.base import FaceDataset
from femb.data.transforms import face_transform

log = logging.getLogger(__name__)

#: How a labelled validation split is scored: all of its pairs, or a seeded balanced pair list.
PROTOCOLS = ("all_pairs", "balanced_pairs")


@dataclass(frozen=True)
class PairRecord:
    """One line of a pairs file.

    Attributes:
        name1: Identity of the first image.
        index1: 1-based image number of the first image.
        name2: Identity of the second image (equal to ``name1`` for matched pairs).
        index2: 1-based image number of the second image.
        issame: ``True`` for a matched (same-person) line.
        fold: 0-based fold the line belongs to.
        line: 1-based line number in the file, for error messages.
    """

    name1: str
    index1: int
    name2: str
    index2: int
    issame: bool
    fold: int
    line: int

    @property
    def keys(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """The two images as ``(name, index)`` keys."""
        return (self.name1, self.index1), (self.name2, self.index2)


@dataclass(frozen=True)
class PairsProtocol:
    """A parsed pairs file.

    Attributes:
        path: The file it was read from.
        num_folds: Number of folds (1 for the View 1 header form).
        pairs_per_fold: Matched lines per fold (equal to mismatched lines per fold).
        records: All pairs in file order.
    """

    path: str
    num_folds: int
    pairs_per_fold: int
    records: tuple[PairRecord, ...]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def issame(self) -> np.ndarray:
        """``(P,)`` bool, one per record."""
        return np.array([r.issame for r in self.records], dtype=bool)

    @property
    def folds(self) -> np.ndarray:
        """``(P,)`` int64 fold index per record."""
        return np.array([r.fold for r in self.records], dtype=np.int64)

    @property
    def names(self) -> set[str]:
        """Every identity named anywhere in the file."""
        return {n for r in self.records for n in (r.name1, r.name2)}

    def image_keys(self) -> list[tuple[str, int]]:
        """Distinct ``(name, index)`` images referenced, sorted by name then index."""
        return sorted({k for r in self.records for k in r.keys})


def _parse_int(token: str, path: str, line_no: int, what: str) -> int:
    try:
        value = int(token)
    except ValueError:
        raise ValueError(f"{path}:{line_no}: {what} must be an integer, got {token!r}") from None
    return value


def read_pairs_file(path: str | os.PathLike) -> PairsProtocol:
    """Parse an LFW-style pairs file (View 1 or View 2 header; see the module docstring).

    Args:
        path: The pairs file.

    Returns:
        The parsed protocol; ``records`` keep file order, so fold ``k`` is records
        ``[2 k n, 2 (k + 1) n)`` with the first ``n`` matched.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: Malformed header or line (wrong field count for its position, non-integer
            or non-positive index, number of lines not matching the header); the message gives
            ``file:line``.
    """
    path_str = os.fspath(path)
    with open(path, encoding="utf-8") as handle:
        numbered = [(n, line.split()) for n, line in enumerate(handle, start=1)]
    numbered = [(n, fields) for n, fields in numbered if fields]
    if not numbered:
        raise ValueError(f"{path_str}: pairs file is empty; expected a header line")

    header_line, header = numbered[0]
    if len(header) == 1:
        num_folds, per_fold = 1, _parse_int(header[0], path_str, header_line, "pair count")
    elif len(header) == 2:
        num_folds = _parse_int(header[0], path_str, header_line, "fold count")
        per_fold = _parse_int(header[1], path_str, header_line, "pairs per fold")
    else:
        raise ValueError(
            f"{path_str}:{header_line}: header must be 'n' (View 1) or 'n_folds n_per_fold' "
            f"(View 2), got {len(header)} fields: {' '.join(header)!r}"
        )
    if num_folds < 1 or per_fold < 1:
        raise ValueError(
            f"{path_str}:{header_line}: header counts must be positive, got {' '.join(header)!r}"
        )

    body = numbered[1:]
    expected = 2 * num_folds * per_fold
    if len(body) != expected:
        where = body[expected][0] if len(body) > expected else (body[-1][0] if body else 1)
        raise ValueError(
            f"{path_str}:{where}: header {' '.join(header)!r} announces {expected} pair lines "
            f"({num_folds} fold(s) x {per_fold} matched + {per_fold} mismatched), "
            f"but the file has {len(body)}"
        )

    records: list[PairRecord] = []
    for position, (line_no, fields) in enumerate(body):
        fold, within = divmod(position, 2 * per_fold)
        matched = within < per_fold
        if matched and len(fields) != 3:
            raise ValueError(
                f"{path_str}:{line_no}: expected a matched line 'name i j' (3 fields, lines "
                f"1-{per_fold} of fold {fold + 1}), got {len(fields)} fields: "
                f"{' '.join(fields)!r}"
            )
        if not matched and len(fields) != 4:
            raise ValueError(
                f"{path_str}:{line_no}: expected a mismatched line 'name1 i name2 j' (4 fields, "
                f"lines {per_fold + 1}-{2 * per_fold} of fold {fold + 1}), got {len(fields)} "
                f"fields: {' '.join(fields)!r}"
            )
        if matched:
            name1 = name2 = fields[0]
            raw1, raw2 = fields[1], fields[2]
        else:
            name1, raw1, name2, raw2 = fields
        index1 = _parse_int(raw1, path_str, line_no, "image index")
        index2 = _parse_int(raw2, path_str, line_no, "image index")
        if index1 < 1 or index2 < 1:
            raise ValueError(
                f"{path_str}:{line_no}: image indices are 1-based and must be >= 1, got "
                f"{index1} and {index2}"
            )
        records.append(PairRecord(name1, index1, name2, index2, matched, fold, line_no))

    return PairsProtocol(path_str, num_folds, per_fold, tuple(records))


def pairs_from_labels(
    labels: np.ndarray | Sequence[int],
    num_folds: int = 10,
    max_positive: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build a balanced, deterministic verification protocol from class labels.

    Takes every same-label pair (or ``max_positive`` of them, drawn without replacement) and
    the same number of different-label pairs drawn uniformly without replacement, then deals
    each kind round-robin into ``num_folds`` folds after a seeded shuffle, so every fold has
    (almost) the same number of positives and negatives.

    Args:
        labels: ``(N,)`` class per sample.
        num_folds: Number of folds for cross-validated thresholds.
        max_positive: Cap on positive pairs; ``None`` keeps all of them.
        seed: Seed of the local generator (the global NumPy state is not touched).

    Returns:
        ``(pairs (P, 2) int64, issame (P,) bool, folds (P,) int64)``, positives first.

    Raises:
        ValueError: No class has two samples, or there is only one class.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if num_folds < 1:
        raise ValueError(f"num_folds must be >= 1, got {num_folds}")
    rng = np.random.default_rng(seed)

    rows, cols = np.triu_indices(len(labels), k=1)
    same = labels[rows] == labels[cols]
    positive = np.stack([rows[same], cols[same]], axis=1)
    negative_pool = np.flatnonzero(~same)
    if len(positive) == 0:
        raise ValueError("cannot build positive pairs: no label occurs twice")
    if len(negative_pool) == 0:
        raise ValueError("cannot build negative pairs: all samples share one label")
    if max_positive is not None and max_positive < len(positive):
        positive = positive[np.sort(rng.choice(len(positive), max_positive, replace=False))]
    num_negative = min(len(positive), len(negative_pool))
    chosen = np.sort(rng.choice(negative_pool, num_negative, replace=False))
    negative = np.stack([rows[chosen], cols[chosen]], axis=1)

    def deal(count: int) -> np.ndarray:
        folds = np.arange(count) % num_folds
        rng.shuffle(folds)
        return folds

    pairs = np.concatenate([positive, negative]).astype(np.int64)
    issame = np.concatenate([np.ones(len(positive), bool), np.zeros(num_negative, bool)])
    folds = np.concatenate([deal(len(positive)), deal(num_negative)]).astype(np.int64)
    return pairs, issame, folds


class PairsDataset(FaceDataset):
    """Any list of image files plus a verification pair list.

    Args:
        paths: One image file per sample.
        pairs: ``(P, 2)`` indices into ``paths``.
        issame: ``(P,)`` same-identity flag per pair.
        folds: ``(P,)`` fold per pair; one fold if ``None``.
        labels: Class per sample; if ``None``, every image gets its own class
            (``identities`` are then the paths), which keeps the dataset contract without
            claiming identities the protocol does not give.
        identities: Class names for ``labels``; defaults to ``str(label)``.
        transform: Defaults to ``face_transform(False, image_size, center_crop)``.
        image_size: Output side when ``transform`` is ``None``.
        center_crop: Center crop when ``transform`` is ``None``.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        pairs: np.ndarray | Sequence[Sequence[int]],
        issame: np.ndarray | Sequence[bool],
        folds: np.ndarray | Sequence[int] | None = None,
        labels: np.ndarray | Sequence[int] | None = None,
        identities: Sequence[str] | None = None,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        image_size: int = 112,
        center_crop: int | None = None,
    ) -> None:
        paths = [os.fspath(Path(p)) for p in paths]
        if labels is None:
            labels = np.arange(len(paths), dtype=np.int64)
            identities = list(paths) if identities is None else identities
        labels = np.asarray(labels, dtype=np.int64)
        if identities is None:
            identities = [str(k) for k in range(int(labels.max()) + 1 if len(labels) else 0)]
        if transform is None:
            transform = face_transform(False, image_size, center_crop)
        super().__init__(paths, labels, identities, transform)
        self._set_pairs(pairs, issame, folds)
