"""Training throughput: femb's ``fit`` step against a bare PyTorch loop doing the same work.

Both sides train the same backbone (same initial weights), an ArcFace header and
cross-entropy with SGD (momentum 0.9, weight decay 5e-4) on the same synthetic in-memory batch
stream, with the same precision and memory format, in one process (``num_workers=0``), without
evaluation. femb runs its real ``FaceEmbeddingModel.fit``; its steps are timed between the
header calls of consecutive steps, so a period covers the whole loop iteration (data, step,
scheduler-free bookkeeping, logging) and setup and the final checkpoint are left out. The bare
loop is the minimal loop a user would write (``DataLoader`` over a ``TensorDataset``,
``zero_grad``, ``backward``, ``step``; no per-step ``loss.item()``), timed with a device sync
at both ends. The femb overhead is ``t_femb / t_bare - 1`` per step (goal: <= 5 %). Runs of
the two alternate ``--repeats`` times and the best (fastest) run of each is reported: on a
machine shared with other processes the least disturbed run is the closest to the code's own
cost (the medians are logged too).

FLOPs of one training step are 3 x the forward FLOPs of backbone and header, counted by
``torch.utils.flop_counter.FlopCounterMode`` on a batch of 2 and scaled to the batch; the
machine's matmul peak is the best GFLOP/s of a large ``torch.mm`` in the run's dtype, and the
last column is the share of that peak femb's step reaches.

Examples::

    .venv/bin/python benchmarks/throughput.py                       # CPU, 4 backbones, minutes
    .venv/bin/python benchmarks/throughput.py --backbones iresnet50 --steps 5 --batch-size 16
    bash benchmarks/gpu.sh                                          # CUDA: bf16, batch 256
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from femb import FaceEmbeddingModel
from femb.backbones import build_backbone
from femb.headers import ArcFaceHeader
from femb.utils import resolve_device

log = logging.getLogger("benchmarks.throughput")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Setup:
    """What every measurement of one table shares."""

    device: torch.device
    batch_size: int
    image_size: int
    precision: str
    channels_last: bool
    compile: bool
    classes: int
    steps: int
    warmup: int
    seed: int


def build(name: str, setup: Setup) -> tuple[nn.Module, nn.Module]:
    """Backbone and header with initial weights that depend on the seed only."""
    torch.manual_seed(setup.seed)
    backbone = build_backbone(name, embed_dim=512, input_size=setup.image_size)
    header = ArcFaceHeader(in_features=512, out_features=setup.classes)
    return backbone, header


def synthetic_data(setup: Setup) -> TensorDataset:
    """Random images in [-1, 1] and labels; 16 batches at most (the stream repeats)."""
    batches = min(setup.warmup + setup.steps + 1, 16)
    generator = torch.Generator().manual_seed(setup.seed)
    n = batches * setup.batch_size
    images = torch.rand(n, 3, setup.image_size, setup.image_size, generator=generator) * 2 - 1
    labels = torch.randint(0, setup.classes, (n,), generator=generator)
    return TensorDataset(images, labels)


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


def femb_seconds_per_step(name: str, setup: Setup, data: TensorDataset) -> float:
    """Mean period of ``fit``'s loop over ``setup.steps`` steps after the warm-up."""
    backbone, header = build(name, setup)
    model = FaceEmbeddingModel(backbone=backbone, header=header, loss=nn.CrossEntropyLoss())
    stamps: list[float] = []

    def stamp(module: nn.Module, inputs: object) -> None:
        if module.training:
            stamps.append(time.perf_counter())

    header.register_forward_pre_hook(stamp)
    with tempfile.TemporaryDirectory() as out_dir:
        model.fit(
            train_dataset=data,
            batch_size=setup.batch_size,
            device=setup.device,
            optimizer=make_optimizer(model.params),
            max_training_steps=setup.warmup + setup.steps + 1,
            out_dir=out_dir,
            progress=False,
            log_every=10**9,
            seed=setup.seed,
            precision=setup.precision,
            channels_last=setup.channels_last,
            compile=setup.compile,
            pin_memory=False,  # pinning in the main process only adds a copy here
        )
    window = stamps[setup.warmup : setup.warmup + setup.steps + 1]
    return (window[-1] - window[0]) / setup.steps


