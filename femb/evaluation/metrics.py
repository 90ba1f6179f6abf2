"""Verification and identification metrics computed exactly from similarity scores.

Conventions used throughout:

- A *score* is "higher = more similar" (see :mod:`femb.evaluation.similarity`). A pair is
  accepted as "same" at threshold ``t`` when ``score >= t``; thresholds are in score units.
- *Genuine* pairs are same-identity pairs (``issame`` True), *impostor* pairs are
  different-identity pairs. ``FPR = FAR`` = accepted impostors / impostors,
  ``TPR = TAR`` = accepted genuine / genuine, ``FNR = FRR = 1 - TPR``.
- The ROC is the empirical one: one operating point per distinct score value (plus the point
  (0, 0) at threshold ``+inf``), joined by straight lines, exactly as ``sklearn.metrics.roc_curve``
  with ``drop_intermediate=False`` defines it.

Everything is computed from the genuine and impostor scores sorted once each
(:class:`GenuineImpostorScores`) with binary searches and cumulative counts, so the cost is
``O(n log n)`` for ``n`` pairs, with no threshold grid and no Python loop over pairs or thresholds.
Results are deterministic: there is no randomness in this module.
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "EqualErrorRate",
    "GenuineImpostorScores",
    "IdentificationSplit",
    "KFoldAccuracy",
    "RocCurve",
    "TarAtFar",
    "cmc_curve",
    "consecutive_folds",
    "equal_error_rate",
    "identification_ranks",
    "identification_split",
    "kfold_accuracy",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
]

# Tolerance on target * n_impostor so that e.g. 0.57 * 100 (= 56.99999999999999 in binary)
# still allows 57 false accepts.
_FAR_COUNT_RTOL = 1e-9


class RocCurve(NamedTuple):
    """ROC operating points ordered by decreasing threshold.

    Attributes:
        fpr: (K,) false positive (false accept) rates, non-decreasing, from 0 to 1.
        tpr: (K,) true positive (true accept) rates, non-decreasing, from 0 to 1.
        thresholds: (K,) score thresholds; point ``k`` accepts ``score >= thresholds[k]``.
            ``thresholds[0]`` is ``+inf`` (accept nothing).
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


class EqualErrorRate(NamedTuple):
    """Equal error rate and its operating threshold (see :meth:`GenuineImpostorScores.eer`)."""

    eer: float
    threshold: float


class TarAtFar(NamedTuple):
    """True accept rates at FAR targets (see :meth:`GenuineImpostorScores.tar_at_far`).

    Attributes:
        far_targets: (T,) the requested FAR targets.
        tar: (T,) TAR at each target; NaN where the target is below ``1 / n_impostor``.
        thresholds: (T,) the highest threshold reaching that TAR within the target
            (``+inf`` when the TAR is 0, NaN where the TAR is NaN).
    """

    far_targets: np.ndarray
    tar: np.ndarray
    thresholds: np.ndarray


class KFoldAccuracy(NamedTuple):
    """Result of :func:`kfold_accuracy`.

    Attributes:
        mean: Mean held-out accuracy over the folds.
        std: Population standard deviation (``ddof=0``) of the fold accuracies.
        threshold: Mean of the fold thresholds (score units).
        fold_accuracies: (K,) held-out accuracy per fold, in sorted fold-id order.
        fold_thresholds: (K,) threshold chosen on the other folds, per fold.
    """

    mean: float
    std: float
    threshold: float
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray


class IdentificationSplit(NamedTuple):
    """Closed-set identification protocol built from labels (see :func:`identification_split`).

    Attributes:
        gallery: (G,) dataset indices of the gallery images, one per identity.
        probes: (P,) dataset indices of the probe images, in dataset order.
        probe_targets: (P,) for each probe, the position in ``gallery`` of its identity.
    """

    gallery: np.ndarray
    probes: np.ndarray
    probe_targets: np.ndarray


