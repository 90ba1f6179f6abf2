"""Tests of femb.evaluation against independent references (sklearn, brute-force loops)."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from sklearn.model_selection import KFold

import femb.evaluation.evaluator as evaluator_module
from femb.evaluation import (
    VerificationEvaluator,
    cmc_curve,
    consecutive_folds,
    cosine_similarity,
    cosine_similarity_matrix,
    equal_error_rate,
    far_key,
    get_similarity,
    identification_ranks,
    identification_split,
    kfold_accuracy,
    l2_normalize,
    l2_similarity,
    l2_similarity_matrix,
    roc_auc,
    roc_curve,
    tar_at_far,
)
from femb.evaluation.evaluator import _sample_sorted

# (seed, number of pairs, decimals to round to: fewer decimals = more ties; None = no ties)
SCORE_SETS = [(0, 200, None), (1, 300, 1), (2, 60, 0), (3, 1000, 2), (4, 7, None)]


def make_scores(seed: int, n: int, decimals: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping genuine/impostor score distributions with both classes present."""
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.4
    issame[:2] = [True, False]
    scores = rng.normal(size=n) + 1.2 * issame
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores, issame


# ---------------------------------------------------------------- independent references


def sk_eer(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """EER by interpolation on sklearn's full ROC at the first point where FPR >= FNR."""
    fpr, tpr, thr = sk_roc_curve(issame, scores, drop_intermediate=False)
    fnr = 1 - tpr
    # sklearn's rates are float quotients; 1e-12 absorbs 2/3 vs 1 - 1/3 rounding.
    k = int(np.flatnonzero(fpr >= fnr - 1e-12)[0])
    d0, d1 = fpr[k - 1] - fnr[k - 1], fpr[k] - fnr[k]
    w = -d0 / (d1 - d0) if d1 != d0 else 1.0
    return fpr[k - 1] + w * (fpr[k] - fpr[k - 1]), thr[k]


def sk_tar(scores: np.ndarray, issame: np.ndarray, target: float) -> float:
    fpr, tpr, _ = sk_roc_curve(issame, scores, drop_intermediate=False)
    if target < 1 / np.count_nonzero(~issame):
        return math.nan
    return float(tpr[fpr <= target + 1e-12].max())


def polyline_corners(fpr: np.ndarray, tpr: np.ndarray, thr: np.ndarray) -> set:
    """Points where the ROC polyline changes direction, plus both ends."""
    keep = [0]
    for k in range(1, fpr.size - 1):
        dx0, dy0 = fpr[k] - fpr[k - 1], tpr[k] - tpr[k - 1]
        dx1, dy1 = fpr[k + 1] - fpr[k], tpr[k + 1] - tpr[k]
        if abs(dx0 * dy1 - dy0 * dx1) > 1e-12:
            keep.append(k)
    keep.append(fpr.size - 1)
    return {(fpr[k], tpr[k], thr[k]) for k in keep}


def brute_force_kfold(scores: np.ndarray, issame: np.ndarray, folds: np.ndarray) -> tuple:
    """Loop over every candidate threshold of each training split (rule of kfold_accuracy)."""
    accuracies, thresholds = [], []
    for fold in sorted(set(folds.tolist())):
        train = folds != fold
        values = sorted(set(scores[train].tolist()), reverse=True)
        candidates = [math.nextafter(values[0], math.inf)]
        candidates += [(a + b) / 2 for a, b in itertools.pairwise(values)] + [values[-1]]
        best_t, best_correct = None, -1
        for t in candidates:  # decreasing, so ties keep the highest threshold
            correct = int(np.sum((scores[train] >= t) == issame[train]))
            if correct > best_correct:
                best_t, best_correct = t, correct
        test = ~train
        accuracies.append(
            np.mean([(s >= best_t) == y for s, y in zip(scores[test], issame[test], strict=True)])
        )
        thresholds.append(best_t)
    return np.mean(accuracies), np.std(accuracies), np.mean(thresholds), accuracies


def brute_force_all_pairs(emb: np.ndarray, labels: np.ndarray) -> tuple:
    """Python-loop cosine scores of every pair i < j."""
    scores, issame = [], []
    for i, j in itertools.combinations(range(len(labels)), 2):
        a, b = emb[i].tolist(), emb[j].tolist()
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        scores.append(dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b)))
        issame.append(bool(labels[i] == labels[j]))
    return np.array(scores), np.array(issame)


