"""ArcFace: additive angular margin.

Paper: J. Deng, J. Guo, N. Xue, S. Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep
Face Recognition", CVPR 2019, https://arxiv.org/abs/1801.07698

    logit_j = s * cos(theta_j)            j != y
    logit_y = s * cos(theta_y + m)        m in radians (0.5 rad = 28.6 degrees)

Shapes: embeddings (B, D), labels (B,) -> logits (B, C).

cos(theta + m) is not monotonic once theta + m > pi: past that point a larger angle would give a
larger target logit, so the loss would push such samples further away from their class.
``easy_margin`` selects how samples at large angles are treated:

* default (insightface): for theta > pi - m use the linear continuation
  cos(theta) - m * sin(m), which meets cos(theta + m) at theta = pi - m in value; the target
  logit is then continuous and decreasing on the whole of [0, pi];
* ``easy_margin=True``: apply the margin only where cos(theta) > 0 (theta < pi / 2) and use the
  plain cos(theta) elsewhere. Hard samples get no margin, which eases early training, but the
  target logit jumps up by sin(m) at theta = pi / 2 (decreasing on each side, not across).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from femb.headers.base import MarginHeader, check_positive, clamp_cos

log = logging.getLogger(__name__)


def additive_angular_margin(cos: Tensor, m: float | Tensor, *, easy_margin: bool) -> Tensor:
    """cos(theta + m) with a monotonic rule past theta = pi - m (see the module docstring).

    Uses cos(theta + m) = cos * cos(m) - sin * sin(m), so no ``acos`` is needed.

    Args:
        cos: (B,) cosines cos(theta).
        m: Angular margin in radians: a float, or a (B,) tensor (MagFace's per-sample margin).
        easy_margin: Apply the margin only where cos(theta) > 0.

    Returns:
        (B,) margin cosines.
    """
    cos_m = torch.cos(m) if isinstance(m, Tensor) else math.cos(m)
    sin_m = torch.sin(m) if isinstance(m, Tensor) else math.sin(m)
    # sqrt(1 - c^2) of the clamped cosine is >= ~1.4e-3: both the value and its gradient
    # -c / sqrt(1 - c^2) stay finite even at cos = +-1. torch.where does not protect the branch
    # it discards: its backward still multiplies the (zero) gradient by that branch's local
    # derivative, and 0 * inf = NaN.
    c = clamp_cos(cos)
    sin = torch.sqrt(1.0 - c * c)
    shifted = c * cos_m - sin * sin_m
    if easy_margin:
        return torch.where(cos > 0, shifted, cos)
    # theta > pi - m  <=>  cos(theta) < cos(pi - m) = -cos(m).
    return torch.where(cos > -cos_m, shifted, cos - m * sin_m)


class ArcFaceHeader(MarginHeader):
    """ArcFace header: target logit ``s * cos(theta_y + m)``.

    Args:
        in_features: Embedding size D.
        out_features: Number of classes C.
        s: Logit scale; 64 in the paper.
        m: Additive angular margin in radians; 0.5 in the paper (PML's ``ArcFaceLoss`` takes
            degrees: 28.6).
        easy_margin: Margin only where cos(theta_y) > 0; default False uses the insightface
            fallback cos(theta_y) - m * sin(m) for theta_y > pi - m (module docstring).
        detach_margin: Straight-through margin: the forward value is unchanged but the margin
            shift is detached, ``logit_y = s * (cos + (cos(theta + m) - cos).detach())``, so the
            target gradient is that of the plain scaled cosine (bounded, no 1/sin(theta) term near
            theta = 0). False (default) differentiates cos(theta + m) exactly.
        num_subcenters: K sub-centres per class; use
            :class:`~femb.headers.SubCenterArcFaceHeader` rather than setting it here.
    """

    stats_prefix = "arcface"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        s: float = 64.0,
        m: float = 0.5,
        easy_margin: bool = False,
        detach_margin: bool = False,
        *,
        num_subcenters: int = 1,
    ) -> None:
        super().__init__(in_features, out_features, s, num_subcenters=num_subcenters)
        self.m = check_positive("m", m, allow_zero=True)
        if self.m >= math.pi:
            raise ValueError(
                f"m is an angle in radians and must be < pi, got {m}; "
                "the paper uses 0.5 (did you pass degrees?)"
            )
        self.easy_margin = bool(easy_margin)
        self.detach_margin = bool(detach_margin)

    def target_cosine(self, cos_y: Tensor, norms: Tensor) -> Tensor:
        target = additive_angular_margin(cos_y, self.m, easy_margin=self.easy_margin)
        with torch.no_grad():
            if self.easy_margin:
                self._stats["no_margin_frac"] = (cos_y <= 0).float().mean()
            else:
                self._stats["fallback_frac"] = (cos_y <= -math.cos(self.m)).float().mean()
        if self.detach_margin:
            return cos_y + (target - cos_y).detach()
        return target

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, m={self.m}, easy_margin={self.easy_margin}, "
            f"detach_margin={self.detach_margin}"
        )
