"""Every option of every config group composes and instantiates."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from femb.train import build_scheduler

from .conftest import CONF, compose_train


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in ("backbone", "header", "loss", "optimizer", "scheduler", "dataset"):
        assert options(group), group


@pytest.mark.parametrize("name", options("backbone"))
def test_backbone_options(tmp_path, name):
    cfg = compose_train([f"backbone={name}", "embed_dim=32"], tmp_path)
    backbone = instantiate(cfg.backbone)
    assert backbone.embed_dim == 32
    if name in ("iresnet100", "iresnet200"):
        return  # forward passes of the big ones are covered in test_backbones
    backbone.eval()
    with torch.no_grad():
        assert backbone(torch.zeros(2, 3, 112, 112)).shape == (2, 32)


@pytest.mark.parametrize("name", options("header"))
def test_header_options(tmp_path, name):
    cfg = compose_train([f"header={name}", "embed_dim=16"], tmp_path)
    header = instantiate(cfg.header, out_features=5)
    embeddings, labels = torch.randn(4, 16), torch.tensor([0, 1, 2, 3])
    if getattr(header, "returns_loss", False):  # Partial FC: the loss, logits without labels
        loss = header(embeddings, labels)
        assert loss.shape == () and torch.isfinite(loss)
        logits = header(embeddings)
    else:
        logits = header(embeddings, labels)
    assert logits.shape == (4, 5) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", options("loss"))
def test_loss_options(tmp_path, name):
    loss = instantiate(compose_train([f"loss={name}"], tmp_path).loss)
    assert torch.isfinite(loss(torch.randn(3, 4), torch.tensor([0, 1, 2])))


@pytest.mark.parametrize("name", options("optimizer"))
@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_optimizer_and_scheduler_options(tmp_path, name, scheduler):
    cfg = compose_train(
        [f"optimizer={name}", f"scheduler={scheduler}", "max_training_steps=10"], tmp_path
    )
    optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(2))])
    interval, scheduler = build_scheduler(cfg.scheduler, optimizer, total_steps=10)
    assert interval in ("step", "epoch")
    if scheduler is not None:
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] >= 0


@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_options(tmp_path, data_root, name):
    cfg = compose_train([f"dataset={name}"], tmp_path)
    if OmegaConf.is_missing(cfg.dataset.train, "root"):
        return  # dataset=folder needs the user's own path (checked in test_data)
    train_set = instantiate(cfg.dataset.train)
    assert train_set.num_classes > 1
    image, label = train_set[0]
    assert image.shape == (3, 112, 112) and 0 <= label < train_set.num_classes
    for node in cfg.dataset.val.values():
        assert len(instantiate(node)) > 1


@pytest.mark.parametrize("name", options("debug") + options("experiment"))
def test_presets_compose(tmp_path, name):
    group = "debug" if name in options("debug") else "experiment"
    cfg = compose_train([f"{group}={name}"], tmp_path)
    OmegaConf.resolve(cfg)


def test_extra_validation_sets_join_the_dataset_ones(tmp_path, data_root):
    cfg = compose_train(["dataset=orl", "+valset=lfw"], tmp_path)
    assert list(cfg.dataset.val) == ["orl", "lfw"]
    lfw = instantiate(cfg.dataset.val.lfw)
    assert len(lfw.pairs) == 600
    names = [f"bin_{n}" for n in ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw")]
    assert sorted(names) == [n for n in options("valset") if n.startswith("bin_")]
    cfg = compose_train([f"+valset=[{','.join(names)}]", "valset_dir=/data/emore"], tmp_path)
    assert cfg.dataset.val.cfp_fp.path == "/data/emore/cfp_fp.bin"
    assert list(cfg.dataset.val) == ["orl", "lfw_bin", "cfp_fp", "agedb_30", "calfw", "cplfw"]
