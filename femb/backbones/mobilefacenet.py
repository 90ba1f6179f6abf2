"""MobileFaceNet: a sub-1M-parameter backbone for real-time face verification.

Paper: Chen et al., "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face Verification on
Mobile Devices", https://arxiv.org/abs/1804.07573 (architecture of Table 1).

Shapes: ``(B, 3, S, S)`` float images in ``[-1, 1]`` -> ``(B, embed_dim)`` un-normalised
embeddings, with ``S = input_size`` (112 by default; the last feature map is ``S/16`` wide).

Size at ``input_size=112``: 1,003,136 parameters with ``embed_dim=128`` (the paper's setting)
and 1,200,512 with ``embed_dim=512``; 221M multiply-adds per image, as in the paper. The paper's
0.99M counts the deployed network: folding each BatchNorm into the convolution before it leaves
993,344 parameters.
"""

import logging

import torch
from torch import nn

from femb.backbones._common import check_embed_dim, check_images, check_input_size

log = logging.getLogger(__name__)

# Bottleneck stages of Table 1 in the paper: (expansion t, output channels c, repeats n,
# stride s of the first repeat).
BOTTLENECK_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)


class ConvBN(nn.Sequential):
    """``Conv2d(bias=False) -> BN``, followed by PReLU unless ``linear``.

    Shapes: ``(B, C_in, H, W) -> (B, C_out, H', W')``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Square kernel side.
        stride: Convolution stride.
        padding: Zero padding on each side.
        groups: Convolution groups; ``in_channels`` for a depthwise convolution.
        linear: Leave out the activation (the paper's "linear" layers).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        linear: bool = False,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_channels),
        ]
        if not linear:
            layers.append(nn.PReLU(out_channels))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """MobileNetV2 inverted residual with PReLU: expand 1x1, depthwise 3x3, linear project 1x1.

    The input is added back when the stride is 1 and the channel count is unchanged.

    Shapes: ``(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)``.

    Args:
        in_channels: Input channels ``C_in``.
        out_channels: Output channels ``C_out``.
        stride: Stride of the depthwise convolution.
        expansion: Width multiplier ``t`` of the hidden layer, relative to ``C_in``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.block = nn.Sequential(
            ConvBN(in_channels, hidden),
            ConvBN(hidden, hidden, 3, stride, padding=1, groups=hidden),
            ConvBN(hidden, out_channels, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Feature map ``(B, C_in, H, W)``.

        Returns:
            Feature map ``(B, C_out, H / stride, W / stride)``.
        """
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet (Table 1 of arXiv 1804.07573) producing face embeddings.

    Layout: ``conv3x3 s2 (64) -> depthwise conv3x3 (64)``; five bottleneck stages
    (``t, c, n, s`` = ``2, 64, 5, 2``; ``4, 128, 1, 2``; ``2, 128, 6, 1``; ``4, 128, 1, 2``;
    ``2, 128, 2, 1``); ``conv1x1 (512)``; linear global depthwise convolution (GDConv) whose kernel
    covers the whole ``S/16 x S/16`` map; linear ``conv1x1 (embed_dim)``; BatchNorm. Every
    non-linear layer uses PReLU. The output is not L2-normalised.

    Shapes: ``(B, 3, S, S) -> (B, embed_dim)`` with ``S = input_size``.

    Args:
        embed_dim: Embedding size ``D`` (the paper uses 128).
        input_size: Side length ``S`` of the square input, a multiple of 16.

    Raises:
        ValueError: For a bad ``embed_dim`` or ``input_size``.
    """

    def __init__(self, embed_dim: int = 512, input_size: int = 112) -> None:
        super().__init__()
        self.embed_dim = check_embed_dim(embed_dim)
        self.input_size = check_input_size(input_size)

        self.conv1 = ConvBN(3, 64, 3, stride=2, padding=1)
        self.conv2_dw = ConvBN(64, 64, 3, padding=1, groups=64)

        in_channels = 64
        stages = []
        for expansion, channels, repeats, stride in BOTTLENECK_STAGES:
            for i in range(repeats):
                stages.append(
                    Bottleneck(in_channels, channels, stride if i == 0 else 1, expansion)
                )
                in_channels = channels
        self.bottlenecks = nn.Sequential(*stages)

        final_side = self.input_size // 16
        self.conv_expand = ConvBN(in_channels, 512)
        self.gdconv = ConvBN(512, 512, final_side, groups=512, linear=True)
        self.embedding = nn.Conv2d(512, self.embed_dim, 1, bias=False)
        self.features = nn.BatchNorm1d(self.embed_dim)

        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

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
        x = self.bottlenecks(self.conv2_dw(self.conv1(x)))
        x = self.gdconv(self.conv_expand(x))
        return self.features(torch.flatten(self.embedding(x), 1))
