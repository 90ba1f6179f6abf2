"""Backbone registry: build any femb backbone by name."""

import logging
from collections.abc import Callable
from functools import partial

from torch import nn

from femb.backbones._common import check_embed_dim
from femb.backbones.iresnet import IRESNET_LAYERS, build_iresnet
from femb.backbones.mobilefacenet import MobileFaceNet
from femb.backbones.torchvision_adapter import TORCHVISION_BACKBONES, TorchvisionBackbone

log = logging.getLogger(__name__)

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    **{name: partial(build_iresnet, name) for name in IRESNET_LAYERS},
    "mobilefacenet": MobileFaceNet,
    **{name: partial(TorchvisionBackbone, arch) for name, arch in TORCHVISION_BACKBONES.items()},
}


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`.

    Returns:
        The sorted backbone names.
    """
    return sorted(_BUILDERS)


def build_backbone(backbone: str, embed_dim: int = 512, **kwargs: object) -> nn.Module:
    """Build a randomly initialised face-embedding backbone by name.

    Every returned module has an ``embed_dim`` attribute and an ``input_size`` attribute, and
    maps float images ``(B, 3, S, S)`` in ``[-1, 1]`` (``S = input_size``, 112 by default) to
    un-normalised embeddings ``(B, embed_dim)``.

    Args:
        backbone: One of :func:`available_backbones`, e.g. ``"iresnet50"``.
        embed_dim: Embedding size ``D``.
        **kwargs: Passed to the backbone class: ``input_size`` for all; ``dropout`` for IResNet
            and torchvision models; ``zero_init_residual`` for IResNet.

    Returns:
        The backbone module.

    Raises:
        ValueError: If ``backbone`` is unknown, ``embed_dim < 1``, or a keyword has a bad value
            (e.g. ``input_size`` not a multiple of 16).
        TypeError: If ``embed_dim`` is not an int or a keyword is not accepted by the backbone.
    """
    if not isinstance(backbone, str) or backbone not in _BUILDERS:
        raise ValueError(f"unknown backbone {backbone!r}; valid names: {available_backbones()}")
    check_embed_dim(embed_dim)
    model = _BUILDERS[backbone](embed_dim=embed_dim, **kwargs)
    num_params = sum(p.numel() for p in model.parameters())
    log.info(
        "Built backbone %s: embed_dim=%d, %.2fM parameters", backbone, embed_dim, num_params / 1e6
    )
    return model
