"""femb: train, evaluate and compare face-embedding models.

A face model has three parts: a backbone (image -> embedding, :mod:`femb.backbones`), a header
used only in training (embedding -> identity logits, :mod:`femb.headers`, where SphereFace,
CosFace, ArcFace and MagFace differ) and a plain torch loss. :class:`FaceEmbeddingModel` holds
them and trains them with :meth:`FaceEmbeddingModel.fit`.
"""

from femb.model import FaceEmbeddingModel

__version__ = "0.1.0"

__all__ = ["FaceEmbeddingModel", "__version__"]
