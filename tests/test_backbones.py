"""Tests for femb.backbones: shapes, gradients, parameter counts and error messages."""

import functools
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from femb.backbones import (
    IResNet,
    MobileFaceNet,
    TorchvisionBackbone,
    available_backbones,
    build_backbone,
)

EXPECTED_NAMES = [
    "iresnet100",
    "iresnet18",
    "iresnet200",
    "iresnet34",
    "iresnet50",
    "mobilefacenet",
    "tv_mobilenet_v3_small",
    "tv_resnet18",
    "tv_resnet50",
]
# Deep models get a single build and forward pass to keep the suite fast.
DEEP = {"iresnet100", "iresnet200"}
FORWARD_CASES = [
    (name, dim) for name in EXPECTED_NAMES for dim in ((512,) if name in DEEP else (128, 512))
]
IRESNET_LAYERS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _free_cached_models() -> Iterator[None]:
    yield
    _eval_model.cache_clear()  # the deep IResNets hold ~1 GB; release it for later test files


@functools.cache
def _eval_model(name: str, embed_dim: int) -> nn.Module:
    """Build once per (name, embed_dim); only used in eval mode, which leaves it unchanged."""
    torch.manual_seed(0)
    return build_backbone(backbone=name, embed_dim=embed_dim).eval()


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _iresnet_params_by_hand(layers: tuple[int, ...], embed_dim: int, side: int = 7) -> int:
    """Count IResNet parameters from the layer recipe, without building the model."""
    total = 3 * 9 * 64 + 2 * 64 + 64  # stem conv3x3, BN (scale+shift), PReLU slopes
    in_channels = 64
    for channels, blocks in zip((64, 128, 256, 512), layers, strict=True):
        for i in range(blocks):
            c_in = in_channels if i == 0 else channels
            total += 2 * c_in + 9 * c_in * channels  # bn1, conv1
            total += 2 * channels + channels  # bn2, prelu
            total += 9 * channels * channels + 2 * channels  # conv2, bn3
            if i == 0:  # every stage opens with stride 2, hence a projection shortcut
                total += c_in * channels + 2 * channels
        in_channels = channels
    total += 2 * 512  # final BN2d
    total += 512 * side * side * embed_dim + embed_dim  # fc weight + bias
    total += 2 * embed_dim  # features BN1d
    return total


def test_available_backbones_is_sorted_and_complete() -> None:
    assert available_backbones() == EXPECTED_NAMES


@pytest.mark.parametrize(("name", "embed_dim"), FORWARD_CASES)
def test_forward_shape_in_eval_mode(name: str, embed_dim: int) -> None:
    model = _eval_model(name, embed_dim)
    assert model.embed_dim == embed_dim and type(model.embed_dim) is int
    assert model.input_size == 112

    with torch.no_grad():
        out = model(torch.rand(2, 3, 112, 112) * 2 - 1)

    assert out.shape == (2, embed_dim)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name", ["iresnet18", "mobilefacenet", "tv_mobilenet_v3_small", "tv_resnet18"]
)
def test_train_mode_embeddings_differ_and_are_not_normalised(name: str) -> None:
    # Train mode, because an untrained torchvision MobileNetV3 in eval mode shrinks the signal
    # to ~1e-8 and maps every input to nearly the same embedding.
    model = build_backbone(backbone=name, embed_dim=64).train()
    with torch.no_grad():
        out = model(torch.rand(4, 3, 112, 112) * 2 - 1)

    assert out.shape == (4, 64)
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    # MagFace reads the norm as a quality score, so the backbone must not L2-normalise.
    assert not torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-2)


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
def test_train_step_gives_finite_gradient_to_every_parameter(name: str) -> None:
    model = build_backbone(backbone=name, embed_dim=128).train()
    x = torch.rand(4, 3, 112, 112) * 2 - 1
    labels = torch.tensor([0, 1, 2, 0])
    # A plain sum of BatchNorm1d outputs has zero gradient in train mode, so score the
    # embeddings with a fixed random classifier instead.
    classifier = torch.randn(128, 3)

    loss = nn.functional.cross_entropy(model(x) @ classifier, labels)
    loss.backward()

    assert torch.isfinite(loss)
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{pname} has a non-finite gradient"
    # The gradient reaches the stem.
    stem = model.conv1 if name == "iresnet18" else model.conv1[0]
    assert stem.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("iresnet18", 24_025_600),
        ("iresnet50", 43_590_848),  # insightface: 43.6M
        ("iresnet100", 65_156_160),  # insightface: 65.2M
    ],
)
def test_iresnet_parameter_counts(name: str, expected: int) -> None:
    count = _num_params(_eval_model(name, 512))
    assert count == expected
    assert count == _iresnet_params_by_hand(IRESNET_LAYERS[name], 512)


