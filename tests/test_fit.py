"""``FaceEmbeddingModel.fit``: stop criteria, schedulers, evaluation cadence, outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from femb import FaceEmbeddingModel
from femb.data import SyntheticFaceDataset
from femb.evaluation import VerificationEvaluator
from femb.headers import ArcFaceHeader, MagFaceHeader

SIZE = 16  # tiny images keep these loop tests fast; the backbones are tested elsewhere


class TinyBackbone(nn.Module):
    """Flatten -> Linear -> BatchNorm1d: enough to train and to catch a batch of one."""

    def __init__(self, embed_dim: int = 8) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * SIZE * SIZE, embed_dim), nn.BatchNorm1d(embed_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CountingScheduler:
    """Counts ``step()`` calls; has the state_dict a checkpoint needs."""

    def __init__(self) -> None:
        self.steps = 0

    def step(self) -> None:
        self.steps += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps}


def make_model(num_classes: int, header_cls=ArcFaceHeader, seed: int = 0) -> FaceEmbeddingModel:
    torch.manual_seed(seed)
    return FaceEmbeddingModel(
        backbone=TinyBackbone(),
        header=header_cls(in_features=8, out_features=num_classes),
        loss=nn.CrossEntropyLoss(),
    )


@pytest.fixture
def train_set() -> SyntheticFaceDataset:
    # 6 identities x 3 images = 18 images: 4 full batches of 4 per epoch, 2 images dropped.
    return SyntheticFaceDataset(
        num_identities=6, images_per_identity=3, image_size=SIZE, split="train", seed=0
    )


@pytest.fixture
def val_set() -> SyntheticFaceDataset:
    return SyntheticFaceDataset(
        num_identities=3, images_per_identity=3, image_size=SIZE, split="val", seed=0
    )


def fit(model, train_set, out_dir, **kwargs):
    optimizer = torch.optim.SGD(model.params, lr=0.05, momentum=0.9)
    args = dict(
        train_dataset=train_set,
        batch_size=4,
        device="cpu",
        optimizer=optimizer,
        lr_epoch_scheduler=None,
        lr_global_step_scheduler=None,
        evaluator=None,
        val_dataset=None,
        evaluation_steps=0,
        max_training_steps=0,
        max_epochs=0,
        tensorboard=False,
        out_dir=out_dir,
        progress=False,
    )
    args.update(kwargs)
    return model.fit(**args)


def test_params_are_two_named_groups_for_any_optimizer(train_set):
    model = make_model(train_set.num_classes)
    groups = model.params
    assert [g["name"] for g in groups] == ["backbone", "header"]
    n_params = sum(1 for _ in model.backbone.parameters()) + sum(
        1 for _ in model.header.parameters()
    )
    assert sum(len(g["params"]) for g in groups) == n_params
    for opt in (torch.optim.SGD(model.params, lr=0.1), torch.optim.AdamW(model.params)):
        assert len(opt.param_groups) == 2
    groups = model.param_groups(header_lr=0.5, header_weight_decay=0.0)
    assert groups[1]["lr"] == 0.5 and groups[1]["weight_decay"] == 0.0 and "lr" not in groups[0]


def test_max_training_steps_wins_and_step_scheduler_steps_every_step(train_set, tmp_path):
    model = make_model(train_set.num_classes)
    per_step, per_epoch = CountingScheduler(), CountingScheduler()
    fit(
        model,
        train_set,
        tmp_path,
        max_training_steps=10,
        max_epochs=100,
        lr_global_step_scheduler=per_step,
        lr_epoch_scheduler=per_epoch,
    )
    assert model.global_step == 10
    assert per_step.steps == 10
    assert per_epoch.steps == 2  # 4 steps per epoch: epochs 0 and 1 completed, 2 steps into 3rd
    assert model.epoch == 2


def test_max_epochs_counts_full_batches_only(train_set, tmp_path):
    model = make_model(train_set.num_classes)
    per_epoch = CountingScheduler()
    fit(model, train_set, tmp_path, max_epochs=3, lr_epoch_scheduler=per_epoch)
    assert model.global_step == 3 * (18 // 4)
    assert model.epoch == 3 and per_epoch.steps == 3


def test_real_torch_schedulers_change_the_lr(train_set, tmp_path):
    model = make_model(train_set.num_classes)
    optimizer = torch.optim.SGD(model.params, lr=0.1)
    step_sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model.fit(
        train_dataset=train_set,
        batch_size=4,
        device="cpu",
        optimizer=optimizer,
        lr_global_step_scheduler=step_sched,
        max_training_steps=3,
        out_dir=tmp_path,
        progress=False,
    )
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_both_stop_criteria_zero_is_an_error(train_set, tmp_path):
    with pytest.raises(ValueError, match="max_training_steps and max_epochs are both 0"):
        fit(make_model(train_set.num_classes), train_set, tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=1), "BatchNorm needs at least 2"),
        (dict(batch_size=64), "fewer than batch_size=64"),
        (dict(evaluator=VerificationEvaluator()), "no val_dataset"),
        (dict(evaluation_steps=-1), "evaluation_steps=-1"),
    ],
)
def test_inconsistent_fit_arguments(train_set, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit(make_model(train_set.num_classes), train_set, tmp_path, max_training_steps=2, **kwargs)


def test_header_smaller_than_the_label_range_is_caught(train_set, tmp_path):
    with pytest.raises(ValueError, match="out_features=6"):
        fit(make_model(3), train_set, tmp_path, max_training_steps=1)


def test_evaluation_every_n_global_steps_and_at_the_end(train_set, val_set, tmp_path):
    model = make_model(train_set.num_classes)
    fit(
        model,
        train_set,
        tmp_path,
        max_training_steps=7,
        evaluation_steps=3,
        evaluator=VerificationEvaluator(similarity="cos"),
        val_dataset=val_set,
    )
    rows = pd.read_csv(tmp_path / "verification.csv")
    assert rows["step"].tolist() == [3, 6, 7]
    assert rows["epoch"].tolist() == [0, 1, 1]
    for column in ("train_loss", "lr", "val/eer", "val/auc", "val/eer_threshold"):
        assert column in rows and rows[column].notna().all()
    rocs = sorted((tmp_path / "roc" / "val").glob("*.csv"))
    assert [p.name for p in rocs] == [f"step_{s:08d}.csv" for s in (3, 6, 7)]
    roc = pd.read_csv(rocs[-1])
    assert roc["fpr"].is_monotonic_increasing and roc["tpr"].is_monotonic_increasing
    assert (roc["fpr"].iloc[0], roc["fpr"].iloc[-1]) == (0.0, 1.0)


def test_evaluation_every_epoch_when_evaluation_steps_is_zero(train_set, val_set, tmp_path):
    model = make_model(train_set.num_classes)
    fit(
        model,
        train_set,
        tmp_path,
        max_epochs=2,
        evaluator=VerificationEvaluator(),
        val_dataset={"a": val_set, "b": val_set},
    )
    rows = pd.read_csv(tmp_path / "verification.csv")
    assert rows["step"].tolist() == [4, 8]
    assert rows["epoch"].tolist() == [1, 2]
    assert (rows["a/eer"] == rows["b/eer"]).all()  # several named sets get their own columns


def test_mid_epoch_stop_still_evaluates_once_at_the_end(train_set, val_set, tmp_path):
    model = make_model(train_set.num_classes)
    fit(
        model,
        train_set,
        tmp_path,
        max_training_steps=6,
        evaluation_steps=0,
        evaluator=VerificationEvaluator(),
        val_dataset=val_set,
    )
    assert pd.read_csv(tmp_path / "verification.csv")["step"].tolist() == [4, 6]


def test_fit_is_deterministic_on_cpu(train_set, val_set, tmp_path):
    results, weights = [], []
    for run in ("a", "b"):
        model = make_model(train_set.num_classes, seed=1)
        results.append(
            fit(
                model,
                train_set,
                tmp_path / run,
                max_training_steps=5,
                seed=3,
                evaluator=VerificationEvaluator(),
                val_dataset=val_set,
            )
        )
        weights.append(model.header.weight.detach().clone())
    assert json.dumps(results[0]) == json.dumps(results[1])  # NaN-aware equality
    assert torch.equal(weights[0], weights[1])
    model = make_model(train_set.num_classes, seed=1)
    fit(model, train_set, tmp_path / "c", max_training_steps=5, seed=4)
    assert not torch.equal(weights[0], model.header.weight.detach())  # the seed matters


def test_magface_regulariser_reaches_the_loss(train_set):
    model = make_model(train_set.num_classes, header_cls=MagFaceHeader)
    images, labels = next(iter(torch.utils.data.DataLoader(train_set, batch_size=4)))
    total, parts = model.training_step(images, labels)
    assert "loss/magface_g" in parts
    assert total.item() == pytest.approx(
        parts["loss/cls"].item() + parts["loss/magface_g"].item(), rel=1e-6
    )


def test_tensorboard_scalars_and_projection(train_set, val_set, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = make_model(train_set.num_classes)
    fit(
        model,
        train_set,
        tmp_path,
        max_training_steps=4,
        evaluation_steps=2,
        log_every=2,
        evaluator=VerificationEvaluator(),
        val_dataset=val_set,
        tensorboard=True,
        projection_samples=5,
    )
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/eer", "val/auc", "train/embedding_norm_mean"} <= tags
    assert [e.step for e in events.Scalars("val/eer")] == [2, 4]
    projector = list((tmp_path / "tensorboard").rglob("projector_config.pbtxt"))
    sprites = list((tmp_path / "tensorboard").rglob("sprite.png"))
    assert projector and sprites
    tensors = list((tmp_path / "tensorboard").rglob("tensors.tsv"))
    assert len(tensors[0].read_text().strip().splitlines()) == 5


def test_final_checkpoint_reads_back_into_a_model(train_set, tmp_path):
    model = make_model(train_set.num_classes)
    metrics = fit(model, train_set, tmp_path, max_training_steps=3)
    assert math.isfinite(metrics["train/loss"])
    state = torch.load(Path(tmp_path) / "checkpoints" / "last.pt", weights_only=False)
    assert state["global_step"] == 3 and state["num_classes"] == 6
    fresh = make_model(train_set.num_classes, seed=9)
    fresh.load_checkpoint_state(state)
    x = torch.stack([train_set[i][0] for i in range(4)])
    torch.testing.assert_close(fresh.encode(x), model.encode(x))


def test_encode_flip_and_norms(val_set):
    model = make_model(6)
    x = torch.stack([val_set[i][0] for i in range(4)])
    emb, norms = model.encode(x, return_norms=True)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    assert (norms > 0).all()
    # The flip-test embedding of an image equals that of its mirror image.
    torch.testing.assert_close(model.encode(x, flip=True), model.encode(x.flip(3), flip=True))
