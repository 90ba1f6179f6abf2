"""The face model: backbone + header + loss, with a plain-PyTorch ``fit`` loop.

``FaceEmbeddingModel`` knows nothing of Hydra; ``femb.train.train`` builds one from a config and
calls :meth:`FaceEmbeddingModel.fit`, and the same object is usable from plain Python::

    backbone = build_backbone(backbone="iresnet18", embed_dim=512)
    header = ArcFaceHeader(in_features=512, out_features=n_identities)
    model = FaceEmbeddingModel(backbone=backbone, header=header, loss=torch.nn.CrossEntropyLoss())
    optimizer = torch.optim.SGD(params=model.params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.fit(train_dataset=train_set, batch_size=32, device="cpu", optimizer=optimizer, ...)

For long runs ``fit`` also trains in mixed precision (``precision="bf16"`` or ``"fp16"``),
continues exactly from its own checkpoints (``resume_from``), stops cleanly on SIGINT and SIGTERM
(:class:`TrainingInterrupted`) and trains on several processes under ``torchrun``
(:mod:`femb.distributed`).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from femb import distributed
from femb.headers.partial_fc import full_optimizer_state, local_optimizer_state
from femb.run_io import (
    RunWriter,
    carry_run_files,
    load_training_checkpoint,
    resume_checkpoint_path,
)
from femb.utils import (
    StopSignals,
    capture_rng_state,
    init_train_worker,
    resolve_device,
    restore_rng_state,
    seed_everything,
)

log = logging.getLogger(__name__)

#: Validation metrics where a smaller value is better; every other metric is "higher is better".
LOWER_IS_BETTER = ("eer",)

#: ``fit(precision=...)``: float32, bfloat16 autocast, float16 autocast with loss scaling.
PRECISIONS = ("bf16", "fp16", "fp32")

#: ``fit(nonfinite=...)``: what a NaN or infinite loss does.
NONFINITE_POLICIES = ("raise", "skip")


class TrainingInterrupted(Exception):
    """``fit`` stopped on SIGINT or SIGTERM after writing a resumable checkpoint.

    Attributes:
        signum: The signal that stopped the run.
        checkpoint: The checkpoint to continue from (``fit(resume_from=checkpoint)``).
        global_step: Optimizer steps done.
    """

    def __init__(self, signum: int, checkpoint: Path, global_step: int) -> None:
        self.signum = int(signum)
        self.checkpoint = checkpoint
        self.global_step = global_step
        super().__init__(
            f"training stopped by {signal.Signals(signum).name} at global step {global_step}; "
            f"continue with resume_from={checkpoint}"
        )


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
        return self.objective(self.backbone(images), labels)

    def objective(
        self, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Header and loss on given embeddings (B, D), (B,): the second half of
        :meth:`training_step`, with the same return value."""
        if getattr(self.header, "returns_loss", False):
            # Partial FC computes its sharded softmax cross-entropy itself.
            cls_loss = self.header(embeddings, labels)
        else:
            cls_loss = self.loss(self.header(embeddings, labels).float(), labels)
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
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
        clip_grad_norm: float | None = None,
        checkpoint_steps: int = 0,
        resume_from: str | Path | Mapping[str, Any] | None = None,
        nonfinite: str = "raise",
        max_nonfinite_skips: int = 10,
        handle_signals: bool = True,
        sync_batchnorm: bool = False,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        prefetch_factor: int | None = None,
    ) -> dict[str, float]:
        """Train the backbone and header.

        Stopping: after ``max_training_steps`` optimizer steps when that is non-zero, otherwise
        after ``max_epochs`` full epochs. Schedulers: ``lr_global_step_scheduler.step()`` after
        every optimizer step, ``lr_epoch_scheduler.step()`` after every full epoch. Evaluation:
        every ``evaluation_steps`` global steps and once more when training ends; with
        ``evaluation_steps=0``, at the end of every epoch (and at the end of training). Batches
        are drawn with ``drop_last=True`` so that BatchNorm never sees a batch of one.

        Checkpoints: ``checkpoints/last.pt`` is written at every evaluation, every
        ``checkpoint_steps`` global steps, at the end and when a stop signal arrives;
        ``checkpoints/best.pt`` at every evaluation that improves ``monitor``. Each holds the
        full training state, so ``resume_from`` continues a run exactly: on the CPU an
        interrupted-then-resumed run ends with the same weights and the same
        ``verification.csv`` as an uninterrupted one. Rows that an interrupted run wrote after
        its last checkpoint are dropped on resume and written again as the run catches up.

        Signals: on SIGINT or SIGTERM (when ``handle_signals``, in the main thread) the current
        step is finished, ``checkpoints/last.pt`` is written and :class:`TrainingInterrupted`
        is raised; a second signal stops at once. Without a stop signal (SIGKILL, a crash) the
        run continues from its last checkpoint.

        Multi-process runs: inside a ``torch.distributed`` process group (``torchrun``, see
        :mod:`femb.distributed`) the backbone and header are trained with
        ``DistributedDataParallel``, ``batch_size`` is per process, and only rank 0 evaluates
        and writes files. A sharded header (:class:`~femb.headers.PartialFCHeader` built inside
        the process group) is model parallel: DDP then wraps the backbone only, every rank
        keeps its own slice of the class centres and of their optimizer state, checkpoints hold
        all classes (gathered), and ``clip_grad_norm`` clips the norm over all ranks' shards.

        Args:
            train_dataset: Yields ``(image (3, H, W), label)``; ``num_classes`` must not exceed
                the header's ``out_features``.
            batch_size: Images per optimizer step (per process in a multi-process run).
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"`` (CUDA when available) or a
                ``torch.device``; ``cuda`` means ``cuda:LOCAL_RANK`` in a multi-process run.
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
            seed: Seeds the shuffling order, the per-sample augmentation seeds (so results do
                not depend on ``num_workers``; see :class:`femb.distributed.EpochSampler`) and,
                offset by the rank, the global generators during training.
            log_every: Write a progress log line and train scalars every this many steps.
            progress: Show a tqdm progress bar (rank 0 only).
            monitor: Metric of the first validation set that selects ``checkpoints/best.pt``
                (``eer``: lower is better, anything else higher), or None for no best copy.
            flip_test: Evaluate with flip test (see :meth:`encode`).
            projection_samples: At most this many validation embeddings go to the TensorBoard
                projector (0 disables it).
            config: Resolved config stored in every checkpoint (``femb.train`` passes it).
            precision: ``"fp32"``, ``"bf16"`` (autocast; CPU and recent GPUs) or ``"fp16"``
                (autocast with a ``GradScaler``; CUDA only). The backbone runs under autocast;
                the header's margin math and the loss stay in float32.
            channels_last: Keep the backbone's weights and the images in channels-last memory
                format (faster convolutions on tensor-core GPUs).
            compile: Train through ``torch.compile(backbone)`` (the saved weights are those of
                the plain backbone).
            clip_grad_norm: Clip the gradient norm of all parameters to this value (after
                unscaling under fp16) and log ``train/grad_norm``; None: no clipping.
            checkpoint_steps: Also write ``checkpoints/last.pt`` every this many global steps;
                0: only at evaluations, at the end and on a stop signal.
            resume_from: Continue from a checkpoint: a ``.pt`` file, a run directory (its
                ``checkpoints/last.pt``), a checkpoint dict, ``"auto"`` (``out_dir``'s own
                last checkpoint if there is one, else start fresh) or None. Weights, optimizer,
                schedulers, step counters, the position in the epoch, the random states and the
                CSV rows come from the checkpoint; stop criteria, cadences and precision from
                the arguments. Every difference from the checkpoint's settings is logged as a
                warning saying which value wins.
            nonfinite: What a non-finite loss does: ``"raise"`` a ``FloatingPointError`` naming
                the step and the last checkpoint, or ``"skip"`` the batch (no optimizer step;
                the global step does not advance, the batch counts as consumed).
            max_nonfinite_skips: With ``nonfinite="skip"``, raise after this many consecutive
                skipped batches.
            handle_signals: Install the SIGINT/SIGTERM handlers described above.
            sync_batchnorm: In a multi-process run, convert the backbone's BatchNorm layers to
                ``SyncBatchNorm`` (statistics over the global batch; CUDA only).
            pin_memory: Pinned host memory for the training batches; None: on for CUDA.
            persistent_workers: Keep the DataLoader workers between epochs; None: on when
                ``num_workers > 0``.
            prefetch_factor: Batches each worker loads ahead; None: torch's default (2).

        Returns:
            The metrics of the last evaluation (``<set>/<metric>``), plus ``train/loss``, the mean
            loss of the last logging interval, and the best monitored value as
            ``best/<set>/<metric>`` when there was an evaluation. Ranks > 0 of a multi-process
            run return only ``train/loss``.

        Raises:
            ValueError: For inconsistent arguments (both stop criteria 0, an evaluator without
                a validation set, a batch size larger than the training set, fp16 on the CPU,
                ...).
            FloatingPointError: A non-finite loss (see ``nonfinite``).
            TrainingInterrupted: A stop signal arrived; the checkpoint to resume from is named.
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
        _check_trainer_args(
            precision,
            nonfinite,
            max_nonfinite_skips,
            clip_grad_norm,
            checkpoint_steps,
            num_workers,
            persistent_workers,
            prefetch_factor,
        )
        rank, world = distributed.rank(), distributed.world_size()
        main = rank == 0
        device = distributed.rank_device(resolve_device(device))
        _check_precision(precision, device, sync_batchnorm and world > 1)
        default_dir = Path("outputs") / "fit" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        # Every rank must agree on the run directory (it holds the checkpoint to resume from).
        out_dir = Path(distributed.broadcast_object(str(out_dir or default_dir)))
        checkpoint, checkpoint_path = _read_resume(resume_from, out_dir)

        objective = self._prepare_training(
            device, precision, channels_last, compile, sync_batchnorm and world > 1
        )
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        state = _FitState(monitor=monitor)
        state.last_checkpoint = checkpoint_path

        def where() -> str:
            last = state.last_checkpoint or "not written yet"
            # "global step N": N optimizer steps were done before this batch (as in the CSV).
            return (
                f"global step {self.global_step} (epoch {self.epoch}, batch "
                f"{state.batches_in_epoch + 1} of the epoch); the last checkpoint is {last}"
            )

        stepper = _Stepper(
            objective,
            optimizer,
            scaler,
            clip_grad_norm,
            nonfinite,
            max_nonfinite_skips,
            where=where,
            sharded=_sharded_parameters(self.header),
        )
        settings = {
            "batch_size": batch_size,
            "world_size": world,
            "seed": seed,
            "precision": precision,
            "train_size": len(train_dataset),
        }
        rows: list[dict[str, Any]] = []
        start_batch, rng_state = 0, None
        if checkpoint is not None:
            seed = _warn_resume_conflicts(checkpoint, settings, config)
            rows, start_batch, rng_state = self._restore_training(
                checkpoint,
                optimizer,
                lr_epoch_scheduler,
                lr_global_step_scheduler,
                scaler,
                state,
                stepper,
                batch_size * world,
            )
        else:
            seed_everything(seed + rank)

        sampler = distributed.EpochSampler(len(train_dataset), batch_size, seed, rank, world)
        if sampler.batches_per_epoch == 0:
            raise ValueError(
                f"the training set has {len(train_dataset)} images, fewer than one global "
                f"batch of batch_size={batch_size} x {world} processes: lower batch_size."
            )
        loader = _train_loader(
            train_dataset,
            sampler,
            device,
            num_workers,
            pin_memory,
            persistent_workers,
            prefetch_factor,
            seed + rank,
        )
        steps_per_epoch = sampler.batches_per_epoch
        start_batch = min(start_batch, steps_per_epoch)
        total_steps = max_training_steps or max_epochs * steps_per_epoch
        writer = RunWriter(
            out_dir,
            tensorboard=tensorboard,
            rows=rows,
            active=main,
            purge_step=self.global_step if checkpoint is not None else None,
        )
        if checkpoint is not None and main:
            writer.write_rows()  # drops the rows written after the checkpoint
            if checkpoint_path is not None:
                carry_run_files(checkpoint_path, out_dir, self.global_step)
        log.info("Run directory: %s", out_dir.resolve())
        log.info(
            "Training for %d steps (%d per epoch, batch %d x %d processes, %s) on %s",
            total_steps,
            steps_per_epoch,
            batch_size,
            world,
            precision,
            device,
        )

        bar = tqdm(
            total=total_steps,
            initial=min(self.global_step, total_steps),
            disable=not progress or not main,
            dynamic_ncols=True,
            desc="train",
            unit="step",
        )
        saved_at: tuple[int, int, int] | None = None

        def position() -> tuple[int, int, int]:
            return self.global_step, self.epoch, state.batches_in_epoch

        def save(names: tuple[str, ...] = ("last",)) -> Path:
            nonlocal saved_at
            # Collective: every rank's random state goes into rank 0's checkpoint, and a
            # sharded header's centres and optimizer state are gathered from all ranks.
            rng = distributed.gather_objects(capture_rng_state())
            training = {
                "settings": {**settings, "seed": seed},
                "samples_in_epoch": state.batches_in_epoch * batch_size * world,
                "rng": rng,
                "rows": [dict(row) for row in writer.rows],
                "fit_state": state.state_dict(),
                "nonfinite": stepper.state_dict(),
            }
            checkpoint_dict = self.checkpoint_state(
                optimizer,
                lr_epoch_scheduler,
                lr_global_step_scheduler,
                config,
                state.final_metrics,
                grad_scaler=scaler,
                resume=training,
            )
            if main:
                for name in names:
                    writer.save_checkpoint(checkpoint_dict, name)
            distributed.barrier()
            saved_at = position()
            state.last_checkpoint = writer.checkpoint_path("last")
            return state.last_checkpoint

        def report(step: _StepResult, images: int) -> None:
            state.record(step.loss, images)
            bar.update(1)
            bar.set_postfix(
                epoch=self.epoch,
                loss=f"{state.epoch_mean():.4f}",
                lr=f"{_current_lr(optimizer):.3g}",
                img_s=f"{state.images_per_s() * world:.1f}",
                refresh=False,
            )
            if self.global_step % log_every == 0:
                self._log_progress(state, step.parts, optimizer, writer, total_steps, stepper)

        def evaluate_and_save() -> None:
            improved = False
            if main:
                improved = self._run_evaluation(
                    evaluator,
                    val_sets,
                    batch_size,
                    device,
                    flip_test,
                    num_workers,
                    writer,
                    projection_samples,
                    optimizer,
                    state,
                )
            else:
                state.last_eval_step = self.global_step
                state.interval_mean()
            save(("last", "best") if improved else ("last",))
            writer.flush()
            state.restart_clock()  # images/s counts training time only

        def interrupt(signum: int | None) -> None:
            path = save() if saved_at != position() else writer.checkpoint_path("last")
            name = signal.Signals(signum or signal.SIGTERM).name
            log.warning(
                "Stopped by %s at global step %d (epoch %d, %d batches into it). Checkpoint: "
                "%s; continue with resume_from=%s (Hydra: resume=%s, or resume=auto with the "
                "same hydra.run.dir).",
                name,
                self.global_step,
                self.epoch,
                state.batches_in_epoch,
                path,
                path,
                path,
            )
            raise TrainingInterrupted(signum or signal.SIGTERM, path, self.global_step)

        if rng_state is not None:
            restore_rng_state(rng_state)
        self.train()
        done = _finished(self, max_training_steps, max_epochs)
        if done:
            log.info(
                "The checkpoint's run is already complete at global step %d.", self.global_step
            )
        with StopSignals(enabled=handle_signals) as signals:
            try:
                while not done:
                    sampler.set_epoch(self.epoch, start_batch)
                    state.batches_in_epoch, start_batch = start_batch, 0
                    state.restart_clock()
                    for images, labels in _batches(loader, signals):
                        self.header_step_hook()
                        images, labels = _to_device(images, labels, device, channels_last)
                        step = stepper(images, labels, lambda: signals.requested is not None)
                        state.batches_in_epoch += 1
                        if not step.skipped:
                            if lr_global_step_scheduler is not None:
                                lr_global_step_scheduler.step()
                            self.global_step += 1
                            report(step, len(images))
                            if (
                                evaluator is not None
                                and evaluation_steps > 0
                                and self.global_step % evaluation_steps == 0
                            ):
                                evaluate_and_save()
                            elif checkpoint_steps and self.global_step % checkpoint_steps == 0:
                                save()
                        if step.stop:
                            interrupt(signals.requested)
                        if max_training_steps and self.global_step >= max_training_steps:
                            done = True
                            break
                    else:
                        # A full epoch ended (the for loop was not broken out of).
                        self.epoch += 1
                        state.batches_in_epoch = 0
                        state.new_epoch()
                        if lr_epoch_scheduler is not None:
                            lr_epoch_scheduler.step()
                        if evaluator is not None and evaluation_steps == 0:
                            evaluate_and_save()
                        if not max_training_steps and self.epoch >= max_epochs:
                            done = True

                if evaluator is not None and state.last_eval_step != self.global_step:
                    evaluate_and_save()
                if saved_at != position():
                    path = save()
                    log.info("Saved final checkpoint %s", path)
            except _LoaderStopped:
                interrupt(signals.requested)
            finally:
                bar.close()
                writer.close()

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
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        resume: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Everything needed to rebuild the model and continue training.

        With a sharded header (Partial FC in a multi-process run) this is a collective: call it
        on every rank; the returned header weights and their optimizer states hold all classes.

        Args:
            optimizer: Its state is stored when given.
            lr_epoch_scheduler: Its state is stored when given.
            lr_global_step_scheduler: Its state is stored when given.
            config: The resolved config (a plain dict), or None.
            metrics: The metrics of the evaluation this checkpoint belongs to.
            grad_scaler: The fp16 ``GradScaler``; its state is stored when given.
            resume: The rest of the training state, written by ``fit``: the position in the
                epoch, random states, CSV rows, running losses, best metric, settings.

        Returns:
            A dict with ``backbone``, ``header`` (state dicts), ``optimizer``, ``schedulers``,
            ``grad_scaler``, ``num_classes`` (the header's ``out_features``), ``global_step``,
            ``epoch``, ``metrics``, ``config`` (the resolved Hydra config as a plain dict, or
            None when trained from plain Python) and ``resume`` (None outside ``fit``).
        """
        full_state = getattr(self.header, "full_state_dict", None)
        sharded = bool(_sharded_parameters(self.header))
        return {
            "backbone": self.backbone.state_dict(),
            "header": full_state() if sharded else self.header.state_dict(),
            "optimizer": (
                full_optimizer_state(optimizer, self.header) if optimizer is not None else None
            ),
            "schedulers": {
                "epoch": lr_epoch_scheduler.state_dict() if lr_epoch_scheduler else None,
                "global_step": (
                    lr_global_step_scheduler.state_dict() if lr_global_step_scheduler else None
                ),
            },
            "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
            "num_classes": getattr(self.header, "out_features", None),
            "global_step": self.global_step,
            "epoch": self.epoch,
            "metrics": dict(metrics or {}),
            "config": dict(config) if config is not None else None,
            "resume": dict(resume) if resume is not None else None,
        }

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """Load the backbone and header weights and the step counters of a checkpoint dict."""
        self.backbone.load_state_dict(state["backbone"])
        self.header.load_state_dict(state["header"])
        self.global_step = int(state.get("global_step", 0))
        self.epoch = int(state.get("epoch", 0))

    def _prepare_training(
        self,
        device: torch.device,
        precision: str,
        channels_last: bool,
        compile: bool,
        sync_batchnorm: bool,
    ) -> nn.Module:
        """Move the model to ``device`` and build the module that the training steps call:
        backbone (under autocast, maybe compiled) + header + loss, DDP-wrapped in a
        multi-process run."""
        if sync_batchnorm:
            # The new SyncBatchNorm layers reuse the old parameters, so the optimizer is intact.
            self.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(self.backbone)
        self.to(device)
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if distributed.world_size() == 1:
            embed = torch.compile(self.backbone) if compile else self.backbone
            return _Objective(self, embed, device, precision)

        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        if not _sharded_parameters(self.header):
            embed = torch.compile(self.backbone) if compile else self.backbone
            return DistributedDataParallel(
                _Objective(self, embed, device, precision), device_ids=device_ids
            )
        # Model parallel header: its centres differ per rank, so DDP must not average their
        # gradients; it wraps the backbone only (the header scales the embedding gradients so
        # that DDP's average is the exact gradient of the global loss).
        embed = DistributedDataParallel(self.backbone, device_ids=device_ids)
        return _Objective(self, torch.compile(embed) if compile else embed, device, precision)

    def _restore_training(
        self,
        checkpoint: Mapping[str, Any],
        optimizer: torch.optim.Optimizer,
        lr_epoch_scheduler: Any,
        lr_global_step_scheduler: Any,
        scaler: torch.amp.GradScaler,
        state: _FitState,
        stepper: _Stepper,
        global_batch: int,
    ) -> tuple[list[dict[str, Any]], int, dict[str, Any] | None]:
        """Load a checkpoint's training state into the model and the training objects.

        Returns:
            The CSV rows so far, the global batch of the current epoch to continue from, and
            this rank's random state to restore just before training (None when the world
            size changed).
        """
        resume = checkpoint["resume"]
        try:
            self.load_checkpoint_state(checkpoint)
        except RuntimeError as err:
            raise ValueError(
                "the checkpoint's weights do not fit the model built for this run (did the "
                f"backbone, header, embed_dim or the number of classes change?): {err}"
            ) from err
        if checkpoint.get("optimizer") is not None:
            try:
                optimizer.load_state_dict(
                    local_optimizer_state(checkpoint["optimizer"], optimizer, self.header)
                )
            except (ValueError, KeyError) as err:
                raise ValueError(
                    "the checkpoint's optimizer state does not fit this optimizer (other "
                    f"parameter groups or optimizer type?): {err}"
                ) from err
        schedulers = checkpoint.get("schedulers") or {}
        for key, scheduler in (
            ("epoch", lr_epoch_scheduler),
            ("global_step", lr_global_step_scheduler),
        ):
            saved = schedulers.get(key)
            if scheduler is not None and saved is not None:
                scheduler.load_state_dict(saved)
            elif (scheduler is None) != (saved is None):
                log.warning(
                    "resume: the %s scheduler is %s in the checkpoint but %s now; the run's "
                    "scheduler, as given, is used without the checkpoint's progress.",
                    key,
                    "set" if saved is not None else "absent",
                    "set" if scheduler is not None else "absent",
                )
        if self.global_step > 0:
            # The optimizer has stepped before; tell torch's schedulers so, else resuming at an
            # epoch's end warns that the epoch scheduler steps before the optimizer.
            optimizer._opt_called = True  # type: ignore[attr-defined]
        if scaler.is_enabled() and checkpoint.get("grad_scaler"):
            scaler.load_state_dict(checkpoint["grad_scaler"])
        state.load_state_dict(resume["fit_state"])
        stepper.load_state_dict(resume["nonfinite"])

        samples = int(resume["samples_in_epoch"])
        start_batch = samples // global_batch
        if samples % global_batch:
            log.warning(
                "resume: the interrupted epoch had consumed %d images, not a whole number of "
                "global batches of %d; continuing at batch %d, so the run is no longer an exact "
                "continuation.",
                samples,
                global_batch,
                start_batch,
            )
        rng = resume["rng"]
        rng_state = rng[distributed.rank()] if len(rng) == distributed.world_size() else None
        if rng_state is None:
            log.warning(
                "resume: the checkpoint holds the random states of %d processes but this run "
                "has %d; the global generators are seeded afresh.",
                len(rng),
                distributed.world_size(),
            )
            seed_everything(
                int(resume["settings"]["seed"]) + distributed.rank() + self.global_step
            )
        log.info(
            "Resumed at global step %d, epoch %d, global batch %d of the epoch (%d CSV rows)",
            self.global_step,
            self.epoch,
            start_batch,
            len(resume["rows"]),
        )
        return [dict(row) for row in resume["rows"]], start_batch, rng_state

    def _run_evaluation(
        self,
        evaluator: Any,
        val_sets: dict[str, Dataset],
        batch_size: int,
        device: torch.device,
        flip_test: bool,
        num_workers: int,
        writer: RunWriter,
        projection_samples: int,
        optimizer: torch.optim.Optimizer,
        state: _FitState,
    ) -> bool:
        """Evaluate, append the CSV row and log it; True when ``monitor`` improved."""
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
        return improved

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
        stepper: _Stepper,
    ) -> None:
        norms = parts["embedding_norm"]
        lr = _current_lr(optimizer)
        window = state.window_mean()
        scalars = {
            "train/loss": window,
            "train/lr": lr,
            "train/embedding_norm_mean": norms.mean().item(),
            "train/embedding_norm_std": norms.std().item() if len(norms) > 1 else 0.0,
            "train/images_per_s": state.images_per_s() * distributed.world_size(),
        }
        scalars.update({f"train/{k}": v.item() for k, v in parts.items() if k.startswith("loss/")})
        stats = getattr(self.header, "stats", None)
        if stats is not None:
            scalars.update({f"header/{k}": float(v) for k, v in stats().items()})
        diagnostics = stepper.scalars()
        scalars.update(diagnostics)
        writer.scalars(scalars, self.global_step)
        extra = " ".join(
            f"{k[len('loss/') :]}={v.item():.4f}"
            for k, v in parts.items()
            if k.startswith("loss/") and k != "loss/cls"
        )
        tail = "".join(f" {k[len('train/') :]} {v:.4g}" for k, v in diagnostics.items())
        log.info(
            "step %d/%d epoch %d loss %.4f (mean %.4f) %slr %.4g img/s %.1f |emb| %.2f+-%.2f%s",
            self.global_step,
            total_steps,
            self.epoch,
            window,
            state.epoch_mean(),
            extra + " " if extra else "",
            lr,
            scalars["train/images_per_s"],
            scalars["train/embedding_norm_mean"],
            scalars["train/embedding_norm_std"],
            tail,
        )


