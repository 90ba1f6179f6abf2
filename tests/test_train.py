"""``femb.train.train(cfg)`` end to end through the real ``conf/`` and Hydra's compose API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict

from femb.data import SyntheticFaceDataset
from femb.train import build, load_model, train

from .conftest import REPO


def test_two_step_run_writes_csv_events_and_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg(
        [
            "dataset=synthetic",
            "backbone=mobilefacenet",
            "header=arcface",
            "max_training_steps=2",
            "evaluation_steps=1",
            "batch_size=8",
        ]
    )
    metrics = train(cfg)
    run = tmp_path / "run"

    rows = pd.read_csv(run / "verification.csv")
    assert rows["step"].tolist() == [1, 2]
    assert {"epoch", "train_loss", "lr", "synthetic/eer", "synthetic/auc"} <= set(rows.columns)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["global_step"] == 2
    assert summary["synthetic/eer"] == pytest.approx(metrics["synthetic/eer"])

    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert state["config"]["header"]["_target_"] == "femb.headers.ArcFaceHeader"
    assert state["global_step"] == 2

    # The checkpoint rebuilds the same model from its own config.
    model = load_model(run)
    images = torch.stack(
        [
            SyntheticFaceDataset(split="val", num_identities=4, images_per_identity=3)[i][0]
            for i in range(3)
        ]
    )
    rebuilt = build(cfg)["model"]
    rebuilt.load_checkpoint_state(state)
    torch.testing.assert_close(model.encode(images), rebuilt.encode(images))


def test_fixed_seed_gives_the_same_losses(make_cfg):
    overrides = [
        "dataset=synthetic",
        "backbone=mobilefacenet",
        "max_training_steps=3",
        "evaluation_steps=3",
        "batch_size=8",
        "tensorboard=false",
    ]
    first = train(make_cfg(overrides, subdir="a"))
    second = train(make_cfg(overrides, subdir="b"))
    assert first["train/loss"] == second["train/loss"]
    assert json.dumps(first) == json.dumps(second)


@pytest.mark.parametrize("header", ["sphereface", "cosface", "arcface", "magface", "linear"])
def test_every_header_trains_on_real_orl_faces(make_cfg, data_root, header):
    cfg = make_cfg(
        [
            f"header={header}",
            "backbone=mobilefacenet",
            "max_training_steps=2",
            "evaluation_steps=2",
            "batch_size=4",
            "tensorboard=false",
            "embed_dim=64",
        ]
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["orl/eer"] <= 1.0
    assert metrics["orl/n_genuine"] == 10 * 45  # all pairs of s31-s40, 10 images each
    assert metrics["orl/n_impostor"] == 100 * 99 // 2 - 450


def test_a_run_finds_its_data_from_any_directory(make_cfg, data_root, tmp_path, monkeypatch):
    """data_root is relative to the working directory; the checkpoint stores it absolute, so
    scripts/evaluate.py (femb.inference) works from elsewhere; moved data gets a clear hint."""
    from femb.inference import evaluate_run, load_run

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    relative = os.path.relpath(data_root, tmp_path / "work")
    overrides = [f"data_root={relative}", "backbone=mobilefacenet", "image_size=32"]
    overrides += ["max_training_steps=4", "evaluation_steps=4", "embed_dim=64"]
    metrics = train(make_cfg([*overrides, "batch_size=8", "tensorboard=false"]))
    run = load_run(tmp_path / "run")
    assert run.config.data_root == str(data_root)
    assert run.config.dataset.val.orl.root == str(data_root / "orl")

    monkeypatch.chdir(tmp_path)
    again = evaluate_run(run, device="cpu", batch_size=8)
    assert again["orl/eer"] == pytest.approx(metrics["orl/eer"], abs=1e-4)

    with open_dict(run.config):
        run.config.data_root = str(tmp_path / "moved")
        run.config.dataset.val.orl.root = str(tmp_path / "moved" / "orl")
    with pytest.raises(FileNotFoundError, match="pass --data-root DIR to the script"):
        evaluate_run(run, device="cpu")
    moved = evaluate_run(run, device="cpu", batch_size=8, data_root=data_root)
    assert moved["orl/eer"] == again["orl/eer"]


def test_scheduler_total_steps_is_injected(make_cfg):
    cfg = make_cfg(
        [
            "dataset=synthetic",
            "scheduler=cosine",
            "max_training_steps=0",
            "max_epochs=2",
            "batch_size=8",
        ]
    )
    parts = build(cfg)
    scheduler = parts["lr_global_step_scheduler"]
    assert parts["lr_epoch_scheduler"] is None
    lrs = []
    for _ in range(2 * (32 // 8)):  # 8 identities x 4 images, batch 8: 4 steps per epoch
        parts["optimizer"].step()
        scheduler.step()
        lrs.append(parts["optimizer"].param_groups[0]["lr"])
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # cosine reaches 0 at the run's last step


def test_unknown_option_lists_the_valid_ones(tmp_path):
    from .conftest import compose_train

    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["header=arcfce"], tmp_path)
    assert "arcface" in str(err.value) and "cosface" in str(err.value)


def test_missing_dataset_folder_is_a_clear_error(make_cfg, tmp_path):
    cfg = make_cfg([f"data_root={tmp_path / 'nowhere'}", "max_training_steps=1"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(cfg)


@pytest.mark.parametrize("multirun", [False, True])
def test_the_script_runs_and_sweeps(tmp_path, multirun):
    sweep = ["-m", "header=arcface,cosface"] if multirun else ["header=magface"]
    command = [
        sys.executable,
        "scripts/train.py",
        *sweep,
        "debug=fast",
        "max_training_steps=2",
        f"hydra.run.dir={tmp_path}/run",
        f"hydra.sweep.dir={tmp_path}/sweep",
        "progress=false",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted((tmp_path / "sweep").iterdir()) if multirun else [tmp_path / "run"]
    runs = [r for r in runs if r.is_dir()]
    assert len(runs) == (2 if multirun else 1)
    for run in runs:
        assert (run / "verification.csv").is_file()
        assert (run / "train.log").is_file() and "eval step" in (run / "train.log").read_text()
        assert (run / ".hydra" / "config.yaml").is_file()
        assert (run / "checkpoints" / "last.pt").is_file()


def test_training_augmentation_never_reaches_validation(make_cfg, data_root):
    parts = build(make_cfg(["dataset=orl"]))
    val = parts["val_sets"]["orl"]
    torch.manual_seed(0)
    first = torch.stack([val[i][0] for i in range(6)])
    torch.manual_seed(1)
    assert torch.equal(first, torch.stack([val[i][0] for i in range(6)]))
    # The training set does flip: over a few draws some image comes out mirrored.
    train_set = parts["train_set"]
    draws = []
    for seed in range(8):
        torch.manual_seed(seed)
        draws.append(train_set[0][0])
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert any(torch.equal(draws[0].flip(2), d) for d in draws[1:])


def test_lfw_run_reports_the_pairs_protocol(make_cfg, data_root):
    cfg = make_cfg(["dataset=lfw", "backbone=tv_resnet18", "image_size=32", "embed_dim=32",
                    "max_training_steps=2", "batch_size=4", "tensorboard=false"])  # fmt: skip
    metrics = train(cfg)
    assert metrics["lfw/n_genuine"] == 300 and metrics["lfw/n_impostor"] == 300
    assert 0.0 <= metrics["lfw/accuracy"] <= 1.0 and metrics["lfw/accuracy_std"] >= 0.0
    assert "lfw/accuracy" in pd.read_csv(tmp_path_of(cfg) / "verification.csv")


def tmp_path_of(cfg):
    from pathlib import Path

    return Path(cfg.output_dir)
