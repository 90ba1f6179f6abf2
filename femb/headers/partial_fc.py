"""Partial FC: a margin softmax whose class centres are sharded across ranks (model parallel).

Papers:
    X. An, X. Zhu, Y. Gao, Y. Xiao, Y. Zhao, Z. Feng, L. Wu, B. Qin, M. Zhang, D. Zhang, Y. Fu,
    "Partial FC: Training 10 Million Identities on a Single Machine", ICCVW 2021,
    https://arxiv.org/abs/2010.05222
    X. An, J. Deng, J. Guo, Z. Feng, X. Zhu, J. Yang, T. Liu, "Killing Two Birds with One Stone:
    Efficient and Robust Training of Face Recognition CNNs by Partial FC", CVPR 2022,
    https://arxiv.org/abs/2203.15565

With R ranks, rank r holds the class centres of a contiguous slice of the C classes (the first
``C % R`` ranks one more). Every training step:

1. all ranks gather the embeddings (B_r, D) -> (B, D) and labels of the global batch;
2. rank r computes cos(theta) (B, C_r) for its classes: all of them (``sample_rate=1``, plain
   model parallelism), or the positive classes of the global batch plus a uniform random subset
   of the others, ``max(positives, int(sample_rate * C_r))`` in all (PFC sampling);
3. the target cosines cos(theta_y) (B,) are shared (all-reduce: each lives on exactly one rank),
   femb's margin hooks (:class:`~femb.headers.base.MarginHeader`: ``target_cosine``,
   ``logit_scale``, ``adjust_non_target``) turn them into target logits on the global batch,
   and each rank writes the targets of its classes into its logits;
4. the softmax cross-entropy over all shards: row max and sum of exponentials all-reduced,
   ``loss = mean_b (max_b + log sum_j exp(l_bj - max_b) - l_b,y_b)``.

So the module returns the **loss** of the global batch (the same scalar on every rank), not
logits: the (B, C) logits never exist in one place. Margin terms outside the logits (MagFace's
g regulariser) go to ``extra_losses`` as with every femb header.

Gradient convention (as insightface's arcface_torch): the class centres get the exact gradient
of the global loss, and each rank's local embeddings get ``R x`` theirs, so that DDP's averaging
of the backbone gradients over R ranks yields the exact gradient of the global loss. Terms every
rank computes identically from the gathered batch (the ``extra_losses``) are scaled by 1/R in
the backward pass only, for the same reason. With one process (no process group, or world size
1) every collective is skipped and the module equals the plain margin header followed by
``torch.nn.CrossEntropyLoss``, in value and gradients.

Shapes: embeddings (B_r, D), labels (B_r,) -> scalar loss.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor, nn

from femb.headers.base import NORM_EPS, Header, MarginHeader, compute_dtype, normalized_linear

log = logging.getLogger(__name__)

# Rows of the class-centre matrix drawn from one seeded generator: the initial centres of class
# c do not depend on how many ranks share the matrix.
_INIT_BLOCK = 4096
_INIT_STD = 0.01  # N(0, 0.01^2), as MarginHeader and insightface


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so nearby inputs give unrelated seeds."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & 0x7FFFFFFFFFFFFFFF


def _init_rows(start: int, count: int, dim: int, seed: int) -> Tensor:
    """Rows ``start .. start + count - 1`` of the seeded N(0, 0.01^2) centre matrix (count, D)."""
    out = torch.empty(count, dim)
    for block in range(start // _INIT_BLOCK, (start + count - 1) // _INIT_BLOCK + 1):
        generator = torch.Generator().manual_seed(_mix(seed, block))
        rows = torch.randn(_INIT_BLOCK, dim, generator=generator).mul_(_INIT_STD)
        lo, hi = max(start, block * _INIT_BLOCK), min(start + count, (block + 1) * _INIT_BLOCK)
        out[lo - start : hi - start] = rows[lo - block * _INIT_BLOCK : hi - block * _INIT_BLOCK]
    return out


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(first class, number of classes)`` of rank ``rank``: contiguous, sizes differ by <= 1."""
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + int(rank < extra)


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError(
                "process_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first (or pass process_group=None)"
            )
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _gather_sizes(n: int, device: torch.device, group, world: int) -> list[int]:
    size = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    return [int(s) for s in sizes]


