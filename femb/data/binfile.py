"""insightface validation ``.bin`` files (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...).

Layout: a pickle of the 2-tuple ``(bins, issame_list)``. ``bins`` is a list of ``2 P`` encoded
images (JPEG or PNG byte strings, usually 112x112 aligned faces); pair ``k`` is images
``2k`` and ``2k + 1``, and ``issame_list[k]`` says whether they show one person. The files were
written by Python 2, so they are read with ``encoding="bytes"``.

Reading uses a restricted unpickler that only rebuilds plain containers, byte strings, bools
and NumPy arrays/scalars, so a tampered ``.bin`` cannot run code on load. Decoding uses PIL;
mxnet is not needed.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from femb.data.base import FaceDataset, ImageReadError
from femb.data.transforms import face_transform
from femb.run_io import atomic_write

log = logging.getLogger(__name__)

_EXPECTED = (
    "expected an insightface verification .bin: a pickled 2-tuple (bins, issame_list) with "
    "bins a list of 2*P encoded images (bytes) and issame_list P booleans"
)

# The only globals such files need: NumPy array/scalar reconstruction (some writers stored
# images or flags as NumPy objects) and the helpers Python uses for bytes/bytearray under
# pickle protocol 2. Anything else (os.system, eval, ...) is refused.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"global {module}.{name} is not allowed in a verification .bin file"
        )


def _as_bytes(item: object, index: int, path: str) -> bytes:
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        # An encoded buffer stored as a NumPy array (e.g. cv2.imencode output).
        return item.tobytes()
    raise ValueError(
        f"{path}: bins[{index}] is a {type(item).__name__}, not encoded image bytes; {_EXPECTED}"
    )


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """Read an insightface ``.bin`` file without decoding the images.

    Args:
        path: The ``.bin`` file.

    Returns:
        ``(bins, issame)``: ``2 P`` encoded images and a ``(P,)`` bool array.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not a pickle of ``(bins, issame_list)`` with
            ``len(bins) == 2 * len(issame_list)``.
    """
    path_str = os.fspath(path)
    with open(path, "rb") as handle:
        try:
            content = _SafeUnpickler(handle, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as err:
            raise ValueError(f"{path_str}: cannot unpickle ({err}); {_EXPECTED}") from err

    if not (isinstance(content, tuple | list) and len(content) == 2):
        kind = type(content).__name__
        size = f" of length {len(content)}" if isinstance(content, tuple | list) else ""
        raise ValueError(f"{path_str}: top-level object is a {kind}{size}; {_EXPECTED}")
    raw_bins, raw_issame = content
    if not isinstance(raw_bins, list | tuple):
        raise ValueError(f"{path_str}: bins is a {type(raw_bins).__name__}; {_EXPECTED}")
    bins = [_as_bytes(item, i, path_str) for i, item in enumerate(raw_bins)]
    try:
        issame_arr = np.asarray(raw_issame)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{path_str}: issame_list is not array-like ({err}); {_EXPECTED}"
        ) from err
    if issame_arr.ndim != 1 or issame_arr.dtype.kind not in "bui":
        raise ValueError(
            f"{path_str}: issame_list has dtype {issame_arr.dtype} and shape "
            f"{issame_arr.shape}; {_EXPECTED}"
        )
    if issame_arr.dtype.kind != "b" and not np.isin(issame_arr, (0, 1)).all():
        raise ValueError(f"{path_str}: issame_list holds values other than 0/1; {_EXPECTED}")
    if len(bins) != 2 * len(issame_arr):
        raise ValueError(
            f"{path_str}: {len(bins)} images for {len(issame_arr)} pairs (need exactly "
            f"2 per pair); {_EXPECTED}"
        )
    return bins, issame_arr.astype(bool)


def _encode(image: bytes | Image.Image | np.ndarray, index: int) -> bytes:
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise TypeError(
                f"images[{index}]: arrays must be uint8 (H, W) or (H, W, C), got "
                f"{image.dtype} {image.shape}"
            )
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # lossless, so a round trip is exact
        return buffer.getvalue()
    raise TypeError(
        f"images[{index}] must be encoded bytes, a PIL image or a uint8 array, "
        f"got {type(image).__name__}"
    )


def write_bin(
    path: str | os.PathLike,
    images: Sequence[bytes | Image.Image | np.ndarray],
    issame: Sequence[bool] | np.ndarray,
) -> None:
    """Write a verification ``.bin`` in insightface's layout, atomically.

    Args:
        path: Output file; replaced only once the new file is complete.
        images: ``2 P`` images: encoded bytes are stored as given, PIL images and uint8
            arrays are encoded as PNG.
        issame: ``P`` flags; pair ``k`` is ``images[2k], images[2k + 1]``.

    Raises:
        ValueError: ``len(images) != 2 * len(issame)``.
        TypeError: An image of an unsupported type.
    """
    flags = [bool(x) for x in np.asarray(issame).reshape(-1)]
    if len(images) != 2 * len(flags):
        raise ValueError(
            f"write_bin needs 2 images per pair: got {len(images)} images for {len(flags)} pairs"
        )
    bins = [_encode(image, i) for i, image in enumerate(images)]

    atomic_write(
        path, lambda handle: pickle.dump((bins, flags), handle, protocol=pickle.HIGHEST_PROTOCOL)
    )


def consecutive_folds(num_pairs: int, num_folds: int = 10) -> np.ndarray:
    """Fold index per pair for ``num_folds`` consecutive blocks, as insightface evaluates.

    Matches ``sklearn.model_selection.KFold(num_folds, shuffle=False)``: the first
    ``num_pairs % num_folds`` folds get one extra pair.

    Returns:
        ``(num_pairs,)`` int64, non-decreasing.
    """
    if not 1 <= num_folds <= max(num_pairs, 1):
        raise ValueError(f"num_folds must be in [1, {max(num_pairs, 1)}], got {num_folds}")
    sizes = np.full(num_folds, num_pairs // num_folds, dtype=np.int64)
    sizes[: num_pairs % num_folds] += 1
    return np.repeat(np.arange(num_folds, dtype=np.int64), sizes)


class BinVerificationDataset(FaceDataset):
    """Verification pairs from an insightface ``.bin`` file.

    Images stay encoded in memory and are decoded per item with PIL, then go through
    :func:`femb.data.face_transform` (``train=False``) like every other dataset.

    Protocol: pair ``k`` is ``(2k, 2k + 1)`` with ``issame[k]`` from the file; ``folds`` splits
    the pairs into ``num_folds`` consecutive blocks, as insightface's 10-fold evaluation does.

    Labels: a ``.bin`` has no identities, so labels are **pseudo-identities**: the two images of
    a same-person pair share a label, every other image has its own. They agree with
    ``issame`` on every listed pair, but images of one person in different pairs get different
    labels; use ``pairs``/``issame`` as the protocol and do not train on these labels.
    ``paths`` are ``"<file>#<image index>"``.

    Args:
        path: The ``.bin`` file.
        image_size: Output side ``S``.
        transform: Defaults to ``face_transform(False, image_size, center_crop)``.
        center_crop: Center crop in source pixels; ``None`` (default) keeps the aligned crop.
        num_folds: Number of consecutive folds.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not in insightface's ``(bins, issame_list)`` layout.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_size: int = 112,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        center_crop: int | None = None,
        num_folds: int = 10,
    ) -> None:
        self.path = Path(path)
        self.bins, issame = read_bin(self.path)
        num_pairs = len(issame)
        if num_pairs == 0:
            raise ValueError(f"{self.path}: contains no pairs; {_EXPECTED}")

        # Image 2k+1 joins image 2k's label when the pair matches, else starts a new one.
        new_label = np.ones(2 * num_pairs, dtype=np.int64)
        new_label[1::2] = ~issame
        labels = np.cumsum(new_label) - 1
        identities = [f"{self.path.stem}/{k:06d}" for k in range(int(labels[-1]) + 1)]
        paths = [f"{os.fspath(self.path)}#{i}" for i in range(2 * num_pairs)]

        if transform is None:
            transform = face_transform(False, image_size, center_crop)
        super().__init__(paths, labels, identities, transform)
        if num_folds > num_pairs:
            log.warning(
                "%s has only %d pairs; using %d folds instead of num_folds=%d",
                self.path,
                num_pairs,
                num_pairs,
                num_folds,
            )
            num_folds = num_pairs
        pairs = np.arange(2 * num_pairs, dtype=np.int64).reshape(num_pairs, 2)
        self._set_pairs(pairs, issame, consecutive_folds(num_pairs, num_folds))
        log.info(
            "BinVerificationDataset %s: %d pairs (%d same), %d folds",
            self.path,
            num_pairs,
            int(issame.sum()),
            int(self.folds.max()) + 1,
        )

    def load(self, index: int) -> Image.Image:
        """Decode image ``index`` from its stored bytes."""
        try:
            image = Image.open(io.BytesIO(self.bins[index]))
            image.load()
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageReadError(f"cannot decode image {self.paths[index]!r}: {err}") from err
        return image
