"""Header base classes: the contract every header follows, and the margin template.

A header maps embeddings (B, D) and identity labels (B,) to identity logits (B, C); the loss is a
plain ``torch.nn.CrossEntropyLoss`` on those logits. Margin headers (SphereFace, CosFace, ArcFace,
MagFace, ...) share one computation, implemented once in :class:`MarginHeader`:

    cos(theta_j) = <x / ||x||, W_j / ||W_j||>                       (B, C)
    logit_j      = s * cos(theta_j)                for j != y
    logit_y      = s * f(cos(theta_y))             margin on the target column only

Subclasses override only the hook ``f`` (:meth:`MarginHeader.target_cosine`), and when they need
it the scale (SphereFace's A-Softmax scales by ``||x||``) or the non-target columns
(CurricularFace). Labels ``None`` give the margin-free logits ``s * cos(theta)`` for scoring.

Numerics. Every header computes in float32 (float64 stays float64, for gradcheck) with autocast
disabled, whatever the input dtype: the margin functions (acos, sqrt(1 - cos^2), cos(m * theta))
lose most of their digits in bfloat16 (8 mantissa bits) and s = 64 magnifies the error.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

#: Clamp margin of cosines before ``acos`` and ``sqrt(1 - cos^2)``. d acos(c)/dc and
#: d sqrt(1 - c^2)/dc are -1/sqrt(1 - c^2) and -c/sqrt(1 - c^2): infinite at c = +-1, where a
#: sample sits exactly on a class centre (or its antipode), and rounding yields |c| slightly above
#: 1, where acos is NaN. A clamp to [-1, 1] alone would leave the infinite derivative at the
#: boundary (masked only by how clamp's backward treats boundary values). Inside
#: [-1 + eps, 1 - eps] both functions are smooth with derivatives below 1/sqrt(2 eps) ~ 707;
#: 1e-6 is ~17 float32 ulps below 1, and an angle error of at most sqrt(2 eps) = 1.4e-3 rad.
COS_EPS = 1e-6

# Norm floor when normalising embeddings and class weights (as F.normalize); only an all-zero
# vector reaches it.
NORM_EPS = 1e-12


def clamp_cos(cos: Tensor, eps: float = COS_EPS) -> Tensor:
    """Clamp cosines into ``[-1 + eps, 1 - eps]`` before ``acos`` or ``sqrt(1 - cos^2)``.

    Args:
        cos: Cosines of any shape.
        eps: Distance kept from +-1; see :data:`COS_EPS` for why.

    Returns:
        The clamped cosines, same shape. The gradient is zero where the clamp is active.
    """
    return cos.clamp(-1.0 + eps, 1.0 - eps)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype femb headers compute in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Validate a positive (or non-negative) finite real hyperparameter.

    Args:
        name: Keyword name, used in the message.
        value: The value to check.
        allow_zero: Accept 0.

    Returns:
        ``float(value)``.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If it is not finite, negative, or zero when ``allow_zero`` is False.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


def _check_size(name: str, value: int) -> int:
    # bool is an int subclass; True as a class count is a config mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class _NormalizedLinear(torch.autograd.Function):
    """cos = x_unit (W / ||W||)^T (B, C) without materialising the normalised weights (C, D).

    Autograd through ``F.normalize(weight)`` keeps a normalised copy of the (C, D) weights for the
    backward pass and allocates several more (C, D) temporaries there; with C = 100k identities
    these dwarf the (B, C) logits. Here only the weight gradient itself is (C, D):

        cos_bj = r_j <x_b, W_j>,  r_j = 1 / ||W_j||
        dL/dx_b = sum_j g_bj r_j W_j
        dL/dW_j = A_j - r_j^2 <A_j, W_j> W_j,  A_j = sum_b g_bj r_j x_b
    """

    @staticmethod
    def forward(ctx, x_unit: Tensor, weight: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(weight, dim=1)
        inv = 1.0 / norm.clamp_min(NORM_EPS)
        cos = F.linear(x_unit, weight).mul_(inv)
        ctx.save_for_backward(x_unit, weight, inv, norm > NORM_EPS)
        return cos

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x_unit, weight, inv, unclamped = ctx.saved_tensors
        g = grad * inv
        grad_x = g @ weight if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = g.t() @ x_unit
            # The radial part; zero where the norm floor was active (r constant there). The
            # row-wise dot product as a batched (1, D) @ (D, 1) matmul avoids a (C, D) product.
            dots = torch.bmm(grad_w.unsqueeze(1), weight.unsqueeze(2)).view(-1)
            radial = torch.where(unclamped, inv * inv * dots, 0.0)
            grad_w.addcmul_(weight, radial.unsqueeze(1), value=-1.0)
        return grad_x, grad_w


def normalized_linear(x_unit: Tensor, weight: Tensor) -> Tensor:
    """Cosines (B, C) between unit rows x_unit (B, D) and the directions of weight (C, D)."""
    return _NormalizedLinear.apply(x_unit, weight)


class Header(nn.Module):
    """Base of every femb header: embeddings (B, D) and labels (B,) -> logits (B, C).

    Attributes:
        in_features: Embedding size D.
        out_features: Number of classes (identities) C.
        extra_losses: Terms computed in the last labelled forward that the model adds to the
            classification loss, e.g. ``{"magface_g": lambda_g * mean(g(a))}``. Empty for most
            headers, and emptied by a forward without labels.
    """

    #: Prefix of the keys of :meth:`stats`, e.g. ``"arcface"``.
    stats_prefix: str = "header"

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = _check_size("in_features", in_features)
        self.out_features = _check_size("out_features", out_features)
        self.extra_losses: dict[str, Tensor] = {}
        # Detached diagnostics of the last labelled forward; converted to floats lazily in
        # stats() so that forward never forces a device synchronisation.
        self._stats: dict[str, Tensor] = {}

    def forward(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        """Identity logits.

        Args:
            embeddings: (B, D) raw (un-normalised) embeddings.
            labels: (B,) integer labels in ``[0, C)``; None gives margin-free logits for
                inference-time class scores.

        Returns:
            (B, C) logits, float32 (float64 for float64 inputs).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def on_train_step(self, global_step: int) -> None:
        """Called by the trainer before each training step; no-op unless a header anneals."""

    def stats(self) -> dict[str, float]:
        """Diagnostics of the last labelled forward, keyed ``"<prefix>/<name>"``."""
        return {f"{self.stats_prefix}/{k}": float(v) for k, v in self._stats.items()}

    def _check_inputs(self, embeddings: Tensor, labels: Tensor | None) -> Tensor | None:
        """Validate shapes, dtypes and label range; return labels as int64 (B,) or None."""
        if not isinstance(embeddings, Tensor):
            raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.in_features:
            raise ValueError(
                f"embeddings must have shape (B, {self.in_features}) for "
                f"{type(self).__name__}(in_features={self.in_features}), got "
                f"{tuple(embeddings.shape)}"
            )
        if not embeddings.is_floating_point():
            raise TypeError(f"embeddings must be floating point, got {embeddings.dtype}")
        if labels is None:
            return None
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
        if labels.shape != (embeddings.shape[0],):
            raise ValueError(
                f"labels must have shape ({embeddings.shape[0]},) to match the embeddings, "
                f"got {tuple(labels.shape)}"
            )
        if labels.numel() > 0:
            # One host sync per step on GPU, for a readable error instead of a device-side
            # assert from gather/scatter on an out-of-range label.
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.out_features:
                raise ValueError(
                    f"labels must lie in [0, {self.out_features}) (out_features), got values "
                    f"in [{lo}, {hi}]; build the header with out_features = number of classes"
                )
        return labels.long()


