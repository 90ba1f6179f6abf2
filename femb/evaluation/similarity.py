"""Similarity functions for face verification: scores where higher means "more likely the same".

Both similarities work on L2-normalised embeddings, so they are monotone functions of each other
and rank pairs identically:

=======  ============================================  ===========  ==========================
name     score of embeddings ``a``, ``b``              range        threshold unit
=======  ============================================  ===========  ==========================
``cos``  ``cos(a, b) = <a/|a|, b/|b|>``                ``[-1, 1]``  cosine
``l2``   ``-|a/|a| - b/|b||_2 = -sqrt(2 - 2 cos)``     ``[-2, 0]``  negative Euclidean distance
=======  ============================================  ===========  ==========================

Every threshold femb reports is in the unit of the score: a pair is accepted as "same" when
``score >= threshold``. With ``l2`` a threshold of ``-1.2`` therefore means "accept when the
distance between the unit embeddings is at most 1.2".

``l2`` is derived from the cosine (``sqrt(2 - 2 cos)``, clamped at 0 against rounding) rather than
from the difference vector. This keeps ``l2`` an exactly monotone function of ``cos`` (so EER, AUC
and TAR@FAR are identical for both), at the cost of a distance resolution of about
``sqrt(machine epsilon)`` for nearly identical embeddings, far below any useful threshold.

An all-zero embedding normalises to the zero vector and has cosine 0 with everything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "SIMILARITIES",
    "Similarity",
    "as_float_array",
    "cosine_similarity",
    "cosine_similarity_matrix",
    "get_similarity",
    "l2_normalize",
    "l2_similarity",
    "l2_similarity_matrix",
]


def as_float_array(x: Any, name: str = "embeddings") -> np.ndarray:
    """Convert a torch tensor or array-like to a float numpy array without needless copies.

    float64 stays float64; every other dtype (float16, bfloat16, integers) becomes float32.

    Raises:
        TypeError: If ``x`` is not numeric.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.numpy() if x.dtype == torch.float64 else x.float().numpy()
    arr = np.asarray(x)
    if arr.dtype == np.float64 or arr.dtype == np.float32:
        return arr
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}.")
    return arr.astype(np.float32)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Scale each row to unit Euclidean norm; all-zero rows stay zero.

    Rows are first divided by their largest absolute entry, so squaring can neither overflow
    (float32 entries above ~1e19) nor underflow (below ~1e-19).

    Shapes: (N, D) -> (N, D).
    """
    peak = np.max(np.abs(x), axis=1, keepdims=True)
    scaled = x / np.where(peak > 0, peak, 1)
    # A non-zero scaled row has norm >= 1 (its peak entry is +-1); zero rows stay zero.
    return scaled / np.maximum(np.linalg.norm(scaled, axis=1, keepdims=True), 1)


def _cos_to_cos(cos: np.ndarray) -> np.ndarray:
    return cos


def _cos_to_l2(cos: np.ndarray) -> np.ndarray:
    # |a - b|^2 = 2 - 2 cos for unit vectors; rounding can push it slightly below 0.
    return -np.sqrt(np.maximum(2.0 - 2.0 * cos, 0.0))


@dataclass(frozen=True)
class Similarity:
    """A named similarity defined on L2-normalised embeddings.

    Attributes:
        name: Registry name (``"cos"`` or ``"l2"``).
        from_cosine: Maps the cosine of unit embeddings to this similarity's score, elementwise;
            monotone non-decreasing.
        unit: The unit of scores and thresholds, for logs and docs.
    """

    name: str
    from_cosine: Callable[[np.ndarray], np.ndarray]
    unit: str

    def paired(self, a: Any, b: Any) -> np.ndarray:
        """Score row ``i`` of ``a`` against row ``i`` of ``b``.

        Shapes: (N, D), (N, D) -> (N,).
        """
        a, b = _check_2d(a, "a"), _check_2d(b, "b")
        if a.shape != b.shape:
            raise ValueError(f"paired similarity needs equal shapes, got {a.shape} and {b.shape}.")
        cos = np.einsum("nd,nd->n", l2_normalize(a), l2_normalize(b))
        return self.from_cosine(cos)

    def matrix(self, a: Any, b: Any | None = None) -> np.ndarray:
        """Score every row of ``a`` against every row of ``b`` (``b = a`` when omitted).

        Shapes: (N, D), (M, D) -> (N, M).
        """
        a = l2_normalize(_check_2d(a, "a"))
        b = a if b is None else l2_normalize(_check_2d(b, "b"))
        if a.shape[1] != b.shape[1]:
            raise ValueError(
                f"embedding sizes differ: a has D={a.shape[1]}, b has D={b.shape[1]}."
            )
        return self.from_cosine(a @ b.T)


#: Registry of similarity names accepted by :func:`get_similarity` and the evaluator.
SIMILARITIES: dict[str, Similarity] = {
    "cos": Similarity("cos", _cos_to_cos, "cosine of the L2-normalised embeddings"),
    "l2": Similarity(
        "l2", _cos_to_l2, "negative Euclidean distance of the L2-normalised embeddings"
    ),
}


def get_similarity(name: str) -> Similarity:
    """Look up a similarity by name.

    Raises:
        ValueError: For an unknown name; the message lists the valid names.
    """
    try:
        return SIMILARITIES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown similarity {name!r}; valid names: {sorted(SIMILARITIES)}."
        ) from None


def cosine_similarity(a: Any, b: Any) -> np.ndarray:
    """Cosine of paired rows. Shapes: (N, D), (N, D) -> (N,)."""
    return SIMILARITIES["cos"].paired(a, b)


def cosine_similarity_matrix(a: Any, b: Any | None = None) -> np.ndarray:
    """Cosine of all row pairs. Shapes: (N, D), (M, D) -> (N, M)."""
    return SIMILARITIES["cos"].matrix(a, b)


def l2_similarity(a: Any, b: Any) -> np.ndarray:
    """Negative Euclidean distance of paired unit rows. Shapes: (N, D), (N, D) -> (N,)."""
    return SIMILARITIES["l2"].paired(a, b)


def l2_similarity_matrix(a: Any, b: Any | None = None) -> np.ndarray:
    """Negative Euclidean distance of all unit row pairs. Shapes: (N, D), (M, D) -> (N, M)."""
    return SIMILARITIES["l2"].matrix(a, b)


def _check_2d(x: Any, name: str) -> np.ndarray:
    arr = as_float_array(x, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {arr.shape}.")
    return arr
