"""SphereFace: multiplicative angular margin, in its original (A-Softmax) and normalised forms.

Papers:
    W. Liu, Y. Wen, Z. Yu, M. Li, B. Raj, L. Song, "SphereFace: Deep Hypersphere Embedding for
    Face Recognition", CVPR 2017, https://arxiv.org/abs/1704.08063
    W. Liu, Y. Wen, B. Raj, R. Singh, A. Weller, "SphereFace Revived: Unifying Hyperspherical
    Face Recognition", TPAMI 2022, https://arxiv.org/abs/2109.05565

The margin function (monotonically decreasing on [0, pi], continuous for any real m >= 1)::

    psi(theta) = (-1)^k cos(m * theta) - 2k,    k = floor(m * theta / pi)

``form="normalized"`` (SphereFace-R, default; s = 30, m = 1.7): features and weights normalised,
the margin applied as a detached shift so that the gradient is the plain scaled-cosine one::

    logit_j = s * cos(theta_j)                                  j != y
    logit_y = s * (cos(theta_y) + (psi(theta_y) - cos(theta_y)).detach())

``form="original"`` (A-Softmax; integer m = 4 typical): weights normalised, the feature norm
kept, and the margin blended in with an annealed weight lambda (the paper's training trick)::

    logit_j = ||x|| cos(theta_j)                                j != y
    logit_y = ||x|| (lambda cos(theta_y) + psi(theta_y)) / (1 + lambda)
    lambda  = max(lambda_min, lambda_base * (1 + lambda_gamma * step)^(-lambda_power))

Shapes: embeddings (B, D), labels (B,) -> logits (B, C).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from femb.headers.base import MarginHeader, check_positive, clamp_cos

log = logging.getLogger(__name__)

_FORMS = ("normalized", "original")
_DEFAULT_M = {"normalized": 1.7, "original": 4.0}
_DEFAULT_S = 30.0


def chebyshev_cos(cos: Tensor, m: int) -> Tensor:
    """cos(m * theta) as the Chebyshev polynomial T_m(cos theta), for integer m >= 0.

    A polynomial in cos(theta) has a bounded derivative everywhere, also at cos = +-1, where
    differentiating cos(m * acos(c)) would need the acos clamp.

    Args:
        cos: Cosines of any shape.
        m: Non-negative integer multiple.

    Returns:
        T_m(cos), same shape.
    """
    prev, cur = torch.ones_like(cos), cos
    if m == 0:
        return prev
    for _ in range(m - 1):
        prev, cur = cur, 2.0 * cos * cur - prev
    return cur


def sphereface_psi(cos: Tensor, m: float) -> Tensor:
    """SphereFace's psi(theta) = (-1)^k cos(m theta) - 2k from cos(theta).

    Args:
        cos: (B,) target cosines cos(theta_y).
        m: Multiplicative margin (>= 1). Integer m uses the Chebyshev polynomial.

    Returns:
        (B,) psi(theta_y).
    """
    with torch.no_grad():
        # k is piecewise constant in theta, so computing it without gradient loses nothing;
        # psi is continuous across the piece boundaries, so rounding of k there is harmless.
        theta = torch.acos(clamp_cos(cos))
        k = torch.floor(m * theta / math.pi)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    if float(m).is_integer():
        cos_m_theta = chebyshev_cos(cos, int(m))
    else:
        cos_m_theta = torch.cos(m * torch.acos(clamp_cos(cos)))
    return sign * cos_m_theta - 2.0 * k


class SphereFaceHeader(MarginHeader):
    """SphereFace header (A-Softmax or its normalised SphereFace-R form); see the module doc.

    Args:
        in_features: Embedding size D.
        out_features: Number of classes C.
        m: Multiplicative angular margin (>= 1). None picks 1.7 for ``"normalized"`` and 4 for
            ``"original"``.
        s: Logit scale for ``form="normalized"`` (None -> 30). Not accepted with
            ``form="original"``, whose logits are scaled by the feature norm.
        form: ``"normalized"`` (SphereFace-R) or ``"original"`` (A-Softmax).
        detach: Apply the margin as a detached shift (straight-through; the forward value is
            unchanged). None picks True for ``"normalized"`` (as SphereFace-R) and False for
            ``"original"`` (exact A-Softmax gradient).
        lambda_base: Initial lambda (``form="original"`` only).
        lambda_gamma: Annealing rate of lambda per step (``form="original"`` only).
        lambda_power: Annealing power (``form="original"`` only).
        lambda_min: Floor of lambda (``form="original"`` only); 5 in the paper's code, 0 gives
            the pure psi target at the end of training.

    Raises:
        ValueError: For an unknown ``form``, ``m < 1``, or ``s`` given with ``form="original"``.
    """

    stats_prefix = "sphereface"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        m: float | None = None,
        s: float | None = None,
        form: str = "normalized",
        detach: bool | None = None,
        lambda_base: float = 1000.0,
        lambda_gamma: float = 0.12,
        lambda_power: float = 1.0,
        lambda_min: float = 5.0,
    ) -> None:
        if form not in _FORMS:
            raise ValueError(f"form must be one of {sorted(_FORMS)}, got {form!r}")
        if form == "original" and s is not None:
            raise ValueError(
                f"s={s} is not used with form='original' (A-Softmax scales the "
                "logits by the feature norm ||x||); drop s or use "
                "form='normalized'"
            )
        super().__init__(in_features, out_features, _DEFAULT_S if s is None else s)
        self.form = form
        self.m = check_positive("m", _DEFAULT_M[form] if m is None else m)
        if self.m < 1.0:
            raise ValueError(f"m must be >= 1 (a multiplicative angular margin), got {m}")
        self.detach = (form == "normalized") if detach is None else bool(detach)
        self.lambda_base = check_positive("lambda_base", lambda_base, allow_zero=True)
        self.lambda_gamma = check_positive("lambda_gamma", lambda_gamma, allow_zero=True)
        self.lambda_power = check_positive("lambda_power", lambda_power, allow_zero=True)
        self.lambda_min = check_positive("lambda_min", lambda_min, allow_zero=True)
        self.lambda_ = self.lambda_at(0)

    def lambda_at(self, step: int) -> float:
        """A-Softmax's annealed blending weight at a global step (stateless, so resume-safe)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        decayed = self.lambda_base * (1.0 + self.lambda_gamma * step) ** (-self.lambda_power)
        return max(self.lambda_min, decayed)

    def on_train_step(self, global_step: int) -> None:
        """Anneal lambda to ``lambda_at(global_step)`` (only ``form="original"`` uses it)."""
        self.lambda_ = self.lambda_at(global_step)

    def logit_scale(self, norms: Tensor) -> float | Tensor:
        return norms if self.form == "original" else self.s

    def target_cosine(self, cos_y: Tensor, norms: Tensor) -> Tensor:
        target = sphereface_psi(cos_y, self.m)
        if self.form == "original":
            target = (self.lambda_ * cos_y + target) / (1.0 + self.lambda_)
        if self.detach:
            return cos_y + (target - cos_y).detach()
        return target

    def stats(self) -> dict[str, float]:
        out = super().stats()
        if self.form == "original":
            out["sphereface/lambda"] = self.lambda_
        return out

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"form={self.form!r}, m={self.m}, detach={self.detach}"
        )
        if self.form == "normalized":
            return f"{text}, s={self.s}"
        return (
            f"{text}, lambda_base={self.lambda_base}, lambda_gamma={self.lambda_gamma}, "
            f"lambda_power={self.lambda_power}, lambda_min={self.lambda_min}"
        )
