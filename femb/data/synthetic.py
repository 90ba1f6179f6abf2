"""Deterministic synthetic "faces" for tests and smoke runs (no files, no downloads)."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from femb.data.base import FaceDataset
from femb.data.pairs import PROTOCOLS, pairs_from_labels

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


def _seed(*entropy: int) -> int:
    """A 32-bit seed that depends on every entropy value (SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


class SyntheticFaceDataset(FaceDataset):
    """Learnable random identities generated on the fly.

    Identity ``k`` has a smooth prototype: ``3 x r x r`` Gaussian noise upsampled bicubically
    to ``S x S`` and squashed by ``0.8 * tanh``. Sample ``j`` of identity ``k`` is the prototype
    circularly shifted by up to ``max_shift`` pixels per axis plus Gaussian noise of std
    ``noise_std``, clipped to ``[-1, 1]``. Prototypes differ far more than samples of one
    identity, so a small network separates the classes within a few steps.

    Every value is a pure function of ``(seed, split, identity, sample)``: the same index always
    gives the same tensor, in any process or worker, and nothing is cached (memory stays
    O(1)). ``train`` and ``val`` draw prototypes from different seed streams, so their
    identities are disjoint. Like ORL, a split is scored on all its pairs unless
    ``protocol="balanced_pairs"`` gives ``val`` a pair list from
    :func:`femb.data.pairs_from_labels`. There is no random augmentation (it would break the
    index -> tensor determinism); the per-sample shift and noise play that role.

    Args:
        num_identities: Classes in this split.
        images_per_identity: Samples per class.
        image_size: Output side ``S``.
        split: ``"train"`` or ``"val"``.
        seed: Base seed; change it for a different synthetic world.
        noise_std: Std of the per-sample pixel noise (prototypes span about +-0.8).
        max_shift: Largest shift in pixels; ``None`` means ``image_size // 16``.
        prototype_resolution: Side ``r`` of the low-resolution noise (smaller = smoother).
        protocol: ``"all_pairs"`` or ``"balanced_pairs"`` (see above).
    """

    def __init__(
        self,
        num_identities: int = 16,
        images_per_identity: int = 8,
        image_size: int = 112,
        split: str = "train",
        seed: int = 0,
        noise_std: float = 0.1,
        max_shift: int | None = None,
        prototype_resolution: int = 8,
        protocol: str = "all_pairs",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
        for key, value in (
            ("num_identities", num_identities),
            ("images_per_identity", images_per_identity),
            ("image_size", image_size),
            ("prototype_resolution", prototype_resolution),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.split = split
        self.seed = seed
        self.image_size = image_size
        self.images_per_identity = images_per_identity
        self.noise_std = float(noise_std)
        self.max_shift = image_size // 16 if max_shift is None else int(max_shift)
        if self.max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        self.prototype_resolution = prototype_resolution
        self._split_code = SPLITS.index(split)

        count = num_identities * images_per_identity
        labels = np.arange(count, dtype=np.int64) // images_per_identity
        identities = [f"synthetic-{split}-{k:04d}" for k in range(num_identities)]
        paths = [
            f"synthetic/{split}/{k:04d}/{j:04d}"
            for k in range(num_identities)
            for j in range(images_per_identity)
        ]
        super().__init__(paths, labels, identities, transform=None)
        balanced = protocol == "balanced_pairs"
        if split == "val" and balanced and images_per_identity >= 2 and num_identities >= 2:
            self._set_pairs(*pairs_from_labels(self.labels, num_folds=10, seed=seed))

    def prototype(self, identity: int) -> torch.Tensor:
        """The clean image of ``identity``, ``(3, S, S)`` in ``(-0.8, 0.8)``."""
        gen = torch.Generator().manual_seed(_seed(self.seed, self._split_code, identity, 0))
        r = self.prototype_resolution
        low = torch.randn(1, 3, r, r, generator=gen)
        size = (self.image_size, self.image_size)
        smooth = F.interpolate(low, size=size, mode="bicubic", align_corners=False)
        return 0.8 * torch.tanh(smooth[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Return ``(image (3, S, S) float32 in [-1, 1], label)``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        identity, sample = divmod(index, self.images_per_identity)
        gen = torch.Generator().manual_seed(
            _seed(self.seed, self._split_code, identity, sample + 1)
        )
        image = self.prototype(identity)
        if self.max_shift > 0:
            dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2,), generator=gen)
            image = torch.roll(image, shifts=(int(dy), int(dx)), dims=(1, 2))
        noise = torch.randn(image.shape, generator=gen) * self.noise_std
        return (image + noise).clamp_(-1.0, 1.0), int(self.labels[index])

    def load(self, index: int) -> Image.Image:
        """Not available: samples are generated as tensors, there is no image file."""
        raise NotImplementedError(
            "SyntheticFaceDataset generates tensors directly; it has no image files to load"
        )
