"""Multi-process training (gloo on the CPU, loopback only).

Equivalence: two ranks with batch B each see the same global batches as one process with batch
2B (``EpochSampler``), DDP averages the two ranks' mean-loss gradients, which is the gradient
of the mean over 2B images, and every rank applies the same update. This holds exactly only
without batch statistics (BatchNorm in training mode normalises each rank's B images on their
own, unless SyncBatchNorm, which torch supports on GPUs only), so the backbone here uses
LayerNorm. What remains is float summation order: weights agree to ~1e-6, not bitwise.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from femb import FaceEmbeddingModel
from femb.data import SyntheticFaceDataset
from femb.distributed import EpochSampler, distributed_from_env
from femb.evaluation import VerificationEvaluator
from femb.headers import ArcFaceHeader

from .conftest import REPO

SIZE = 16
STEPS = 8  # 24 images, global batch 4: 6 steps per epoch, so the run crosses an epoch end


class NoBatchStatsBackbone(nn.Module):
    """Flatten -> Linear -> LayerNorm: per-sample normalisation, identical under DDP."""

    def __init__(self, embed_dim: int = 8) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * SIZE * SIZE, embed_dim), nn.LayerNorm(embed_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def run(out_dir: Path, batch_size: int) -> FaceEmbeddingModel:
    train_set = SyntheticFaceDataset(
        num_identities=8, images_per_identity=3, image_size=SIZE, split="train", seed=0
    )
    val_set = SyntheticFaceDataset(
        num_identities=3, images_per_identity=3, image_size=SIZE, split="val", seed=0
    )
    torch.manual_seed(1)
    model = FaceEmbeddingModel(
        backbone=NoBatchStatsBackbone(),
        header=ArcFaceHeader(in_features=8, out_features=train_set.num_classes),
        loss=nn.CrossEntropyLoss(),
    )
    optimizer = torch.optim.SGD(model.params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.fit(
        train_dataset=train_set,
        batch_size=batch_size,
        device="cpu",
        optimizer=optimizer,
        lr_global_step_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 3, gamma=0.7),
        evaluator=VerificationEvaluator(),
        val_dataset=val_set,
        evaluation_steps=3,
        max_training_steps=STEPS,
        out_dir=out_dir,
        progress=False,
        seed=3,
    )
    return model


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    with distributed_from_env("cpu"):
        # Each rank names its own run directory; rank 0's must win on every rank.
        model = run(Path(root) / f"run_rank{rank}", batch_size=2)
        torch.save(model.state_dict(), Path(root) / f"weights_rank{rank}.pt")


def test_two_gloo_ranks_match_one_process_with_the_global_batch(tmp_path):
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "weights_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "weights_rank1.pt", weights_only=True)
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), f"{name} differs between the ranks"
    assert not (tmp_path / "run_rank1").exists()  # only rank 0 writes, into its directory

    single = run(tmp_path / "single", batch_size=4).state_dict()
    for name, tensor in single.items():
        torch.testing.assert_close(rank0[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    ddp_rows = pd.read_csv(tmp_path / "run_rank0" / "verification.csv")
    single_rows = pd.read_csv(tmp_path / "single" / "verification.csv")
    assert ddp_rows["step"].tolist() == single_rows["step"].tolist() == [3, 6, 8]
    for column in ("train_loss", "lr", "val/eer", "val/auc"):
        assert ddp_rows[column].tolist() == pytest.approx(single_rows[column].tolist(), rel=1e-5)
    state = torch.load(tmp_path / "run_rank0" / "checkpoints" / "last.pt", weights_only=True)
    assert state["resume"]["settings"]["world_size"] == 2
    assert len(state["resume"]["rng"]) == 2  # both ranks' random states, for resuming


def test_global_batches_do_not_depend_on_the_world_size():
    def global_batches(world: int, batch: int) -> list[set[int]]:
        per_rank = []
        for rank in range(world):
            sampler = EpochSampler(26, batch, seed=4, rank=rank, world_size=world)
            sampler.set_epoch(2, start_batch=1)
            indices = [index for index, _ in sampler]
            per_rank.append([indices[i : i + batch] for i in range(0, len(indices), batch)])
        return [set().union(*(ranks[j] for ranks in per_rank)) for j in range(len(per_rank[0]))]

    one = global_batches(1, 6)
    assert len(one) == 26 // 6 - 1 and all(len(b) == 6 for b in one)
    assert global_batches(2, 3) == one == global_batches(3, 2)


def test_torchrun_runs_the_script_with_two_processes(tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "scripts/train.py",
        "debug=fast",
        "image_size=32",
        "max_training_steps=2",
        "log_every=1",
        "tensorboard=false",
        "progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    log = (run_dir / "train.log").read_text()
    assert log.count("step 1/2 ") == 1  # the progress log of rank 0 only
    assert "batch 8 x 2 processes" in log
    assert pd.read_csv(run_dir / "verification.csv")["step"].tolist() == [2]
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["global_step"] == 2 and state["resume"]["settings"]["world_size"] == 2
