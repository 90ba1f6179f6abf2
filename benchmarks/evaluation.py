"""Benchmark femb's verification evaluator against simple baselines on random embeddings.

Cases (all on the same seeded, clustered random embeddings):

(a) femb, pairs protocol: ``--pairs`` pairs (half genuine), 10-fold accuracy + EER/AUC/TAR.
(b) femb, all pairs of ``--ids x --per-id`` labelled embeddings (with and without rank-1).
(c) "per-pair loop": the original femb evaluator's approach, re-created: pairs drawn with numpy,
    one similarity call per pair in a Python loop, then ``sklearn.metrics.roc_curve`` and the
    EER at the ROC point where |FNR - FPR| is smallest. Compared with femb at equal pair counts:
    on the pairs of (a), and on all pairs of ``--loop-ids x --per-id`` embeddings.
(d) insightface-style 10-fold accuracy: squared L2 distances of unit embeddings, threshold
    grid 0..4 step 0.01, a loop over thresholds per fold; compared with femb's exact k-fold
    search on the same pairs.

Usage::

    python benchmarks/evaluation.py            # defaults: 500 ids x 10, D=512, 6000 pairs

Timings are the median of ``--repeats`` runs after one warm-up run (the slow baselines run
once). Nothing is asserted;
the goal column only reports whether the target was met on this machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_curve

from femb.evaluation import VerificationEvaluator, consecutive_folds, kfold_accuracy


def clustered_embeddings(rng: np.random.Generator, n_ids: int, per_id: int, dim: int) -> tuple:
    centres = rng.normal(size=(n_ids, dim))
    labels = np.repeat(np.arange(n_ids), per_id)
    emb = centres[labels] + 2.5 * rng.normal(size=(labels.size, dim))
    return emb.astype(np.float32), labels


def draw_pairs(rng: np.random.Generator, labels: np.ndarray, n_pairs: int) -> tuple:
    """Half genuine, half impostor pairs, drawn at random (LFW-like protocol size)."""
    order = np.argsort(labels, kind="stable")
    ids, start, count = np.unique(labels[order], return_index=True, return_counts=True)
    n_gen = n_pairs // 2
    who = rng.choice(ids.size, size=n_gen)
    a = rng.integers(0, count[who])
    b = (a + rng.integers(1, count[who])) % count[who]
    genuine = np.column_stack([order[start[who] + a], order[start[who] + b]])
    impostor = rng.integers(0, labels.size, size=(4 * (n_pairs - n_gen), 2))
    impostor = impostor[labels[impostor[:, 0]] != labels[impostor[:, 1]]][: n_pairs - n_gen]
    pairs = np.concatenate([genuine, impostor])[rng.permutation(n_pairs)]
    return pairs, labels[pairs[:, 0]] == labels[pairs[:, 1]]


# ---------------------------------------------------------------- baselines (own code)


def per_pair_cos(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.reshape(-1), y.reshape(-1)
    return float(np.dot(x, y) / (1e-10 + np.linalg.norm(x) * np.linalg.norm(y)))


def per_pair_loop(emb: np.ndarray, pairs: np.ndarray, issame: np.ndarray) -> dict[str, float]:
    """Original-femb style: one similarity call per pair in Python, then sklearn's ROC."""
    genuine, impostor = [], []
    for (i, j), same in zip(pairs.tolist(), issame.tolist(), strict=True):
        (genuine if same else impostor).append(per_pair_cos(emb[i], emb[j]))
    scores = np.hstack([genuine, impostor])
    truth = np.hstack([np.ones(len(genuine)), np.zeros(len(impostor))])
    fpr, tpr, thresholds = roc_curve(truth, scores)
    k = int(np.nanargmin(np.abs((1 - tpr) - fpr)))
    return {"eer": float(fpr[k]), "eer_threshold": float(thresholds[k])}


def insightface_style_kfold(dist: np.ndarray, issame: np.ndarray, n_folds: int = 10) -> float:
    """10-fold accuracy over a distance threshold grid (accept when dist < t)."""
    grid = np.arange(0, 4, 0.01)
    folds = consecutive_folds(dist.size, n_folds)
    accuracies = []
    for fold in range(n_folds):
        train, test = folds != fold, folds == fold
        train_acc = np.zeros(grid.size)
        for t_idx, t in enumerate(grid):
            train_acc[t_idx] = np.mean((dist[train] < t) == issame[train])
        best = grid[int(np.argmax(train_acc))]
        accuracies.append(np.mean((dist[test] < best) == issame[test]))
    return float(np.mean(accuracies))


