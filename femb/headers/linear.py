"""Plain softmax baseline: a linear classifier on the raw embeddings.

    logits = x W^T + b          W (C, D), b (C,)

Shapes: embeddings (B, D), labels (B,) (unused) -> logits (B, C). No normalisation and no margin:
the reference point the margin headers are compared against (e.g. the softmax rows of the
SphereFace/CosFace/ArcFace papers' tables).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from femb.headers.base import Header, compute_dtype

log = logging.getLogger(__name__)


class LinearHeader(Header):
    """Softmax baseline header: ``logits = x W^T + b``.

    Args:
        in_features: Embedding size D.
        out_features: Number of classes C.
        bias: Learn a per-class bias b.
    """

    stats_prefix = "linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features)
        # nn.Linear's default (Kaiming-uniform) initialisation.
        self.fc = nn.Linear(in_features, out_features, bias=bias)

    @property
    def weight(self) -> nn.Parameter:
        """The class weights (C, D)."""
        return self.fc.weight

    def forward(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits (B, D), (B,) -> (B, C); the labels are only validated (no margin)."""
        self._check_inputs(embeddings, labels)
        dtype = compute_dtype(embeddings.dtype)
        # Same numerics as the margin headers: float32 logits even under autocast.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            bias = None if self.fc.bias is None else self.fc.bias.to(dtype)
            logits = F.linear(embeddings.to(dtype), self.fc.weight.to(dtype), bias)
        if labels is not None:
            with torch.no_grad():
                self._stats["norm_mean"] = torch.linalg.vector_norm(
                    embeddings.detach().to(dtype), dim=1
                ).mean()
        return logits

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.fc.bias is not None}"
        )