def bare_seconds_per_step(name: str, setup: Setup, data: TensorDataset) -> float:
    """Mean step time of a minimal hand-written loop doing the same work."""
    backbone, header = build(name, setup)
    backbone.to(setup.device)
    header.to(setup.device)
    if setup.channels_last:
        backbone.to(memory_format=torch.channels_last)
    embed = torch.compile(backbone) if setup.compile else backbone
    optimizer = make_optimizer([*backbone.parameters(), *header.parameters()])
    dtype = DTYPES[setup.precision]
    scaler = torch.amp.GradScaler(setup.device.type, enabled=setup.precision == "fp16")
    loader = DataLoader(
        data,
        batch_size=setup.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(setup.seed),
    )

    def batches():
        while True:
            yield from loader

    stream = batches()
    start = 0.0
    for step in range(setup.warmup + setup.steps):
        if step == setup.warmup:
            synchronize(setup.device)
            start = time.perf_counter()
        images, labels = next(stream)
        images = images.to(setup.device, non_blocking=True)
        if setup.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(setup.device, non_blocking=True)
        with torch.autocast(setup.device.type, dtype=dtype, enabled=dtype != torch.float32):
            embeddings = embed(images)
        loss = F.cross_entropy(header(embeddings, labels).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    synchronize(setup.device)
    return (time.perf_counter() - start) / setup.steps


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_image(name: str, setup: Setup) -> float:
    """FLOPs of forward + backward of backbone and header for one image: 3 x the forward
    (backward ~ 2 x forward, the usual estimate; torch's counter overcounts the backward of
    grouped convolutions, e.g. MobileFaceNet's depthwise ones, by several times)."""
    backbone, header = build(name, setup)
    backbone.to(setup.device)
    header.to(setup.device)
    images = torch.rand(2, 3, setup.image_size, setup.image_size, device=setup.device)
    labels = torch.tensor([0, 1], device=setup.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        header(backbone(images), labels)
    return 3 * counter.get_total_flops() / 2


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Best GFLOP/s of a square ``torch.mm`` (n = 2048 on the CPU, 8192 on a GPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pools, cuBLAS handles
    best = float("inf")
    for _ in range(3 if device.type == "cpu" else 10):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def measure(name: str, setup: Setup, repeats: int) -> dict[str, float]:
    data = synthetic_data(setup)
    femb_times, bare_times = [], []
    for _ in range(repeats):
        femb_times.append(femb_seconds_per_step(name, setup, data))
        bare_times.append(bare_seconds_per_step(name, setup, data))
        log.info("%s: femb %.3f s/step, bare %.3f s/step", name, femb_times[-1], bare_times[-1])
    log.info(
        "%s: medians femb %.3f s/step, bare %.3f s/step",
        name,
        statistics.median(femb_times),
        statistics.median(bare_times),
    )
    femb, bare = min(femb_times), min(bare_times)
    return {
        "femb_img_s": setup.batch_size / femb,
        "bare_img_s": setup.batch_size / bare,
        "overhead": femb / bare - 1,
        "gflop_img": flops_per_image(name, setup) / 1e9,
    }


def table(rows: dict[str, dict[str, float]], peak: float) -> str:
    lines = [
        "| backbone | GFLOP/img (fwd+bwd) | femb img/s | bare img/s | femb overhead "
        "| femb GFLOP/s | share of matmul peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        gflops = row["gflop_img"] * row["femb_img_s"]
        lines.append(
            f"| {name} | {row['gflop_img']:.2f} | {row['femb_img_s']:.2f} "
            f"| {row['bare_img_s']:.2f} | {100 * row['overhead']:+.1f} % "
            f"| {gflops:.1f} | {100 * gflops / peak:.0f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=["iresnet18", "iresnet50", "mobilefacenet", "tv_resnet18"],
    )
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each side")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--classes", type=int, default=1000, help="identities of the header")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads; default: torch's choice"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    setup = Setup(
        device=device,
        batch_size=args.batch_size,
        image_size=args.image_size,
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
        classes=args.classes,
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
    )
    peak = matmul_peak(device, DTYPES[args.precision])
    rows = {name: measure(name, setup, args.repeats) for name in args.backbones}

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{where}, torch {torch.__version__}, {torch.get_num_threads()} threads; batch "
        f"{args.batch_size}, {args.image_size} px, {args.precision}"
        f"{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''}"
        f", {args.classes} classes; best of {args.repeats} runs of {args.steps} steps after "
        f"{args.warmup} warm-up; {args.precision} matmul peak {peak:.1f} GFLOP/s\n"
    )
    print(table(rows, peak))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("benchmarks.throughput").setLevel(logging.INFO)
    sys.exit(main())