class GenuineImpostorScores:
    """Genuine and impostor scores, each sorted once, with every verification metric on them.

    Build it with :meth:`from_labels` from scores and same/different labels, or directly from
    the two score sets (what :class:`~femb.evaluation.VerificationEvaluator` does, so that
    millions of all-pairs scores never need a label array).

    Args:
        genuine: (G,) scores of same-identity pairs, G >= 1.
        impostor: (I,) scores of different-identity pairs, I >= 1.
        assume_sorted: Skip sorting when both arrays are already ascending.

    Raises:
        ValueError: If either set is empty or holds a non-finite score.
    """

    def __init__(self, genuine: Any, impostor: Any, *, assume_sorted: bool = False) -> None:
        genuine, impostor = _as_scores(genuine, "genuine"), _as_scores(impostor, "impostor")
        if genuine.size == 0 or impostor.size == 0:
            raise ValueError(
                f"verification metrics need at least 1 genuine and 1 impostor pair, got "
                f"{genuine.size} genuine and {impostor.size} impostor pairs."
            )
        # Ascending order: counts of "score >= t" are n - searchsorted(x, t, "left").
        self.genuine = genuine if assume_sorted else np.sort(genuine)
        self.impostor = impostor if assume_sorted else np.sort(impostor)

    @classmethod
    def from_labels(cls, scores: Any, issame: Any) -> GenuineImpostorScores:
        """Split ``scores`` (P,) by ``issame`` (P,) (True = same identity)."""
        scores = _as_scores(scores, "scores")
        issame = _as_bool(issame, "issame")
        if scores.shape != issame.shape:
            raise ValueError(
                f"scores and issame must have the same shape, got {scores.shape} and "
                f"{issame.shape}."
            )
        return cls(scores[issame], scores[~issame])

    @property
    def n_genuine(self) -> int:
        return int(self.genuine.size)

    @property
    def n_impostor(self) -> int:
        return int(self.impostor.size)

    def roc_curve(self, drop_intermediate: bool = True) -> RocCurve:
        """The empirical ROC, reduced to the points needed to draw it exactly.

        Between two consecutive distinct genuine scores only impostor scores exist, so the ROC
        there is a horizontal run; it is represented by its two ends. The points kept, for each
        distinct genuine score ``g`` (in decreasing order): the point at the threshold just
        above ``g`` and the point at threshold ``g``; plus ``(0, 0)`` at ``+inf`` and ``(1, 1)``
        at the lowest score. Every returned point is one of ``sklearn.metrics.roc_curve``'s
        points, and the polyline through them is the full ROC. Size: at most ``2 G + 2``.

        Args:
            drop_intermediate: Also drop points lying on the straight line between their
                neighbours (the polyline does not change).

        Returns:
            The curve, ordered by decreasing threshold.
        """
        gen, imp = self.genuine, self.impostor
        n_gen, n_imp = gen.size, imp.size

        # Distinct genuine values in decreasing order.
        first = np.r_[True, gen[1:] != gen[:-1]]
        g = gen[first][::-1]
        tp_at = n_gen - np.searchsorted(gen, g, "left")
        fp_at = n_imp - np.searchsorted(imp, g, "left")
        tp_above = n_gen - np.searchsorted(gen, g, "right")
        above_idx = np.searchsorted(imp, g, "right")
        fp_above = n_imp - above_idx

        # The threshold "just above g" is the smallest score > g: the next larger distinct
        # genuine value or the smallest impostor score above g, whichever is lower.
        next_gen = np.r_[np.inf, g[:-1].astype(np.float64)]
        imp_above = np.full(g.size, np.inf)
        has_imp = above_idx < n_imp
        imp_above[has_imp] = imp[above_idx[has_imp]]
        thr_above = np.minimum(next_gen, imp_above)

        lowest = float(min(gen[0], imp[0]))
        fp = np.concatenate([[0], np.column_stack([fp_above, fp_at]).ravel(), [n_imp]])
        tp = np.concatenate([[0], np.column_stack([tp_above, tp_at]).ravel(), [n_gen]])
        thr = np.concatenate(
            [[np.inf], np.column_stack([thr_above, g.astype(np.float64)]).ravel(), [lowest]]
        )

        # Equal consecutive points come from empty impostor runs; they share the threshold.
        keep = np.r_[True, (np.diff(fp) != 0) | (np.diff(tp) != 0)]
        fp, tp, thr = fp[keep], tp[keep], thr[keep]
        if drop_intermediate and fp.size > 2:
            dx0, dy0 = np.diff(fp)[:-1], np.diff(tp)[:-1]
            dx1, dy1 = np.diff(fp)[1:], np.diff(tp)[1:]
            turns = dx0 * dy1 - dy0 * dx1 != 0
            keep = np.r_[True, turns, True]
            fp, tp, thr = fp[keep], tp[keep], thr[keep]
        return RocCurve(fp / n_imp, tp / n_gen, thr)

    def auc(self) -> float:
        """Area under the ROC: ``P(genuine > impostor) + 0.5 P(genuine == impostor)``.

        This Mann-Whitney form equals the trapezoidal area under the empirical ROC
        (``sklearn.metrics.roc_auc_score``), ties included.
        """
        below = np.searchsorted(self.impostor, self.genuine, "left")
        below_or_tied = np.searchsorted(self.impostor, self.genuine, "right")
        # Integer sum of 2 * (#below + 0.5 #tied): exact up to ~4.6e18 pair comparisons.
        twice = int(np.sum(below, dtype=np.int64) + np.sum(below_or_tied, dtype=np.int64))
        return twice / (2.0 * self.n_genuine * self.n_impostor)

    def eer(self) -> EqualErrorRate:
        """Equal error rate, by linear interpolation on the ROC where FPR crosses FNR = 1 - TPR.

        Let ``t*`` be the highest score threshold with ``FPR(t*) >= FNR(t*)`` (it always exists:
        at the lowest score FPR = 1 and FNR = 0). Its ROC point and the point at the next higher
        threshold bracket the crossing; the EER is the value where the segment between them
        meets ``FPR = FNR``. ``t*`` is returned as the EER threshold: an actual operating
        threshold, the highest one whose FAR is at least its FRR.
        """
        gen, imp = self.genuine, self.impostor
        n_gen, n_imp = gen.size, imp.size

        def far_at_least_frr(t: float) -> bool:
            # Exact integer form of (#imp >= t) / n_imp >= (#gen < t) / n_gen.
            n_fa = n_imp - int(np.searchsorted(imp, t, "left"))
            n_fr = int(np.searchsorted(gen, t, "left"))
            return n_gen * n_fa >= n_imp * n_fr

        # The predicate is true for low thresholds and false for high ones; search both sets.
        candidates = [
            float(x[i]) for x in (gen, imp) if (i := _last_true(x, far_at_least_frr)) >= 0
        ]
        t = max(candidates)

        # ROC points at t (accept >= t) and at the next higher threshold (accept > t), as
        # counts; d = n_gen * n_imp * (FPR - FNR) stays an exact integer.
        fa_at = n_imp - int(np.searchsorted(imp, t, "left"))
        fr_at = int(np.searchsorted(gen, t, "left"))
        fa_above = n_imp - int(np.searchsorted(imp, t, "right"))
        fr_above = int(np.searchsorted(gen, t, "right"))
        d_at = n_gen * fa_at - n_imp * fr_at
        d_above = n_gen * fa_above - n_imp * fr_above
        assert d_at >= 0 > d_above, (d_at, d_above)
        w = -d_above / (d_at - d_above)
        eer = (fa_above + w * (fa_at - fa_above)) / n_imp
        return EqualErrorRate(float(eer), t)

    def tar_at_far(self, far_targets: Any) -> TarAtFar:
        """TAR at each FAR target: the highest TPR over thresholds whose FPR is <= the target.

        With ``n_impostor`` impostor pairs the FPR moves in steps of ``1 / n_impostor``; that is
        the smallest resolvable FAR. A target below it can only be met at FPR = 0, which says
        nothing about that FAR, so the TAR is NaN there.

        Args:
            far_targets: FAR targets in (0, 1].

        Raises:
            ValueError: If a target is outside (0, 1].
        """
        targets = _check_far_targets(far_targets)
        gen, imp = self.genuine, self.impostor
        n_gen, n_imp = gen.size, imp.size
        tar = np.full(targets.size, np.nan)
        thresholds = np.full(targets.size, np.nan)
        for k, target in enumerate(targets):
            max_fa = math.floor(target * n_imp * (1.0 + _FAR_COUNT_RTOL))
            if max_fa < 1:
                continue
            if max_fa >= n_imp:
                tar[k], thresholds[k] = 1.0, float(gen[0])
                continue
            # Accepting any score <= v (the (max_fa + 1)-th highest impostor) exceeds max_fa.
            v = imp[n_imp - 1 - max_fa]
            first_accepted = int(np.searchsorted(gen, v, "right"))
            tar[k] = (n_gen - first_accepted) / n_gen
            thresholds[k] = float(gen[first_accepted]) if first_accepted < n_gen else np.inf
        return TarAtFar(targets, tar, thresholds)