def brute_force_rank1(emb: np.ndarray, labels: np.ndarray) -> float:
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    first: dict[int, int] = {}
    for i, label in enumerate(labels.tolist()):
        first.setdefault(label, i)
    multi = [label for label in first if np.count_nonzero(labels == label) >= 2]
    gallery = {label: first[label] for label in multi}
    hits = []
    for i, label in enumerate(labels.tolist()):
        if label in gallery and gallery[label] != i:
            sims = {g: float(unit[i] @ unit[idx]) for g, idx in gallery.items()}
            rank = sum(v >= sims[label] for v in sims.values())
            hits.append(rank == 1)
    return float(np.mean(hits))


def clustered_embeddings(seed: int, n_ids: int, per_id: int, dim: int, noise: float) -> tuple:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    labels = np.repeat(np.arange(n_ids), per_id)
    emb = centres[labels] + noise * rng.normal(size=(labels.size, dim))
    return emb, labels


def assert_metrics_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]) or (math.isnan(a[key]) and math.isnan(b[key])), key


# ---------------------------------------------------------------- similarity


def test_similarity_hand_values_and_shapes():
    a = np.array([[3.0, 4.0], [1.0, 0.0]])
    b = np.array([[4.0, 3.0], [-2.0, 0.0]])
    np.testing.assert_allclose(cosine_similarity(a, b), [24 / 25, -1.0])
    np.testing.assert_allclose(l2_similarity(a, b), [-math.sqrt(2 - 48 / 25), -2.0])
    m = cosine_similarity_matrix(a, b)
    assert m.shape == (2, 2)
    np.testing.assert_allclose(np.diag(m), cosine_similarity(a, b))
    np.testing.assert_allclose(m[0, 1], -3 / 5)
    # l2 is the distance of the unit vectors, whatever the input norms.
    np.testing.assert_allclose(l2_similarity_matrix(a, 10 * b), l2_similarity_matrix(a, b))
    np.testing.assert_allclose(l2_similarity_matrix(a)[0, 1], -np.linalg.norm([0.6 - 1, 0.8]))
    # torch input and float32 dtype are kept.
    out = cosine_similarity(torch.tensor(a, dtype=torch.float32), torch.tensor(b).float())
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [24 / 25, -1.0], rtol=1e-6)


