"""Face-embedding backbones: images ``(B, 3, S, S)`` -> embeddings ``(B, embed_dim)``."""

from femb.backbones.build import available_backbones, build_backbone
from femb.backbones.iresnet import IResNet
from femb.backbones.mobilefacenet import MobileFaceNet
from femb.backbones.torchvision_adapter import TorchvisionBackbone

__all__ = [
    "IResNet",
    "MobileFaceNet",
    "TorchvisionBackbone",
    "available_backbones",
    "build_backbone",
]
