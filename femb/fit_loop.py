"""The machinery of :meth:`femb.model.FaceEmbeddingModel.fit`, apart from the loop itself.

One optimizer step (:class:`Stepper`: forward, agreement of the ranks, backward, clipping,
update), the module the step trains through (:class:`Objective`), the running state of the
loop (:class:`FitState`), the checks of ``fit``'s arguments, reading and checking a checkpoint
to resume from, and the training ``DataLoader``. ``femb.model`` holds the loop and the model;
nothing here is needed to use femb, only to change how it trains.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from femb import distributed
from femb.run_io import load_training_checkpoint, resume_checkpoint_path
from femb.utils import StopSignals, init_train_worker

if TYPE_CHECKING:
    from femb.model import FaceEmbeddingModel

log = logging.getLogger(__name__)

#: Validation metrics where a smaller value is better; every other metric is "higher is better".
LOWER_IS_BETTER = ("eer",)

#: ``fit(precision=...)``: float32, bfloat16 autocast, float16 autocast with loss scaling.
PRECISIONS = ("bf16", "fp16", "fp32")

#: ``fit(nonfinite=...)``: what a NaN or infinite loss does.
NONFINITE_POLICIES = ("raise", "skip")


class LoaderStopped(Exception):
    """The training DataLoader failed after a stop signal (its workers were signalled too)."""


class Objective(nn.Module):
    """Backbone (under autocast, maybe compiled) + header + loss as one module.

    ``fit`` trains through this module so that a single ``DistributedDataParallel`` wraps both
    the backbone and the header: the gradients of both are all-reduced and the buffers of both
    broadcast from rank 0 (with a sharded header, ``embed`` is the DDP-wrapped backbone
    instead). Autocast covers the backbone only; the headers compute their margin math in
    float32 and the loss sees float32 logits.
    """

    def __init__(
        self, model: FaceEmbeddingModel, embed: Any, device: torch.device, precision: str
    ) -> None:
        super().__init__()
        self.model = model
        # A plain attribute, not a submodule: a compiled backbone shares the backbone's
        # parameters, which must be registered once only.
        self.__dict__["embed"] = embed
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, 3, H, W), (B,) -> total loss and its parts (see ``training_step``)."""
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None):
            embeddings = self.embed(images)
        return self.model.objective(embeddings, labels)


@dataclass
class StepResult:
    loss: float  # mean over all ranks
    parts: dict[str, torch.Tensor]
    skipped: bool  # non-finite loss, batch skipped
    stop: bool  # some rank received a stop signal


