"""Sub-centre ArcFace: K class centres per identity, ArcFace margin on the nearest one.

Paper: J. Deng, J. Guo, T. Liu, M. Gong, S. Zafeiriou, "Sub-center ArcFace: Boosting Face
Recognition by Large-scale Noisy Web Faces", ECCV 2020,
https://www.ecva.net/papers/eccv_2020/papers_ECCV/papers/123560715.pdf

Each class c has K sub-centres W_{c,1..K}; a sample's cosine to the class is the largest::

    cos(theta_c) = max_k <x / ||x||, W_{c,k} / ||W_{c,k}||>
    logit_j = s * cos(theta_j)            j != y
    logit_y = s * cos(theta_y + m)        (ArcFace rules past theta_y = pi - m)

Noisy samples then gather on non-dominant sub-centres instead of pulling the dominant one. The
paper's second stage (drop non-dominant sub-centres and the samples far from the dominant one,
then retrain with K = 1) is a data-cleaning step outside the header and is not implemented.

Shapes: embeddings (B, D), labels (B,) -> logits (B, C); ``weight`` is (C * K, D).
"""

from __future__ import annotations

import logging

from femb.headers.arcface import ArcFaceHeader

log = logging.getLogger(__name__)


class SubCenterArcFaceHeader(ArcFaceHeader):
    """Sub-centre ArcFace header: ArcFace on the max over K sub-centre cosines.

    Args:
        in_features: Embedding size D.
        out_features: Number of classes C.
        k: Sub-centres per class (3 in the paper).
        s: Logit scale.
        m: Additive angular margin, radians.
        easy_margin: As for :class:`~femb.headers.ArcFaceHeader`.
        detach_margin: As for :class:`~femb.headers.ArcFaceHeader`.
    """

    stats_prefix = "subcenter_arcface"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        k: int = 3,
        s: float = 64.0,
        m: float = 0.5,
        easy_margin: bool = False,
        detach_margin: bool = False,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            s=s,
            m=m,
            easy_margin=easy_margin,
            detach_margin=detach_margin,
            num_subcenters=k,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.num_subcenters}"
