"""Learning-rate schedules that need the run's length, which is known only at build time.

``femb.train`` completes a partially configured scheduler with ``optimizer=`` and, when the
schedule takes it, ``total_steps=`` (the run's length in global steps). Plain torch schedulers
(``MultiStepLR``, ``StepLR``, ...) are used as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR


def _warmup_then(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    decay: Callable[[float], float],
) -> LambdaLR:
    """LambdaLR: linear warm-up for ``warmup_steps``, then ``decay(progress in [0, 1])``."""
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1.")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}).")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return decay(min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return LambdaLR(optimizer, factor)


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``; stepped every global step.

    Args:
        optimizer: The optimizer whose groups' lr are scaled.
        total_steps: Length of the run in global steps.
        warmup_steps: Steps of linear warm-up from ``lr / warmup_steps`` to ``lr``.
        min_lr_ratio: Final lr as a fraction of the initial lr, in [0, 1].
    """
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1].")
    return _warmup_then(
        optimizer,
        total_steps,
        warmup_steps,
        lambda p: min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)),
    )


def polynomial(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, power: float = 2.0
) -> LambdaLR:
    """Linear warm-up, then ``(1 - progress) ** power`` decay to 0 (insightface uses power 2)."""
    return _warmup_then(optimizer, total_steps, warmup_steps, lambda p: (1 - p) ** power)