class Stepper:
    """One optimizer step: forward, agreement of the ranks, backward, clipping, update.

    The ranks agree in one all-reduce on the mean loss, on whether any rank's loss is
    non-finite (then every rank skips the batch, or raises) and on whether any rank received a
    stop signal (then every rank stops after this step).
    """

    def __init__(
        self,
        objective: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        clip_grad_norm: float | None,
        nonfinite: str,
        max_nonfinite_skips: int,
        where: Callable[[], str],
        sharded: Iterable[nn.Parameter] = (),
    ) -> None:
        """``sharded``: parameters split over the ranks (a model-parallel header)."""
        self.objective = objective
        self.optimizer = optimizer
        self.scaler = scaler
        self.clip_grad_norm = clip_grad_norm
        self.nonfinite = nonfinite
        self.max_nonfinite_skips = max_nonfinite_skips
        self.where = where
        self.consecutive_skips = 0
        self.total_skips = 0
        self.grad_norm: float | None = None
        self.sharded = list(sharded)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, stop_requested: Callable[[], bool]
    ) -> StepResult:
        """Train on one batch; ``stop_requested`` says whether this rank received a stop
        signal (asked at the agreement, and again at the end in a single process)."""
        loss, parts = self.objective(images, labels)
        mean_loss, nonfinite, stop = self._agree(loss, stop_requested())
        if nonfinite:
            self._on_nonfinite(mean_loss)
            return StepResult(mean_loss, parts, skipped=True, stop=stop or _alone(stop_requested))
        self.consecutive_skips = 0

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not scaled ones
            self.grad_norm = self._clip()
        # Under fp16 every rank's GradScaler reaches the same skip decision also with a sharded
        # header: the backbone's gradients are all-reduced (an overflow reaches every rank),
        # the centres and their gradients are float32 (the loss scale that float16 backbone
        # gradients tolerate is far inside float32's range), and a non-finite loss was caught
        # above on all ranks at once.
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.is_enabled():
            # A step the GradScaler skipped (overflow) still counts as a global step and the
            # schedulers advance with it; tell torch's schedulers so, else the first skipped
            # step makes them warn that they step before the optimizer.
            self.optimizer._opt_called = True  # type: ignore[attr-defined]
        # A signal that arrived during this step stops after it; in a multi-process run the
        # ranks can only agree at the next step's all-reduce.
        return StepResult(mean_loss, parts, skipped=False, stop=stop or _alone(stop_requested))

    def _clip(self) -> float:
        """Clip all gradients to a total norm of ``clip_grad_norm``; return the norm before.

        Sharded parameters (Partial FC's centres) hold different rows on every rank, so their
        squared norms are summed over the ranks; the replicated parameters (all-reduced by
        DDP) count once. The norm is that of the single-process gradient.
        """
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        sharded_ids = {id(p) for p in self.sharded}
        if not sharded_ids:
            return float(torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm))
        sharded = [p.grad for p in params if p.grad is not None and id(p) in sharded_ids]
        replicated = [p.grad for p in params if p.grad is not None and id(p) not in sharded_ids]
        sharded_sq = torch.nn.utils.get_total_norm(sharded).float().square()
        total = torch.sqrt(
            torch.nn.utils.get_total_norm(replicated).float().square()
            + distributed.all_reduce_sum(sharded_sq)
        )
        torch.nn.utils.clip_grads_with_norm_(params, self.clip_grad_norm, total)
        return float(total)

    def scalars(self) -> dict[str, float]:
        """Diagnostics for the progress log: grad norm, fp16 loss scale, skipped batches."""
        values: dict[str, float] = {}
        if self.grad_norm is not None:
            values["train/grad_norm"] = self.grad_norm
        if self.scaler.is_enabled():
            values["train/grad_scale"] = float(self.scaler.get_scale())
        if self.nonfinite == "skip":
            values["train/nonfinite_skips"] = float(self.total_skips)
        return values

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive_skips, "total": self.total_skips}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.consecutive_skips = int(state["consecutive"])
        self.total_skips = int(state["total"])

    def _agree(self, loss: torch.Tensor, stop: bool) -> tuple[float, bool, bool]:
        world = distributed.world_size()
        if world == 1:
            value = loss.item()
            return value, not math.isfinite(value), stop
        detached = loss.detach().float()
        flags = torch.stack(
            [
                detached,
                (~torch.isfinite(detached)).float(),
                torch.tensor(float(stop), device=detached.device),
            ]
        )
        total, nonfinite, stops = distributed.all_reduce_sum(flags).tolist()
        return total / world, nonfinite > 0, stops > 0

    def _on_nonfinite(self, loss: float) -> None:
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"non-finite loss {loss} at {self.where()}. Lower the learning rate, set "
                "clip_grad_norm, check the data, or set nonfinite=skip to skip such batches."
            )
        self.consecutive_skips += 1
        self.total_skips += 1
        log.warning(
            "non-finite loss %s at %s: batch skipped (%d in a row, %d in all)",
            loss,
            self.where(),
            self.consecutive_skips,
            self.total_skips,
        )
        if self.consecutive_skips >= self.max_nonfinite_skips:
            raise FloatingPointError(
                f"{self.consecutive_skips} consecutive non-finite losses "
                f"(max_nonfinite_skips={self.max_nonfinite_skips}), the last at {self.where()}. "
                "Training diverged: lower the learning rate, set clip_grad_norm or check the "
                "data, then resume from the last checkpoint."
            )