class MarginHeader(Header):
    """Template of the normalised-softmax margin headers.

    Holds the class weights ``weight`` (C, D), initialised N(0, 0.01^2) as in insightface's
    arcface_torch (only their directions matter). The forward pass:

    1. cos(theta) (B, C) between the normalised embeddings and class weights;
    2. without labels: return ``scale * cos(theta)``;
    3. gather the target cosines cos(theta_y) (B,), apply the hook :meth:`target_cosine`,
       let :meth:`adjust_non_target` touch the other columns (identity by default), scale and
       write the new target logits into column y.

    The margin touches only B numbers (the target column) instead of a (B, C) one-hot blend:
    the (B, C) work is one matmul, one scaling and one scatter.

    Args:
        in_features: Embedding size D.
        out_features: Number of classes C.
        s: Logit scale (the radius of the hypersphere the features are projected on).
        num_subcenters: K sub-centres per class (sub-centre ArcFace): ``weight`` is then
            (C * K, D), rows ``c * K ... c * K + K - 1`` belonging to class c, and cos(theta_c)
            is the largest cosine over them.
    """

    def __init__(
        self, in_features: int, out_features: int, s: float, num_subcenters: int = 1
    ) -> None:
        super().__init__(in_features, out_features)
        self.s = check_positive("s", s)
        self.num_subcenters = _check_size("num_subcenters", num_subcenters)
        self.weight = nn.Parameter(torch.empty(out_features * num_subcenters, in_features))
        nn.init.normal_(self.weight, std=0.01)

    # ------------------------------------------------------------------ hooks

    def target_cosine(self, cos_y: Tensor, norms: Tensor) -> Tensor:
        """The margin hook: target cosines (B,) -> target logits before scaling (B,).

        Args:
            cos_y: (B,) cos(theta_y), unclamped (may round slightly past +-1).
            norms: (B,) embedding norms ||x||.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement target_cosine")

    def logit_scale(self, norms: Tensor) -> float | Tensor:
        """Logit scale: the constant ``s``, or a per-sample (B,) tensor."""
        return self.s

    def adjust_non_target(self, cos: Tensor, cos_y: Tensor, target: Tensor) -> Tensor:
        """Hook on the full (B, C) cosines; identity here (CurricularFace re-weights negatives).

        Args:
            cos: (B, C) cosines; must not be modified in place.
            cos_y: (B,) target cosines before the margin.
            target: (B,) output of :meth:`target_cosine`.
        """
        return cos

    def cosine(self, x_unit: Tensor, weight: Tensor) -> Tensor:
        """Cosines (B, C) between unit embeddings (B, D) and the class weights (C * K, D)."""
        cos = normalized_linear(x_unit, weight)
        if self.num_subcenters == 1:
            return cos
        return cos.view(cos.shape[0], self.out_features, self.num_subcenters).amax(dim=2)

    # --------------------------------------------------------------- template

    def forward(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        """Margin logits: (B, D), (B,) -> (B, C); see the class docstring."""
        labels = self._check_inputs(embeddings, labels)
        dtype = compute_dtype(embeddings.dtype)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = embeddings.to(dtype)
            norms = torch.linalg.vector_norm(x, dim=1)
            x_unit = x / norms.clamp_min(NORM_EPS).unsqueeze(1)
            cos = self.cosine(x_unit, self.weight.to(dtype))
            scale = self.logit_scale(norms)
            col_scale = scale.unsqueeze(1) if isinstance(scale, Tensor) else scale
            if labels is None:
                self.extra_losses = {}
                return cos * col_scale

            index = labels.unsqueeze(1)
            cos_y = cos.gather(1, index).squeeze(1)
            target = self.target_cosine(cos_y, norms)
            logits = self.adjust_non_target(cos, cos_y, target) * col_scale
            # In place is safe: the product above is a fresh tensor that autograd does not save.
            logits.scatter_(1, index, (target * scale).unsqueeze(1))
            self._stats["cos_target_mean"] = cos_y.detach().mean()
        return logits

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, s={self.s}"
