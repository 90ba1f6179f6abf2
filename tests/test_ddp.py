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
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from femb import FaceEmbeddingModel
from femb.data import SyntheticFaceDataset
from femb.distributed import EpochSampler, distributed_from_env
from femb.evaluation import VerificationEvaluator
from femb.headers import ArcFaceHeader, PartialFCHeader

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


def run(
    out_dir: Path,
    batch_size: int,
    header: str = "arcface",
    steps: int = STEPS,
    **options: Any,
) -> FaceEmbeddingModel:
    """8 steps on 8 synthetic identities; ``header="partial_fc"``: Partial FC (ArcFace margin,
    sharded when run inside a process group), its centres seeded independently of the
    sharding."""
    train_set = SyntheticFaceDataset(
        num_identities=8, images_per_identity=3, image_size=SIZE, split="train", seed=0
    )
    val_set = SyntheticFaceDataset(
        num_identities=3, images_per_identity=3, image_size=SIZE, split="val", seed=0
    )
    torch.manual_seed(1)
    backbone = NoBatchStatsBackbone()
    num_classes = train_set.num_classes
    if header == "partial_fc":
        head = PartialFCHeader(8, num_classes, margin="arcface", s=16.0, m=0.5, seed=11)
    else:
        head = ArcFaceHeader(in_features=8, out_features=num_classes)
    model = FaceEmbeddingModel(backbone=backbone, header=head, loss=nn.CrossEntropyLoss())
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
        max_training_steps=steps,
        out_dir=out_dir,
        progress=False,
        seed=3,
        **options,
    )
    return model


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_rank_env(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives a rank, on the loopback interface; one thread each."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def ddp_worker(rank: int, world: int, port: int, root: str) -> None:
    set_rank_env(rank, world, port)
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


def assert_same_run(run_dir: Path, reference_dir: Path, rtol: float = 1e-5) -> None:
    """Same final weights (the full centre matrix), optimizer state and CSV rows."""
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    reference = torch.load(reference_dir / "checkpoints" / "last.pt", weights_only=True)
    for part in ("backbone", "header"):
        for name, tensor in reference[part].items():
            torch.testing.assert_close(state[part][name], tensor, rtol=rtol, atol=1e-6)
    for index, slots in reference["optimizer"]["state"].items():
        for key, value in slots.items():
            torch.testing.assert_close(
                state["optimizer"]["state"][index][key], value, rtol=rtol, atol=1e-6
            )
    rows = pd.read_csv(run_dir / "verification.csv")
    reference_rows = pd.read_csv(reference_dir / "verification.csv")
    assert rows["step"].tolist() == reference_rows["step"].tolist() == [3, 6, 8]
    for column in ("train_loss", "lr", "val/eer", "val/auc"):
        assert rows[column].tolist() == pytest.approx(reference_rows[column].tolist(), rel=rtol)


CLIP = 0.05  # below the gradient norm of every step here, so clipping is active


def partial_fc_worker(rank: int, world: int, port: int, root: str) -> None:
    set_rank_env(rank, world, port)
    root_dir = Path(root)
    with distributed_from_env("cpu"):
        run(root_dir / "full", 2, "partial_fc", clip_grad_norm=CLIP)
        run(root_dir / "resumed", 2, "partial_fc", steps=6, clip_grad_norm=CLIP)
        if rank == 0:
            shutil.copy(root_dir / "resumed" / "checkpoints" / "last.pt", root_dir / "step6.pt")
        torch.distributed.barrier()
        run(root_dir / "resumed", 2, "partial_fc", clip_grad_norm=CLIP, resume_from="auto")
        model = run(root_dir / "fp16", 2, "partial_fc", precision="fp16")
        torch.save(model.backbone.state_dict(), root_dir / f"fp16_backbone_rank{rank}.pt")


def test_partial_fc_on_two_ranks_trains_resumes_and_clips_like_one_process(tmp_path):
    """Partial FC in fit: DDP over the backbone only, class centres sharded, the gradient norm
    taken over both shards, checkpoints with all centres and their momentum, and resume on the
    same or another world size: all equal to one process with the global batch."""
    mp.spawn(partial_fc_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = tmp_path / "single"
    model = run(single, 4, "partial_fc", clip_grad_norm=CLIP)
    assert model.header.world_size == 1

    state = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    assert state["header"]["weight"].shape == (8, 8)  # all 8 classes, gathered from 2 shards
    momentum = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert (8, 8) in [tuple(m.shape) for m in momentum]
    assert_same_run(tmp_path / "full", single)
    assert_same_run(tmp_path / "resumed", single)  # stopped at 6 on 2 ranks, resumed on 2

    # The 2-rank checkpoint of step 6 continues in one process (world size 2 -> 1).
    run(tmp_path / "one", 4, "partial_fc", clip_grad_norm=CLIP, resume_from=tmp_path / "step6.pt")
    assert_same_run(tmp_path / "one", single)

    # fp16 with loss scaling: both ranks take the same skip decisions (identical backbones),
    # and the weights train and stay finite. The local embedding gradients carry the factor R
    # of the gradient convention, so the loss scale settles lower than in one process.
    ranks = [torch.load(tmp_path / f"fp16_backbone_rank{r}.pt") for r in (0, 1)]
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), name
        assert torch.isfinite(tensor).all()
    run(tmp_path / "fp16_single", 4, "partial_fc", precision="fp16")
    fp16 = [torch.load(tmp_path / d / "checkpoints" / "last.pt") for d in ("fp16", "fp16_single")]
    assert fp16[0]["grad_scaler"]["scale"] <= fp16[1]["grad_scaler"]["scale"] < 2.0**16
    assert torch.isfinite(fp16[0]["header"]["weight"]).all()
    initial = PartialFCHeader(8, 8, margin="arcface", s=16.0, m=0.5, seed=11).weight
    assert not torch.allclose(fp16[0]["header"]["weight"], initial)  # some updates were taken


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


@pytest.mark.parametrize("header", [[], ["header=partial_fc", "clip_grad_norm=5.0"]])
def test_torchrun_runs_the_script_with_two_processes(tmp_path, header):
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
        *header,
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
    if header:  # Partial FC: the checkpoint holds every class, and loads in one process
        from femb.train import load_model

        assert "PartialFCHeader rank 1/2" not in log  # rank 1's INFO lines are dropped
        model = load_model(run_dir)
        assert model.header.world_size == 1
        assert model.header.weight.shape[0] == state["num_classes"]
