"""Headers: embeddings (B, D) and labels (B,) -> identity logits (B, C).

Every header follows the :class:`~femb.headers.base.Header` contract (``forward``,
``extra_losses``, ``on_train_step``, ``stats``); the loss is a plain cross-entropy on the logits
plus ``sum(header.extra_losses.values())``.
"""

from __future__ import annotations

from femb.headers.adaface import AdaFaceHeader
from femb.headers.arcface import ArcFaceHeader
from femb.headers.base import Header, MarginHeader
from femb.headers.combined import CombinedMarginHeader
from femb.headers.cosface import CosFaceHeader
from femb.headers.curricularface import CurricularFaceHeader
from femb.headers.linear import LinearHeader
from femb.headers.magface import MagFaceHeader
from femb.headers.partial_fc import PartialFCHeader
from femb.headers.sphereface import SphereFaceHeader
from femb.headers.subcenter import SubCenterArcFaceHeader

_HEADERS: dict[str, type[Header]] = {
    "adaface": AdaFaceHeader,
    "arcface": ArcFaceHeader,
    "combined": CombinedMarginHeader,
    "cosface": CosFaceHeader,
    "curricularface": CurricularFaceHeader,
    "linear": LinearHeader,
    "magface": MagFaceHeader,
    "sphereface": SphereFaceHeader,
    "subcenter_arcface": SubCenterArcFaceHeader,
}


def available_headers() -> dict[str, type[Header]]:
    """Short name -> header class, sorted by name, e.g. ``{"adaface": AdaFaceHeader, ...}``."""
    return dict(_HEADERS)


def build_header(name: str, in_features: int, out_features: int, **kwargs) -> Header:
    """Build a header by short name (see :func:`available_headers`).

    Raises:
        ValueError: If ``name`` is unknown; the message lists the valid names.
    """
    if name not in _HEADERS:
        raise ValueError(f"unknown header {name!r}; choose one of {sorted(_HEADERS)}")
    return _HEADERS[name](in_features=in_features, out_features=out_features, **kwargs)


__all__ = [
    "AdaFaceHeader",
    "ArcFaceHeader",
    "CombinedMarginHeader",
    "CosFaceHeader",
    "CurricularFaceHeader",
    "Header",
    "LinearHeader",
    "MagFaceHeader",
    "MarginHeader",
    "PartialFCHeader",
    "SphereFaceHeader",
    "SubCenterArcFaceHeader",
    "available_headers",
    "build_header",
]
