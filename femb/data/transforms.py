"""Image preprocessing for every femb dataset.

:func:`face_transform` is the single definition of preprocessing in femb. Training uses
``train=True`` (adds a random horizontal flip); evaluation and inference use ``train=False``,
so an embedding computed at test time sees exactly the pixels a validation batch saw.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

log = logging.getLogger(__name__)

# Maps [0, 1] to [-1, 1]: (x - 0.5) / 0.5, the normalisation used by arcface_torch and most
# margin-loss codebases, so pretrained weights from them see the same input range.
_MEAN = (0.5, 0.5, 0.5)
_STD = (0.5, 0.5, 0.5)


class ToRGB:
    """Convert a PIL image of any mode (``L``, ``P``, ``RGBA``, ...) to 3-channel ``RGB``.

    Grey images get their single channel repeated three times, so grey datasets (ORL) and
    colour datasets (LFW) share one backbone input layout.
    """

    def __call__(self, image: Image.Image) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"face_transform expects a PIL.Image.Image, got {type(image).__name__}; "
                "open files with PIL.Image.open (femb.data.load_image does this)"
            )
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CheckedCenterCrop:
    """Center crop of ``size`` pixels that refuses to pad.

    torchvision's ``CenterCrop`` silently pads with zeros when the crop is larger than the image;
    for faces that would add black borders the model never saw in training, so we raise instead.

    Args:
        size: Crop side in pixels, or ``(height, width)``.
    """

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = _as_hw(size, "center_crop")

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        crop_h, crop_w = self.size
        if crop_h > height or crop_w > width:
            raise ValueError(
                f"center_crop={self.size} (height, width) is larger than the image "
                f"({height}, {width}); use a smaller center_crop or center_crop=None"
            )
        return F.center_crop(image, [crop_h, crop_w])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def _as_hw(value: int | Sequence[int], key: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        # Any 2-sequence, so Hydra's ListConfig works as well as a tuple.
        pair = (value[0], value[1])
    else:
        raise TypeError(f"{key} must be an int or a (height, width) pair, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{key} must contain positive ints, got {value!r}")
    return pair


def face_transform(
    train: bool,
    image_size: int = 112,
    center_crop: int | tuple[int, int] | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """Build the preprocessing pipeline: PIL image -> float tensor ``(3, S, S)`` in ``[-1, 1]``.

    Steps, in order:

    1. convert to RGB (grey images are repeated to 3 channels);
    2. if ``center_crop`` is set, crop that many pixels from the centre of the *original*
       image (so the crop is defined in source-image pixels, independent of ``image_size``);
    3. resize to ``image_size x image_size`` (bilinear, antialiased; the aspect ratio is not
       kept, e.g. ORL's 92x112 faces are stretched horizontally);
    4. only when ``train=True``: random horizontal flip with probability 0.5;
    5. convert to float32 in ``[0, 1]`` and normalise with mean 0.5, std 0.5 to ``[-1, 1]``.

    This is the only place femb defines preprocessing: datasets build it by default, and
    evaluation and inference call it with ``train=False``.

    Args:
        train: Add training augmentation (random horizontal flip). Use ``False`` for
            evaluation and inference.
        image_size: Output side ``S`` in pixels.
        center_crop: Crop side in pixels (or ``(height, width)``) taken from the centre of the
            input image before resizing; ``None`` keeps the whole image. A crop larger than the
            image raises ``ValueError`` when applied.

    Returns:
        A callable ``PIL.Image -> torch.Tensor`` of shape ``(3, image_size, image_size)``,
        dtype float32, values in ``[-1, 1]``.
    """
    if not isinstance(train, bool):
        raise TypeError(f"train must be a bool, got {train!r}")
    size = _as_hw(image_size, "image_size")
    if size[0] != size[1]:
        raise ValueError(f"image_size must be a single int (square output), got {image_size!r}")

    steps: list[Callable] = [ToRGB()]
    if center_crop is not None:
        steps.append(CheckedCenterCrop(center_crop))
    bilinear = v2.InterpolationMode.BILINEAR
    steps.append(v2.Resize(list(size), interpolation=bilinear, antialias=True))
    if train:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    steps += [
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(_MEAN), std=list(_STD)),
    ]
    return v2.Compose(steps)
