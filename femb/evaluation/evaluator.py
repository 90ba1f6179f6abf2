"""Face verification evaluator: embeddings (+ labels or a pairs protocol) -> flat metrics dict."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from femb.evaluation.metrics import (
    GenuineImpostorScores,
    KFoldAccuracy,
    RocCurve,
    cmc_curve,
    identification_ranks,
    identification_split,
    kfold_accuracy,
)
from femb.evaluation.similarity import as_float_array, get_similarity, l2_normalize

log = logging.getLogger(__name__)

__all__ = ["VerificationEvaluator", "VerificationResult", "far_key"]

# Score-matrix blocks hold at most this many entries (16 MiB in float32) besides the output.
_BLOCK_ELEMENTS = 1 << 22
# Pairs-protocol similarities are computed this many pairs at a time (bounded gather memory).
_PAIR_CHUNK = 1 << 16


def far_key(target: float) -> str:
    """Metric key of a FAR target: ``1e-3 -> "tar@far=1e-3"``, ``2.5e-4 -> "tar@far=2.5e-4"``."""
    return f"tar@far={np.format_float_scientific(target, trim='-', exp_digits=1)}"


@dataclass(frozen=True)
class VerificationResult:
    """Everything one evaluation computed.

    Attributes:
        metrics: The flat ``{name: value}`` dict returned by ``evaluator(...)``.
        roc: ROC operating points (fpr, tpr, thresholds), by decreasing threshold, reduced to
            the corners of the curve (see :meth:`GenuineImpostorScores.roc_curve`).
        scores: The sorted genuine and impostor scores the metrics were computed from.
        kfold: Per-fold accuracies and thresholds (pairs protocol only, else None).
        cmc: (G,) cumulative match characteristic, ``cmc[k - 1]`` = rank-k identification rate
            (all-pairs mode with ``identification=True`` only, else None).
    """

    metrics: dict[str, float]
    roc: RocCurve
    scores: GenuineImpostorScores
    kfold: KFoldAccuracy | None = None
    cmc: np.ndarray | None = None


def stratified_folds(issame: np.ndarray, n_folds: int) -> np.ndarray:
    """Fold ids for cross-validating a pair list that is a single protocol fold.

    LFW's ``pairs_fold1.txt`` (like each fold of ``pairs.txt``) lists its 300 matched pairs and
    then its 300 mismatched ones, so consecutive sub-folds would each hold one class only. Here
    each class is cut into ``n_folds`` consecutive blocks and block ``k`` of both classes forms
    fold ``k``: every fold keeps the class balance, as every fold of ``pairs.txt`` does.

    Args:
        issame: (P,) bool.
        n_folds: Number of folds.

    Returns:
        (P,) int64 fold ids in ``[0, n_folds)``.
    """
    issame = np.asarray(issame, dtype=bool)
    folds = np.empty(issame.shape[0], dtype=np.int64)
    for mask in (issame, ~issame):
        count = int(mask.sum())
        folds[mask] = np.arange(count) * n_folds // max(count, 1)
    return folds


class VerificationEvaluator:
    """Verification (and optional identification) metrics of face embeddings.

    Called as ``evaluator(embeddings, labels, pairs=None, issame=None, folds=None)`` and returns
    a flat ``dict[str, float]``; :meth:`compute` returns the same dict inside a
    :class:`VerificationResult` together with the ROC. Embeddings are L2-normalised first.

    Two modes:

    - **All pairs** (``pairs`` and ``issame`` omitted): every pair ``i < j`` of the ``N``
      embeddings is scored; same label = genuine, different label = impostor. Scores come from
      blocked matrix products, ``O(N^2 D)`` time and about ``N^2 / 2`` stored scores, so use a
      pairs protocol beyond a few ten thousand images. When the number of pairs exceeds
      ``max_pairs``, pairs are subsampled without replacement by a
      ``numpy.random.default_rng(seed)`` generator, uniformly among the pairs of each kind:
      all genuine pairs are kept if they are at most ``max_pairs // 2``, and the rest of the
      budget goes to impostor pairs; otherwise ``max_pairs - max_pairs // 2`` impostor pairs
      (or all, if fewer) are kept and genuine pairs fill the rest. Genuine ranks are drawn
      before impostor ranks. The result is the same for the same input and seed.
    - **Pairs protocol** (``pairs`` and ``issame`` given, e.g. LFW): only the listed pairs are
      scored and the k-fold accuracy is added. Labels are ignored and ``max_pairs`` does not
      apply.

    Metric keys (thresholds are in score units: accept as "same" when ``score >= threshold``;
    see :mod:`femb.evaluation.similarity`; rates are fractions in [0, 1]):

    ======================  ==================================================================
    ``n_genuine``           Number of genuine (same-identity) pairs scored.
    ``n_impostor``          Number of impostor pairs scored.
    ``eer``                 Equal error rate: FAR = FRR, linearly interpolated on the ROC.
    ``eer_threshold``       Highest threshold whose FAR >= FRR (the operating point at the EER).
    ``auc``                 Area under the ROC (ties count 1/2).
    ``tar@far=1e-3`` ...    One per FAR target: highest TAR with FAR <= target; NaN when the
                            target is below ``1 / n_impostor`` (the smallest resolvable FAR).
    ``accuracy``            Pairs protocol only: mean held-out accuracy over the folds, each
                            with the threshold maximising accuracy on the other folds.
    ``accuracy_std``        Pairs protocol only: standard deviation (ddof=0) of the fold
                            accuracies.
    ``accuracy_threshold``  Pairs protocol only: mean of the per-fold thresholds.
    ``rank1``               All-pairs mode with ``identification=True``: rank-1 rate of closed-set
                            identification; gallery = first image (dataset order) of each
                            identity with >= 2 images, probes = their other images; ties count
                            as misses.
    ======================  ==================================================================

    Args:
        similarity: Similarity name, ``"cos"`` or ``"l2"``.
        far_targets: FAR targets in (0, 1] for the ``tar@far=...`` keys.
        n_folds: Folds for the k-fold accuracy when the dataset gives no ``folds``; the pairs are
            split into consecutive folds without shuffling, as insightface does.
        max_pairs: Most pairs scored in all-pairs mode before subsampling.
        seed: Seed of the all-pairs subsampling.
        identification: Add ``rank1`` (and :attr:`VerificationResult.cmc`) in all-pairs mode;
            it costs one (probes x identities) similarity matrix, far less than all pairs.

    Raises:
        ValueError: For an unknown similarity or out-of-range arguments.
    """

    def __init__(
        self,
        similarity: str = "cos",
        far_targets: Sequence[float] = (1e-1, 1e-2, 1e-3),
        n_folds: int = 10,
        max_pairs: int = 20_000_000,
        seed: int = 0,
        identification: bool = True,
    ) -> None:
        self.similarity = get_similarity(similarity)
        targets = tuple(float(t) for t in far_targets)
        if not all(0.0 < t <= 1.0 for t in targets):
            raise ValueError(f"far_targets must lie in (0, 1], got {far_targets!r}.")
        keys = [far_key(t) for t in targets]
        if len(set(keys)) != len(keys):
            raise ValueError(f"far_targets has duplicates: {far_targets!r}.")
        if not isinstance(n_folds, numbers.Integral) or n_folds < 2:
            raise ValueError(f"n_folds={n_folds!r} must be an integer >= 2.")
        if not isinstance(max_pairs, numbers.Integral) or max_pairs < 2:
            raise ValueError(f"max_pairs={max_pairs!r} must be an integer >= 2.")
        self.far_targets = targets
        self.n_folds = int(n_folds)
        self.max_pairs = int(max_pairs)
        self.seed = int(seed)
        self.identification = bool(identification)

    def __repr__(self) -> str:
        return (
            f"VerificationEvaluator(similarity={self.similarity.name!r}, "
            f"far_targets={self.far_targets}, n_folds={self.n_folds}, "
            f"max_pairs={self.max_pairs}, seed={self.seed}, "
            f"identification={self.identification})"
        )

    def __call__(
        self,
        embeddings: Any,
        labels: Any = None,
        pairs: Any = None,
        issame: Any = None,
        folds: Any = None,
    ) -> dict[str, float]:
        """Evaluate and return the flat metrics dict; see :meth:`compute`."""
        return self.compute(embeddings, labels, pairs=pairs, issame=issame, folds=folds).metrics

    def compute(
        self,
        embeddings: Any,
        labels: Any = None,
        pairs: Any = None,
        issame: Any = None,
        folds: Any = None,
    ) -> VerificationResult:
        """Evaluate embeddings (N, D) in all-pairs mode (labels) or pairs mode (pairs, issame).

        Args:
            embeddings: (N, D) float tensor or array, not necessarily normalised.
            labels: (N,) integer identity labels; required in all-pairs mode.
            pairs: (P, 2) integer indices into ``embeddings``.
            issame: (P,) bool, True for same-identity pairs.
            folds: (P,) integer fold id per pair; default ``n_folds`` consecutive folds; when
                all pairs share one fold, :func:`stratified_folds`.

        Raises:
            ValueError: For inconsistent shapes, out-of-range indices, NaN/inf embeddings, or
                fewer than 1 genuine or 1 impostor pair.
        """
        unit = l2_normalize(_check_embeddings(embeddings))
        if pairs is None and issame is None:
            if folds is not None:
                raise ValueError("folds was given without pairs and issame; pass all three.")
            return self._all_pairs(unit, labels)
        if pairs is None or issame is None:
            missing = "pairs" if pairs is None else "issame"
            raise ValueError(f"the pairs protocol needs both pairs and issame; {missing} is None.")
        return self._pairs(unit, pairs, issame, folds)

    def _pairs(self, unit: np.ndarray, pairs: Any, issame: Any, folds: Any) -> VerificationResult:
        n = unit.shape[0]
        pairs = _to_numpy(pairs)
        if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype.kind not in "iu":
            raise ValueError(
                f"pairs must be an integer array (P, 2), got shape {pairs.shape} and dtype "
                f"{pairs.dtype}."
            )
        if pairs.size and (pairs.min() < 0 or pairs.max() >= n):
            raise ValueError(
                f"pairs index rows {pairs.min()}..{pairs.max()} but embeddings has {n} rows."
            )
        issame = _to_numpy(issame)
        if issame.shape != (pairs.shape[0],):
            raise ValueError(
                f"issame must have shape ({pairs.shape[0]},) to match pairs, got {issame.shape}."
            )
        if folds is not None:
            folds = _to_numpy(folds)
            if folds.shape != (pairs.shape[0],):
                raise ValueError(
                    f"folds must have shape ({pairs.shape[0]},) to match pairs, got {folds.shape}."
                )

        cos = np.empty(pairs.shape[0], dtype=unit.dtype)
        for start in range(0, pairs.shape[0], _PAIR_CHUNK):
            p = pairs[start : start + _PAIR_CHUNK]
            cos[start : start + p.shape[0]] = np.einsum("nd,nd->n", unit[p[:, 0]], unit[p[:, 1]])
        scores = self.similarity.from_cosine(cos)

        split = GenuineImpostorScores.from_labels(scores, issame)
        if folds is not None and np.unique(folds).size < 2:
            folds = stratified_folds(issame, self.n_folds)
        kfold = kfold_accuracy(scores, issame, folds=folds, n_folds=self.n_folds)
        metrics = self._verification_metrics(split)
        metrics["accuracy"] = kfold.mean
        metrics["accuracy_std"] = kfold.std
        metrics["accuracy_threshold"] = kfold.threshold
        return VerificationResult(metrics, split.roc_curve(), split, kfold=kfold)

    def _all_pairs(self, unit: np.ndarray, labels: Any) -> VerificationResult:
        n = unit.shape[0]
        if labels is None:
            raise ValueError("all-pairs mode needs labels (N,); or pass pairs and issame.")
        labels = _to_numpy(labels)
        if labels.ndim != 1 or labels.shape[0] != n:
            raise ValueError(
                f"labels must have shape ({n},) to match embeddings, got {labels.shape}."
            )
        if labels.dtype.kind not in "iu":
            raise TypeError(f"labels must be integers, got dtype {labels.dtype}.")
        _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
        counts = counts.astype(np.int64)
        n_genuine = int(np.sum(counts * (counts - 1) // 2))
        n_impostor = n * (n - 1) // 2 - n_genuine
        if n_genuine == 0 or n_impostor == 0:
            raise ValueError(
                f"all-pairs mode needs >= 1 genuine and >= 1 impostor pair, got {n_genuine} "
                f"genuine and {n_impostor} impostor pairs from {n} embeddings of "
                f"{counts.size} identities: need an identity with >= 2 images and >= 2 identities."
            )

        keep_gen, keep_imp = self._pair_budget(n_genuine, n_impostor)
        gen_ranks = imp_ranks = None
        if keep_gen + keep_imp < n_genuine + n_impostor:
            rng = np.random.default_rng(self.seed)
            gen_ranks = _sample_sorted(rng, n_genuine, keep_gen)
            imp_ranks = _sample_sorted(rng, n_impostor, keep_imp)
            log.info(
                "all-pairs: %d pairs exceed max_pairs=%d; scoring %d/%d genuine and %d/%d "
                "impostor pairs sampled with seed %d",
                n_genuine + n_impostor,
                self.max_pairs,
                keep_gen,
                n_genuine,
                keep_imp,
                n_impostor,
                self.seed,
            )
        genuine, impostor = self._score_all_pairs(unit, codes, gen_ranks, imp_ranks, n_impostor)
        split = GenuineImpostorScores(genuine, impostor, assume_sorted=True)

        metrics = self._verification_metrics(split)
        cmc = None
        if self.identification:
            cmc = self._cmc(unit, labels)
            metrics["rank1"] = float(cmc[0])
        return VerificationResult(metrics, split.roc_curve(), split, cmc=cmc)

    def _pair_budget(self, n_genuine: int, n_impostor: int) -> tuple[int, int]:
        """Numbers of genuine and impostor pairs to keep under ``max_pairs`` (see class doc)."""
        if n_genuine + n_impostor <= self.max_pairs:
            return n_genuine, n_impostor
        if n_genuine <= self.max_pairs // 2:
            return n_genuine, self.max_pairs - n_genuine
        keep_imp = min(n_impostor, self.max_pairs - self.max_pairs // 2)
        return self.max_pairs - keep_imp, keep_imp

    def _score_all_pairs(
        self,
        unit: np.ndarray,
        codes: np.ndarray,
        gen_ranks: np.ndarray | None,
        imp_ranks: np.ndarray | None,
        n_impostor: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sorted genuine and impostor scores of all pairs i < j (or of the sampled ranks).

        Rows are scored in blocks ``[r0, r1)`` against columns ``[r0, N)``; inside each
        block's leading square only the strict upper triangle holds pairs i < j. Pair ranks
        count the pairs of one kind in row-major (i, j) order.
        """
        n = unit.shape[0]
        # About 16 blocks: the wasted lower triangles then cost ~6% of the pairs.
        rows = max(1, min(_BLOCK_ELEMENTS // n, -(-n // 16)))
        starts = np.arange(0, n - 1, rows)
        heights = np.minimum(rows, n - starts)
        areas = heights * (n - starts)
        offsets = np.r_[0, np.cumsum(areas)[:-1]]
        gen_i, gen_j = _genuine_pairs(codes)

        if imp_ranks is None:
            # One buffer for all blocks; genuine and j <= i entries are overwritten with +inf
            # and one sort moves them past the n_impostor real impostor scores.
            buffer = np.empty(int(areas.sum()), dtype=unit.dtype)
            for r0, b, offset in zip(starts, heights, offsets, strict=True):
                view = buffer[offset : offset + b * (n - r0)].reshape(b, n - r0)
                # np.dot writes through BLAS; matmul(out=) with a transposed operand does not.
                np.dot(unit[r0 : r0 + b], unit[r0:].T, out=view)
                scores = self.similarity.from_cosine(view)
                if scores is not view:
                    view[...] = scores
                view[:, :b][np.tri(b, dtype=bool)] = np.inf
            block = gen_i // rows
            r0 = starts[block]
            gen_pos = offsets[block] + (gen_i - r0) * (n - r0) + (gen_j - r0)
            genuine = np.sort(buffer[gen_pos])
            buffer[gen_pos] = np.inf
            buffer.sort()
            impostor = buffer[:n_impostor]
            assert np.isfinite(impostor[-1]), "fewer impostor scores than counted"
            assert buffer.size == n_impostor or np.isinf(buffer[n_impostor]), "too many"
            return genuine, impostor

        gen_parts, imp_parts = [], []
        imp_seen = 0
        for r0, b in zip(starts, heights, strict=True):
            flat = self.similarity.from_cosine(unit[r0 : r0 + b] @ unit[r0:].T).ravel()
            # Genuine pairs with rows in [r0, r0 + b) are a contiguous part of the row-major list.
            lo, hi = np.searchsorted(gen_i, [r0, r0 + b])
            local = (gen_i[lo:hi] - r0) * (n - r0) + (gen_j[lo:hi] - r0)
            gen_parts.append(_take_ranks(flat[local], gen_ranks, lo))
            is_impostor = np.ones(flat.size, dtype=bool)
            is_impostor[local] = False
            is_impostor.reshape(b, n - r0)[:, :b][np.tri(b, dtype=bool)] = False
            imp_block = flat[is_impostor]
            imp_parts.append(_take_ranks(imp_block, imp_ranks, imp_seen))
            imp_seen += imp_block.size
        assert imp_seen == n_impostor, (imp_seen, n_impostor)
        return np.sort(np.concatenate(gen_parts)), np.sort(np.concatenate(imp_parts))

    def _cmc(self, unit: np.ndarray, labels: np.ndarray) -> np.ndarray:
        split = identification_split(labels)
        gallery = unit[split.gallery]
        rows = max(1, _BLOCK_ELEMENTS // max(1, gallery.shape[0]))
        ranks = np.empty(split.probes.size, dtype=np.int64)
        for start in range(0, split.probes.size, rows):
            probes = split.probes[start : start + rows]
            scores = self.similarity.from_cosine(unit[probes] @ gallery.T)
            ranks[start : start + probes.size] = identification_ranks(
                scores, split.probe_targets[start : start + probes.size]
            )
        return cmc_curve(ranks, max_rank=gallery.shape[0])

    def _verification_metrics(self, split: GenuineImpostorScores) -> dict[str, float]:
        eer = split.eer()
        tar = split.tar_at_far(self.far_targets)
        metrics = {
            "n_genuine": float(split.n_genuine),
            "n_impostor": float(split.n_impostor),
            "eer": eer.eer,
            "eer_threshold": eer.threshold,
            "auc": split.auc(),
        }
        for target, value in zip(self.far_targets, tar.tar, strict=True):
            metrics[far_key(target)] = float(value)
        return metrics


def _genuine_pairs(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i < j with equal codes (labels as 0..C-1), in row-major (i, j) order."""
    order = np.argsort(codes, kind="stable")  # ascending indices inside each identity
    counts = np.bincount(codes)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    i_parts, j_parts = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.int64)]
    # Identities of equal size share one triu_indices pattern.
    for size in np.unique(counts[counts >= 2]):
        members = order[starts[counts == size][:, None] + np.arange(size)]
        first, second = np.triu_indices(size, k=1)
        i_parts.append(members[:, first].ravel())
        j_parts.append(members[:, second].ravel())
    i, j = np.concatenate(i_parts), np.concatenate(j_parts)
    row_major = np.lexsort((j, i))
    return i[row_major], j[row_major]


def _take_ranks(values: np.ndarray, ranks: np.ndarray, seen: int) -> np.ndarray:
    """Entries of ``values`` whose global rank ``seen + k`` is in the sorted ``ranks``."""
    lo, hi = np.searchsorted(ranks, [seen, seen + values.size])
    return values[ranks[lo:hi] - seen]


def _sample_sorted(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """Sorted uniform random subset of size ``m`` of ``range(n)``, in O(m) memory for m << n."""
    if m >= n:
        return np.arange(n, dtype=np.int64)
    if 2 * m > n:
        # The complement of a uniform subset is uniform; drawing the smaller side is cheaper.
        keep = np.ones(n, dtype=bool)
        keep[_sample_sorted(rng, n, n - m)] = False
        return np.flatnonzero(keep)
    picked = np.empty(0, dtype=np.int64)
    while picked.size < m:
        draws = rng.integers(0, n, size=(m - picked.size) * 11 // 10 + 16, dtype=np.int64)
        picked = np.unique(np.concatenate([picked, draws]))
    # The union of i.i.d. draws, given its size, is a uniform subset; thin it uniformly to m.
    if picked.size > m:
        picked = np.sort(rng.choice(picked, size=m, replace=False))
    return picked


def _to_numpy(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)


def _check_embeddings(embeddings: Any) -> np.ndarray:
    emb = as_float_array(embeddings, "embeddings")
    if emb.ndim != 2 or emb.shape[0] < 2 or emb.shape[1] < 1:
        raise ValueError(f"embeddings must have shape (N, D) with N >= 2, got {emb.shape}.")
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"embeddings contain NaN or inf in {bad.size} of {emb.shape[0]} rows (first: "
            f"{bad[:5].tolist()}); the model may have diverged (check the loss and lr)."
        )
    return emb
