"""Mixed precision, channels-last, torch.compile, gradient clipping and the loader knobs."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch
from torch import nn

from femb import FaceEmbeddingModel
from femb.data import SyntheticFaceDataset
from femb.distributed import EpochSampler
from femb.headers import ArcFaceHeader

SIZE = 16
STEPS_FP16 = 12  # enough for the loss scale to settle and the weights to train
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class ConvBackbone(nn.Module):
    """Conv -> BatchNorm -> PReLU -> pool -> Linear: small, but exercises conv autocast."""

    def __init__(self, embed_dim: int = 8) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.PReLU(4),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.fc = nn.Linear(4 * 4 * 4, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@pytest.fixture
def train_set() -> SyntheticFaceDataset:
    return SyntheticFaceDataset(
        num_identities=6, images_per_identity=3, image_size=SIZE, split="train", seed=0
    )


def make_model(num_classes: int = 6) -> FaceEmbeddingModel:
    torch.manual_seed(0)
    return FaceEmbeddingModel(
        backbone=ConvBackbone(),
        header=ArcFaceHeader(in_features=8, out_features=num_classes),
        loss=nn.CrossEntropyLoss(),
    )


def fit(model, train_set, tmp_path, optimizer=None, **kwargs):
    optimizer = optimizer or torch.optim.SGD(model.params, lr=0.05, momentum=0.9)
    args = dict(
        train_dataset=train_set,
        batch_size=4,
        device="cpu",
        optimizer=optimizer,
        max_training_steps=3,
        out_dir=tmp_path,
        progress=False,
        seed=2,
    )
    args.update(kwargs)
    return model.fit(**args)


def test_bf16_on_cpu_autocasts_the_backbone_and_keeps_the_loss_in_float32(train_set, tmp_path):
    model = make_model()
    dtypes: dict[str, torch.dtype] = {}

    def record(name):
        def hook(module, inputs, output):
            if module.training:
                dtypes.setdefault(name, output.dtype)

        return hook

    model.backbone.fc.register_forward_hook(record("backbone"))
    model.header.register_forward_hook(record("logits"))
    before = [p.detach().clone() for p in model.parameters()]
    metrics = fit(model, train_set, tmp_path, precision="bf16", max_training_steps=4)
    assert dtypes == {"backbone": torch.bfloat16, "logits": torch.float32}
    assert math.isfinite(metrics["train/loss"])
    for old, new in zip(before, model.parameters(), strict=True):
        assert new.dtype == torch.float32 and torch.isfinite(new).all()
        assert not torch.equal(old, new)  # every parameter trained (weights stay float32)


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, NEEDS_CUDA])]
)
def test_fp16_scales_the_loss_and_stays_finite(train_set, tmp_path, caplog, device):
    """fp16 autocast + GradScaler: the scale starts at 2^16 and halves while the float16
    gradients overflow (those updates are skipped), then the weights train; weights and logits
    stay float32, the scale is logged and checkpointed (on the CPU with a warning that bf16 is
    the CPU's mixed precision)."""
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    with caplog.at_level(logging.INFO, logger="femb"):
        metrics = fit(
            model,
            train_set,
            tmp_path,
            device=device,
            precision="fp16",
            log_every=1,
            max_training_steps=STEPS_FP16,
        )
    assert math.isfinite(metrics["train/loss"])
    scales = [float(m) for m in re.findall(r"grad_scale ([0-9.e+]+)", caplog.text)]
    assert len(scales) == STEPS_FP16 and max(scales) <= 2.0**16
    assert ("bf16 is the CPU's mixed precision" in caplog.text) == (device == "cpu")
    for old, new in zip(before, model.parameters(), strict=True):
        assert new.dtype == torch.float32 and torch.isfinite(new).all()
        assert not torch.equal(old.to(new.device), new)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["grad_scaler"]["scale"] == pytest.approx(scales[-1], rel=1e-3)


def test_fp16_resume_continues_the_loss_scale_exactly(train_set, tmp_path):
    """Stopped while the scale still falls and resumed: the same weights and GradScaler state
    as the uninterrupted run."""
    whole = make_model()
    fit(whole, train_set, tmp_path / "whole", precision="fp16", max_training_steps=STEPS_FP16)
    parted = make_model()
    fit(parted, train_set, tmp_path / "parted", precision="fp16", max_training_steps=3)
    parted = make_model()
    fit(
        parted,
        train_set,
        tmp_path / "parted",
        precision="fp16",
        max_training_steps=STEPS_FP16,
        resume_from="auto",
    )
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, parted.state_dict()[name]), name
    states = [
        torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)["grad_scaler"]
        for run in ("whole", "parted")
    ]
    assert states[0] == states[1]