def roc_curve(scores: Any, issame: Any, drop_intermediate: bool = True) -> RocCurve:
    """Empirical ROC of scores (P,) with labels issame (P,).

    See :meth:`GenuineImpostorScores.roc_curve`.
    """
    return GenuineImpostorScores.from_labels(scores, issame).roc_curve(drop_intermediate)


def roc_auc(scores: Any, issame: Any) -> float:
    """Area under the ROC; see :meth:`GenuineImpostorScores.auc`."""
    return GenuineImpostorScores.from_labels(scores, issame).auc()


def equal_error_rate(scores: Any, issame: Any) -> EqualErrorRate:
    """EER and its threshold; see :meth:`GenuineImpostorScores.eer`."""
    return GenuineImpostorScores.from_labels(scores, issame).eer()


def tar_at_far(scores: Any, issame: Any, far_targets: Any) -> TarAtFar:
    """TAR at FAR targets; see :meth:`GenuineImpostorScores.tar_at_far`."""
    return GenuineImpostorScores.from_labels(scores, issame).tar_at_far(far_targets)


def consecutive_folds(n: int, n_folds: int) -> np.ndarray:
    """Fold id of each of ``n`` items split into ``n_folds`` consecutive, unshuffled blocks.

    The first ``n % n_folds`` folds get one item more, as ``sklearn.model_selection.KFold``
    without shuffling (the split insightface uses for LFW-style 10-fold accuracy).

    Shapes: -> (n,) int64 in ``[0, n_folds)``.

    Raises:
        ValueError: If ``n_folds`` is not in ``[2, n]``.
    """
    if not 2 <= n_folds <= n:
        raise ValueError(f"n_folds={n_folds} must be between 2 and the number of pairs ({n}).")
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    return np.repeat(np.arange(n_folds), sizes)


