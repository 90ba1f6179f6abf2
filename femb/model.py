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
import signal
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from femb import distributed, fit_loop
from femb.fit_loop import LOWER_IS_BETTER, NONFINITE_POLICIES, PRECISIONS
from femb.run_io import (
    RunWriter,
    carry_run_files,
)
from femb.utils import (
    StopSignals,
    capture_rng_state,
    resolve_device,
    restore_rng_state,
    seed_everything,
)

log = logging.getLogger(__name__)


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
        return fit_loop.score(evaluator, dataset, embeddings)[0]

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
                (autocast with a ``GradScaler``; meant for CUDA, runs slowly on the CPU). The
                backbone runs under autocast; the header's margin math and the loss stay in
                float32.
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
                a validation set, a batch size larger than the training set, ...).
            FloatingPointError: A non-finite loss (see ``nonfinite``).
            TrainingInterrupted: A stop signal arrived; the checkpoint to resume from is named.
        """
        val_sets = fit_loop.as_val_sets(val_dataset)
        fit_loop.check_fit_args(
            batch_size,
            evaluator,
            val_sets,
            evaluation_steps,
            max_training_steps,
            max_epochs,
            train_dataset,
            self.header,
        )
        fit_loop.check_trainer_args(
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
        fit_loop.check_precision(precision, device, sync_batchnorm and world > 1)
        default_dir = Path("outputs") / "fit" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        # Every rank must agree on the run directory (it holds the checkpoint to resume from).
        out_dir = Path(distributed.broadcast_object(str(out_dir or default_dir)))
        checkpoint, checkpoint_path = fit_loop.read_resume(resume_from, out_dir)

        objective = self._prepare_training(
            device, precision, channels_last, compile, sync_batchnorm and world > 1
        )
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        state = fit_loop.FitState(monitor=monitor)
        state.last_checkpoint = checkpoint_path

        def where() -> str:
            last = state.last_checkpoint or "not written yet"
            # "global step N": N optimizer steps were done before this batch (as in the CSV).
            return (
                f"global step {self.global_step} (epoch {self.epoch}, batch "
                f"{state.batches_in_epoch + 1} of the epoch); the last checkpoint is {last}"
            )

        stepper = fit_loop.Stepper(
            objective,
            optimizer,
            scaler,
            clip_grad_norm,
            nonfinite,
            max_nonfinite_skips,
            where=where,
            sharded=fit_loop.sharded_parameters(self.header),
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
            seed = fit_loop.warn_resume_conflicts(checkpoint, settings, config)
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
        loader = fit_loop.train_loader(
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

        def report(step: fit_loop.StepResult, images: int) -> None:
            state.record(step.loss, images)
            bar.update(1)
            bar.set_postfix(
                epoch=self.epoch,
                loss=f"{state.epoch_mean():.4f}",
                lr=f"{fit_loop.current_lr(optimizer):.3g}",
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
        done = fit_loop.finished(self, max_training_steps, max_epochs)
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
                    for images, labels in fit_loop.batches(loader, signals):
                        self.header_step_hook()
                        images, labels = fit_loop.to_device(images, labels, device, channels_last)
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
            except fit_loop.LoaderStopped:
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
        sharded = bool(fit_loop.sharded_parameters(self.header))
        return {
            "backbone": self.backbone.state_dict(),
            "header": full_state() if sharded else self.header.state_dict(),
            "optimizer": (
                fit_loop.full_optimizer_state(optimizer, self.header)
                if optimizer is not None
                else None
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
            return fit_loop.Objective(self, embed, device, precision)

        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        if not fit_loop.sharded_parameters(self.header):
            embed = torch.compile(self.backbone) if compile else self.backbone
            return DistributedDataParallel(
                fit_loop.Objective(self, embed, device, precision), device_ids=device_ids
            )
        # Model parallel header: its centres differ per rank, so DDP must not average their
        # gradients; it wraps the backbone only (the header scales the embedding gradients so
        # that DDP's average is the exact gradient of the global loss).
        embed = DistributedDataParallel(self.backbone, device_ids=device_ids)
        return fit_loop.Objective(
            self, torch.compile(embed) if compile else embed, device, precision
        )

    def _restore_training(
        self,
        checkpoint: Mapping[str, Any],
        optimizer: torch.optim.Optimizer,
        lr_epoch_scheduler: Any,
        lr_global_step_scheduler: Any,
        scaler: torch.amp.GradScaler,
        state: fit_loop.FitState,
        stepper: fit_loop.Stepper,
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
                    fit_loop.local_optimizer_state(checkpoint["optimizer"], optimizer, self.header)
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
        state: fit_loop.FitState,
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
            "lr": fit_loop.current_lr(optimizer),
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
            scores, roc = fit_loop.score(evaluator, dataset, embeddings)
            metrics.update({f"{name}/{key}": float(value) for key, value in scores.items()})
            if roc is not None:
                writer.roc(name, self.global_step, roc)
            if projection_samples > 0 and writer.tensorboard:
                self._write_projection(
                    dataset,
                    embeddings,
                    fit_loop.labels_of(dataset),
                    writer,
                    name,
                    projection_samples,
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
        state: fit_loop.FitState,
        parts: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        writer: RunWriter,
        total_steps: int,
        stepper: fit_loop.Stepper,
    ) -> None:
        norms = parts["embedding_norm"]
        lr = fit_loop.current_lr(optimizer)
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


# LOWER_IS_BETTER, NONFINITE_POLICIES and PRECISIONS live in femb.fit_loop; they stay importable
# from here, where fit documents them.
__all__ = [
    "LOWER_IS_BETTER",
    "NONFINITE_POLICIES",
    "PRECISIONS",
    "FaceEmbeddingModel",
    "TrainingInterrupted",
]