class FitState:
    """Running losses, throughput, the best monitored metric and the position in the epoch of
    one ``fit`` call."""

    def __init__(self, monitor: str | None) -> None:
        self.monitor = monitor
        self.batches_in_epoch = 0
        self.last_checkpoint: Path | None = None
        self.last_eval_step = -1
        self.final_metrics: dict[str, float] = {}
        self.best_key: str | None = None
        self.best_value = math.nan
        self._epoch = [0.0, 0]
        self._interval = [0.0, 0]
        self._window = [0.0, 0]
        self._last_interval = math.nan
        self._images = 0
        self._seconds = 0.0
        self._tick = time.perf_counter()

    def restart_clock(self) -> None:
        """Start timing the next step now (time spent before, e.g. evaluating, is left out)."""
        self._tick = time.perf_counter()

    def record(self, loss: float, images: int) -> None:
        """Add one optimizer step: its loss and images, and the time since the last one."""
        for acc in (self._epoch, self._interval, self._window):
            acc[0] += loss
            acc[1] += 1
        now = time.perf_counter()
        self._images += images
        self._seconds += now - self._tick
        self._tick = now

    def new_epoch(self) -> None:
        self._epoch = [0.0, 0]

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the running means and the best metric."""
        return {
            "last_eval_step": self.last_eval_step,
            "final_metrics": dict(self.final_metrics),
            "best_key": self.best_key,
            "best_value": self.best_value,
            "epoch": list(self._epoch),
            "interval": list(self._interval),
            "window": list(self._window),
            "last_interval": self._last_interval,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_eval_step = int(state["last_eval_step"])
        self.final_metrics = dict(state["final_metrics"])
        self.best_key = state["best_key"]
        self.best_value = float(state["best_value"])
        self._epoch = list(state["epoch"])
        self._interval = list(state["interval"])
        self._window = list(state["window"])
        self._last_interval = float(state["last_interval"])

    def epoch_mean(self) -> float:
        return self._epoch[0] / self._epoch[1] if self._epoch[1] else math.nan

    def window_mean(self) -> float:
        """Mean loss since the previous progress line."""
        mean = self._window[0] / self._window[1] if self._window[1] else math.nan
        self._window = [0.0, 0]
        return mean

    def interval_mean(self, reset: bool = True) -> float:
        """Mean loss since the previous evaluation."""
        if self._interval[1]:
            self._last_interval = self._interval[0] / self._interval[1]
        if reset:
            self._interval = [0.0, 0]
        return self._last_interval

    def images_per_s(self) -> float:
        return self._images / self._seconds if self._seconds > 0 else 0.0

    def update_best(self, metrics: dict[str, float], first_set: str) -> bool:
        """Track the best monitored value; True when this evaluation is the new best."""
        if self.monitor is None:
            return False
        key = f"{first_set}/{self.monitor}"
        if key not in metrics:
            raise ValueError(
                f"monitor={self.monitor!r} is not among the evaluator's metrics "
                f"{sorted(k.split('/', 1)[1] for k in metrics)}; pick one of "
                "those or set monitor=None."
            )
        value = metrics[key]
        lower = self.monitor in LOWER_IS_BETTER
        if math.isnan(value):
            return False
        if (
            self.best_key is None
            or math.isnan(self.best_value)
            or (value < self.best_value if lower else value > self.best_value)
        ):
            self.best_key, self.best_value = key, value
            return True
        return False


def sharded_parameters(header: nn.Module) -> list[nn.Parameter]:
    """The header's parameters that are split over the ranks (Partial FC in a DDP run)."""
    sharded = getattr(header, "sharded_parameters", None)
    return list(sharded()) if sharded is not None else []


def _sharded_slots(optimizer: torch.optim.Optimizer, header: nn.Module) -> dict[int, nn.Parameter]:
    """Index in ``optimizer.state_dict()["state"]`` -> parameter, for the sharded ones."""
    sharded = {id(p) for p in sharded_parameters(header)}
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: p for i, p in enumerate(flat) if id(p) in sharded}