def kfold_accuracy(
    scores: Any, issame: Any, folds: Any | None = None, n_folds: int = 10
) -> KFoldAccuracy:
    """Verification accuracy with a threshold learned on the other folds (LFW protocol).

    For each fold: choose the threshold that maximises accuracy on the pairs of all other
    folds, then measure accuracy on the held-out fold. The search is exact, over every
    distinct training score (accept ``score >= u``) and "accept nothing"; among equally
    accurate choices the highest threshold wins. The threshold applied to the held-out fold
    is placed midway between the lowest accepted and the highest rejected training score
    (just above the highest score for "accept nothing", at the lowest score for "accept all").
    Scores are sorted once; each fold's training accuracies come from cumulative counts.

    Args:
        scores: (P,) similarity scores.
        issame: (P,) True for same-identity pairs.
        folds: (P,) fold id of each pair (any integers, at least 2 distinct). When omitted the
            pairs are split into ``n_folds`` consecutive folds (:func:`consecutive_folds`).
        n_folds: Number of consecutive folds when ``folds`` is omitted.

    Raises:
        ValueError: For mismatched shapes or fewer than 2 folds.
    """
    scores = _as_scores(scores, "scores")
    issame = _as_bool(issame, "issame")
    if scores.shape != issame.shape:
        raise ValueError(
            f"scores and issame must have the same shape, got {scores.shape} and {issame.shape}."
        )
    if folds is None:
        folds = consecutive_folds(scores.size, n_folds)
    else:
        folds = _as_int(folds, "folds")
        if folds.shape != scores.shape:
            raise ValueError(
                f"folds must have the same shape as scores {scores.shape}, got {folds.shape}."
            )
    fold_ids = np.unique(folds)
    if fold_ids.size < 2:
        raise ValueError(f"k-fold accuracy needs at least 2 distinct folds, got {fold_ids}.")

    order = np.argsort(-scores, kind="stable")
    s_desc, y_desc, f_desc = scores[order], issame[order], folds[order]
    accuracies = np.empty(fold_ids.size)
    thresholds = np.empty(fold_ids.size)
    for k, fold in enumerate(fold_ids):
        held_out = f_desc == fold
        t = _best_threshold(s_desc[~held_out], y_desc[~held_out])
        accuracies[k] = np.mean((s_desc[held_out] >= t) == y_desc[held_out])
        thresholds[k] = t
    return KFoldAccuracy(
        float(accuracies.mean()),
        float(accuracies.std()),
        float(thresholds.mean()),
        accuracies,
        thresholds,
    )


