"""Launchers and sweepers of ``scripts/train.py -m``: joblib, submitit (local), Optuna, presets.

Each test runs a real 2-job sweep of a tiny synthetic config in a subprocess (seconds per job)
and checks the run directories it leaves, through ``femb.analysis``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from femb import analysis

from .conftest import CONF, REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
TINY = [
    "debug=fast",
    "image_size=32",
    "embed_dim=16",
    "max_training_steps=2",
    "evaluation_steps=2",
    "projection_samples=0",
    "progress=false",
    "tensorboard=false",
]


def sweep(args: list[str], sweep_dir: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "scripts/train.py", "-m", *TINY, *args, f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def hydra_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    "preset,seeds", [("compare_heads_orl", "0,1,2"), ("compare_heads_lfw", "0,1")]
)
def test_compare_presets_sweep_the_four_margin_headers(preset, seeds):
    cfg = hydra_cfg([f"experiment={preset}"])
    assert dict(cfg.hydra.sweeper.params) == {
        "header": "sphereface,cosface,arcface,magface",
        "seed": seeds,
    }
    assert cfg.hydra.sweeper._target_.endswith("BasicSweeper")
    for key in ("max_epochs", "batch_size", "image_size", "embed_dim"):
        assert cfg[key] > 0, key
    assert cfg.optimizer.lr > 0 and cfg.backbone.backbone == "tv_resnet18"
    for header in cfg.hydra.sweeper.params.header.split(","):
        # Every swept header builds with the preset's header settings (LFW: s=30).
        node = hydra_cfg([f"experiment={preset}", f"header={header}"]).header
        built = instantiate(node, in_features=8, out_features=5)
        assert built.s == (30.0 if preset == "compare_heads_lfw" else node.s), header


def test_slurm_launcher_option_extends_submitit_slurm():
    launcher = hydra_cfg(["hydra/launcher=slurm"]).hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert launcher.timeout_min == 720


def test_joblib_launcher_runs_two_jobs_in_parallel(tmp_path):
    sweep(
        ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "header=arcface,cosface"],
        tmp_path / "joblib",
    )
    runs = analysis.load_runs(tmp_path / "joblib").runs
    assert runs["header"].tolist() == ["arcface", "cosface"]
    assert (runs["status"] == "complete").all() and (runs["steps"] == 2).all()


def test_submitit_local_launcher_runs_two_jobs(tmp_path):
    sweep(
        [
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=3",
            "hydra.launcher.cpus_per_task=1",
            "header=sphereface,magface",
        ],
        tmp_path / "submitit",
    )
    runs = analysis.load_runs(tmp_path / "submitit").runs
    assert runs["header"].tolist() == ["sphereface", "magface"]
    assert (runs["status"] == "complete").all()
    assert list((tmp_path / "submitit" / ".submitit").iterdir())  # submitit's own job logs


def test_optuna_preset_minimises_the_returned_best_eer(tmp_path):
    sweep(["experiment=optuna_arcface_margin", "hydra.sweeper.n_trials=2"], tmp_path / "optuna")
    result = OmegaConf.load(tmp_path / "optuna" / "optimization_results.yaml")
    assert set(result.best_params) == {"header.m", "header.s", "optimizer.lr"}
    assert 0.1 <= result.best_params["header.m"] <= 0.7
    assert result.best_params["header.s"] in (16.0, 32.0, 64.0)
    assert 0.005 <= result.best_params["optimizer.lr"] <= 0.2

    trials = analysis.load_runs(tmp_path / "optuna", metrics=["synthetic/eer"])
    runs = trials.runs
    assert len(runs) == 2 and (runs["status"] == "complete").all()
    assert {"header.m", "header.s", "optimizer.lr"} <= set(trials.overrides)
    # The sweeper minimised what scripts/train.py returns: the best monitored EER.
    assert result.best_value == pytest.approx(runs["best/synthetic/eer"].min())