def full_optimizer_state(optimizer: torch.optim.Optimizer, header: nn.Module) -> dict:
    """``optimizer.state_dict()`` with the states of a sharded header gathered to all C rows.

    Per-parameter tensors shaped like a sharded parameter (SGD's momentum, Adam's moments) are
    all-gathered, so a checkpoint holds the optimizer state of every class and resumes on any
    world size (:func:`local_optimizer_state`). Collective when ``header`` is sharded: call it
    on all ranks. The optimizer's own state is not modified.
    """
    state = optimizer.state_dict()
    slots = _sharded_slots(optimizer, header)
    if not slots:
        return state
    per_param = dict(state["state"])
    for index in sorted(slots):  # the same collectives in the same order on every rank
        entry = per_param.get(index)
        if entry is None:
            continue  # not stepped yet, on any rank
        shape = slots[index].shape
        per_param[index] = {
            key: header.gather_rows(value)
            if isinstance(value, torch.Tensor) and value.shape == shape
            else value
            for key, value in entry.items()
        }
    return {**state, "state": per_param}


def local_optimizer_state(
    state: dict, optimizer: torch.optim.Optimizer, header: nn.Module
) -> dict:
    """The inverse of :func:`full_optimizer_state`: this rank's rows of a sharded header's
    optimizer states, ready for ``optimizer.load_state_dict``."""
    slots = _sharded_slots(optimizer, header)
    if not slots:
        return state
    per_param = dict(state["state"])
    for index, param in slots.items():
        full_shape = (header.out_features, *param.shape[1:])
        entry = per_param.get(index)
        if entry is None:
            continue
        per_param[index] = {
            key: header.local_rows(value)
            if isinstance(value, torch.Tensor) and tuple(value.shape) == full_shape
            else value
            for key, value in entry.items()
        }
    return {**state, "state": per_param}


def as_val_sets(val_dataset: Dataset | Mapping[str, Dataset] | None) -> dict[str, Dataset]:
    if val_dataset is None:
        return {}
    if isinstance(val_dataset, Mapping):
        return dict(val_dataset)
    return {"val": val_dataset}


def labels_of(dataset: Dataset) -> Any:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [int(dataset[i][1]) for i in range(len(dataset))]
    return torch.as_tensor(labels)


def score(evaluator: Any, dataset: Dataset, embeddings: torch.Tensor) -> tuple[dict, Any]:
    """Score a validation set: ``(metrics, roc)``; ``roc`` is None for an evaluator without
    ``compute`` (any callable returning a metrics dict is a valid evaluator)."""
    args = (embeddings, labels_of(dataset))
    kwargs = {key: getattr(dataset, key, None) for key in ("pairs", "issame", "folds")}
    compute = getattr(evaluator, "compute", None)
    if compute is None:
        return evaluator(*args, **kwargs), None
    result = compute(*args, **kwargs)
    return result.metrics, result.roc


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def check_fit_args(
    batch_size: int,
    evaluator: Any,
    val_sets: dict[str, Dataset],
    evaluation_steps: int,
    max_training_steps: int,
    max_epochs: int,
    train_dataset: Dataset,
    header: nn.Module,
) -> None:
    if max_training_steps < 0 or max_epochs < 0:
        raise ValueError(
            f"max_training_steps={max_training_steps} and max_epochs={max_epochs} "
            "must not be negative."
        )
    if max_training_steps == 0 and max_epochs == 0:
        raise ValueError(
            "max_training_steps and max_epochs are both 0, so training would "
            "never stop: set max_training_steps > 0 (it wins) or max_epochs > 0."
        )
    if batch_size < 2:
        raise ValueError(
            f"batch_size={batch_size}: BatchNorm needs at least 2 images per "
            "batch; use batch_size >= 2."
        )
    if evaluation_steps < 0:
        raise ValueError(f"evaluation_steps={evaluation_steps} must be >= 0 (0: every epoch).")
    if evaluator is not None and not val_sets:
        raise ValueError(
            "an evaluator was given but no val_dataset: pass val_dataset=... or evaluator=None."
        )
    if val_sets and evaluator is None:
        raise ValueError(
            "a val_dataset was given but no evaluator: pass "
            "evaluator=VerificationEvaluator(...) or val_dataset=None."
        )
    if len(train_dataset) < batch_size:
        raise ValueError(
            f"the training set has {len(train_dataset)} images, fewer than "
            f"batch_size={batch_size}, so no full batch can be drawn (batches of "
            "an incomplete size are dropped for BatchNorm): lower batch_size."
        )
    num_classes = getattr(train_dataset, "num_classes", None)
    out_features = getattr(header, "out_features", None)
    if num_classes is not None and out_features is not None and num_classes > out_features:
        raise ValueError(
            f"the training set has {num_classes} identities but the header has "
            f"out_features={out_features}: build the header with "
            f"out_features={num_classes}."
        )