# ---------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls; with repeats > 1 an untimed warm-up call first."""
    if repeats > 1:
        fn()  # first-touch page faults of large buffers, BLAS thread start-up
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=500, help="identities for all-pairs (b)")
    parser.add_argument("--per-id", type=int, default=10, help="images per identity")
    parser.add_argument("--dim", type=int, default=512, help="embedding size D")
    parser.add_argument("--pairs", type=int, default=6000, help="pairs of the protocol (a)")
    parser.add_argument(
        "--loop-ids", type=int, default=200, help="identities for the equal-count loop (c)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs per femb timing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    emb, labels = clustered_embeddings(rng, args.ids, args.per_id, args.dim)
    pairs, issame = draw_pairs(rng, labels, args.pairs)
    n_all = labels.size * (labels.size - 1) // 2
    evaluator = VerificationEvaluator()
    rows = []

    # (a) pairs protocol with 10-fold accuracy.
    t_a, m_a = timed(lambda: evaluator(emb, labels, pairs=pairs, issame=issame), args.repeats)
    rows.append(
        ("(a) femb pairs protocol, 10-fold", pairs.shape[0], t_a, None, "< 0.2 s", t_a < 0.2)
    )

    # (b) all pairs, with and without identification.
    t_b, m_b = timed(lambda: evaluator(emb, labels), args.repeats)
    rows.append(
        (f"(b) femb all pairs of {labels.size} (+rank1)", n_all, t_b, None, "< 2 s", t_b < 2.0)
    )
    no_id = VerificationEvaluator(identification=False)
    t_b2, _ = timed(lambda: no_id(emb, labels), args.repeats)
    rows.append((f"(b) femb all pairs of {labels.size}", n_all, t_b2, None, "< 2 s", t_b2 < 2.0))

    # (c) per-pair loop at equal pair counts.
    t_c, m_c = timed(lambda: per_pair_loop(emb, pairs, issame), 1)
    rows.append(("(c) per-pair loop vs (a)", pairs.shape[0], t_a, t_c, "", None))
    n_loop = args.loop_ids * args.per_id
    sub_emb, sub_labels = emb[:n_loop], labels[:n_loop]
    t_femb_sub, m_sub = timed(lambda: no_id(sub_emb, sub_labels), args.repeats)

    def loop_all_pairs() -> dict[str, float]:
        i, j = np.triu_indices(n_loop, k=1)
        all_pairs = np.column_stack([i, j])
        return per_pair_loop(sub_emb, all_pairs, sub_labels[i] == sub_labels[j])

    t_c2, m_c2 = timed(loop_all_pairs, 1)
    n_sub = n_loop * (n_loop - 1) // 2
    rows.append(
        (
            f"(c) per-pair loop vs all pairs of {n_loop}",
            n_sub,
            t_femb_sub,
            t_c2,
            ">= 100x",
            t_c2 / t_femb_sub >= 100,
        )
    )

    # (d) insightface-style grid 10-fold vs femb's exact search, same pairs.
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = np.einsum("nd,nd->n", unit[pairs[:, 0]], unit[pairs[:, 1]]).astype(np.float64)
    dist = np.sum((unit[pairs[:, 0]] - unit[pairs[:, 1]]) ** 2, axis=1)
    t_d_femb, kf = timed(lambda: kfold_accuracy(cos, issame), args.repeats)
    t_d, acc_grid = timed(lambda: insightface_style_kfold(dist, issame), 1)
    rows.append(("(d) grid 10-fold vs femb k-fold only", pairs.shape[0], t_d_femb, t_d, "", None))

    print(
        f"numpy {np.__version__}, torch {torch.__version__}, torch threads "
        f"{torch.get_num_threads()}, {platform.processor() or platform.machine()}"
    )
    print(
        f"embeddings: {labels.size} = {args.ids} ids x {args.per_id}, D={args.dim}, float32; "
        f"median of {args.repeats} femb runs after a warm-up, baselines once\n"
    )
    header = ("case", "pairs", "femb s", "baseline s", "speedup", "goal", "met")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * len(header)) + "|")
    for name, n, t_femb, t_base, goal, met in rows:
        base = f"{t_base:.3f}" if t_base is not None else ""
        speed = f"{t_base / t_femb:.0f}x" if t_base is not None else ""
        ok = "" if met is None else ("yes" if met else "NO")
        print(f"| {name} | {n:,} | {t_femb:.3f} | {base} | {speed} | {goal} | {ok} |")

    print("\nmetric agreement:")
    print(
        f"  (a) femb eer={m_a['eer']:.4f} accuracy={m_a['accuracy']:.4f}; "
        f"per-pair loop eer (nearest ROC point)={m_c['eer']:.4f}"
    )
    print(
        f"  (b) eer={m_b['eer']:.4f} auc={m_b['auc']:.4f} tar@far=1e-3={m_b['tar@far=1e-3']:.4f}"
        f" rank1={m_b['rank1']:.4f}"
    )
    print(f"  (c) all pairs of {n_loop}: femb eer={m_sub['eer']:.4f}, loop eer={m_c2['eer']:.4f}")
    print(f"  (d) 10-fold accuracy: femb exact={kf.mean:.4f}, grid={acc_grid:.4f}")


if __name__ == "__main__":
    main()
