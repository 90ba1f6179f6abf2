"""The face model: backbone + header + loss, with a plain-PyTorch ``fit`` loop.

``FaceEmbeddingModel`` knows nothing of Hydra; ``femb.train.train`` builds one from a config and
calls :meth:`FaceEmbeddingModel.fit`, and the same object is usable from plain Python::

    backbone = build_backbone(backbone="iresnet18", embed_dim=512)
    header = ArcFaceHeader(in_features=512, out_features=n_identities)
    model = FaceEmbeddingModel(backbone=backbone, header=header, loss=torch.nn.CrossEntropyLoss())
    optimizer = torch.optim.SGD(params=model.params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.fit(train_dataset=train_set, batch_size=32, device="cpu", optimizer=optimizer, ...)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from femb.run_io import RunWriter
from femb.utils import resolve_device, seed_worker

log = logging.getLogger(__name__)

#: Validation metrics where a smaller value is better; every other metric is "higher is better".
LOWER_IS_BETTER = ("eer",)


class FaceEmbeddingModel(nn.Module):
    """A backbone that embeds faces, a header that turns embeddings into identity logits, a loss.

    The header is used only in training. A header may add terms to the objective (MagFace's
    g(a) regulariser): it puts them in its ``extra_losses`` dict during ``forward`` and the model
    adds them to ``loss(logits, labels)``, so the loss itself stays a plain torch loss.

    Args:
        backbone: Maps images (B, 3, H, W) to embeddings (B, D).
        header: Maps ``(embeddings (B, D), labels (B,))`` to logits (B, C).
        loss: A torch loss on ``(logits (B, C), labels (B,))``, usually ``nn.CrossEntropyLoss()``.
    """

    def __init__(self, backbone: nn.Module, header: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.header = header
        self.loss = loss
        self.global_step = 0
        self.epoch = 0

    @classmethod
    def load(
        cls, path: str | Path, map_location: str | torch.device = "cpu"
    ) -> FaceEmbeddingModel:
        """Rebuild a trained model from a run directory or checkpoint written by ``femb.train``.

        The resolved config travels inside the checkpoint, so nothing else is needed. The
        returned model is in eval mode.
        """
        from femb.train import load_model  # femb.train imports this module

        return load_model(path, map_location=map_location)

    @property
    def params(self) -> list[dict[str, Any]]:
        """Two optimizer parameter groups, ``backbone`` and ``header``, for any torch optimizer."""
        return self.param_groups()

    def param_groups(
        self, header_lr: float | None = None, header_weight_decay: float | None = None
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups with optional header-specific lr and weight decay.

        Args:
            header_lr: Learning rate of the header group; None uses the optimizer's.
            header_weight_decay: Weight decay of the header group; None uses the optimizer's.

        Returns:
            ``[{"name": "backbone", "params": [...]}, {"name": "header", "params": [...], ...}]``
        """
        header_group: dict[str, Any] = {"name": "header", "params": list(self.header.parameters())}
        if header_lr is not None:
            header_group["lr"] = header_lr
        if header_weight_decay is not None:
            header_group["weight_decay"] = header_weight_decay
        groups = [{"name": "backbone", "params": list(self.backbone.parameters())}]
        # A parameter-free header (none of femb's, but a user's may be) would make an empty
        # group, which torch optimizers accept but schedulers then track for nothing.
        if header_group["params"]:
            groups.append(header_group)
        return groups

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch: images (B, 3, H, W) -> raw (un-normalised) embeddings (B, D)."""
        return self.backbone(images)

    def training_step(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward pass of the objective.

        Args:
            images: (B, 3, H, W) training images.
            labels: (B,) identity labels in ``[0, header.out_features)``.

        Returns:
            The total loss (scalar) and its named parts (``loss/cls`` plus the header's extra
            terms), plus ``embedding_norm`` (B,) for diagnostics, all detached except the total.
        """
        embeddings = self.backbone(images)
        logits = self.header(embeddings, labels)
        cls_loss = self.loss(logits.float(), labels)
        extra = dict(getattr(self.header, "extra_losses", None) or {})
        total = cls_loss + sum(extra.values()) if extra else cls_loss
        parts = {"loss/cls": cls_loss.detach()}
        parts.update({f"loss/{name}": value.detach() for name, value in extra.items()})
        parts["embedding_norm"] = embeddings.detach().float().norm(dim=1)
        return total, parts

    @torch.no_grad()
    def encode(
        self,
        data: Dataset | torch.Tensor,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        flip: bool = False,
        normalize: bool = True,
        num_workers: int = 0,
        return_norms: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Embed images or a whole dataset in eval mode.

        Args:
            data: A tensor of images (N, 3, H, W) or a dataset yielding ``(image, label)``.
            batch_size: Images per forward pass.
            device: Where to run, e.g. ``"cpu"``, ``"cuda"`` or ``"auto"``.
            flip: Flip test: add the embedding of the horizontally mirrored image before
                normalising.
            normalize: L2-normalise the returned embeddings.
            num_workers: DataLoader workers when ``data`` is a dataset.
            return_norms: Also return the raw embedding norms (N,), MagFace's quality score.

        Returns:
            Embeddings (N, D) on the CPU, and the norms (N,) when ``return_norms``.
        """
        device = resolve_device(device)
        was_training = self.training
        self.eval()
        self.backbone.to(device)
        if isinstance(data, torch.Tensor):
            batches = (data[i : i + batch_size] for i in range(0, len(data), batch_size))
        else:
            loader = DataLoader(
                data, batch_size=batch_size, shuffle=False, num_workers=num_workers
            )
            batches = (images for images, _ in loader)
        chunks, norms = [], []
        for images in batches:
            images = images.to(device)
            emb = self.backbone(images).float()
            norms.append(emb.norm(dim=1).cpu())
            if flip:
                emb = emb + self.backbone(torch.flip(images, dims=[3])).float()
            if normalize:
                emb = nn.functional.normalize(emb, dim=1)
            chunks.append(emb.cpu())
        self.train(was_training)
        embeddings = torch.cat(chunks)
        return (embeddings, torch.cat(norms)) if return_norms else embeddings

    def evaluate(
        self,
        evaluator: Any,
        dataset: Dataset,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        flip: bool = False,
        num_workers: int = 0,
    ) -> dict[str, float]:
        """Encode a validation set and score it.

        Pair-protocol datasets (with ``pairs``, ``issame`` and ``folds`` attributes) are scored
        on their pairs; identity-labelled sets on all their genuine and impostor pairs.

        Returns:
            The evaluator's metrics, e.g. ``{"eer": ..., "auc": ...}``.
        """
        embeddings = self.encode(
            dataset,
            batch_size=batch_size,
            device=device,
            flip=flip,
            normalize=False,
            num_workers=num_workers,
        )
        return _score(evaluator, dataset, embeddings)[0]

    def fit(
        self,
        train_dataset: Dataset,
        batch_size: int,
        device: str | torch.device,
        optimizer: torch.optim.Optimizer,
        lr_epoch_scheduler: Any = None,
        lr_global_step_scheduler: Any = None,
        evaluator: Any = None,
        val_dataset: Dataset | Mapping[str, Dataset] | None = None,
        evaluation_steps: int = 0,
        max_training_steps: int = 0,
        max_epochs: int = 0,
        tensorboard: bool = False,
        *,
        out_dir: str | Path | None = None,
        num_workers: int = 0,
        seed: int = 0,
        log_every: int = 10,
        progress: bool = True,
        monitor: str | None = "eer",
        flip_test: bool = False,
        projection_samples: int = 256,
        config: Mapping[str, Any] | None = None,
    ) -> dict[str, float]:
        """Train the backbone and header.

        Stopping: after ``max_training_steps`` optimizer steps when that is non-zero, otherwise
        after ``max_epochs`` full epochs. Schedulers: ``lr_global_step_scheduler.step()`` after
        every optimizer step, ``lr_epoch_scheduler.step()`` after every full epoch. Evaluation:
        every ``evaluation_steps`` global steps and once more when training ends; with
        ``evaluation_steps=0``, at the end of every epoch (and at the end of training). Batches
        are drawn with ``drop_last=True`` so that BatchNorm never sees a batch of one.

        Args:
            train_dataset: Yields ``(image (3, H, W), label)``; ``num_classes`` must not exceed
                the header's ``out_features``.
            batch_size: Images per optimizer step.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"`` (CUDA when available) or a
                ``torch.device``.
            optimizer: Built on :attr:`params` (or :meth:`param_groups`).
            lr_epoch_scheduler: Stepped once per epoch, or None.
            lr_global_step_scheduler: Stepped once per optimizer step, or None.
            evaluator: Called as ``evaluator(embeddings, labels, pairs=, issame=, folds=)``,
                e.g. ``VerificationEvaluator(similarity="cos")``. Needs ``val_dataset``.
            val_dataset: One validation set, or a dict ``{name: dataset}`` of several; metrics
                are named ``<name>/<metric>`` (a single set is named ``val``).
            evaluation_steps: Evaluate every this many global steps; 0 means every epoch.
            max_training_steps: Stop after this many optimizer steps (0: use ``max_epochs``).
            max_epochs: Stop after this many epochs when ``max_training_steps`` is 0.
            tensorboard: Write scalars and an embedding projection under ``out_dir/tensorboard``.
            out_dir: Run directory for the CSV, TensorBoard events and checkpoints; default
                ``outputs/fit/<date>_<time>`` under the working directory.
            num_workers: DataLoader worker processes.
            seed: Seeds the shuffling order and the workers.
            log_every: Write a progress log line and train scalars every this many steps.
            progress: Show a tqdm progress bar.
            monitor: Metric of the first validation set that selects ``checkpoints/best.pt``
                (``eer``: lower is better, anything else higher), or None for no best copy.
            flip_test: Evaluate with flip test (see :meth:`encode`).
            projection_samples: At most this many validation embeddings go to the TensorBoard
                projector (0 disables it).
            config: Resolved config stored in every checkpoint (``femb.train`` passes it).

        Returns:
            The metrics of the last evaluation (``<set>/<metric>``), plus ``train/loss``, the mean
            loss of the last logging interval, and the best monitored value as
            ``best/<set>/<metric>`` when there was an evaluation.

        Raises:
            ValueError: For inconsistent arguments (both stop criteria 0, an evaluator without
                a validation set, a batch size larger than the training set, ...).
        """
        val_sets = _as_val_sets(val_dataset)
        _check_fit_args(
            batch_size,
            evaluator,
            val_sets,
            evaluation_steps,
            max_training_steps,
            max_epochs,
            train_dataset,
            self.header,
        )
        device = resolve_device(device)
        self.to(device)
        out_dir = (
            Path(out_dir)
            if out_dir is not None
            else Path("outputs") / "fit" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        )
        writer = RunWriter(out_dir, tensorboard=tensorboard)
        log.info("Run directory: %s", out_dir.resolve())

        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            train_dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=num_workers,
            generator=generator,
            worker_init_fn=seed_worker,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
        )
        steps_per_epoch = len(loader)
        total_steps = max_training_steps or max_epochs * steps_per_epoch
        log.info(
            "Training for %d steps (%d per epoch, batch %d) on %s",
            total_steps,
            steps_per_epoch,
            batch_size,
            device,
        )

        state = _FitState(monitor=monitor)
        bar = tqdm(
            total=total_steps, disable=not progress, dynamic_ncols=True, desc="train", unit="step"
        )

        def run_evaluation() -> None:
            metrics = self._evaluate_all(
                evaluator,
                val_sets,
                batch_size,
                device,
                flip_test,
                num_workers,
                writer,
                projection_samples,
            )
            state.last_eval_step = self.global_step
            row = {
                "step": self.global_step,
                "epoch": self.epoch,
                "train_loss": state.interval_mean(),
                "lr": _current_lr(optimizer),
            }
            row.update(metrics)
            writer.append_row(row)
            writer.scalars(metrics, self.global_step)
            state.final_metrics = metrics
            improved = state.update_best(metrics, next(iter(val_sets)))
            best_text = f"best {state.best_key}={state.best_value:.4f}" if state.best_key else ""
            log.info(
                "eval step %d epoch %d: %s %s",
                self.global_step,
                self.epoch,
                " ".join(
                    f"{k}={v:.4f}"
                    for k, v in metrics.items()
                    if not k.endswith(("n_genuine", "n_impostor"))
                ),
                best_text,
            )
            if improved:
                writer.save_checkpoint(
                    self.checkpoint_state(
                        optimizer, lr_epoch_scheduler, lr_global_step_scheduler, config, metrics
                    ),
                    "best",
                )
            writer.flush()

        self.train()
        done = False
        try:
            while not done:
                tick = time.perf_counter()
                for images, labels in loader:
                    self.header_step_hook()
                    images = images.to(device, non_blocking=True)
                    labels = labels.to(device, non_blocking=True)

                    loss, parts = self.training_step(images, labels)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"non-finite loss {loss.item()} at global step {self.global_step}; "
                            f"the last good checkpoint is {writer.checkpoint_path('best')} if "
                            "it exists. Lower the learning rate or check the data."
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if lr_global_step_scheduler is not None:
                        lr_global_step_scheduler.step()
                    self.global_step += 1

                    now = time.perf_counter()
                    state.record(loss.item(), len(images), now - tick)
                    tick = now
                    bar.update(1)
                    bar.set_postfix(
                        epoch=self.epoch,
                        loss=f"{state.epoch_mean():.4f}",
                        lr=f"{_current_lr(optimizer):.3g}",
                        img_s=f"{state.images_per_s():.1f}",
                        refresh=False,
                    )
                    if self.global_step % log_every == 0:
                        self._log_progress(state, parts, optimizer, writer, total_steps)

                    if (
                        evaluator is not None
                        and evaluation_steps > 0
                        and self.global_step % evaluation_steps == 0
                    ):
                        run_evaluation()
                        tick = time.perf_counter()  # images/s counts training time only
                    if max_training_steps and self.global_step >= max_training_steps:
                        done = True
                        break
                else:
                    # A full epoch ended (the for loop was not broken out of).
                    self.epoch += 1
                    state.new_epoch()
                    if lr_epoch_scheduler is not None:
                        lr_epoch_scheduler.step()
                    if evaluator is not None and evaluation_steps == 0:
                        run_evaluation()
                    if not max_training_steps and self.epoch >= max_epochs:
                        done = True

            if evaluator is not None and state.last_eval_step != self.global_step:
                run_evaluation()
        finally:
            bar.close()
            writer.close()

        last = self.checkpoint_state(
            optimizer, lr_epoch_scheduler, lr_global_step_scheduler, config, state.final_metrics
        )
        path = writer.save_checkpoint(last, "last")
        log.info("Saved final checkpoint %s", path)

        result = dict(state.final_metrics)
        result["train/loss"] = state.interval_mean(reset=False)
        if state.best_key is not None:
            result[f"best/{state.best_key}"] = state.best_value
        return result

    def header_step_hook(self) -> None:
        """Tell the header the global step (SphereFace's lambda annealing uses it)."""
        hook = getattr(self.header, "on_train_step", None)
        if hook is not None:
            hook(self.global_step)

    def checkpoint_state(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        lr_epoch_scheduler: Any = None,
        lr_global_step_scheduler: Any = None,
        config: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """Everything needed to rebuild the model and continue training.

        Returns:
            A dict with ``backbone``, ``header`` (state dicts), ``optimizer``, ``schedulers``,
            ``num_classes`` (the header's ``out_features``), ``global_step``, ``epoch``,
            ``metrics`` and ``config`` (the resolved Hydra config as a plain dict, or None when
            trained from plain Python).
        """
        return {
            "backbone": self.backbone.state_dict(),
            "header": self.header.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "schedulers": {
                "epoch": lr_epoch_scheduler.state_dict() if lr_epoch_scheduler else None,
                "global_step": (
                    lr_global_step_scheduler.state_dict() if lr_global_step_scheduler else None
                ),
            },
            "num_classes": getattr(self.header, "out_features", None),
            "global_step": self.global_step,
            "epoch": self.epoch,
            "metrics": dict(metrics or {}),
            "config": dict(config) if config is not None else None,
        }

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """Load the backbone and header weights and the step counters of a checkpoint dict."""
        self.backbone.load_state_dict(state["backbone"])
        self.header.load_state_dict(state["header"])
        self.global_step = int(state.get("global_step", 0))
        self.epoch = int(state.get("epoch", 0))

    def _evaluate_all(
        self,
        evaluator: Any,
        val_sets: dict[str, Dataset],
        batch_size: int,
        device: torch.device,
        flip: bool,
        num_workers: int,
        writer: RunWriter,
        projection_samples: int,
    ) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for name, dataset in val_sets.items():
            embeddings = self.encode(
                dataset,
                batch_size=batch_size,
                device=device,
                flip=flip,
                normalize=False,
                num_workers=num_workers,
            )
            scores, roc = _score(evaluator, dataset, embeddings)
            metrics.update({f"{name}/{key}": float(value) for key, value in scores.items()})
            if roc is not None:
                writer.roc(name, self.global_step, roc)
            if projection_samples > 0 and writer.tensorboard:
                self._write_projection(
                    dataset, embeddings, _labels_of(dataset), writer, name, projection_samples
                )
        return metrics

    def _write_projection(
        self,
        dataset: Dataset,
        embeddings: torch.Tensor,
        labels: Any,
        writer: RunWriter,
        name: str,
        limit: int,
    ) -> None:
        # An evenly spaced, hence deterministic, sample keeps the projector file bounded.
        count = min(limit, len(embeddings))
        index = torch.linspace(0, len(embeddings) - 1, count).long().tolist()
        thumbs = torch.stack([dataset[i][0] for i in index])
        thumbs = nn.functional.interpolate(
            thumbs, size=(32, 32), mode="bilinear", antialias=True, align_corners=False
        )
        thumbs = ((thumbs + 1) / 2).clamp(
            0, 1
        )  # images are in [-1, 1]; the projector wants [0, 1]
        identities = getattr(dataset, "identities", None)
        meta = (
            [
                identities[int(labels[i])]
                if identities is not None and int(labels[i]) >= 0
                else str(int(labels[i]))
                for i in index
            ]
            if labels is not None
            else None
        )
        emb = nn.functional.normalize(embeddings[index], dim=1)
        writer.embedding(emb, meta, thumbs, self.global_step, tag=f"{name}/embedding")

    def _log_progress(
        self,
        state: _FitState,
        parts: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        writer: RunWriter,
        total_steps: int,
    ) -> None:
        norms = parts["embedding_norm"]
        lr = _current_lr(optimizer)
        window = state.window_mean()
        scalars = {
            "train/loss": window,
            "train/lr": lr,
            "train/embedding_norm_mean": norms.mean().item(),
            "train/embedding_norm_std": norms.std().item() if len(norms) > 1 else 0.0,
            "train/images_per_s": state.images_per_s(),
        }
        scalars.update({f"train/{k}": v.item() for k, v in parts.items() if k.startswith("loss/")})
        stats = getattr(self.header, "stats", None)
        if stats is not None:
            scalars.update({f"header/{k}": float(v) for k, v in stats().items()})
        writer.scalars(scalars, self.global_step)
        extra = " ".join(
            f"{k[len('loss/') :]}={v.item():.4f}"
            for k, v in parts.items()
            if k.startswith("loss/") and k != "loss/cls"
        )
        log.info(
            "step %d/%d epoch %d loss %.4f (mean %.4f) %slr %.4g img/s %.1f |emb| %.2f+-%.2f",
            self.global_step,
            total_steps,
            self.epoch,
            window,
            state.epoch_mean(),
            extra + " " if extra else "",
            lr,
            state.images_per_s(),
            scalars["train/embedding_norm_mean"],
            scalars["train/embedding_norm_std"],
        )


class _FitState:
    """Running losses, throughput and the best monitored metric of one ``fit`` call."""

    def __init__(self, monitor: str | None) -> None:
        self.monitor = monitor
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

    def record(self, loss: float, images: int, seconds: float) -> None:
        for acc in (self._epoch, self._interval, self._window):
            acc[0] += loss
            acc[1] += 1
        self._images += images
        self._seconds += seconds

    def new_epoch(self) -> None:
        self._epoch = [0.0, 0]

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


def _as_val_sets(val_dataset: Dataset | Mapping[str, Dataset] | None) -> dict[str, Dataset]:
    if val_dataset is None:
        return {}
    if isinstance(val_dataset, Mapping):
        return dict(val_dataset)
    return {"val": val_dataset}


def _labels_of(dataset: Dataset) -> Any:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [int(dataset[i][1]) for i in range(len(dataset))]
    return torch.as_tensor(labels)


def _score(evaluator: Any, dataset: Dataset, embeddings: torch.Tensor) -> tuple[dict, Any]:
    """Score a validation set: ``(metrics, roc)``; ``roc`` is None for an evaluator without
    ``compute`` (any callable returning a metrics dict is a valid evaluator)."""
    args = (embeddings, _labels_of(dataset))
    kwargs = {key: getattr(dataset, key, None) for key in ("pairs", "issame", "folds")}
    compute = getattr(evaluator, "compute", None)
    if compute is None:
        return evaluator(*args, **kwargs), None
    result = compute(*args, **kwargs)
    return result.metrics, result.roc


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _check_fit_args(
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
