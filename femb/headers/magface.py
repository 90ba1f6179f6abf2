"""MagFace: magnitude-aware angular margin with a magnitude regulariser.

Paper: Q. Meng, S. Zhao, Z. Huang, F. Zhou, "MagFace: A Universal Representation for Face
Recognition and Quality Assessment", CVPR 2021, https://arxiv.org/abs/2103.06627

With a = ||x|| clamped to [l_a, u_a]::

    m(a)    = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m     margin, radians, increasing in a
    g(a)    = 1 / a + a / u_a^2                               regulariser, decreasing on (l_a, u_a)
    logit_j = s * cos(theta_j)                                j != y
    logit_y = s * cos(theta_y + m(a))
    loss    = CE(logits, y) + lambda_g * mean_b g(a_b)

The g term is not part of the logits: it is returned in ``extra_losses["magface_g"]`` and the
model adds it to the classification loss. The easy margin (margin only where cos(theta_y) > 0) is
on by default, as in the official code; ``easy_margin=False`` uses ArcFace's insightface fallback
with the per-sample margin. Gradients flow through a into both m(a) and g(a); outside [l_a, u_a]
the clamp stops them, as in the official code.

The paper's convergence/uniqueness result needs lambda_g >= s * k * u_a^2 l_a^2 / (u_a^2 - l_a^2)
with k = (u_m - l_m) / (u_a - l_a): 22.6 for the defaults (s=64, [10, 110], [0.45, 0.8]), below
the default lambda_g = 35.

Shapes: embeddings (B, D), labels (B,) -> logits (B, C).
"""

from __future__ import annotations

import logging

from torch import Tensor

from femb.headers.arcface import additive_angular_margin
from femb.headers.base import MarginHeader, check_positive

log = logging.getLogger(__name__)


def magface_lambda_g_bound(s: float, l_a: float, u_a: float, l_m: float, u_m: float) -> float:
    """Smallest lambda_g of MagFace's theory: s * k * u_a^2 l_a^2 / (u_a^2 - l_a^2)."""
    k = (u_m - l_m) / (u_a - l_a)
    return s * k * u_a**2 * l_a**2 / (u_a**2 - l_a**2)


class MagFaceHeader(MarginHeader):
    """MagFace header: margin m(a) growing with the feature norm a, plus lambda_g * g(a).

    Args:
        in_features: Embedding size D.
        out_features: Number of classes C.
        s: Logit scale.
        l_a: Lower bound of the feature norm a.
        u_a: Upper bound of the feature norm a.
        l_m: Margin at a = l_a, radians.
        u_m: Margin at a = u_a, radians.
        lambda_g: Weight of the regulariser g(a) in the loss. A warning is logged when it is
            below the paper's bound (module docstring).
        easy_margin: Margin only where cos(theta_y) > 0 (official default).

    Raises:
        ValueError: If ``l_a >= u_a`` or ``l_m > u_m``.
    """

    stats_prefix = "magface"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        s: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        easy_margin: bool = True,
    ) -> None:
        super().__init__(in_features, out_features, s)
        self.l_a = check_positive("l_a", l_a)
        self.u_a = check_positive("u_a", u_a)
        self.l_m = check_positive("l_m", l_m, allow_zero=True)
        self.u_m = check_positive("u_m", u_m, allow_zero=True)
        self.lambda_g = check_positive("lambda_g", lambda_g, allow_zero=True)
        self.easy_margin = bool(easy_margin)
        if self.l_a >= self.u_a:
            raise ValueError(f"need l_a < u_a, got l_a={l_a}, u_a={u_a}")
        if self.l_m > self.u_m:
            raise ValueError(
                f"need l_m <= u_m (the margin grows with the norm), got l_m={l_m}, u_m={u_m}"
            )
        bound = magface_lambda_g_bound(self.s, self.l_a, self.u_a, self.l_m, self.u_m)
        if self.lambda_g < bound:
            log.warning(
                "MagFace lambda_g=%g is below the bound s*k*u_a^2*l_a^2/(u_a^2-l_a^2) "
                "= %.4g (k=(u_m-l_m)/(u_a-l_a)); the paper's guarantee of a unique "
                "optimal feature norm does not hold",
                self.lambda_g,
                bound,
            )

    def margin(self, a: Tensor) -> Tensor:
        """m(a) (B,) for clamped norms a (B,), in radians."""
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def regularizer(self, a: Tensor) -> Tensor:
        """g(a) = 1/a + a/u_a^2 (B,) for clamped norms a (B,)."""
        return 1.0 / a + a / self.u_a**2

    def target_cosine(self, cos_y: Tensor, norms: Tensor) -> Tensor:
        a = norms.clamp(self.l_a, self.u_a)
        m = self.margin(a)
        g_mean = self.regularizer(a).mean()
        g_term = self.lambda_g * g_mean
        self.extra_losses = {"magface_g": g_term}

        m_detached = m.detach()
        self._stats.update(
            m_min=m_detached.min(),
            m_mean=m_detached.mean(),
            m_max=m_detached.max(),
            norm_mean=norms.detach().mean(),
            g_mean=g_mean.detach(),
            g_loss=g_term.detach(),
        )
        return additive_angular_margin(cos_y, m, easy_margin=self.easy_margin)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, "
            f"u_m={self.u_m}, lambda_g={self.lambda_g}, easy_margin={self.easy_margin}"
        )
