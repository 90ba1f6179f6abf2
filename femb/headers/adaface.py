"""AdaFace: quality-adaptive margin driven by the feature norm.

Paper: M. Kim, A. K. Jain, X. Liu, "AdaFace: Quality Adaptive Margin for Face Recognition",
CVPR 2022, https://arxiv.org/abs/2204.00964

The feature norm ||x|| is a proxy of image quality. It is standardised with exponential moving
averages (EMA, momentum t_alpha) of the batch mean and std of the norms, scaled by h and clipped::

    z       = clip(h * (||x|| - mu_ema) / (sigma_ema + eps), -1, 1)     no gradient
    g_angle = -m * z,    g_add = m * z + m
    logit_j = s * cos(theta_j)                                          j != y
    logit_y = s * (cos(clip(theta_y + g_angle, eps, pi - eps)) - g_add)

z = -1 (low norm, low quality) gives ArcFace, s * cos(theta_y + m); z = 0 gives CosFace,
s * (cos(theta_y) - m); z = +1 (high quality) gives s * (cos(theta_y - m) - 2m), which
emphasises hard samples. The EMAs (buffers ``batch_mean``, ``batch_std``, initial 20 and 100
as in the official code) are updated in training mode only, before the margin is computed. A
batch of one sample has no std: the std EMA is then left unchanged.

Shapes: embeddings (B, D), labels (B,) -> logits (B, C).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from femb.headers.base import MarginHeader, check_positive, clamp_cos

log = logging.getLogger(__name__)

# The official code's eps for the std denominator and the clip of theta_y + g_angle, which keeps
# the target angle inside (0, pi) so that cos stays monotonic in it.
_ADAFACE_EPS = 1e-3
# Norms clipped before the statistics, as in the official code (guards degenerate features).
_NORM_CLIP = (1e-3, 100.0)


class AdaFaceHeader(MarginHeader):
    """AdaFace header: norm-adaptive angular + additive margin; see the module docstring.

    Args:
        in_features: Embedding size D.
        out_features: Number of classes C.
        s: Logit scale.
        m: Margin (radians for the angular part, cosine units for the additive part).
        h: Concentration: how many EMA standard deviations map to z = +-1 (0.333 -> 3 sigma).
        t_alpha: EMA momentum of the norm statistics (weight of the current batch).
    """

    stats_prefix = "adaface"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        s: float = 64.0,
        m: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
    ) -> None:
        super().__init__(in_features, out_features, s)
        self.m = check_positive("m", m, allow_zero=True)
        self.h = check_positive("h", h, allow_zero=True)
        self.t_alpha = check_positive("t_alpha", t_alpha, allow_zero=True)
        if self.t_alpha > 1:
            raise ValueError(f"t_alpha is an EMA momentum in [0, 1], got {t_alpha}")
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def target_cosine(self, cos_y: Tensor, norms: Tensor) -> Tensor:
        with torch.no_grad():
            safe = norms.detach().clamp(*_NORM_CLIP)
            mean = safe.mean()
            std = safe.std() if safe.numel() > 1 else self.batch_std
            if self.training:
                self.batch_mean.lerp_(mean.to(self.batch_mean.dtype), self.t_alpha)
                self.batch_std.lerp_(std.to(self.batch_std.dtype), self.t_alpha)
            z = (self.h * (safe - self.batch_mean) / (self.batch_std + _ADAFACE_EPS)).clamp(-1, 1)
            self._stats.update(
                norm_mean=mean,
                norm_std=std,
                ema_mean=self.batch_mean.clone(),
                ema_std=self.batch_std.clone(),
                z_mean=z.mean(),
            )

        theta = torch.acos(clamp_cos(cos_y))
        theta_m = (theta - self.m * z).clamp(_ADAFACE_EPS, math.pi - _ADAFACE_EPS)
        return torch.cos(theta_m) - (self.m + self.m * z)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}"
