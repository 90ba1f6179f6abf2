"""Combined margin: SphereFace-, ArcFace- and CosFace-style margins in one formula.

Paper: the combined form is given in J. Deng, J. Guo, N. Xue, S. Zafeiriou, "ArcFace: Additive
Angular Margin Loss for Deep Face Recognition", CVPR 2019, https://arxiv.org/abs/1801.07698
(Sec. 3.3 / Eq. 4), and used by insightface's ``CombinedMarginLoss``.

    logit_j = s * cos(theta_j)                          j != y
    logit_y = s * (cos(m1 * theta_y + m2) - m3)

(m1, m2, m3) = (1, m, 0) is ArcFace, (1, 0, m) is CosFace, (m, 0, 0) is a multiplicative
(SphereFace-like) margin without SphereFace's monotonic psi. Shapes: embeddings (B, D),
labels (B,) -> logits (B, C).

The formula is applied as written, with no monotonicity fix: once m1 * theta + m2 > pi the target
logit grows again with theta. Use :class:`~femb.headers.ArcFaceHeader` or
:class:`~femb.headers.SphereFaceHeader` when samples can reach such angles (early training).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from femb.headers.base import MarginHeader, check_positive, clamp_cos

log = logging.getLogger(__name__)


class CombinedMarginHeader(MarginHeader):
    """Combined margin header: target logit ``s * (cos(m1 * theta_y + m2) - m3)``.

    Args:
        in_features: Embedding size D.
        out_features: Number of classes C.
        s: Logit scale.
        m1: Multiplicative angular margin (> 0, unitless).
        m2: Additive angular margin, radians (>= 0).
        m3: Additive cosine margin (>= 0).
    """

    stats_prefix = "combined"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
    ) -> None:
        super().__init__(in_features, out_features, s)
        self.m1 = check_positive("m1", m1)
        self.m2 = check_positive("m2", m2, allow_zero=True)
        self.m3 = check_positive("m3", m3, allow_zero=True)

    def target_cosine(self, cos_y: Tensor, norms: Tensor) -> Tensor:
        if self.m1 == 1.0 and self.m2 == 0.0:
            # Pure cosine margin: skip the acos round trip and its clamp.
            return cos_y - self.m3
        theta = torch.acos(clamp_cos(cos_y))
        return torch.cos(self.m1 * theta + self.m2) - self.m3

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m1={self.m1}, m2={self.m2}, m3={self.m3}"