def check_trainer_args(
    precision: str,
    nonfinite: str,
    max_nonfinite_skips: int,
    clip_grad_norm: float | None,
    checkpoint_steps: int,
    num_workers: int,
    persistent_workers: bool | None,
    prefetch_factor: int | None,
) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; use one of {sorted(PRECISIONS)}.")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite={nonfinite!r}; use one of {sorted(NONFINITE_POLICIES)}.")
    if max_nonfinite_skips < 1:
        raise ValueError(f"max_nonfinite_skips={max_nonfinite_skips} must be >= 1.")
    if clip_grad_norm is not None and not clip_grad_norm > 0:
        raise ValueError(
            f"clip_grad_norm={clip_grad_norm} must be > 0 (the largest gradient norm), or "
            "None for no clipping."
        )
    if checkpoint_steps < 0:
        raise ValueError(
            f"checkpoint_steps={checkpoint_steps} must be >= 0 (0: checkpoints only at "
            "evaluations and at the end)."
        )
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0.")
    if num_workers == 0 and (persistent_workers or prefetch_factor is not None):
        raise ValueError(
            f"persistent_workers={persistent_workers} and prefetch_factor={prefetch_factor} "
            "apply to DataLoader workers but num_workers=0: set num_workers > 0 or leave them "
            "at None."
        )
    if prefetch_factor is not None and prefetch_factor < 1:
        raise ValueError(f"prefetch_factor={prefetch_factor} must be >= 1 (or None).")


def check_precision(precision: str, device: torch.device, sync_batchnorm: bool) -> None:
    if precision == "fp16" and device.type != "cuda":
        # Supported by torch (autocast and GradScaler on the CPU), and what lets the loss
        # scaling be tested without a GPU, but few CPUs have fast float16 kernels.
        log.warning(
            "precision=fp16 on %s: float16 autocast with loss scaling runs, but is usually "
            "slower than fp32 here; bf16 is the CPU's mixed precision.",
            device,
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"precision=bf16 but {torch.cuda.get_device_name(device)} has no bfloat16 support; "
            "use precision=fp16."
        )
    if sync_batchnorm and device.type != "cuda":
        raise ValueError(
            f"sync_batchnorm=true needs CUDA devices (torch's SyncBatchNorm), not {device}; "
            "set sync_batchnorm=false."
        )


def read_resume(
    resume_from: str | Path | Mapping[str, Any] | None, out_dir: Path
) -> tuple[dict[str, Any] | None, Path | None]:
    """The checkpoint dict to resume from and its file (rank 0 resolves, every rank reads)."""
    if resume_from is None:
        return None, None
    if isinstance(resume_from, Mapping):
        if "resume" not in resume_from or resume_from["resume"] is None:
            raise ValueError(
                "resume_from is a dict without training state ('resume' entry); pass a "
                "checkpoint written by fit."
            )
        return dict(resume_from), None
    path = distributed.broadcast_object(
        resume_checkpoint_path(resume_from, out_dir) if distributed.is_main_process() else None
    )
    if path is None:
        log.info("resume=auto: no checkpoint in %s, starting a fresh run.", out_dir)
        return None, None
    log.info("Resuming from %s", path)
    return load_training_checkpoint(path), Path(path)


#: Config keys that may differ between a checkpoint and the run resuming it without notice.
_RESUME_SILENT_KEYS = (
    "data_root",
    "device",
    "log_every",
    "num_workers",
    "output_dir",
    "persistent_workers",
    "pin_memory",
    "prefetch_factor",
    "progress",
    "resume",
)

