"""Adapter that turns a torchvision classification network into a face-embedding backbone.

The classifier of the torchvision model (``fc`` for ResNet-style models, ``classifier`` for
MobileNet/EfficientNet/VGG-style ones) is replaced by ``Dropout -> Linear(-> embed_dim) ->
BatchNorm1d``, the usual embedding head of face-recognition backbones. The model is always
built with ``weights=None``: nothing is downloaded, and the weights are randomly initialised by
torchvision's own scheme.

Shapes: ``(B, 3, S, S)`` float images in ``[-1, 1]`` -> ``(B, embed_dim)`` un-normalised
embeddings, with ``S = input_size``. These networks were designed for 224x224 ImageNet images
and end in global average pooling, so 112x112 faces give a small (4x4 for ResNet) last map.

Parameter counts at ``embed_dim=512`` (independent of ``input_size``): ``tv_resnet18``
11,440,192; ``tv_resnet50`` 24,558,144; ``tv_mobilenet_v3_small`` 1,223,456.
"""

import logging

import torch
import torchvision
from torch import nn

from femb.backbones._common import check_dropout, check_embed_dim, check_images, check_input_size

log = logging.getLogger(__name__)

# Registered femb names -> torchvision architecture names. Any other torchvision classification
# model with an ``fc`` or Linear ``classifier`` works through ``TorchvisionBackbone(arch=...)``.
TORCHVISION_BACKBONES: dict[str, str] = {
    "tv_mobilenet_v3_small": "mobilenet_v3_small",
    "tv_resnet18": "resnet18",
    "tv_resnet50": "resnet50",
}

_AUX_HEAD_MODELS = frozenset({"googlenet", "inception_v3"})


def _strip_classifier(model: nn.Module, arch: str) -> int:
    """Replace the classifier of ``model`` by the identity, in place.

    Args:
        model: A torchvision classification model.
        arch: Its torchvision name, for messages.

    Returns:
        Size of the pooled feature vector that the classifier received.

    Raises:
        NotImplementedError: If the model has no ``fc``/``classifier`` with a Linear layer.
    """
    for attr in ("fc", "classifier"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            in_features = head.in_features
        elif isinstance(head, nn.Sequential):
            linears = [m for m in head if isinstance(m, nn.Linear)]
            if not linears:
                continue
            # The first Linear sees the pooled features; the rest is the ImageNet MLP head.
            in_features = linears[0].in_features
        else:
            continue
        setattr(model, attr, nn.Identity())
        return in_features
    raise NotImplementedError(
        f"torchvision model {arch!r} is not supported by TorchvisionBackbone: it has no `fc` or "
        "`classifier` with a Linear layer (e.g. SqueezeNet, ViT, Swin)"
    )


class TorchvisionBackbone(nn.Module):
    """A torchvision classification network with a face-embedding head.

    Shapes: ``(B, 3, S, S) -> (B, embed_dim)`` with ``S = input_size``.

    Not supported: pretrained ImageNet weights (the model is always built with
    ``weights=None``), models with auxiliary heads (GoogLeNet, Inception-v3), and models without
    an ``fc`` or Linear ``classifier`` (SqueezeNet, vision transformers).

    Args:
        arch: torchvision model name, e.g. ``"resnet18"``; see
            ``torchvision.models.list_models(module=torchvision.models)``.
        embed_dim: Embedding size ``D``.
        input_size: Side length ``S`` of the square input, a multiple of 16; only used to
            check the input shape, since the network ends in global pooling.
        dropout: Dropout probability on the pooled features before the linear layer.

    Raises:
        ValueError: If ``arch`` is not a torchvision classification model, or for a bad
            ``embed_dim``, ``input_size`` or ``dropout``.
        NotImplementedError: If ``arch`` has no replaceable Linear classifier.
    """

    def __init__(
        self, arch: str, embed_dim: int = 512, input_size: int = 112, dropout: float = 0.0
    ) -> None:
        super().__init__()
        valid = sorted(torchvision.models.list_models(module=torchvision.models))
        if arch not in valid:
            raise ValueError(
                f"unknown torchvision classification model arch={arch!r}; valid names: {valid}"
            )
        self.arch = arch
        self.embed_dim = check_embed_dim(embed_dim)
        self.input_size = check_input_size(input_size)
        dropout = check_dropout(dropout)

        if arch in _AUX_HEAD_MODELS:
            raise NotImplementedError(
                f"torchvision model {arch!r} is not supported by TorchvisionBackbone: its "
                "auxiliary classifiers change the training-mode output"
            )
        self.body = torchvision.models.get_model(arch, weights=None)
        in_features = _strip_classifier(self.body, arch)
        self.head = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(in_features, self.embed_dim),
            nn.BatchNorm1d(self.embed_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch of aligned faces.

        Args:
            x: Images ``(B, 3, S, S)`` scaled to ``[-1, 1]``.

        Returns:
            Un-normalised embeddings ``(B, embed_dim)``.

        Raises:
            ValueError: If ``x`` does not have shape ``(B, 3, input_size, input_size)``.
        """
        check_images(x, self.input_size, f"TorchvisionBackbone({self.arch})")
        return self.head(self.body(x))