def identification_split(labels: Any) -> IdentificationSplit:
    """Closed-set identification protocol from labels.

    Rule: only identities with at least 2 images take part. The gallery holds the first image
    (in dataset order) of each such identity; every other image of those identities is a
    probe. Identities with a single image are left out (they could be neither found nor used).

    Args:
        labels: (N,) identity labels.
    """
    labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {labels.shape}.")
    _, first, inverse, counts = np.unique(
        labels, return_index=True, return_inverse=True, return_counts=True
    )
    multi = counts >= 2
    gallery_of_id = np.full(counts.size, -1)
    gallery = np.sort(first[multi])
    gallery_of_id[inverse[gallery]] = np.arange(gallery.size)
    is_probe = multi[inverse]
    is_probe[gallery] = False
    probes = np.flatnonzero(is_probe)
    return IdentificationSplit(gallery, probes, gallery_of_id[inverse[probes]])


def identification_ranks(scores: Any, targets: Any) -> np.ndarray:
    """Rank of the correct gallery entry for each probe (1 = best match).

    Ties count against the probe: the rank is the number of gallery entries scoring at least
    as high as the correct one, itself included.

    Args:
        scores: (P, G) probe-to-gallery similarities.
        targets: (P,) column of the correct gallery entry per probe.

    Returns:
        (P,) int64 ranks in ``[1, G]``.
    """
    scores = np.asarray(scores)
    targets = _as_int(targets, "targets")
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(
            f"need scores (P, G) and targets (P,), got {scores.shape} and {targets.shape}."
        )
    correct = scores[np.arange(scores.shape[0]), targets]
    return np.count_nonzero(scores >= correct[:, None], axis=1).astype(np.int64)


def cmc_curve(ranks: Any, max_rank: int) -> np.ndarray:
    """Cumulative match characteristic: ``cmc[k - 1]`` = fraction of probes with rank <= k.

    Shapes: (P,) -> (max_rank,).
    """
    ranks = _as_int(ranks, "ranks")
    if ranks.size == 0 or max_rank < 1:
        raise ValueError(
            f"need at least one rank and max_rank >= 1, got {ranks.size}, {max_rank}."
        )
    hist = np.bincount(np.minimum(ranks, max_rank + 1), minlength=max_rank + 2)
    return np.cumsum(hist[1 : max_rank + 1]) / ranks.size


def _best_threshold(s_desc: np.ndarray, y_desc: np.ndarray) -> float:
    """Accuracy-maximising threshold on scores sorted in decreasing order, with labels."""
    n = s_desc.size
    n_imp = n - int(np.count_nonzero(y_desc))
    # Last index of each run of equal scores: accepting "score >= value" accepts up to there.
    ends = np.flatnonzero(np.r_[s_desc[1:] != s_desc[:-1], True])
    true_acc = np.cumsum(y_desc)[ends]
    false_acc = ends + 1 - true_acc
    # Correct decisions; index 0 is "accept nothing", index j >= 1 accepts runs 0..j-1.
    correct = np.r_[n_imp, true_acc + (n_imp - false_acc)]
    best = int(np.argmax(correct))

    # Thresholds are kept representable in the score dtype, so comparing float32 scores with
    # them is exact.
    dtype = s_desc.dtype.type
    if best == 0:
        return float(np.nextafter(s_desc[0], dtype(np.inf)))
    if best == ends.size:
        return float(s_desc[-1])
    lowest_accepted = s_desc[ends[best - 1]]
    highest_rejected = s_desc[ends[best - 1] + 1]
    mid = dtype(0.5 * (float(lowest_accepted) + float(highest_rejected)))
    # Adjacent floats have no midpoint: rounding could land on the rejected score.
    return float(mid if highest_rejected < mid <= lowest_accepted else lowest_accepted)


def _last_true(values: np.ndarray, predicate: Any) -> int:
    """Last index whose value satisfies ``predicate`` (true on a prefix); -1 if none."""
    lo, hi = 0, values.size
    while lo < hi:
        mid = (lo + hi) // 2
        if predicate(values[mid]):
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


def _check_far_targets(far_targets: Any) -> np.ndarray:
    targets = np.atleast_1d(np.asarray(far_targets, dtype=np.float64))
    if targets.ndim != 1 or not np.all((targets > 0) & (targets <= 1)):
        raise ValueError(f"FAR targets must be numbers in (0, 1], got {far_targets!r}.")
    return targets


def _as_scores(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x if x.dtype == torch.float64 else x.float()
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}.")
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf; check the embeddings.")
    return arr


def _as_bool(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind in "iu" and np.all((arr == 0) | (arr == 1)):
        return arr.astype(bool)
    raise TypeError(f"{name} must be boolean (or 0/1 integers), got dtype {arr.dtype}.")


def _as_int(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype}.")
    return arr.astype(np.int64, copy=False)
