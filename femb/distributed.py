"""Multi-process (DDP) training with ``torchrun``: process group, rank-zero logging, sampling.

``torchrun --nproc_per_node=N scripts/train.py ...`` starts N copies of the trainer with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their
environment. :func:`distributed_from_env` joins them into one process group (NCCL when the run
uses CUDA, gloo on the CPU); without those variables, or with ``WORLD_SIZE=1``, it does nothing
and the same command trains in one process. Everything else in femb asks this module for the
rank and world size, which are 0 and 1 when no process group exists.

Conventions (those of insightface's ``arcface_torch``):

* ``batch_size`` is the batch of one process; a step of the run sees ``batch_size x
  world_size`` images, so scale the learning rate with the world size.
* Only rank 0 writes files (CSV, TensorBoard, checkpoints) and evaluates; the other ranks wait
  at a barrier. Log records of the other ranks are dropped below WARNING by
  :class:`RankZeroFilter`.
* Every epoch is one permutation of the training set shared by all ranks
  (:class:`EpochSampler`), so that a run on N processes sees the same global batches as a run
  on one process with an N times larger batch.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler, get_worker_info

log = logging.getLogger(__name__)

#: How long a rank waits at a collective, e.g. while rank 0 evaluates. NCCL's default (10
#: minutes) is shorter than a large validation run.
TIMEOUT = timedelta(minutes=30)


def is_initialized() -> bool:
    """Whether a process group exists (a DDP run)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the run; 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank in ``[0, world_size)``; 0 without a process group."""
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``); 0 without a process group."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0, the only process that evaluates and writes files."""
    return rank() == 0


def init_from_env(device: str | torch.device = "auto") -> bool:
    """Join the process group that ``torchrun`` describes in the environment.

    Args:
        device: The run's device setting; ``"cpu"`` selects gloo even where CUDA exists.

    Returns:
        True when this call created the process group (then it should also destroy it);
        False for a single-process run or when a process group already exists.

    Raises:
        ValueError: ``WORLD_SIZE`` > 1 without ``RANK`` or ``LOCAL_RANK``, or more local ranks
            than visible GPUs.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or is_initialized():
        return False
    required = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    missing = [key for key in required if key not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={size} but {missing} are not set: start multi-process runs with "
            "torchrun --nproc_per_node=N scripts/train.py ..., which sets them."
        )
    use_cuda = torch.cuda.is_available() and str(device) != "cpu"
    local = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPUs are visible: "
                "use --nproc_per_node <= the number of GPUs."
            )
        torch.cuda.set_device(local)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", timeout=TIMEOUT)
    log.info(
        "Joined process group: rank %d of %d (local rank %d, backend %s)",
        rank(),
        world_size(),
        local,
        backend,
    )
    return True


@contextmanager
def distributed_from_env(device: str | torch.device = "auto") -> Iterator[bool]:
    """Context of one training run: the process group (if torchrun asked for one) and
    rank-zero logging; both are undone on exit.

    Yields:
        Whether this is a multi-process run.
    """
    created = init_from_env(device)
    log_filter = RankZeroFilter()
    handlers = logging.getLogger().handlers if not is_main_process() else []
    for handler in handlers:
        handler.addFilter(log_filter)
    try:
        yield is_initialized()
    finally:
        for handler in handlers:
            handler.removeFilter(log_filter)
        if created:
            dist.destroy_process_group()


class RankZeroFilter(logging.Filter):
    """Log filter of ranks > 0: only warnings and errors pass, prefixed with the rank.

    Attached by :func:`distributed_from_env` to the root logger's handlers (Hydra's console and
    ``train.log`` handlers), so that N processes print one progress log, yet a failure on any
    rank is seen.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if rank() == 0:
            return True
        if record.levelno < logging.WARNING:
            return False
        if not getattr(record, "_femb_rank_prefixed", False):
            record.msg = f"[rank {rank()}] {record.msg}"
            record._femb_rank_prefixed = True
        return True


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda`` without an index means ``cuda:LOCAL_RANK`` in DDP."""
    if device.type == "cuda" and device.index is None and is_initialized():
        return torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, in place, and return it (identity in a single process)."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object; identity in a single process)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single process)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed that depends on both values (SeedSequence mixing, not ``seed + epoch``)."""
    words = np.random.SeedSequence([seed % 2**63, epoch]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffled epochs split across ranks, resumable mid-epoch, with a seed for every sample.

    Epoch ``e`` is the permutation ``perm_e`` of the dataset drawn from a generator seeded by
    ``(seed, e)``, a pure function of the two (``DistributedSampler`` semantics), so no
    generator state has to be saved to replay an epoch. Only the first ``G * floor(N / G)``
    positions are used, ``G = batch_size * world_size``; global batch ``j`` is the window
    ``perm_e[j*G : (j+1)*G]`` and rank ``r`` takes every ``world_size``-th position of it from
    ``r`` on. So the global batches do not depend on the world size: one process with batch
    ``2B`` and two ranks with ``B`` each see the same images at every step.

    Each position also draws a 63-bit sample seed. The sampler yields ``(index, seed)`` and
    :class:`SeededDataset` seeds the global generators with it while it loads that sample, so a
    random augmentation depends on the epoch and position only: not on the number of workers,
    on which worker loaded the sample, or on whether the run was resumed.

    Args:
        num_samples: Length of the dataset.
        batch_size: Batch of one rank.
        seed: Base seed of the permutations.
        rank: This rank.
        world_size: Number of ranks.
    """

    def __init__(
        self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Full global batches (= optimizer steps) in one epoch."""
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Draw epoch ``epoch`` from global batch ``start_batch`` on (the earlier ones are
        skipped without being loaded; used to resume mid-epoch)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(
                f"start_batch={start_batch} outside [0, {self.batches_per_epoch}] batches."
            )
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        perm = torch.randperm(self.num_samples, generator=generator)
        seeds = torch.randint(0, 2**62, (self.num_samples,), generator=generator)
        group = self.batch_size * self.world_size
        mine = slice(
            self.start_batch * group + self.rank, self.batches_per_epoch * group, self.world_size
        )
        yield from zip(perm[mine].tolist(), seeds[mine].tolist(), strict=True)


class SeededDataset(Dataset):
    """Wraps a dataset so that ``dataset[(index, seed)]`` loads ``index`` under ``seed``.

    While a sample loads, torch's CPU generator, NumPy's and Python's global generators are
    seeded with its seed. In the main process (``num_workers=0``) their previous states are
    restored after each batch (``__getitems__``, which the DataLoader calls with a whole
    batch; saving and restoring NumPy's state costs ~0.1 ms, too much per sample), so data
    loading leaves the training process's random stream alone.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        saved = _global_rng_states() if get_worker_info() is None else None
        try:
            samples = []
            for index, seed in keys:
                torch.default_generator.manual_seed(seed)
                np.random.seed(seed % 2**32)
                random.seed(seed)
                samples.append(self.dataset[index])
            return samples
        finally:
            if saved is not None:
                _set_global_rng_states(saved)


def _global_rng_states() -> tuple[torch.Tensor, Any, Any]:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _set_global_rng_states(states: tuple[torch.Tensor, Any, Any]) -> None:
    torch_state, numpy_state, python_state = states
    torch.set_rng_state(torch_state)
    np.random.set_state(numpy_state)
    random.setstate(python_state)
