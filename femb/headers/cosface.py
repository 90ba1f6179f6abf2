"""CosFace: additive cosine margin (large margin cosine loss, LMCL).

Paper: H. Wang, Y. Wang, Z. Zhou, X. Ji, D. Gong, J. Zhou, Z. Li, W. Liu, "CosFace: Large Margin
Cosine Loss for Deep Face Recognition", CVPR 2018, https://arxiv.org/abs/1801.09414

    logit_j = s * cos(theta_j)            j != y
    logit_y = s * (cos(theta_y) - m)

Shapes: embeddings (B, D), labels (B,) -> logits (B, C). The margin is a constant shift of the
target logit, so it is smooth everywhere (no acos, no clamp).
"""

from __future__ import annotations

import logging

from torch import Tensor

from femb.headers.base import MarginHeader, check_positive

log = logging.getLogger(__name__)


class CosFaceHeader(MarginHeader):
    """CosFace header: target logit ``s * (cos(theta_y) - m)``.

    Args:
        in_features: Embedding size D.
        out_features: Number of classes C.
        s: Logit scale; the paper uses 64.
        m: Cosine margin (unitless, in [0, 2)); the paper uses 0.35.
    """

    stats_prefix = "cosface"

    def __init__(
        self, in_features: int, out_features: int, s: float = 64.0, m: float = 0.35
    ) -> None:
        super().__init__(in_features, out_features, s)
        self.m = check_positive("m", m, allow_zero=True)

    def target_cosine(self, cos_y: Tensor, norms: Tensor) -> Tensor:
        return cos_y - self.m

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}"
