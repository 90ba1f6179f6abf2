"""Shared fixtures: the real ``conf/`` composed through Hydra's compose API, shrunk for CPU."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
DATA_ROOT = Path(os.environ.get("FEMB_DATA_ROOT", REPO.parent / "shared" / "data")).resolve()

# Keep the default test run light on a 2-core machine and reproducible.
torch.set_num_threads(min(2, torch.get_num_threads()))

#: Overrides that make any config run in seconds on CPU and write nowhere but tmp_path.
FAST = ["device=cpu", "num_workers=0", "progress=false", "projection_samples=8"]


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``conf/train.yaml`` with ``overrides``, data from DATA_ROOT, outputs elsewhere."""
    GlobalHydra.instance().clear()
    with initialize(version_base="1.3", config_path="../conf"):
        return compose(
            config_name="train",
            overrides=[f"data_root={DATA_ROOT}", f"output_dir={output_dir}", *FAST, *overrides],
        )


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg(overrides, subdir="run")`` -> a composed config writing into tmp_path/subdir."""

    def make(overrides: list[str] | None = None, subdir: str = "run") -> DictConfig:
        return compose_train(list(overrides or []), tmp_path / subdir)

    return make


@pytest.fixture
def data_root() -> Path:
    if not (DATA_ROOT / "orl").is_dir():
        pytest.skip(f"the staged face data is not at {DATA_ROOT} (set FEMB_DATA_ROOT)")
    return DATA_ROOT
