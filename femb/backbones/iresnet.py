"""IResNet ("improved ResNet") backbones for aligned face crops.

Paper: Duta et al., "Improved Residual Networks for Image and Video Recognition",
https://arxiv.org/abs/2004.04989, in the face-recognition form popularised by ArcFace
(Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
https://arxiv.org/abs/1801.07698) and insightface ``arcface_torch``.

Shapes: ``(B, 3, S, S)`` float images in ``[-1, 1]`` -> ``(B, embed_dim)`` un-normalised
embeddings, with ``S = input_size`` (112 by default). Each of the four stages halves the
resolution, so the last feature map is ``(B, 512, S/16, S/16)``: ``7 x 7`` at ``S = 112``.

Parameter counts at ``input_size=112``, ``embed_dim=512`` (all parameters, trainable):

=========== =============== ============
name        layers          parameters
=========== =============== ============
iresnet18   (2, 2, 2, 2)    24,025,600
iresnet34   (3, 4, 6, 3)    34,139,328
iresnet50   (3, 4, 14, 3)   43,590,848
iresnet100  (3, 13, 30, 3)  65,156,160
iresnet200  (6, 26, 60, 6)  118,833,920
=========== =============== ============

The module and parameter names (``conv1``, ``bn1``, ``prelu``, ``layer1``..``layer4``, ``bn2``,
``fc``, ``features``; per block ``bn1``, ``conv1``, ``bn2``, ``prelu``, ``conv2``, ``bn3``,
``downsample``) follow insightface ``arcface_torch`` so that its ``state_dict`` layout maps one to
one. Differences from ``arcface_torch``: the scale of the final ``features`` BatchNorm is
trainable here (insightface fixes it at 1), convolutions use Kaiming rather than ``N(0, 0.1)``
initialisation, and ``zero_init_residual`` zeroes the last BatchNorm of each block (``bn3``),
which makes every residual branch start at zero. Mixed precision is left to ``torch.autocast``
in the trainer rather than built into the module.
"""

import logging
from collections.abc import Sequence

import torch
from torch import nn

from femb.backbones._common import check_dropout, check_embed_dim, check_images, check_input_size

log = logging.getLogger(__name__)

STAGE_CHANNELS = (64, 128, 256, 512)

IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """IResNet basic block: ``BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN`` + shortcut.

    The shortcut is the identity, or ``conv1x1(stride) -> BN`` when the stride or the channel
    count changes. There is no activation after the addition (the "improved" ordering).

    Shapes: ``(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)``.

    Args:
        in_channels: Input channels ``C_in``.
        out_channels: Output channels ``C_out``.
        stride: Stride of the second convolution and of the projection shortcut.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.prelu = nn.PReLU(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels, stride)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Feature map ``(B, C_in, H, W)``.

        Returns:
            Feature map ``(B, C_out, H / stride, W / stride)``.
        """
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.prelu(self.bn2(self.conv1(self.bn1(x))))
        out = self.bn3(self.conv2(out))
        return out + shortcut


class IResNet(nn.Module):
    """Improved residual network producing face embeddings.

    Layout: stem ``conv3x3(3 -> 64) -> BN -> PReLU`` at full resolution; four stages of
    :class:`IBasicBlock` with 64, 128, 256 and 512 channels, each opening with a stride-2 block;
    then ``BN2d -> Dropout -> flatten -> Linear(512 * (S/16)^2 -> embed_dim) -> BN1d``.
    The output is not L2-normalised: margin headers normalise it themselves and MagFace reads its
    norm as a quality score.

    Shapes: ``(B, 3, S, S) -> (B, embed_dim)`` with ``S = input_size``.

    Use :func:`femb.backbones.build_backbone` with ``"iresnet18"`` .. ``"iresnet200"`` for the
    standard depths; see the module docstring for parameter counts.

    Args:
        layers: Number of blocks in each of the four stages, e.g. ``(3, 4, 14, 3)`` for IResNet-50.
        embed_dim: Embedding size ``D``.
        input_size: Side length ``S`` of the square input, a multiple of 16.
        dropout: Dropout probability applied to the last feature map before the linear layer.
        zero_init_residual: Zero the scale of the last BatchNorm of every block, so every block
            starts as its shortcut; often helps very deep models train stably.

    Raises:
        ValueError: If ``layers`` does not hold four positive ints, or for a bad ``embed_dim``,
            ``input_size`` or ``dropout``.
    """

    def __init__(
        self,
        layers: Sequence[int],
        embed_dim: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        layers = tuple(layers)
        if len(layers) != len(STAGE_CHANNELS) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers
        ):
            raise ValueError(
                f"layers must hold {len(STAGE_CHANNELS)} positive ints (blocks per stage), "
                f"got {layers!r}; e.g. (3, 4, 14, 3) for IResNet-50"
            )
        self.layers = layers
        self.embed_dim = check_embed_dim(embed_dim)
        self.input_size = check_input_size(input_size)
        dropout = check_dropout(dropout)

        self.conv1 = _conv3x3(3, STAGE_CHANNELS[0])
        self.bn1 = nn.BatchNorm2d(STAGE_CHANNELS[0])
        self.prelu = nn.PReLU(STAGE_CHANNELS[0])

        in_channels = STAGE_CHANNELS[0]
        stages = []
        for channels, num_blocks in zip(STAGE_CHANNELS, layers, strict=True):
            blocks = [IBasicBlock(in_channels, channels, stride=2)]
            blocks += [IBasicBlock(channels, channels) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        final_side = self.input_size // 16
        self.bn2 = nn.BatchNorm2d(in_channels)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_channels * final_side * final_side, self.embed_dim)
        self.features = nn.BatchNorm1d(self.embed_dim)

        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, IBasicBlock):
                    nn.init.zeros_(module.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch of aligned faces.

        Args:
            x: Images ``(B, 3, S, S)`` scaled to ``[-1, 1]``.

        Returns:
            Un-normalised embeddings ``(B, embed_dim)``.

        Raises:
            ValueError: If ``x`` does not have shape ``(B, 3, input_size, input_size)``.
        """
        check_images(x, self.input_size, type(self).__name__)
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x))
        return self.features(self.fc(torch.flatten(x, 1)))


def build_iresnet(name: str, embed_dim: int = 512, **kwargs: object) -> IResNet:
    """Build a standard-depth IResNet by name.

    Args:
        name: One of ``IRESNET_LAYERS`` (``"iresnet18"``, ..., ``"iresnet200"``).
        embed_dim: Embedding size.
        **kwargs: Passed to :class:`IResNet` (``input_size``, ``dropout``, ``zero_init_residual``).

    Returns:
        The randomly initialised model.

    Raises:
        ValueError: If ``name`` is not a known depth.
    """
    if name not in IRESNET_LAYERS:
        raise ValueError(f"unknown IResNet {name!r}; valid names: {sorted(IRESNET_LAYERS)}")
    return IResNet(IRESNET_LAYERS[name], embed_dim=embed_dim, **kwargs)
