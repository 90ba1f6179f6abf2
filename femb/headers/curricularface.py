"""CurricularFace: ArcFace margin plus adaptive re-weighting of hard negatives.

Paper: Y. Huang, Y. Wang, Y. Tai, X. Liu, P. Shen, S. Li, J. Li, F. Huang, "CurricularFace:
Adaptive Curriculum Learning Loss for Deep Face Recognition", CVPR 2020,
https://arxiv.org/abs/2004.00288

With T(cos theta_y) the ArcFace target (cos(theta_y + m), insightface fallback past pi - m) and t
an EMA of the mean target cosine (buffer, starts at 0: easy samples first, hard ones later)::

    logit_y = s * T(cos theta_y)
    logit_j = s * cos(theta_j)                          if cos(theta_j) <= T(cos theta_y)
    logit_j = s * cos(theta_j) * (t + cos(theta_j))     otherwise (hard negative), j != y

t is updated in training mode only, with momentum ``t_alpha``, before the logits are built (as
in the official code). The hard-negative test compares against the final target T (after the
fallback); the official code compares against the raw cos(theta_y + m), which differs only for
theta_y > pi - m, where the raw value is no longer monotonic. Gradients flow through both factors
of cos * (t + cos); t and the hard-negative mask carry none.

Shapes: embeddings (B, D), labels (B,) -> logits (B, C).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from femb.headers.arcface import additive_angular_margin
from femb.headers.base import MarginHeader, check_positive

log = logging.getLogger(__name__)


class CurricularFaceHeader(MarginHeader):
    """CurricularFace header; see the module docstring.

    Args:
        in_features: Embedding size D.
        out_features: Number of classes C.
        s: Logit scale.
        m: Additive angular margin, radians.
        t_alpha: EMA momentum of t (weight of the current batch's mean target cosine).
    """

    stats_prefix = "curricularface"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        s: float = 64.0,
        m: float = 0.5,
        t_alpha: float = 0.01,
    ) -> None:
        super().__init__(in_features, out_features, s)
        self.m = check_positive("m", m, allow_zero=True)
        if self.m >= math.pi:
            raise ValueError(f"m is an angle in radians and must be < pi, got {m}")
        self.t_alpha = check_positive("t_alpha", t_alpha, allow_zero=True)
        if self.t_alpha > 1:
            raise ValueError(f"t_alpha is an EMA momentum in [0, 1], got {t_alpha}")
        self.register_buffer("t", torch.tensor(0.0))

    def target_cosine(self, cos_y: Tensor, norms: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                self.t.lerp_(cos_y.detach().mean().to(self.t.dtype), self.t_alpha)
        return additive_angular_margin(cos_y, self.m, easy_margin=False)

    def adjust_non_target(self, cos: Tensor, cos_y: Tensor, target: Tensor) -> Tensor:
        hard = cos > target.detach().unsqueeze(1)
        t = self.t.to(cos.dtype)
        with torch.no_grad():
            # The target column itself is usually "hard" (cos > cos(theta + m)) but is
            # overwritten afterwards; count only the negatives.
            n_target = (cos_y > target.detach()).sum()
            negatives = cos.shape[0] * max(cos.shape[1] - 1, 1)
            self._stats.update(t=self.t.clone(), hard_frac=(hard.sum() - n_target) / negatives)
        return torch.where(hard, cos * (t + cos), cos)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}, t_alpha={self.t_alpha}"