class _LoaderStopped(Exception):
    """The training DataLoader failed after a stop signal (its workers were signalled too)."""


class _Objective(nn.Module):
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
class _StepResult:
    loss: float  # mean over all ranks
    parts: dict[str, torch.Tensor]
    skipped: bool  # non-finite loss, batch skipped
    stop: bool  # some rank received a stop signal


class _Stepper:
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
    ) -> _StepResult:
        """Train on one batch; ``stop_requested`` says whether this rank received a stop
        signal (asked at the agreement, and again at the end in a single process)."""
        loss, parts = self.objective(images, labels)
        mean_loss, nonfinite, stop = self._agree(loss, stop_requested())
        if nonfinite:
            self._on_nonfinite(mean_loss)
            return _StepResult(mean_loss, parts, skipped=True, stop=stop or _alone(stop_requested))
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
        # A signal that arrived during this step stops after it; in a multi-process run the
        # ranks can only agree at the next step's all-reduce.
        return _StepResult(mean_loss, parts, skipped=False, stop=stop or _alone(stop_requested))

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


class _FitState:
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


def _sharded_parameters(header: nn.Module) -> list[nn.Parameter]:
    """The header's parameters that are split over the ranks (Partial FC in a DDP run)."""
    sharded = getattr(header, "sharded_parameters", None)
    return list(sharded()) if sharded is not None else []


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


def _check_trainer_args(
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


def _check_precision(precision: str, device: torch.device, sync_batchnorm: bool) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"precision=fp16 on device {device}: float16 autocast is CUDA only here (slow or "
            "unsupported for CPU convolutions); use precision=bf16 on the CPU."
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


def _read_resume(
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


def _warn_resume_conflicts(
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


def _train_loader(
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


def _batches(loader: DataLoader, signals: StopSignals) -> Iterator[Any]:
    """The loader's batches; a loader failure after a stop signal raises ``_LoaderStopped``."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError:
            if signals.requested is None:
                raise
            raise _LoaderStopped() from None
        yield batch


def _to_device(
    images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def _alone(stop_requested: Callable[[], bool]) -> bool:
    """``stop_requested()`` in a single process; False in a multi-process run (the ranks decide
    together, in :meth:`_Stepper._agree`)."""
    return distributed.world_size() == 1 and stop_requested()


def _finished(model: FaceEmbeddingModel, max_training_steps: int, max_epochs: int) -> bool:
    if max_training_steps:
        return model.global_step >= max_training_steps
    return model.epoch >= max_epochs
