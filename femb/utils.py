"""Small helpers shared by the trainer and the scripts: devices, seeding, RNG states, signals."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from types import FrameType
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a device into a ``torch.device``.

    Raises:
        ValueError: For an unknown name, or CUDA asked for where none is available.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:<index>'."
        ) from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} but CUDA is not available here; use device=cpu or device=auto."
        )
    return resolved


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive NumPy/Python seeds from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def init_train_worker(worker_id: int) -> None:
    """``worker_init_fn`` of ``fit``'s training loader: seeds, and signals left to the trainer.

    Ctrl-C reaches every process of the terminal's process group and a batch scheduler's
    SIGTERM often reaches every process of the job. The trainer finishes its step and writes a
    checkpoint on either, so a worker must not die of them mid-step: torch's SIGCHLD handler
    would then raise in the trainer at an arbitrary point. A worker therefore ignores SIGINT
    (the trainer shuts the workers down) and leaves quietly, with exit status 0, on SIGTERM
    (which is also how the DataLoader stops a worker that does not answer).
    """
    seed_worker(worker_id)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def capture_rng_state() -> dict[str, Any]:
    """The states of every global random generator of this process.

    Returns:
        ``{"torch": ByteTensor, "cuda": [ByteTensor per device], "numpy": {...},
        "python": tuple}``, made of tensors and plain containers only, so that a checkpoint
        holding it loads with ``torch.load(..., weights_only=True)``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`: set every global generator back to the captured state.

    CUDA states are restored only when the counts of devices agree (a run resumed on other
    hardware keeps its fresh CUDA generators).
    """
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class StopSignals:
    """Turn SIGINT and SIGTERM into a request to stop after the current training step.

    Used as a context manager around the training loop. The first signal is only recorded
    (:attr:`requested`); the loop finishes its step, writes a checkpoint and stops. A second
    signal of the same kind restores the previous handler and re-delivers itself, so pressing
    Ctrl-C twice aborts at once, as without this class. Handlers can only be installed from the
    main thread; elsewhere (a training thread of a notebook, say) the class does nothing and
    :attr:`requested` stays None. The previous handlers are restored on exit.

    Args:
        enabled: Install the handlers; False makes the context manager a no-op.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.requested = None
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    @property
    def name(self) -> str:
        """Name of the requested signal, e.g. ``"SIGTERM"`` (empty when none)."""
        return signal.Signals(self.requested).name if self.requested is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self.requested = signum
        log.warning(
            "Received %s: finishing the current step, then writing a checkpoint and stopping "
            "(send it again to stop at once, without a checkpoint).",
            signal.Signals(signum).name,
        )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