#: Which value wins when the checkpoint and the resuming run disagree; other keys: the run's.
_RESUME_RULES = {
    "seed": "the checkpoint's seed is kept, so that the interrupted epoch's order is replayed",
    "batch_size": (
        "the run's batch size is used; the interrupted epoch continues at the same image "
        "count (rounded down to a whole batch), so the run is no longer an exact continuation"
    ),
    "world_size": (
        "the run's process count is used; the interrupted epoch continues at the same image "
        "count (rounded down to a whole batch)"
    ),
    "train_size": (
        "the run's training set is used; the epoch position is kept as an image count, "
        "which no longer means the same images"
    ),
    "backbone": "the checkpoint's weights are loaded into the run's model (they must fit)",
    "header": "the checkpoint's weights are loaded into the run's header (they must fit)",
    "embed_dim": "the checkpoint's weights are loaded into the run's model (they must fit)",
    "optimizer": (
        "the checkpoint's optimizer state wins, including each group's lr, momentum and "
        "weight decay"
    ),
    "scheduler": (
        "the checkpoint's scheduler progress is loaded into the run's schedule (whose length "
        "follows the run's stop criterion)"
    ),
    "precision": (
        "the run's precision is used (the fp16 loss scale carries over from fp16 runs only)"
    ),
}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def warn_resume_conflicts(
    checkpoint: Mapping[str, Any],
    settings: Mapping[str, Any],
    config: Mapping[str, Any] | None,
) -> int:
    """Log every difference between the checkpoint's settings and the run's, with the rule of
    :data:`_RESUME_RULES`; returns the seed to use (the checkpoint's)."""
    saved = dict(checkpoint["resume"]["settings"])
    differences = {
        key: (saved.get(key), value) for key, value in settings.items() if saved.get(key) != value
    }
    old_config, new_config = checkpoint.get("config"), config
    if old_config is not None and new_config is not None:
        old, new = _flatten(old_config), _flatten(dict(new_config))
        for key in sorted(set(old) | set(new)):
            top = key.split(".", 1)[0]
            if top in _RESUME_SILENT_KEYS or top in settings or old.get(key) == new.get(key):
                continue
            differences[key] = (old.get(key), new.get(key))
    for key, (was, now) in differences.items():
        rule = _RESUME_RULES.get(key.split(".", 1)[0], "the run's value is used from here on")
        log.warning("resume: %s is %r in the checkpoint but %r now: %s.", key, was, now, rule)
    return int(saved["seed"])


def train_loader(
    dataset: Dataset,
    sampler: distributed.EpochSampler,
    device: torch.device,
    num_workers: int,
    pin_memory: bool | None,
    persistent_workers: bool | None,
    prefetch_factor: int | None,
    seed: int,
) -> DataLoader:
    workers: dict[str, Any] = {}
    if num_workers > 0:
        workers["persistent_workers"] = True if persistent_workers is None else persistent_workers
        if prefetch_factor is not None:
            workers["prefetch_factor"] = prefetch_factor
    return DataLoader(
        distributed.SeededDataset(dataset),
        batch_size=sampler.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        # Draws only the workers' base seeds, so the global generator is left alone.
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=init_train_worker,
        pin_memory=device.type == "cuda" if pin_memory is None else pin_memory,
        **workers,
    )


def batches(loader: DataLoader, signals: StopSignals) -> Iterator[Any]:
    """The loader's batches; a loader failure after a stop signal raises ``LoaderStopped``."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError:
            if signals.requested is None:
                raise
            raise LoaderStopped() from None
        yield batch


def to_device(
    images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def _alone(stop_requested: Callable[[], bool]) -> bool:
    """``stop_requested()`` in a single process; False in a multi-process run (the ranks decide
    together, in :meth:`Stepper._agree`)."""
    return distributed.world_size() == 1 and stop_requested()


def finished(model: FaceEmbeddingModel, max_training_steps: int, max_epochs: int) -> bool:
    if max_training_steps:
        return model.global_step >= max_training_steps
    return model.epoch >= max_epochs
