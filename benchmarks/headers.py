"""Benchmark femb headers against pytorch-metric-learning (PML) losses on the CPU.

Measures one training step of the classification objective, ``header -> cross-entropy ->
backward`` (PML: ``loss_fn(embeddings, labels) -> backward``; its losses include the
cross-entropy), at batch B, embedding size D and C classes:

* time: median wall time of ``--reps`` steps after ``--warmup`` steps. Candidates that are
  compared (femb ArcFace vs PML ArcFaceLoss, ...) run their steps interleaved, so that load from
  other processes hits both alike;
* memory: peak of the tensor memory allocated during one step by PyTorch's CPU allocator, from
  the memory timeline of ``torch.profiler`` (``profile_memory=True``); tensors alive before the
  step (weights, embeddings) are not counted, the gradients created by the step are. Reported in
  MiB and, after subtracting the unavoidable (C, D) weight gradient, in units of ``B * C * 4``
  bytes (one float32 logit matrix).

Hyperparameters are matched across libraries: ArcFace s = 64, m = 0.5 rad (PML takes degrees:
28.648); CosFace s = 64, m = 0.35; SphereFace A-Softmax m = 4 (multiplicative), logits scaled by
||x||, lambda = 0 (PML has no lambda annealing). Before timing, each pair is checked to give the
same loss from the same weights.

Example::

    .venv/bin/python benchmarks/headers.py --classes 10000 100000

Needs ``pytorch-metric-learning`` (the ``bench`` extra) for the PML columns; without it only femb
is measured.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from femb.headers import (
    AdaFaceHeader,
    ArcFaceHeader,
    CombinedMarginHeader,
    CosFaceHeader,
    CurricularFaceHeader,
    LinearHeader,
    MagFaceHeader,
    SphereFaceHeader,
    SubCenterArcFaceHeader,
)

log = logging.getLogger("benchmarks.headers")


@dataclass
class Candidate:
    """One implementation to measure: a module and how to get its loss."""

    name: str
    library: str
    module: nn.Module
    loss: Callable[[Tensor, Tensor], Tensor]
    times: list[float] = field(default_factory=list)


@dataclass
class Row:
    """Measured numbers of one candidate."""

    classes: int
    name: str
    library: str
    time_s: float
    peak_bytes: int | None
    grad_bytes: int
    ratio: float | None = None


def femb_candidate(name: str, header: nn.Module) -> Candidate:
    def loss(x: Tensor, y: Tensor) -> Tensor:
        logits = header(x, y)
        total = F.cross_entropy(logits.float(), y)
        return total + sum(header.extra_losses.values()) if header.extra_losses else total

    return Candidate(name, "femb", header, loss)


def pml_candidate(name: str, loss_fn: nn.Module) -> Candidate:
    return Candidate(name, "PML", loss_fn, lambda x, y: loss_fn(x, y))


def group_factories(dim: int, classes: int, with_pml: bool) -> list[Callable[[], list[Candidate]]]:
    """Builders of candidate groups; members of a group are compared (timed interleaved).

    Groups are built one at a time so that only one group's (C, D) weights are alive.
    """
    kw = {"in_features": dim, "out_features": classes}

    def paired(name: str, header: nn.Module, pml_name: str, **pml_kw) -> list[Candidate]:
        group = [femb_candidate(name, header)]
        if with_pml:
            from pytorch_metric_learning import losses

            loss_fn = getattr(losses, pml_name)(classes, dim, **pml_kw)
            # Same class weights in both libraries; PML stores them as (D, C).
            loss_fn.W.data.copy_(header.weight.detach().t())
            group.append(pml_candidate(name, loss_fn))
        return group

    def single(name: str, build: Callable[[], nn.Module]) -> Callable[[], list[Candidate]]:
        return lambda: [femb_candidate(name, build())]

    return [
        lambda: paired(
            "ArcFace",
            ArcFaceHeader(**kw, s=64.0, m=0.5),
            "ArcFaceLoss",
            margin=math.degrees(0.5),
            scale=64,
        ),
        lambda: paired(
            "CosFace", CosFaceHeader(**kw, s=64.0, m=0.35), "CosFaceLoss", margin=0.35, scale=64
        ),
        lambda: paired(
            "SphereFace (A-Softmax, m=4)",
            SphereFaceHeader(**kw, m=4, form="original", lambda_base=0.0, lambda_min=0.0),
            "SphereFaceLoss",
            margin=4,
            scale=1,
        ),
        single("Linear (softmax)", lambda: LinearHeader(**kw)),
        single("SphereFace-R (normalized, m=1.7)", lambda: SphereFaceHeader(**kw)),
        single("CombinedMargin (1, 0.5, 0)", lambda: CombinedMarginHeader(**kw)),
        single("MagFace", lambda: MagFaceHeader(**kw)),
        single("AdaFace", lambda: AdaFaceHeader(**kw)),
        single("CurricularFace", lambda: CurricularFaceHeader(**kw)),
        single("Sub-center ArcFace (K=3)", lambda: SubCenterArcFaceHeader(**kw)),
    ]


def make_inputs(batch: int, dim: int, classes: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Norms ~27, inside MagFace's [l_a, u_a] = [10, 110].
    x = torch.randn(batch, dim, generator=gen) * 1.2
    y = torch.randint(0, classes, (batch,), generator=gen)
    return x.requires_grad_(), y


def step(cand: Candidate, x: Tensor, y: Tensor) -> float:
    """One zero-grad/forward/backward; returns the loss."""
    cand.module.zero_grad(set_to_none=True)
    x.grad = None
    loss = cand.loss(x, y)
    loss.backward()
    return float(loss.detach())


def peak_step_bytes(cand: Candidate, x: Tensor, y: Tensor) -> int | None:
    """Peak tensor memory allocated during one step (profiler memory timeline), or None."""
    from torch.profiler import ProfilerActivity, profile

    cand.module.zero_grad(set_to_none=True)
    x.grad = None
    try:
        with profile(
            activities=[ProfilerActivity.CPU],
            profile_memory=True,
            record_shapes=True,
            with_stack=True,
        ) as prof:
            step(cand, x, y)
        # Private but present since torch 2.1; export_memory_timeline builds on it.
        from torch.profiler._memory_profiler import Action

        timeline = prof._memory_profile().timeline
    except Exception as err:  # a broken profiler must not stop the timings
        log.warning("memory profiling failed for %s %s: %s", cand.library, cand.name, err)
        return None
    current = peak = 0
    for _, action, _, size in timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


def measure_group(
    group: list[Candidate], x: Tensor, y: Tensor, classes: int, warmup: int, reps: int
) -> list[Row]:
    """Check that the members agree, time them interleaved, then profile their memory."""
    losses = [step(c, x, y) for c in group]
    if len(losses) > 1 and not math.isclose(losses[0], losses[1], rel_tol=1e-4, abs_tol=1e-4):
        log.warning("%s: femb loss %.6f != PML loss %.6f", group[0].name, *losses[:2])
    for _ in range(warmup - 1):
        for cand in group:
            step(cand, x, y)
    for _ in range(reps):
        for cand in group:
            start = time.perf_counter()
            step(cand, x, y)
            cand.times.append(time.perf_counter() - start)

    rows = []
    for cand in group:
        grads = sum(p.numel() * p.element_size() for p in cand.module.parameters())
        rows.append(
            Row(
                classes,
                cand.name,
                cand.library,
                statistics.median(cand.times),
                peak_step_bytes(cand, x, y),
                grads,
            )
        )
        log.info(
            "C=%d %s %s: %.1f ms (loss %.4f)",
            classes,
            cand.library,
            cand.name,
            1e3 * rows[-1].time_s,
            losses[len(rows) - 1],
        )
    pml = next((r for r in rows if r.library == "PML"), None)
    if pml is not None:
        for row in rows:
            if row.library == "femb":
                row.ratio = row.time_s / pml.time_s
    return rows


def table(rows: list[Row], batch: int) -> str:
    lines = [
        "| C | header | library | time (ms) | femb / PML time | peak step memory (MiB) "
        "| (peak - weight grad) / (B*C*4) |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}x"
        if row.peak_bytes is None:
            mem = rel = "n/a"
        else:
            mem = f"{row.peak_bytes / 2**20:.1f}"
            rel = f"{(row.peak_bytes - row.grad_bytes) / (batch * row.classes * 4):.2f}"
        lines.append(
            f"| {row.classes} | {row.name} | {row.library} | {1e3 * row.time_s:.1f} "
            f"| {ratio} | {mem} | {rel} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads; default: torch's choice"
    )
    parser.add_argument("--no-pml", action="store_true", help="measure femb only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with_pml = not args.no_pml
    if with_pml:
        try:
            import pytorch_metric_learning  # noqa: F401
        except ImportError:
            log.warning(
                "pytorch-metric-learning is not installed; measuring femb only "
                "(pip install pytorch-metric-learning)"
            )
            with_pml = False

    rows: list[Row] = []
    for classes in args.classes:
        torch.manual_seed(args.seed)
        x, y = make_inputs(args.batch_size, args.dim, classes, args.seed)
        for build in group_factories(args.dim, classes, with_pml):
            rows += measure_group(build(), x, y, classes, args.warmup, args.reps)

    print(
        f"B={args.batch_size}, D={args.dim}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.reps} steps after "
        f"{args.warmup} warm-up\n"
    )
    print(table(rows, args.batch_size))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    sys.exit(main())