def test_normalisation_is_safe_for_extreme_and_zero_rows():
    x = np.array([[3e30, 4e30], [3e-30, 4e-30], [0.0, 0.0]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow/underflow/division warnings
        unit = l2_normalize(x)
    np.testing.assert_allclose(unit, [[0.6, 0.8], [0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
    assert cosine_similarity_matrix(x)[2, 0] == 0.0


def test_unknown_similarity_lists_valid_names():
    with pytest.raises(ValueError, match=r"'dot'.*\['cos', 'l2'\]"):
        get_similarity("dot")
    with pytest.raises(ValueError, match=r"\['cos', 'l2'\]"):
        VerificationEvaluator(similarity="euclidean")


# ---------------------------------------------------------------- metrics vs sklearn


@pytest.mark.parametrize("seed,n,decimals", SCORE_SETS)
def test_eer_matches_sklearn_interpolation(seed, n, decimals):
    scores, issame = make_scores(seed, n, decimals)
    ref_eer, ref_thr = sk_eer(scores, issame)
    result = equal_error_rate(scores, issame)
    assert result.eer == pytest.approx(ref_eer, abs=1e-12)
    assert result.threshold == ref_thr


@pytest.mark.parametrize("seed,n,decimals", SCORE_SETS)
def test_auc_matches_sklearn(seed, n, decimals):
    scores, issame = make_scores(seed, n, decimals)
    assert roc_auc(scores, issame) == pytest.approx(roc_auc_score(issame, scores), abs=1e-12)


@pytest.mark.parametrize("seed,n,decimals", SCORE_SETS)
def test_tar_at_far_matches_sklearn(seed, n, decimals):
    scores, issame = make_scores(seed, n, decimals)
    targets = [1e-3, 1e-2, 0.05, 0.1, 0.3, 0.57, 1.0]
    result = tar_at_far(scores, issame, targets)
    for target, tar, thr in zip(targets, result.tar, result.thresholds, strict=True):
        ref = sk_tar(scores, issame, target)
        if math.isnan(ref):
            assert math.isnan(tar) and math.isnan(thr)
            continue
        assert tar == pytest.approx(ref, abs=1e-12)
        # The reported threshold really operates at that TAR within the FAR target.
        accepted = scores >= thr
        assert np.mean(accepted[issame]) == pytest.approx(tar)
        assert np.mean(accepted[~issame]) <= target + 1e-12


@pytest.mark.parametrize("seed,n,decimals", SCORE_SETS)
def test_roc_points_are_sklearn_points_and_keep_every_corner(seed, n, decimals):
    scores, issame = make_scores(seed, n, decimals)
    full = sk_roc_curve(issame, scores, drop_intermediate=False)
    full_points = set(zip(*full, strict=True))
    compact = roc_curve(scores, issame, drop_intermediate=False)
    reduced = roc_curve(scores, issame)
    assert set(zip(*compact, strict=True)) <= full_points
    assert set(zip(*reduced, strict=True)) == polyline_corners(*full)
    sk_reduced = set(zip(*sk_roc_curve(issame, scores), strict=True))
    assert set(zip(*reduced, strict=True)) <= sk_reduced
    for curve in (compact, reduced):
        assert curve.thresholds[0] == np.inf and (curve.fpr[0], curve.tpr[0]) == (0, 0)
        assert (curve.fpr[-1], curve.tpr[-1]) == (1, 1)
        assert np.all(np.diff(curve.thresholds) < 0)
        assert np.trapezoid(curve.tpr, curve.fpr) == pytest.approx(roc_auc_score(issame, scores))


def test_eer_hand_examples():
    # Exact tie of the error rates: G I G I G I, at threshold 2 FAR = FRR = 1/3.
    scores = np.array([5.0, 4.0, 2.0, 1.0, 0.0, -1.0])
    issame = np.array([True, False, True, False, True, False])
    assert tuple(equal_error_rate(scores, issame)) == pytest.approx((1 / 3, 2.0))
    # Crossing inside a horizontal ROC run: FRR stays 1/3 while FAR goes 0 -> 1/2.
    scores = np.array([3.0, 2.0, 1.0, 0.0, -1.0])
    issame = np.array([True, True, False, True, False])
    assert tuple(equal_error_rate(scores, issame)) == pytest.approx((1 / 3, 1.0))


def test_perfect_separation():
    scores = np.array([0.9, 0.8, 0.8, 0.1, 0.2, -0.3])
    issame = np.array([True, True, True, False, False, False])
    eer = equal_error_rate(scores, issame)
    assert eer.eer == 0.0 and eer.threshold == 0.8  # the lowest genuine score
    assert roc_auc(scores, issame) == 1.0
    np.testing.assert_array_equal(tar_at_far(scores, issame, [0.34, 1.0]).tar, [1.0, 1.0])
    assert kfold_accuracy(scores, issame, folds=np.array([0, 1, 2, 0, 1, 2])).mean == 1.0
    curve = roc_curve(scores, issame)
    np.testing.assert_array_equal(curve.fpr, [0, 0, 1])
    np.testing.assert_array_equal(curve.tpr, [0, 1, 1])
    # Fully inverted scores: everything wrong.
    assert equal_error_rate(-scores, issame).eer == 1.0
    assert roc_auc(-scores, issame) == 0.0


def test_tar_is_nan_below_smallest_resolvable_far():
    scores, issame = make_scores(5, 150, None)
    n_imp = int(np.count_nonzero(~issame))
    smallest = 1 / n_imp
    result = tar_at_far(scores, issame, [0.99 * smallest, smallest, 1e-4])
    assert math.isnan(result.tar[0]) and math.isnan(result.tar[2])
    assert result.tar[1] == pytest.approx(sk_tar(scores, issame, smallest))
    # The same rule through the evaluator, with the key formatted from the target.
    emb, labels = clustered_embeddings(0, 4, 3, 8, 1.0)  # 12 genuine, 54 impostor pairs
    metrics = VerificationEvaluator(far_targets=(1e-1, 1e-2, 1e-4))(emb, labels)
    assert math.isnan(metrics["tar@far=1e-2"]) and math.isnan(metrics["tar@far=1e-4"])
    assert not math.isnan(metrics["tar@far=1e-1"])


def test_far_key_format():
    assert far_key(1e-1) == "tar@far=1e-1"
    assert far_key(1e-4) == "tar@far=1e-4"
    assert far_key(2.5e-3) == "tar@far=2.5e-3"
    with pytest.raises(ValueError, match="duplicates"):
        VerificationEvaluator(far_targets=(1e-3, 0.001))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        VerificationEvaluator(far_targets=(0.0,))


# ---------------------------------------------------------------- k-fold accuracy


@pytest.mark.parametrize("seed,n,decimals", SCORE_SETS[:4])
def test_kfold_accuracy_matches_brute_force(seed, n, decimals):
    scores, issame = make_scores(seed, n, decimals)
    folds = consecutive_folds(n, 10)
    mean, std, thr, fold_acc = brute_force_kfold(scores, issame, folds)
    result = kfold_accuracy(scores, issame)  # default: the same 10 consecutive folds
    np.testing.assert_allclose(result.fold_accuracies, fold_acc)
    assert result.mean == pytest.approx(mean) and result.std == pytest.approx(std)
    assert result.threshold == pytest.approx(thr)
    # Explicit, non-contiguous fold ids.
    rng = np.random.default_rng(seed)
    folds = rng.choice([3, 7, 11], size=n)
    mean, _, thr, _ = brute_force_kfold(scores, issame, folds)
    result = kfold_accuracy(scores, issame, folds=folds)
    assert result.mean == pytest.approx(mean) and result.threshold == pytest.approx(thr)


def test_kfold_accepts_nothing_when_that_is_best():
    # Genuine scores are all below the impostors: the best rule rejects every pair.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.2])
    issame = np.array([False, False, False, False, True, True])
    result = kfold_accuracy(scores, issame, folds=np.array([0, 1, 0, 1, 0, 1]))
    # Just above the highest training score: 0.8 for fold 0, 0.9 for fold 1.
    np.testing.assert_array_equal(
        result.fold_thresholds, [math.nextafter(0.8, 1), math.nextafter(0.9, 1)]
    )
    np.testing.assert_allclose(result.fold_accuracies, [1 / 3, 2 / 3])


def test_consecutive_folds_match_unshuffled_kfold():
    for n, k in [(6000, 10), (23, 10), (10, 10), (7, 2)]:
        ref = np.empty(n, dtype=int)
        for fold, (_, test) in enumerate(KFold(n_splits=k, shuffle=False).split(np.zeros(n))):
            ref[test] = fold
        np.testing.assert_array_equal(consecutive_folds(n, k), ref)
    with pytest.raises(ValueError, match="n_folds=11"):
        consecutive_folds(10, 11)


# ---------------------------------------------------------------- identification


def test_identification_split_rule_and_cmc():
    labels = np.array([5, 7, 5, 9, 7, 5, 2])  # 9 and 2 have one image: left out
    split = identification_split(labels)
    np.testing.assert_array_equal(split.gallery, [0, 1])
    np.testing.assert_array_equal(split.probes, [2, 4, 5])
    np.testing.assert_array_equal(split.probe_targets, [0, 1, 0])
    scores = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.3]])
    ranks = identification_ranks(scores, split.probe_targets)
    np.testing.assert_array_equal(ranks, [1, 2, 2])  # a tie counts against the probe
    np.testing.assert_allclose(cmc_curve(ranks, 2), [1 / 3, 1.0])


# ---------------------------------------------------------------- evaluator


@pytest.mark.parametrize("similarity", ["cos", "l2"])
def test_evaluator_all_pairs_matches_brute_force(similarity):
    emb, labels = clustered_embeddings(1, 5, 4, 6, 1.3)
    labels = labels[np.random.default_rng(1).permutation(labels.size)]  # interleaved ids
    scores, issame = brute_force_all_pairs(emb, labels)
    if similarity == "l2":
        scores = -np.sqrt(np.maximum(2 - 2 * scores, 0))
    result = VerificationEvaluator(similarity=similarity, far_targets=(0.1, 0.05)).compute(
        emb, labels
    )
    m = result.metrics
    assert m["n_genuine"] == issame.sum() == 30 and m["n_impostor"] == (~issame).sum() == 160
    ref_eer, ref_thr = sk_eer(scores, issame)
    assert m["eer"] == pytest.approx(ref_eer, abs=1e-9)
    assert m["eer_threshold"] == pytest.approx(ref_thr, abs=1e-9)
    assert m["auc"] == pytest.approx(roc_auc_score(issame, scores), abs=1e-12)
    assert m["tar@far=1e-1"] == pytest.approx(sk_tar(scores, issame, 0.1))
    assert m["tar@far=5e-2"] == pytest.approx(sk_tar(scores, issame, 0.05))
    assert m["rank1"] == pytest.approx(brute_force_rank1(emb, labels))
    np.testing.assert_allclose(np.sort(scores[issame]), result.scores.genuine, atol=1e-12)
    np.testing.assert_allclose(np.sort(scores[~issame]), result.scores.impostor, atol=1e-12)
    assert "accuracy" not in m


def test_evaluator_pairs_protocol_matches_references():
    emb, labels = clustered_embeddings(2, 30, 4, 16, 1.5)
    rng = np.random.default_rng(2)
    pairs = rng.integers(0, labels.size, size=(400, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    issame = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    same_pairs = np.flatnonzero(labels[:, None] == labels[None, :])
    extra = np.column_stack(np.unravel_index(same_pairs, (labels.size,) * 2))
    pairs = np.concatenate([pairs, extra[extra[:, 0] < extra[:, 1]][::3]])
    issame = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    scores = np.einsum("nd,nd->n", unit[pairs[:, 0]], unit[pairs[:, 1]])

    metrics = VerificationEvaluator()(
        torch.tensor(emb),
        torch.tensor(labels),
        pairs=torch.tensor(pairs),
        issame=torch.tensor(issame),
    )
    mean, std, thr, _ = brute_force_kfold(scores, issame, consecutive_folds(scores.size, 10))
    assert metrics["accuracy"] == pytest.approx(mean)
    assert metrics["accuracy_std"] == pytest.approx(std)
    assert metrics["accuracy_threshold"] == pytest.approx(thr)
    assert metrics["eer"] == pytest.approx(sk_eer(scores, issame)[0], abs=1e-9)
    assert metrics["auc"] == pytest.approx(roc_auc_score(issame, scores), abs=1e-12)
    assert metrics["n_genuine"] == issame.sum() and "rank1" not in metrics

    folds = np.arange(scores.size) % 3
    with_folds = VerificationEvaluator()(emb, None, pairs=pairs, issame=issame, folds=folds)
    assert with_folds["accuracy"] == pytest.approx(brute_force_kfold(scores, issame, folds)[0])


def test_cos_and_l2_agree_on_ranking_metrics():
    emb, labels = clustered_embeddings(3, 20, 5, 32, 2.0)
    cos = VerificationEvaluator("cos", far_targets=(0.1, 0.01)).compute(emb, labels)
    l2 = VerificationEvaluator("l2", far_targets=(0.1, 0.01)).compute(emb, labels)
    for key in ["eer", "auc", "tar@far=1e-1", "tar@far=1e-2", "rank1", "n_genuine"]:
        assert cos.metrics[key] == pytest.approx(l2.metrics[key], abs=1e-12), key
    # Thresholds map through distance = sqrt(2 - 2 cos).
    assert -l2.metrics["eer_threshold"] == pytest.approx(
        math.sqrt(2 - 2 * cos.metrics["eer_threshold"]), abs=1e-7
    )
    np.testing.assert_allclose(cos.roc.fpr, l2.roc.fpr)
    np.testing.assert_allclose(cos.roc.tpr, l2.roc.tpr)

    pairs = np.column_stack([np.arange(0, 99), np.arange(1, 100)])
    issame = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    a = VerificationEvaluator("cos")(emb, labels, pairs=pairs, issame=issame)
    b = VerificationEvaluator("l2")(emb, labels, pairs=pairs, issame=issame)
    assert a["accuracy"] == b["accuracy"] and a["eer"] == pytest.approx(b["eer"])


def test_evaluator_is_deterministic_and_numpy_torch_agree():
    emb, labels = clustered_embeddings(4, 12, 6, 24, 1.8)
    emb = emb.astype(np.float32)
    evaluator = VerificationEvaluator()
    first = evaluator(emb, labels)
    assert_metrics_equal(first, evaluator(emb, labels))
    assert_metrics_equal(first, evaluator(torch.from_numpy(emb), torch.from_numpy(labels)))


def test_blocked_scoring_equals_single_block(monkeypatch):
    emb, labels = clustered_embeddings(5, 7, 4, 8, 1.5)
    for max_pairs in (10**6, 150):
        evaluator = VerificationEvaluator(max_pairs=max_pairs)
        single = evaluator.compute(emb, labels)
        monkeypatch.setattr(evaluator_module, "_BLOCK_ELEMENTS", 3 * labels.size)
        blocked = evaluator.compute(emb, labels)
        monkeypatch.undo()
        # Different block shapes may round matrix products differently (1 ulp).
        assert single.metrics == pytest.approx(blocked.metrics, abs=1e-12, nan_ok=True)
        np.testing.assert_allclose(single.scores.impostor, blocked.scores.impostor, atol=1e-12)
        np.testing.assert_allclose(single.scores.genuine, blocked.scores.genuine, atol=1e-12)


def test_subsampling_keeps_genuine_pairs_and_is_seeded():
    emb, labels = clustered_embeddings(6, 10, 4, 8, 1.5)  # 60 genuine, 720 impostor pairs
    full = VerificationEvaluator().compute(emb, labels)
    evaluator = VerificationEvaluator(max_pairs=200, seed=3)
    sub = evaluator.compute(emb, labels)
    assert sub.metrics["n_genuine"] == 60 and sub.metrics["n_impostor"] == 140
    np.testing.assert_array_equal(sub.scores.genuine, full.scores.genuine)
    assert np.isin(sub.scores.impostor, full.scores.impostor).all()
    assert_metrics_equal(sub.metrics, evaluator(emb, labels))
    other = VerificationEvaluator(max_pairs=200, seed=4).compute(emb, labels)
    assert not np.array_equal(other.scores.impostor, sub.scores.impostor)

    # The sampled pairs are the seeded ranks of impostor pairs in row-major (i < j) order.
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    impostor_pairs = [
        (i, j) for i, j in itertools.combinations(range(labels.size), 2) if labels[i] != labels[j]
    ]
    rng = np.random.default_rng(3)
    _sample_sorted(rng, 60, 60)
    ranks = _sample_sorted(rng, 720, 140)
    expected = np.sort([unit[impostor_pairs[r][0]] @ unit[impostor_pairs[r][1]] for r in ranks])
    np.testing.assert_allclose(sub.scores.impostor, expected, atol=1e-12)

    # Genuine pairs are subsampled too once they exceed half of the budget.
    tight = VerificationEvaluator(max_pairs=80).compute(emb, labels)
    assert tight.metrics["n_genuine"] == 40 and tight.metrics["n_impostor"] == 40


@pytest.mark.parametrize("n,m", [(10, 0), (10, 3), (10, 8), (10, 10), (10**9, 1000)])
def test_sample_sorted_is_a_sorted_subset(n, m):
    a = _sample_sorted(np.random.default_rng(0), n, m)
    assert a.size == m and np.all(np.diff(a) > 0) and (m == 0 or (a[0] >= 0 and a[-1] < n))
    np.testing.assert_array_equal(a, _sample_sorted(np.random.default_rng(0), n, m))


@pytest.mark.parametrize("m", [3, 8])  # rejection branch and complement branch
def test_sample_sorted_is_uniform(m):
    rng = np.random.default_rng(1)
    counts = np.zeros(10)
    for _ in range(2000):
        counts[_sample_sorted(rng, 10, m)] += 1
    # Each element is picked with probability m / 10 (binomial sd <= 0.011 here).
    np.testing.assert_allclose(counts / 2000, m / 10, atol=0.05)


def test_input_validation():
    emb, labels = clustered_embeddings(7, 3, 3, 4, 1.0)
    evaluator = VerificationEvaluator()
    with pytest.raises(ValueError, match=r"labels must have shape \(9,\)"):
        evaluator(emb, labels[:-1])
    bad = emb.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf in 1 of 9 rows \(first: \[4\]\)"):
        evaluator(bad, labels)
    with pytest.raises(ValueError, match="0 impostor pairs"):
        evaluator(emb, np.zeros(9, dtype=int))
    with pytest.raises(ValueError, match="0 genuine"):
        evaluator(emb, np.arange(9))
    with pytest.raises(ValueError, match="needs labels"):
        evaluator(emb)
    with pytest.raises(TypeError, match="integers"):
        evaluator(emb, labels.astype(float))
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        evaluator(emb[0], labels)
    pairs = np.array([[0, 1], [2, 3], [0, 5]])
    issame = np.array([True, False, False])
    with pytest.raises(ValueError, match="issame is None"):
        evaluator(emb, labels, pairs=pairs)
    with pytest.raises(ValueError, match="embeddings has 9 rows"):
        evaluator(emb, labels, pairs=pairs + 7, issame=issame)
    with pytest.raises(ValueError, match=r"issame must have shape \(3,\)"):
        evaluator(emb, labels, pairs=pairs, issame=issame[:2])
    with pytest.raises(ValueError, match="at least 1 genuine"):
        evaluator(emb, labels, pairs=pairs, issame=np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="n_folds=10"):
        evaluator(emb, labels, pairs=pairs, issame=issame)  # 3 pairs, 10 folds
    with pytest.raises(ValueError, match="without pairs"):
        evaluator(emb, labels, folds=np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="n_folds"):
        VerificationEvaluator(n_folds=1)


def test_a_single_protocol_fold_is_cross_validated_in_balanced_folds():
    # LFW's pairs_fold1.txt is one fold of pairs.txt: 300 matched, then 300 mismatched pairs.
    from femb.evaluation.evaluator import stratified_folds

    issame = np.repeat([True, False], 30)
    folds = stratified_folds(issame, 5)
    for k in range(5):
        assert (issame[folds == k].sum(), (~issame[folds == k]).sum()) == (6, 6)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(120, 8))
    emb[1::2][:30] = emb[0::2][:30] + 0.3 * rng.normal(size=(30, 8))  # matched pairs are close
    pairs = np.stack([np.arange(0, 120, 2), np.arange(1, 120, 2)], axis=1)
    evaluator = VerificationEvaluator(n_folds=5)
    one_fold = evaluator(emb, None, pairs=pairs, issame=issame, folds=np.zeros(60, dtype=int))
    explicit = evaluator(emb, None, pairs=pairs, issame=issame, folds=folds)
    assert one_fold["accuracy"] == explicit["accuracy"] > 0.9