def _all_gather_rows(x: Tensor, sizes: list[int], group) -> Tensor:
    """Concatenate every rank's rows (B_r, ...) -> (sum B_r, ...), padding to equal shapes."""
    longest = max(sizes)
    padded = x
    if x.shape[0] < longest:
        padded = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


class _GatherEmbeddings(torch.autograd.Function):
    """All-gather with gradient: forward (B_r, D) -> (B, D); backward sums the (B, D) gradients
    of all ranks, keeps this rank's rows and multiplies them by R (module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], rank: int, group) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _all_gather_rows(x, sizes, group)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        mine = total[start : start + ctx.sizes[ctx.rank]]
        return mine * len(ctx.sizes), None, None, None


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy of (B, C) logits held as column shards (B, C_r) on R ranks.

    ``target`` (B,) is the local column of each row's class, or -1 where another rank holds
    it. The backward pass returns this shard's part of the exact gradient,
    ``(softmax - onehot) / B``; no communication is needed there.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, group, world: int) -> Tensor:
        row_max = logits.max(dim=1).values
        if world > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        probs = (logits - row_max.unsqueeze(1)).exp_()
        denom = probs.sum(dim=1)
        owned = target >= 0
        picked = logits.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1)
        target_logit = torch.where(owned, picked, torch.zeros_like(picked))
        if world > 1:
            dist.all_reduce(denom, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(target_logit, op=dist.ReduceOp.SUM, group=group)
        probs.div_(denom.unsqueeze(1))
        ctx.save_for_backward(probs, target)
        # log-sum-exp minus the target logit, as torch's cross_entropy computes it.
        return (row_max + denom.log() - target_logit).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        probs, target = ctx.saved_tensors
        scale = grad / probs.shape[0]
        grad_logits = probs * scale
        rows = (target >= 0).nonzero().squeeze(1)
        grad_logits[rows, target[rows]] -= scale
        return grad_logits, None, None, None


def _replicated(value: Tensor, world: int) -> Tensor:
    """``value`` with its gradient divided by ``world``: for terms all ranks compute alike."""
    if world == 1:
        return value
    return value / world + (value - value / world).detach()


class PartialFCHeader(Header):
    """Partial FC: a femb margin on class centres sharded across ranks; returns the LOSS.

    See the module docstring for the computation and the gradient convention. Unlike the other
    headers, ``forward(embeddings, labels)`` returns the scalar classification loss of the
    global batch (``returns_loss = True``); the trainer must use it in place of
    ``loss(header(embeddings, labels), labels)`` and add ``extra_losses`` as usual.

    Set up ``torch.distributed`` before building it: the shard is chosen at construction from
    the rank and world size of ``process_group``. Under DDP, wrap only the backbone (or make DDP
    ignore this module's parameters): its ``weight`` is rank-local, so averaging its gradient
    across ranks would mix different classes. Every rank must call ``forward`` on every step
    (it runs collectives).

    Not supported: sub-centre margins (``num_subcenters > 1``) and non-margin headers. With
    ``sample_rate < 1`` the unsampled centres get a zero gradient for the step, but weight decay
    and momentum still move them, as in insightface's PFC; sampling happens in training mode
    only.

    Args:
        in_features: Embedding size D.
        out_features: Total number of classes C over all ranks (at least the world size).
        margin: A margin header name (``"arcface"``, ``"cosface"``, ``"combined"``,
            ``"sphereface"``, ``"magface"``, ``"adaface"``, ``"curricularface"``), built with
            ``margin_kwargs``; or a :class:`~femb.headers.base.MarginHeader` instance, whose
            own ``weight`` is removed (only its hooks are used).
        sample_rate: Fraction of each rank's classes in the softmax, in (0, 1]; the positives
            of the global batch are always kept. 1 is plain model parallelism.
        process_group: Group to shard over; None is the default group, or a single process
            when torch.distributed is not initialised.
        seed: Seed of the initial centres and of the negative sampling; None draws it from
            torch's global generator (seeded alike on all ranks by ``seed_everything``). The
            sampled classes of step t depend only on (seed, t, rank), so a resumed run draws
            the same negatives.
        **margin_kwargs: Hyperparameters of the named margin, e.g. ``s=64.0, m=0.5``.

    Attributes:
        rank: This process's rank in ``process_group``.
        world_size: Number of ranks.
        class_start: First class held here; ``weight`` row i is class ``class_start + i``.
        num_local: Classes held here, C_r.
        weight: (C_r, D) class centres of this rank.
        margin: The margin header whose hooks are applied (its buffers, e.g. AdaFace's norm
            statistics, are updated identically on every rank).
        sampled_classes: Global class ids in the last sampled softmax of this rank, or None
            when no sampling happened.

    Raises:
        ValueError: Unknown margin name, ``sample_rate`` outside (0, 1], fewer classes than
            ranks, or ``margin_kwargs`` given with a margin instance.
        NotImplementedError: A sub-centre margin.
    """

    stats_prefix = "partial_fc"
    #: Tells the trainer that ``forward`` returns the loss, not logits.
    returns_loss = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        margin: str | MarginHeader = "arcface",
        sample_rate: float = 1.0,
        process_group: dist.ProcessGroup | None = None,
        seed: int | None = None,
        **margin_kwargs: float,
    ) -> None:
        super().__init__(in_features, out_features)
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | float):
            raise TypeError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
        if not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.sample_rate = float(sample_rate)
        self.process_group = process_group
        self.rank, self.world_size = _world(process_group)
        if out_features < self.world_size:
            raise ValueError(
                f"out_features={out_features} classes cannot be sharded over "
                f"{self.world_size} ranks; every rank needs at least one class"
            )
        self.class_start, self.num_local = shard_range(out_features, self.rank, self.world_size)
        self.margin = self._build_margin(margin, margin_kwargs)

        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        self.seed = int(seed)
        self.weight = nn.Parameter(
            _init_rows(self.class_start, self.num_local, in_features, self.seed)
        )
        self.sampled_classes: Tensor | None = None
        self._sample_seed = _mix(self.seed, 0, self.rank)
        self._generator: torch.Generator | None = None
        log.info(
            "PartialFCHeader rank %d/%d: classes %d..%d (%d of %d), sample_rate %g, margin %s",
            self.rank,
            self.world_size,
            self.class_start,
            self.class_start + self.num_local - 1,
            self.num_local,
            out_features,
            self.sample_rate,
            type(self.margin).__name__,
        )

    def _build_margin(self, margin: str | MarginHeader, kwargs: dict) -> MarginHeader:
        if isinstance(margin, MarginHeader):
            if kwargs:
                raise ValueError(
                    f"margin is a {type(margin).__name__} instance; configure it directly "
                    f"instead of passing {sorted(kwargs)} to PartialFCHeader"
                )
            header = margin
        elif isinstance(margin, str):
            from femb.headers import available_headers  # the package imports this module

            choices = {
                name: cls
                for name, cls in available_headers().items()
                if issubclass(cls, MarginHeader)
            }
            if margin not in choices:
                raise ValueError(
                    f"margin={margin!r} is not a margin header; choose one of "
                    f"{sorted(n for n in choices if n != 'subcenter_arcface')}"
                )
            # out_features=1: only the hooks are used, the (1, D) weight is removed below.
            header = choices[margin](in_features=self.in_features, out_features=1, **kwargs)
        else:
            raise TypeError(
                f"margin must be a header name or a MarginHeader, got {type(margin).__name__}"
            )
        if header.num_subcenters != 1:
            raise NotImplementedError(
                "sub-centre margins (num_subcenters > 1) are not supported with PartialFCHeader"
            )
        header.weight = None  # unregisters the parameter: no unused (1, D) or (C, D) weight
        return header

    # ------------------------------------------------------------------ helpers

    def on_train_step(self, global_step: int) -> None:
        """Seed this step's negative sampling from (seed, step, rank); anneal the margin."""
        self._sample_seed = _mix(self.seed, int(global_step) + 1, self.rank)
        self._generator = None
        self.margin.on_train_step(global_step)

    def stats(self) -> dict[str, float]:
        return {**super().stats(), **self.margin.stats()}

    def _check_world(self) -> None:
        rank, world = _world(self.process_group)
        if (rank, world) != (self.rank, self.world_size):
            raise RuntimeError(
                f"PartialFCHeader was built for rank {self.rank} of {self.world_size}, but "
                f"runs as rank {rank} of {world}; build it after init_process_group"
            )

    def _sample(self, positives: Tensor) -> Tensor:
        """Sorted local class indices: all ``positives`` plus uniform random negatives."""
        num_sample = max(1, int(self.sample_rate * self.num_local))
        positives = torch.unique(positives)
        if positives.numel() >= num_sample:
            return positives
        device = self.weight.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self._sample_seed)
        score = torch.rand(self.num_local, generator=self._generator, device=device)
        score[positives] = 2.0  # above every uniform draw: positives are always selected
        return score.topk(num_sample).indices.sort().values

    # ------------------------------------------------------------------ forward

    def forward(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        """Loss of the global batch: (B_r, D), (B_r,) -> scalar (float32).

        Without labels: margin-free logits ``s * cos(theta)`` (B_r, C_r) of the local
        embeddings against this rank's classes (the full (B, C) logits for one process); no
        communication.
        """
        labels = self._check_inputs(embeddings, labels)
        self._check_world()
        dtype = compute_dtype(embeddings.dtype)
        group, world = self.process_group, self.world_size
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = embeddings.to(dtype)
            if labels is None:
                self.extra_losses = {}
                norms = torch.linalg.vector_norm(x, dim=1)
                cos = normalized_linear(x / norms.clamp_min(NORM_EPS).unsqueeze(1), self.weight)
                scale = self.margin.logit_scale(norms)
                return cos * (scale.unsqueeze(1) if isinstance(scale, Tensor) else scale)

            # 1. The global batch on every rank.
            if world > 1:
                sizes = _gather_sizes(x.shape[0], x.device, group, world)
                x = _GatherEmbeddings.apply(x, sizes, self.rank, group)
                labels = _all_gather_rows(labels, sizes, group)
            norms = torch.linalg.vector_norm(x, dim=1)
            x_unit = x / norms.clamp_min(NORM_EPS).unsqueeze(1)

            # 2. Cosines to this rank's (sampled) classes; local column of each owned label.
            local = labels - self.class_start
            owned = (local >= 0) & (local < self.num_local)
            weight = self.weight
            self.sampled_classes = None
            if self.sample_rate < 1.0 and self.training:
                index = self._sample(local[owned])
                weight = weight[index]
                local = torch.searchsorted(index, local.clamp(0, self.num_local - 1))
                self.sampled_classes = (index + self.class_start).detach()
            column = torch.where(owned, local, torch.zeros_like(local))
            cos = normalized_linear(x_unit, weight.to(dtype))

            # 3. Target cosines of the whole batch; each row's lives on exactly one rank.
            cos_y_here = cos.gather(1, column.unsqueeze(1)).squeeze(1)
            cos_y = cos_y_here
            if world > 1:
                shared = torch.where(owned, cos_y_here.detach(), torch.zeros_like(cos_y_here))
                dist.all_reduce(shared, op=dist.ReduceOp.SUM, group=group)
                cos_y = torch.where(owned, cos_y_here, shared)
            target = self.margin.target_cosine(cos_y, norms)
            scale = self.margin.logit_scale(norms)
            col_scale = scale.unsqueeze(1) if isinstance(scale, Tensor) else scale
            logits = self.margin.adjust_non_target(cos, cos_y, target) * col_scale
            rows = owned.nonzero().squeeze(1)
            # In place is safe: the product above is a fresh tensor that autograd does not save.
            logits.index_put_((rows, column[rows]), (target * scale)[rows])

            # 4. Softmax cross-entropy across the shards.
            loss = _ShardedCrossEntropy.apply(
                logits, torch.where(owned, column, torch.full_like(column, -1)), group, world
            )
            self.extra_losses = {
                name: _replicated(value, world) for name, value in self.margin.extra_losses.items()
            }
            self._stats["cos_target_mean"] = cos_y.detach().mean()
            self._stats["num_classes_in_softmax"] = torch.tensor(float(cos.shape[1]))
        return loss

    # ------------------------------------------------------------------ checkpoints

    @property
    def sharded(self) -> bool:
        """Whether the class centres are split over several ranks (world size > 1)."""
        return self.world_size > 1

    def sharded_parameters(self) -> list[nn.Parameter]:
        """Parameters whose rows are split over the ranks (``weight``), for the trainer."""
        return [self.weight] if self.sharded else []

    @torch.no_grad()
    def gather_rows(self, local: Tensor) -> Tensor:
        """(C_r, ...) rows of this rank -> (C, ...) rows of all ranks, on every rank.

        Collective (call it on all ranks). Used for the centres and for optimizer states of
        the same shape (momentum, Adam moments), so that checkpoints hold all C classes.
        """
        if local.shape[0] != self.num_local:
            raise ValueError(f"expected {self.num_local} rows (C_r), got {local.shape[0]}")
        if self.world_size == 1:
            return local.detach().clone()
        sizes = [
            shard_range(self.out_features, r, self.world_size)[1] for r in range(self.world_size)
        ]
        return _all_gather_rows(local.detach().contiguous(), sizes, self.process_group)

    def local_rows(self, full: Tensor) -> Tensor:
        """(C, ...) rows of all classes -> (C_r, ...) rows of this rank (a view)."""
        if full.shape[0] != self.out_features:
            raise ValueError(f"expected {self.out_features} rows (C), got {full.shape[0]}")
        return full[self.class_start : self.class_start + self.num_local]

    def gather_weight(self) -> Tensor:
        """All class centres (C, D) on every rank (collective: call it on all ranks)."""
        return self.gather_rows(self.weight)

    def full_state_dict(self) -> dict[str, Tensor]:
        """``state_dict()`` with the (C, D) centres of all ranks (collective).

        Such a state dict loads into a Partial FC header of any world size (each rank keeps
        its rows, see ``load_state_dict``), and in one process for inference.
        """
        state = self.state_dict()
        state["weight"] = self.gather_weight()
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A full (C, D) centre matrix (a checkpoint of any world size) loads as this rank's
        # rows; a (C_r, D) shard of the same world size loads as it is.
        key = prefix + "weight"
        weight = state_dict.get(key)
        if (
            isinstance(weight, Tensor)
            and self.sharded
            and tuple(weight.shape) == (self.out_features, self.in_features)
        ):
            state_dict[key] = self.local_rows(weight)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def load_full_weight(self, weight: Tensor) -> None:
        """Copy this rank's rows out of a full (C, D) centre matrix (e.g. from a checkpoint)."""
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"weight must have shape {expected} (out_features, in_features), got "
                f"{tuple(weight.shape)}"
            )
        self.weight.copy_(self.local_rows(weight))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, world_size={self.world_size}, class_start={self.class_start}, "
            f"num_local={self.num_local}, sample_rate={self.sample_rate}"
        )


__all__ = ["PartialFCHeader", "shard_range"]