def test_published_iresnet_sizes() -> None:
    # Ballpark of the figures quoted for insightface arcface_torch r50 / r100.
    assert abs(_iresnet_params_by_hand(IRESNET_LAYERS["iresnet50"], 512) / 1e6 - 43.6) < 0.05
    assert abs(_iresnet_params_by_hand(IRESNET_LAYERS["iresnet100"], 512) / 1e6 - 65.2) < 0.05


def test_mobilefacenet_parameter_count() -> None:
    model = MobileFaceNet(embed_dim=128)
    assert _num_params(model) == 1_003_136
    # The paper's 0.99M is the BN-folded network: each BatchNorm keeps only a per-channel bias.
    bn_channels = sum(
        m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)
    )
    assert abs((_num_params(model) - bn_channels) / 1e6 - 0.99) < 0.005


def test_iresnet_state_dict_uses_insightface_key_layout() -> None:
    keys = set(build_backbone(backbone="iresnet18").state_dict())
    for key in (
        "conv1.weight",
        "bn1.running_var",
        "prelu.weight",
        "layer1.0.bn1.weight",
        "layer1.0.conv2.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_mean",
        "layer4.1.bn3.bias",
        "bn2.weight",
        "fc.weight",
        "features.running_mean",
    ):
        assert key in keys, key


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
def test_input_size_64(name: str) -> None:
    model = build_backbone(backbone=name, embed_dim=128, input_size=64).eval()
    assert model.input_size == 64
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 128)
    if name == "iresnet18":
        assert model.fc.in_features == 512 * 4 * 4
    with pytest.raises(ValueError, match="input_size=64"):
        model(torch.zeros(2, 3, 112, 112))


def test_zero_init_residual_makes_blocks_start_as_shortcut() -> None:
    model = IResNet((2, 2, 2, 2), zero_init_residual=True).eval()
    block = model.layer1[1]  # identity shortcut: same channels, stride 1
    x = torch.randn(2, 64, 14, 14)
    with torch.no_grad():
        assert torch.equal(block(x), x)
    assert not torch.equal(IResNet((2, 2, 2, 2)).eval().layer1[1](x), x)


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        build_backbone(backbone="resnet-18")
    message = str(err.value)
    assert "'resnet-18'" in message
    assert str(EXPECTED_NAMES) in message
    with pytest.raises(ValueError, match="valid names"):
        build_backbone(backbone=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("embed_dim", [0, -5])
def test_bad_embed_dim(embed_dim: int) -> None:
    with pytest.raises(ValueError, match=f"embed_dim must be >= 1, got {embed_dim}"):
        build_backbone(backbone="mobilefacenet", embed_dim=embed_dim)
    with pytest.raises(ValueError, match="embed_dim"):
        MobileFaceNet(embed_dim=embed_dim)


def test_non_int_embed_dim() -> None:
    with pytest.raises(TypeError, match="embed_dim must be an int"):
        build_backbone(backbone="iresnet18", embed_dim=128.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet", "tv_resnet18"])
@pytest.mark.parametrize("input_size", [100, 8, 0])
def test_bad_input_size(name: str, input_size: int) -> None:
    with pytest.raises(ValueError, match=f"multiple of 16.*got {input_size}"):
        build_backbone(backbone=name, input_size=input_size)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((2, 1, 112, 112), "3-channel"),
        ((2, 3, 96, 96), "input_size=112"),
        ((2, 3, 112, 96), "input_size=112"),
        ((3, 112, 112), "4-D"),
    ],
)
@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet", "tv_mobilenet_v3_small"])
def test_wrong_input_shape(name: str, shape: tuple[int, ...], match: str) -> None:
    model = _eval_model(name, 128)
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape))


def test_iresnet_bad_layers_and_dropout() -> None:
    with pytest.raises(ValueError, match="layers must hold 4 positive ints"):
        IResNet((2, 2, 2))
    with pytest.raises(ValueError, match="layers must hold 4 positive ints"):
        IResNet((2, 0, 2, 2))
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        build_backbone(backbone="iresnet18", dropout=1.0)


def test_dropout_is_active_only_in_train_mode() -> None:
    model = build_backbone(backbone="iresnet18", embed_dim=32, dropout=0.5)
    x = torch.rand(4, 3, 112, 112) * 2 - 1
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_torchvision_adapter_head_and_errors() -> None:
    model = TorchvisionBackbone("resnet18", embed_dim=64)
    assert isinstance(model.body.fc, nn.Identity)
    linear, bn = model.head[1], model.head[2]
    assert (linear.in_features, linear.out_features, bn.num_features) == (512, 64, 64)

    small = build_backbone(backbone="tv_mobilenet_v3_small", embed_dim=64)
    assert isinstance(small.body.classifier, nn.Identity)
    assert small.head[1].in_features == 576

    with pytest.raises(ValueError, match="unknown torchvision classification model"):
        TorchvisionBackbone("resnet19")
    with pytest.raises(NotImplementedError, match="squeezenet1_0"):
        TorchvisionBackbone("squeezenet1_0")
    with pytest.raises(NotImplementedError, match="auxiliary"):
        TorchvisionBackbone("googlenet")