def test_unknown_precision_lists_the_choices(train_set, tmp_path):
    with pytest.raises(
        ValueError, match=r"precision='half'; use one of \['bf16', 'fp16', 'fp32'\]"
    ):
        fit(make_model(), train_set, tmp_path, precision="half")


def first_batch(train_set, seed: int, batch_size: int = 4):
    """The first training batch of ``fit(seed=seed)``, from its documented sampler."""
    sampler = EpochSampler(len(train_set), batch_size, seed)
    sampler.set_epoch(0)
    indices = [index for index, _ in sampler][:batch_size]
    images = torch.stack([train_set[i][0] for i in indices])
    labels = torch.tensor([train_set[i][1] for i in indices])
    return images, labels


def test_gradient_clipping_scales_the_step_to_the_max_norm(train_set, tmp_path, caplog):
    # Reference: the raw gradient of the first batch, computed by hand on a copy of the model.
    reference = make_model()
    images, labels = first_batch(train_set, seed=2)
    loss, _ = reference.training_step(images, labels)
    loss.backward()
    grads = [p.grad for p in reference.parameters()]
    raw_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
    max_norm = 1.0
    assert raw_norm > 10 * max_norm  # so clipping is active

    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    lr = 1.0
    optimizer = torch.optim.SGD(model.params, lr=lr)  # plain SGD: step = -lr * grad
    with caplog.at_level(logging.INFO, logger="femb"):
        fit(
            model,
            train_set,
            tmp_path,
            optimizer=optimizer,
            max_training_steps=1,
            clip_grad_norm=max_norm,
            log_every=1,
        )
    steps = [(old - new) / lr for old, new in zip(before, model.parameters(), strict=True)]
    step_norm = torch.linalg.vector_norm(torch.stack([s.norm() for s in steps])).item()
    assert step_norm == pytest.approx(max_norm, rel=1e-4)
    for step, grad in zip(steps, grads, strict=True):
        # float32 weights of size ~1 resolve steps to ~1e-7
        torch.testing.assert_close(step, grad * (max_norm / raw_norm), rtol=1e-3, atol=1e-6)
    logged = float(caplog.text.split("grad_norm ")[1].split()[0])
    assert logged == pytest.approx(raw_norm, rel=1e-3)  # the norm before clipping


def test_bad_clip_value_is_a_clear_error(train_set, tmp_path):
    with pytest.raises(ValueError, match="clip_grad_norm=0"):
        fit(make_model(), train_set, tmp_path, clip_grad_norm=0)


def test_channels_last_trains_and_keeps_the_format(train_set, tmp_path):
    model = make_model()
    metrics = fit(model, train_set, tmp_path, channels_last=True, precision="bf16")
    assert math.isfinite(metrics["train/loss"])
    conv = model.backbone.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)


class RandomlyFlipped(torch.utils.data.Dataset):
    """Mirrors each image with probability 1/2, drawn from torch's global generator."""

    def __init__(self, dataset: SyntheticFaceDataset) -> None:
        self.dataset = dataset
        self.num_classes = dataset.num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return (image.flip(2) if torch.rand(()) < 0.5 else image), label


def test_augmentation_does_not_depend_on_the_number_of_workers(train_set, tmp_path):
    """Per-sample seeds: a sample's random flip does not depend on which process loads it."""
    weights = []
    for workers, extra in ((0, {}), (2, {"prefetch_factor": 1, "persistent_workers": False})):
        model = make_model()
        fit(
            model,
            RandomlyFlipped(train_set),
            tmp_path / str(workers),
            num_workers=workers,
            **extra,
        )
        weights.append(model.header.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    model = make_model()
    fit(model, train_set, tmp_path / "unflipped")
    assert not torch.equal(weights[0], model.header.weight.detach())  # the flips happened


@pytest.mark.slow
def test_compile_trains_and_saves_the_plain_backbone(train_set, tmp_path):
    model = make_model()
    metrics = fit(model, train_set, tmp_path, compile=True)
    assert math.isfinite(metrics["train/loss"])
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert not any(key.startswith("_orig_mod") for key in state["backbone"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_channels_last_on_cuda(train_set, tmp_path):
    model = make_model()
    metrics = fit(model, train_set, tmp_path, device="cuda", precision="bf16", channels_last=True)
    assert math.isfinite(metrics["train/loss"])
    assert next(model.parameters()).device.type == "cuda"
