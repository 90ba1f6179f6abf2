"""Config to objects to ``fit``: the one function behind ``scripts/train.py``.

``train(cfg)`` takes a composed config of ``conf/train.yaml`` (from ``@hydra.main`` or from
Hydra's compose API in tests and notebooks), builds every part with
``hydra.utils.instantiate`` and returns the final metrics, so that sweepers (Optuna) can
optimise what it returns. Started by ``torchrun``, every process runs ``train(cfg)`` and they
train one model together (see :mod:`femb.distributed`).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from femb import distributed
from femb.config_check import check_config
from femb.data import SkipBadImages
from femb.model import FaceEmbeddingModel, TrainingInterrupted
from femb.run_io import atomic_write
from femb.utils import seed_everything

log = logging.getLogger(__name__)


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that surfaces the target's own error.

    Hydra wraps every exception raised by a ``_target_`` in an ``InstantiationException``;
    re-raising the original keeps its type (``FileNotFoundError`` for missing data,
    ``ValueError`` for a bad value) and its message, which names the problem and the fix.
    """
    try:
        return hydra_instantiate(node, *args, **kwargs)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from err
        raise


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate the datasets, model, optimizer, schedulers and evaluator of a config.

    Returns:
        A dict with keys ``train_set``, ``val_sets`` (name -> dataset), ``model``,
        ``optimizer``, ``lr_epoch_scheduler``, ``lr_global_step_scheduler`` and ``evaluator``.
    """
    seed_everything(cfg.seed)

    log.info("Instantiating train dataset <%s>", cfg.dataset.train._target_)
    train_set = instantiate(cfg.dataset.train)
    if cfg.skip_bad_images:
        train_set = SkipBadImages(train_set, max_bad_fraction=cfg.max_bad_fraction)
    val_sets = {}
    for name, node in (cfg.dataset.get("val") or {}).items():
        log.info("Instantiating validation dataset %r <%s>", name, node._target_)
        val_sets[name] = instantiate(node)

    log.info("Instantiating backbone <%s>", cfg.backbone._target_)
    backbone = instantiate(cfg.backbone)
    # The class count is known only once the training set is read: inject it here.
    log.info(
        "Instantiating header <%s> with %d classes", cfg.header._target_, train_set.num_classes
    )
    header = instantiate(cfg.header, out_features=train_set.num_classes)
    log.info("Instantiating loss <%s>", cfg.loss._target_)
    loss = instantiate(cfg.loss)
    model = FaceEmbeddingModel(backbone=backbone, header=header, loss=loss)

    log.info("Instantiating optimizer <%s>", cfg.optimizer._target_)
    groups = model.param_groups(
        header_lr=cfg.header_lr, header_weight_decay=cfg.header_weight_decay
    )
    optimizer = instantiate(cfg.optimizer)(params=groups)

    schedulers = {"epoch": None, "step": None}
    steps = total_training_steps(cfg, len(train_set), world_size=distributed.world_size())
    interval, scheduler = build_scheduler(cfg.scheduler, optimizer, steps)
    schedulers[interval] = scheduler

    evaluator = None
    if val_sets:
        log.info("Instantiating evaluator <%s>", cfg.evaluator._target_)
        evaluator = instantiate(cfg.evaluator)
    return {
        "train_set": train_set,
        "val_sets": val_sets,
        "model": model,
        "optimizer": optimizer,
        "lr_epoch_scheduler": schedulers["epoch"],
        "lr_global_step_scheduler": schedulers["step"],
        "evaluator": evaluator,
    }


def build_scheduler(
    node: DictConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> tuple[str, Any]:
    """Complete a ``conf/scheduler`` option with the optimizer (and the run's length).

    Args:
        node: ``{interval: step|epoch, scheduler: <partial> | null}``.
        optimizer: The optimizer to schedule.
        total_steps: Global steps of the run, passed as ``total_steps=`` to schedules that
            take it (``femb.schedulers``).

    Returns:
        ``(interval, scheduler)``; the scheduler is None for a constant lr.
    """
    intervals = ("epoch", "step")
    if node.interval not in intervals:
        raise ValueError(f"scheduler.interval={node.interval!r}; use one of {list(intervals)}.")
    if node.get("scheduler") is None:
        return node.interval, None
    log.info("Instantiating %s scheduler <%s>", node.interval, node.scheduler._target_)
    make = instantiate(node.scheduler)
    kwargs: dict[str, Any] = {}
    if "total_steps" in inspect.signature(make).parameters:
        kwargs["total_steps"] = total_steps
    return node.interval, make(optimizer=optimizer, **kwargs)


def total_training_steps(cfg: DictConfig, num_train_images: int, world_size: int = 1) -> int:
    """Global steps the run will take: ``max_training_steps``, else epochs x full batches.

    A global batch is ``batch_size x world_size`` images (``batch_size`` is per process).
    """
    if cfg.max_training_steps > 0:
        return int(cfg.max_training_steps)
    return int(cfg.max_epochs) * (num_train_images // (int(cfg.batch_size) * world_size))


def train(cfg: DictConfig) -> dict[str, float]:
    """Train one model as the config says and write its run directory.

    Under ``torchrun`` every process calls this; they join one process group first (NCCL on
    GPUs, gloo on the CPU) and only rank 0 writes files.

    Args:
        cfg: A composed ``conf/train.yaml``. ``cfg.output_dir`` is the run directory
            (Hydra's ``${hydra:runtime.output_dir}`` by default).

    Returns:
        The final metrics, e.g. ``{"val/eer": ..., "val/auc": ..., "train/loss": ...}``; also
        written to ``metrics.json`` in the run directory.

    Raises:
        SystemExit: With status ``128 + signal`` after SIGINT or SIGTERM stopped the run
            (``checkpoints/last.pt`` then holds the state to continue from with
            ``resume=auto`` or ``resume=<run dir>``).
    """
    check_config(cfg)  # impossible values fail here, before any data is read
    _absolute_data_root(cfg)
    with distributed.distributed_from_env(cfg.device):
        out_dir = Path(cfg.output_dir)
        parts = build(cfg)
        model: FaceEmbeddingModel = parts["model"]
        resolved = OmegaConf.to_container(cfg, resolve=True)
        try:
            metrics = model.fit(
                train_dataset=parts["train_set"],
                batch_size=cfg.batch_size,
                device=cfg.device,
                optimizer=parts["optimizer"],
                lr_epoch_scheduler=parts["lr_epoch_scheduler"],
                lr_global_step_scheduler=parts["lr_global_step_scheduler"],
                evaluator=parts["evaluator"],
                val_dataset=parts["val_sets"] or None,
                evaluation_steps=cfg.evaluation_steps,
                max_training_steps=cfg.max_training_steps,
                max_epochs=cfg.max_epochs,
                tensorboard=cfg.tensorboard,
                out_dir=out_dir,
                num_workers=cfg.num_workers,
                seed=cfg.seed,
                log_every=cfg.log_every,
                progress=cfg.progress,
                monitor=cfg.monitor,
                flip_test=cfg.flip_test,
                projection_samples=cfg.projection_samples,
                config=resolved,
                precision=cfg.precision,
                channels_last=cfg.channels_last,
                compile=cfg.compile,
                clip_grad_norm=cfg.clip_grad_norm,
                checkpoint_steps=cfg.checkpoint_steps,
                resume_from=cfg.resume,
                nonfinite=cfg.nonfinite,
                max_nonfinite_skips=cfg.max_nonfinite_skips,
                handle_signals=cfg.handle_signals,
                sync_batchnorm=cfg.sync_batchnorm,
                pin_memory=cfg.pin_memory,
                persistent_workers=cfg.persistent_workers,
                prefetch_factor=cfg.prefetch_factor,
            )
        except TrainingInterrupted as stop:
            # 128 + signal is the shell's status for a process ended by that signal.
            raise SystemExit(128 + stop.signum) from None
        if distributed.is_main_process():
            _write_summary(out_dir, metrics, model)
            if cfg.tensorboard:
                _write_hparams(out_dir, resolved, metrics, model.global_step)
    return metrics


def _absolute_data_root(cfg: DictConfig) -> None:
    """Pin ``data_root`` (relative to the working directory by default) to an absolute path,
    so that the config stored in the checkpoints finds the data from any directory."""
    if cfg.get("data_root") is None:
        return
    with open_dict(cfg):
        cfg.data_root = str(Path(cfg.data_root).expanduser().resolve())


def _write_hparams(out_dir: Path, resolved: dict, metrics: dict, step: int) -> None:
    """The run's hyperparameters beside its final metrics, for TensorBoard's HParams tab."""
    from hydra.core.hydra_config import HydraConfig

    from femb.analysis import write_hparams

    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else None
    write_hparams(out_dir, resolved, metrics, step=step, choices=choices)


def _write_summary(out_dir: Path, metrics: dict[str, float], model: FaceEmbeddingModel) -> None:
    summary = {
        k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()
    }
    summary["global_step"] = model.global_step
    summary["epoch"] = model.epoch
    atomic_write(
        out_dir / "metrics.json", lambda f: f.write(json.dumps(summary, indent=2).encode())
    )
    log.info("Final metrics: %s", json.dumps(summary))


def load_model(
    checkpoint: str | Path | dict[str, Any], map_location: str | torch.device = "cpu"
) -> FaceEmbeddingModel:
    """Rebuild a trained model from a checkpoint written by ``train`` (the config travels in it).

    Args:
        checkpoint: ``checkpoints/last.pt`` or ``best.pt`` of a run, the run directory (then
            ``checkpoints/last.pt`` is used), or a checkpoint dict already loaded.
        map_location: Where to load the tensors.

    Raises:
        FileNotFoundError: No checkpoint at that path.
        ValueError: Not a femb checkpoint (see :func:`femb.inference.read_checkpoint`), or one
            without a config.
    """
    if isinstance(checkpoint, dict):
        state, path = checkpoint, "the checkpoint dict"
    else:
        from femb.inference import read_checkpoint  # femb.inference imports this module

        path, state = read_checkpoint(checkpoint, map_location=map_location)
    config = state.get("config")
    if config is None:
        raise ValueError(
            f"{path} holds no config (it was written by a plain-Python fit); "
            "rebuild the backbone and header yourself and call "
            "model.load_checkpoint_state(torch.load(path))."
        )
    cfg = OmegaConf.create(config)
    backbone = instantiate(cfg.backbone)
    header = instantiate(cfg.header, out_features=state["num_classes"])
    model = FaceEmbeddingModel(backbone=backbone, header=header, loss=instantiate(cfg.loss))
    model.load_checkpoint_state(state)
    model.eval()
    return model
