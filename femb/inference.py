"""Use a trained run: load it, embed images, compare two faces, export the backbone.

Everything here starts from what ``femb.train`` writes: a run directory (or one of its
``checkpoints/*.pt`` files) whose checkpoint carries the resolved config. From that config
femb rebuilds the model *and* the preprocessing, so an image embedded here sees exactly the
pixels a validation image saw during training::

    run = load_run("outputs/2024-05-01/12-00-00")
    emb = embed_folder(run, "my_faces/")                  # FolderEmbeddings
    result = compare_images(run, "a.jpg", "b.jpg")        # Comparison at the EER threshold
    report = export_model(run, "model.onnx", "onnx")      # parity-checked ONNX file

Preprocessing (:func:`preprocessing_from_config`) is ``femb.data.face_transform(train=False,
image_size, center_crop)`` with ``image_size`` and ``center_crop`` read from the run's
validation dataset node (falling back to that dataset class's defaults, e.g. LFW's 150 px
centre crop), the single place where inference preprocessing is decided.

Thresholds (:class:`Threshold`) are in the unit of the run's evaluator similarity
(``evaluator.similarity``: ``cos`` or ``l2``, see :mod:`femb.evaluation.similarity`); a pair
is "same" when ``score >= threshold``.
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import logging
import math
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from femb.data import face_transform, load_image
from femb.data.base import ImageReadError
from femb.evaluation import get_similarity
from femb.model import FaceEmbeddingModel
from femb.run_io import atomic_write
from femb.utils import resolve_device

log = logging.getLogger(__name__)

__all__ = [
    "EMBEDDING_FORMATS",
    "EXPORT_FORMATS",
    "INFERENCE_IMAGE_EXTENSIONS",
    "ONNX_EXPORTERS",
    "Comparison",
    "EmbeddingExport",
    "ExportParityError",
    "ExportReport",
    "FolderEmbeddings",
    "ImageFileDataset",
    "Preprocessing",
    "Threshold",
    "TrainedRun",
    "check_embeddings_path",
    "checkpoint_file",
    "compare_images",
    "embed_folder",
    "embed_images",
    "export_model",
    "find_images",
    "load_embeddings",
    "load_run",
    "preprocess_from_config",
    "preprocessing_from_config",
    "read_checkpoint",
    "save_embeddings",
    "stored_eer_threshold",
    "threshold_at_far",
]

#: Suffixes (case-insensitive) that :func:`find_images` collects.
INFERENCE_IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".bmp",
    ".jpeg",
    ".jpg",
    ".pgm",
    ".png",
    ".ppm",
    ".webp",
)
#: File suffixes :func:`save_embeddings` can write.
EMBEDDING_FORMATS: tuple[str, ...] = (".npz", ".parquet")
#: Formats of :func:`export_model`.
EXPORT_FORMATS: tuple[str, ...] = ("onnx", "torchscript")
#: ONNX exporters: torch.export-based ("dynamo", torch's default, needs ``onnxscript``) or the
#: TorchScript-tracing one ("legacy", deprecated by PyTorch but dependency-free).
ONNX_EXPORTERS: tuple[str, ...] = ("dynamo", "legacy")

_CHECKPOINT_KEYS = ("backbone", "header", "num_classes")


# --------------------------------------------------------------------------------------------
# Loading a run


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint a run directory, checkpoints folder or ``.pt`` path stands for.

    A run directory means ``<run>/checkpoints/last.pt``; a ``checkpoints`` folder means its
    ``last.pt``; a file is taken as is.

    Raises:
        FileNotFoundError: Nothing usable at ``path``; the message lists the checkpoints that
            do exist there.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(
            f"no run directory or checkpoint at {path}; pass a run directory (it holds "
            "checkpoints/last.pt, written by scripts/train.py) or a .pt checkpoint file."
        )
    for candidate in (path / "checkpoints" / "last.pt", path / "last.pt"):
        if candidate.is_file():
            return candidate
    found = sorted(str(p.relative_to(path)) for p in path.glob("**/*.pt"))[:5]
    hint = f" It holds {found}; pass one of those files." if found else ""
    raise FileNotFoundError(
        f"{path} is a directory without checkpoints/last.pt (training may not have "
        f"finished).{hint}"
    )


def read_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]]:
    """Find and read a femb checkpoint, with errors that say what is wrong and what to do.

    Loading uses ``torch.load(..., weights_only=True)``: femb checkpoints hold only tensors and
    plain containers, so no code from the file is ever run.

    Args:
        path: A run directory, its ``checkpoints`` folder, or a ``.pt`` file.
        map_location: Where to put the tensors.

    Returns:
        The checkpoint file and its dict (keys ``backbone``, ``header``, ``num_classes``,
        ``config``, ``metrics``, ``global_step``, ...).

    Raises:
        FileNotFoundError: See :func:`checkpoint_file`.
        ValueError: The file is not a torch file, not a femb checkpoint, or holds Python
            objects that a weights-only load refuses.
    """
    file = checkpoint_file(path)
    # torch.save writes a zip archive; anything else is some other file (or a pre-1.6 torch
    # checkpoint, which femb never wrote) and would fail inside the unpickler with an
    # unhelpful message.
    if not zipfile.is_zipfile(file):
        raise ValueError(
            f"{file} is not a PyTorch checkpoint (torch.save writes a zip archive); pass "
            "<run>/checkpoints/last.pt or best.pt written by femb.train."
        )
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{file} holds Python objects beyond tensors and plain containers, which femb "
            "does not unpickle (that could run code from the file). If you trust the file, "
            "load it with torch.load(path, weights_only=False) and pass the dict to "
            "femb.train.load_model."
        ) from err
    except (RuntimeError, EOFError, OSError, KeyError, zipfile.BadZipFile) as err:
        raise ValueError(f"{file} is not a readable PyTorch checkpoint ({err}).") from err
    if not isinstance(state, Mapping) or not all(k in state for k in _CHECKPOINT_KEYS):
        keys = sorted(state)[:8] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"{file} is not a femb checkpoint: expected a dict with keys "
            f"{list(_CHECKPOINT_KEYS)}, got {keys}. Pass a checkpoint written by femb.train "
            "(<run>/checkpoints/last.pt or best.pt)."
        )
    return file, dict(state)


@dataclass
class TrainedRun:
    """A trained model with the config and metrics its checkpoint carried.

    Attributes:
        model: The model, in eval mode, on the CPU (``encode`` moves it to its ``device``).
        checkpoint: The checkpoint file read.
        config: The resolved training config.
        metrics: The metrics of the evaluation stored with the checkpoint (``<valset>/<key>``;
            the last evaluation for ``last.pt``, the best for ``best.pt``).
        global_step: Optimizer steps the model was trained for.
    """

    model: FaceEmbeddingModel
    checkpoint: Path
    config: DictConfig
    metrics: dict[str, float] = field(default_factory=dict)
    global_step: int = 0

    @property
    def valsets(self) -> list[str]:
        """Names of the run's validation sets, in config order (the first is monitored)."""
        return list((self.config.dataset.get("val") or {}).keys())

    @property
    def similarity(self) -> str:
        """The evaluator's similarity name (``cos`` or ``l2``), the unit of its thresholds."""
        evaluator = self.config.get("evaluator") or {}
        return str(evaluator.get("similarity", "cos"))

    @property
    def flip_test(self) -> bool:
        """Whether the run evaluated with flip test (its thresholds assume the same)."""
        return bool(self.config.get("flip_test", False))

    def valset(self, name: str | None = None) -> str:
        """Check a validation-set name, or return the first (monitored) one for None.

        Raises:
            ValueError: Unknown name, or the run has no validation set.
        """
        names = self.valsets
        if name is None:
            if not names:
                raise ValueError(
                    f"the run of {self.checkpoint} has no validation set (dataset.val is "
                    "empty), so it stored no threshold; pass an explicit threshold."
                )
            return names[0]
        if name not in names:
            raise ValueError(f"unknown validation set {name!r}; this run has {sorted(names)}.")
        return name

    def preprocessing(self, valset: str | None = None) -> Preprocessing:
        """The validation preprocessing of the run; see :func:`preprocessing_from_config`."""
        prep = preprocessing_from_config(self.config, valset)
        input_size = getattr(self.model.backbone, "input_size", None)
        if input_size is not None and int(input_size) != prep.image_size:
            raise ValueError(
                f"the backbone expects {input_size} px images but {prep.source} has "
                f"image_size={prep.image_size}; the config is inconsistent."
            )
        return prep

    def resolve_flip(self, flip: bool | None) -> bool:
        """``flip`` if given, else the run's ``flip_test``; warns when they disagree."""
        if flip is None:
            return self.flip_test
        if flip != self.flip_test:
            log.warning(
                "flip=%s but the run evaluated with flip_test=%s: stored thresholds were "
                "computed %s flip test, so similarities are on a slightly different scale.",
                flip,
                self.flip_test,
                "with" if self.flip_test else "without",
            )
        return bool(flip)


def load_run(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> TrainedRun:
    """Rebuild a trained model from a run directory or checkpoint (see :func:`read_checkpoint`).

    Args:
        path: A run directory, its ``checkpoints`` folder, or a ``.pt`` file.
        map_location: Where ``torch.load`` puts the tensors while reading.

    Raises:
        FileNotFoundError: No checkpoint at ``path``.
        ValueError: Not a femb checkpoint, or one without a config (a plain-Python ``fit``).
    """
    from femb.train import load_model  # femb.train imports this module lazily, too

    file, state = read_checkpoint(path, map_location=map_location)
    if state.get("config") is None:
        raise ValueError(
            f"{file} holds no config (it was written by a plain-Python fit); rebuild the "
            "backbone and header yourself and call model.load_checkpoint_state(state)."
        )
    model = load_model(state, map_location=map_location)
    metrics = {k: float(v) for k, v in (state.get("metrics") or {}).items()}
    run = TrainedRun(
        model=model,
        checkpoint=file,
        config=OmegaConf.create(state["config"]),
        metrics=metrics,
        global_step=int(state.get("global_step", 0)),
    )
    log.info(
        "Loaded %s (step %d, backbone %s)",
        file,
        run.global_step,
        run.config.backbone.get("backbone", run.config.backbone.get("_target_")),
    )
    return run


# --------------------------------------------------------------------------------------------
# Preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """The inference preprocessing of a run: ``face_transform(train=False, ...)`` parameters.

    Attributes:
        image_size: Output side ``S`` in pixels.
        center_crop: Centre crop in source pixels before resizing, or None.
        source: The config node it was read from, e.g. ``dataset.val.orl``.
    """

    image_size: int
    center_crop: int | tuple[int, int] | None
    source: str

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """``PIL.Image -> (3, S, S)`` float32 in ``[-1, 1]``, as in validation."""
        return face_transform(False, self.image_size, self.center_crop)

    def describe(self) -> str:
        crop = f"centre crop {self.center_crop} px, " if self.center_crop is not None else ""
        return f"RGB, {crop}resize to {self.image_size}x{self.image_size}, (x - 0.5) / 0.5"


def preprocessing_from_config(
    cfg: DictConfig | Mapping[str, Any], valset: str | None = None
) -> Preprocessing:
    """Read a run's inference preprocessing from its training config.

    ``image_size`` and ``center_crop`` come from the validation dataset node
    ``dataset.val.<valset>`` (the first one when ``valset`` is None); a key the node does not
    set takes the default of the node's ``_target_`` class (so an LFW run, whose node leaves
    ``center_crop`` to ``LFWDataset``, gets its 150 px crop). A run without validation sets
    uses ``dataset.train``, whose validation-time transform is the same minus the random flip.

    Raises:
        ValueError: Unknown ``valset``, or a node whose target cannot be imported.
        NotImplementedError: The node sets its own ``transform``, which femb cannot rebuild.
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    val = cfg.dataset.get("val") or {}
    if valset is None and val:
        valset = next(iter(val))
    if valset is not None:
        if valset not in val:
            raise ValueError(f"unknown validation set {valset!r}; the config has {sorted(val)}.")
        node, source = val[valset], f"dataset.val.{valset}"
    else:
        node, source = cfg.dataset.train, "dataset.train"
    if node.get("transform") is not None:
        raise NotImplementedError(
            f"{source} sets its own transform, which is not supported by femb.inference; "
            "preprocess the images yourself and call model.encode(tensor)."
        )

    defaults = _target_defaults(node, source)
    image_size = node.get("image_size", defaults.get("image_size", cfg.get("image_size", 112)))
    if "center_crop" in node:
        center_crop = node.center_crop
    else:
        center_crop = defaults.get("center_crop")
    if center_crop is not None and not isinstance(center_crop, int):
        center_crop = (int(center_crop[0]), int(center_crop[1]))
    return Preprocessing(image_size=int(image_size), center_crop=center_crop, source=source)


def preprocess_from_config(
    cfg: DictConfig | Mapping[str, Any], valset: str | None = None
) -> Callable[[Image.Image], torch.Tensor]:
    """The validation transform of a run config (see :func:`preprocessing_from_config`)."""
    return preprocessing_from_config(cfg, valset).transform()


def _target_defaults(node: DictConfig, source: str) -> dict[str, Any]:
    target = node.get("_target_")
    if target is None:
        return {}
    try:
        obj = get_object(target)
    except Exception as err:  # Hydra raises ImportError or ValueError depending on the path
        raise ValueError(f"{source}._target_={target!r} cannot be imported: {err}") from err
    params = inspect.signature(obj).parameters
    return {
        name: params[name].default
        for name in ("image_size", "center_crop")
        if name in params and params[name].default is not inspect.Parameter.empty
    }


# --------------------------------------------------------------------------------------------
# Embedding images


def find_images(
    root: str | os.PathLike, extensions: Iterable[str] = INFERENCE_IMAGE_EXTENSIONS
) -> list[Path]:
    """Every image under ``root``, at any depth, as sorted paths relative to ``root``.

    Hidden files and folders (name starting with ``.``) are skipped; symlinked folders are
    not followed (symlinked files are kept).

    Raises:
        FileNotFoundError: ``root`` is not a directory or holds no image.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory.")
    suffixes = {e.lower() for e in extensions}
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        base = Path(folder).relative_to(root)
        found += [
            base / f for f in files if not f.startswith(".") and Path(f).suffix.lower() in suffixes
        ]
    if not found:
        raise FileNotFoundError(
            f"no images under {root} (looked for {sorted(suffixes)} at any depth)."
        )
    return sorted(found, key=lambda p: p.as_posix())


class ImageFileDataset(Dataset):
    """Image files -> ``(image (3, S, S), ok)`` for :func:`embed_images`.

    Args:
        paths: Image files.
        transform: ``PIL.Image -> Tensor``, usually :meth:`Preprocessing.transform`.
        skip_unreadable: Yield ``(zeros, False)`` for a file that cannot be decoded or
            preprocessed instead of raising, so one bad file does not stop a large folder.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        transform: Callable[[Image.Image], torch.Tensor],
        skip_unreadable: bool = False,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self.skip_unreadable = skip_unreadable
        self._blank: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        path = self.paths[index]
        try:
            image = self.transform(load_image(path))
        except (ImageReadError, FileNotFoundError, ValueError) as err:
            # ValueError: the preprocessing refuses the image (e.g. smaller than the crop).
            if not self.skip_unreadable:
                if isinstance(err, ValueError):
                    raise ValueError(f"cannot preprocess {path}: {err}") from err
                raise
            log.warning("skipping unusable image %s: %s", path, err)
            return self._placeholder(), False
        if self._blank is None:
            self._blank = torch.zeros_like(image)
        return image, True

    def _placeholder(self) -> torch.Tensor:
        if self._blank is None:
            # The transform fixes the output shape; probe it once on a blank image large
            # enough for any face crop.
            self._blank = torch.zeros_like(self.transform(Image.new("RGB", (1024, 1024))))
        return self._blank


@dataclass
class FolderEmbeddings:
    """Embeddings of a folder of images.

    Attributes:
        paths: (N,) image paths relative to the folder, POSIX style, sorted.
        embeddings: (N, D) float32, L2-normalised.
        norms: (N,) float32 raw embedding norms (MagFace's quality score).
        skipped: Relative paths of unreadable files left out (with ``skip_unreadable``).
    """

    paths: list[str]
    embeddings: np.ndarray
    norms: np.ndarray
    skipped: list[str] = field(default_factory=list)


def embed_images(
    model: FaceEmbeddingModel,
    paths: Sequence[str | os.PathLike],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 64,
    device: str | torch.device = "auto",
    flip: bool = False,
    num_workers: int = 0,
    progress: bool = False,
    skip_unreadable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed image files with ``model.encode``.

    Args:
        model: A trained model.
        paths: Image files.
        transform: The run's preprocessing (:meth:`TrainedRun.preprocessing`).
        batch_size: Images per forward pass.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        flip: Flip test (see :meth:`FaceEmbeddingModel.encode`).
        num_workers: DataLoader workers decoding the files.
        progress: Show a tqdm bar.
        skip_unreadable: Leave out files that cannot be decoded (see :class:`ImageFileDataset`).

    Returns:
        L2-normalised embeddings (M, D), raw norms (M,) and the bool mask (N,) of the files
        that were read, ``M = mask.sum()``.

    Raises:
        ImageReadError: A file cannot be decoded and ``skip_unreadable`` is False.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    device = resolve_device(device)
    dataset = ImageFileDataset(paths, transform, skip_unreadable=skip_unreadable)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    chunks, norms, masks = [], [], []
    with tqdm(total=len(dataset), disable=not progress, unit="img", desc="embed") as bar:
        for images, ok in loader:
            emb, norm = model.encode(
                images, batch_size=len(images), device=device, flip=flip, return_norms=True
            )
            chunks.append(emb[ok])
            norms.append(norm[ok])
            masks.append(ok)
            bar.update(len(images))
    return torch.cat(chunks), torch.cat(norms), torch.cat(masks)


def embed_folder(
    run: TrainedRun,
    root: str | os.PathLike,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    flip: bool | None = None,
    num_workers: int = 0,
    progress: bool = False,
    skip_unreadable: bool = False,
    extensions: Iterable[str] = INFERENCE_IMAGE_EXTENSIONS,
) -> FolderEmbeddings:
    """Embed every image under ``root`` (recursively) with the run's validation preprocessing.

    Args:
        run: From :func:`load_run`.
        root: Folder of images, any layout and depth.
        flip: Flip test; None follows the run's ``flip_test``.
        extensions: Suffixes collected by :func:`find_images`.
        Others: As in :func:`embed_images`.

    Raises:
        FileNotFoundError: ``root`` is missing or holds no image.
        ImageReadError: A file cannot be decoded and ``skip_unreadable`` is False.
        ValueError: Every file was unreadable.
    """
    root = Path(root)
    relative = find_images(root, extensions)
    prep = run.preprocessing()
    log.info("Embedding %d images under %s (%s)", len(relative), root, prep.describe())
    emb, norms, ok = embed_images(
        run.model,
        [root / p for p in relative],
        prep.transform(),
        batch_size=batch_size,
        device=device,
        flip=run.resolve_flip(flip),
        num_workers=num_workers,
        progress=progress,
        skip_unreadable=skip_unreadable,
    )
    names = [p.as_posix() for p in relative]
    keep = ok.tolist()
    skipped = [n for n, k in zip(names, keep, strict=True) if not k]
    if skipped:
        log.warning("left out %d unreadable file(s), e.g. %s", len(skipped), skipped[:5])
    if not any(keep):
        raise ValueError(f"none of the {len(names)} image files under {root} could be read.")
    return FolderEmbeddings(
        paths=[n for n, k in zip(names, keep, strict=True) if k],
        embeddings=emb.numpy().astype(np.float32),
        norms=norms.numpy().astype(np.float32),
        skipped=skipped,
    )


def save_embeddings(path: str | os.PathLike, result: FolderEmbeddings) -> Path:
    """Write embeddings atomically as ``.npz`` or ``.parquet`` (chosen by the suffix).

    ``.npz`` holds arrays ``embeddings`` (N, D) float32, ``norms`` (N,) float32 and ``paths``
    (N,) unicode (readable with ``np.load`` without ``allow_pickle``). ``.parquet`` (needs
    ``pyarrow``) has one row per image with columns ``path`` (string), ``norm`` (float32) and
    ``embedding`` (fixed-size list of D float32).

    Raises:
        ValueError: Unknown suffix.
        ModuleNotFoundError: ``.parquet`` without ``pyarrow`` installed.
    """
    path = Path(path)
    suffix = check_embeddings_path(path)
    if suffix == ".npz":

        def write(f: io.BufferedWriter) -> None:
            np.savez(
                f,
                embeddings=result.embeddings.astype(np.float32),
                norms=result.norms.astype(np.float32),
                paths=np.asarray(result.paths, dtype=str),
            )

    else:
        pa, pq = _import_pyarrow(path)
        dim = result.embeddings.shape[1]
        flat = pa.array(result.embeddings.astype(np.float32).ravel(), type=pa.float32())
        table = pa.table(
            {
                "path": pa.array(result.paths, type=pa.string()),
                "norm": pa.array(result.norms.astype(np.float32), type=pa.float32()),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
            }
        )

        def write(f: io.BufferedWriter) -> None:
            pq.write_table(table, f)

    atomic_write(path, write)
    return path


def check_embeddings_path(path: str | os.PathLike) -> str:
    """Check that :func:`save_embeddings` can write ``path``; return its lower-case suffix.

    Raises:
        ValueError: Unknown suffix.
        ModuleNotFoundError: ``.parquet`` without ``pyarrow`` installed.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EMBEDDING_FORMATS:
        raise ValueError(
            f"unknown embeddings file type {path.suffix!r} of {path}; use one of "
            f"{sorted(EMBEDDING_FORMATS)}."
        )
    if suffix == ".parquet":
        _import_pyarrow(path)
    return suffix


def load_embeddings(path: str | os.PathLike) -> FolderEmbeddings:
    """Read a file written by :func:`save_embeddings`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path) as data:
            return FolderEmbeddings(
                paths=data["paths"].tolist(),
                embeddings=data["embeddings"],
                norms=data["norms"],
            )
    if suffix == ".parquet":
        _, pq = _import_pyarrow(path)
        table = pq.read_table(path)
        emb = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
        return FolderEmbeddings(
            paths=table.column("path").to_pylist(),
            embeddings=emb.reshape(table.num_rows, -1),
            norms=table.column("norm").to_numpy(),
        )
    raise ValueError(
        f"unknown embeddings file type {path.suffix!r} of {path}; use one of "
        f"{sorted(EMBEDDING_FORMATS)}."
    )


def _import_pyarrow(path: Path) -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"{path} is a .parquet file, which needs pyarrow (pip install pyarrow); or "
            "name the output file *.npz."
        ) from err
    return pa, pq


# --------------------------------------------------------------------------------------------
# Comparing faces


@dataclass(frozen=True)
class Threshold:
    """A same/different decision threshold, in the unit of ``similarity``.

    Attributes:
        value: Accept a pair as "same" when its score is ``>= value``.
        similarity: The similarity it applies to (``cos`` or ``l2``).
        rule: ``"eer"`` (stored EER threshold), ``"far"`` (recomputed at a FAR target) or
            ``"manual"``.
        description: One human-readable line saying where the value comes from.
        valset: The validation set it was validated on (None for ``manual``).
        far_target: The requested FAR (rule ``far``).
        far: The FAR the threshold reaches on the validation set (rule ``far``).
        tar: The TAR at that threshold on the validation set (rule ``far``).
        flip: Whether the validation embeddings used flip test.
    """

    value: float
    similarity: str
    rule: str
    description: str
    valset: str | None = None
    far_target: float | None = None
    far: float | None = None
    tar: float | None = None
    flip: bool | None = None


def stored_eer_threshold(run: TrainedRun, valset: str | None = None) -> Threshold:
    """The EER threshold of the evaluation stored in the checkpoint.

    That is ``metrics["<valset>/eer_threshold"]``: the highest threshold whose FAR is at least
    its FRR on that validation set (see :meth:`GenuineImpostorScores.eer`), measured with the
    run's evaluator similarity and flip setting.

    Raises:
        ValueError: The run has no validation set or its checkpoint stored no evaluation.
    """
    name = run.valset(valset)
    key = f"{name}/eer_threshold"
    if key not in run.metrics or not math.isfinite(run.metrics[key]):
        raise ValueError(
            f"{run.checkpoint} stores no {key!r} (no evaluation ran before it was saved); "
            "use the far rule (recomputes on the validation set) or an explicit threshold."
        )
    eer = run.metrics.get(f"{name}/eer", math.nan)
    return Threshold(
        value=float(run.metrics[key]),
        similarity=run.similarity,
        rule="eer",
        description=(
            f"EER threshold on {name} stored in {run.checkpoint.name} at step "
            f"{run.global_step}, EER {eer:.4f}"
        ),
        valset=name,
        flip=run.flip_test,
    )


def score_valset(
    run: TrainedRun,
    name: str,
    flip: bool,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    data_root: str | os.PathLike | None = None,
    num_workers: int = 0,
) -> Any:
    """Rebuild validation set ``name`` from the run's config, encode it and score it with the
    run's own evaluator.

    Returns:
        The evaluator's ``VerificationResult`` (``.metrics``, ``.roc``, ``.scores``).
    """
    from femb.train import instantiate  # lazy, as load_model: femb.train imports this module

    node = _relocated(run.config, run.config.dataset.val[name], data_root)
    log.info("Rebuilding validation set %r <%s>", name, node._target_)
    try:
        dataset = instantiate(node)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}\nThe run's validation set {name!r} is rebuilt from the config stored in "
            f"the checkpoint (data_root={run.config.get('data_root')!r}); if the data lives "
            "elsewhere now, pass --data-root DIR to the script (data_root= in femb.inference)."
        ) from err
    embeddings = run.model.encode(
        dataset, batch_size=batch_size, device=device, flip=flip, num_workers=num_workers
    )
    evaluator = instantiate(run.config.evaluator)
    return evaluator.compute(
        embeddings,
        getattr(dataset, "labels", None),
        pairs=getattr(dataset, "pairs", None),
        issame=getattr(dataset, "issame", None),
        folds=getattr(dataset, "folds", None),
    )


def evaluate_run(
    run: TrainedRun,
    flip: bool | None = None,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    data_root: str | os.PathLike | None = None,
    num_workers: int = 0,
) -> dict[str, float]:
    """Metrics of a trained run on every validation set of its config.

    Args:
        run: From :func:`load_run`.
        flip: Flip test; None uses the run's ``flip_test``.
        batch_size, device, num_workers: As for ``encode``.
        data_root: Where the data lives now, if it moved since training.

    Returns:
        ``{"<set>/<metric>": value}``, the columns of ``verification.csv``.
    """
    flip = run.resolve_flip(flip)
    metrics: dict[str, float] = {}
    for name in run.valsets:
        result = score_valset(run, name, flip, batch_size, device, data_root, num_workers)
        metrics.update({f"{name}/{k}": float(v) for k, v in result.metrics.items()})
    return metrics


def threshold_at_far(
    run: TrainedRun,
    far: float,
    valset: str | None = None,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    flip: bool | None = None,
    data_root: str | os.PathLike | None = None,
    num_workers: int = 0,
) -> Threshold:
    """Threshold at a FAR target, recomputed by encoding the run's validation set.

    The validation set is rebuilt from ``dataset.val.<valset>`` of the run config and scored
    by the run's evaluator (same similarity and pair protocol as in training). The threshold
    is the one :meth:`GenuineImpostorScores.tar_at_far` reports: among thresholds whose FAR
    on that set is ``<= far``, the one with the highest TAR.

    Args:
        run: From :func:`load_run`.
        far: Target false accept rate in (0, 1].
        valset: Validation set name; None is the first.
        flip: Flip test; None follows the run's ``flip_test``.
        data_root: Where the data lives now, if it moved since training: replaces the run's
            ``data_root`` prefix of the dataset paths.
        Others: As in :func:`embed_images`.

    Raises:
        ValueError: ``far`` outside (0, 1] or below the smallest FAR the set resolves
            (``1 / n_impostor``).
        FileNotFoundError: The validation data is not where the config says; pass
            ``data_root``.
    """
    if not 0.0 < far <= 1.0:
        raise ValueError(f"far={far} must lie in (0, 1], e.g. 1e-3.")
    name = run.valset(valset)
    flip = run.resolve_flip(flip)
    result = score_valset(run, name, flip, batch_size, device, data_root, num_workers)
    scores = result.scores
    at = scores.tar_at_far([far])
    value, tar = float(at.thresholds[0]), float(at.tar[0])
    if math.isnan(value):
        raise ValueError(
            f"far={far:g} is below the smallest FAR that {name} resolves, "
            f"1/{scores.n_impostor} = {1 / scores.n_impostor:.3g}; use a larger far."
        )
    achieved = float(np.count_nonzero(scores.impostor >= value) / scores.n_impostor)
    if math.isinf(value):
        log.warning(
            "no genuine pair of %s scores above the FAR %g limit: every pair will be "
            "judged different",
            name,
            far,
        )
    return Threshold(
        value=value,
        similarity=run.similarity,
        rule="far",
        description=(
            f"threshold at FAR <= {far:g} recomputed on {name}, {scores.n_genuine} genuine "
            f"and {scores.n_impostor} impostor pairs: FAR {achieved:.3g}, TAR {tar:.4f}"
        ),
        valset=name,
        far_target=float(far),
        far=achieved,
        tar=tar,
        flip=flip,
    )


def _relocated(
    cfg: DictConfig, node: DictConfig, data_root: str | os.PathLike | None
) -> DictConfig:
    node = copy.deepcopy(node)
    if data_root is None:
        return node
    old = str(cfg.get("data_root", ""))
    root = node.get("root")
    if isinstance(root, str) and old and (root == old or root.startswith(old.rstrip("/") + "/")):
        node.root = str(Path(data_root) / Path(root).relative_to(old))
    else:
        log.warning(
            "data_root=%s given but the dataset root %r does not start with the run's "
            "data_root %r; using it unchanged",
            data_root,
            root,
            old,
        )
    return node


@dataclass(frozen=True)
class Comparison:
    """The similarity of two face images and the decision at a threshold.

    Attributes:
        image_a: First image path.
        image_b: Second image path.
        score: Their similarity (unit of ``threshold.similarity``).
        same: ``score >= threshold.value``.
        threshold: The threshold used and where it comes from.
        flip: Whether flip test was used for the two embeddings.
        checkpoint: The checkpoint of the model.
    """

    image_a: str
    image_b: str
    score: float
    same: bool
    threshold: Threshold
    flip: bool
    checkpoint: str

    def summary(self) -> str:
        """One line: the decision, the score and the rule."""
        verdict = "same person" if self.same else "different people"
        op = ">=" if self.same else "<"
        # 4 decimals, or as many as it takes to tell the score from the threshold.
        digits = 4
        while digits < 12 and (
            f"{self.score:.{digits}f}" == f"{self.threshold.value:.{digits}f}"
            and self.score != self.threshold.value
        ):
            digits += 2
        return (
            f"{verdict}: {self.threshold.similarity} similarity {self.score:.{digits}f} {op} "
            f"threshold {self.threshold.value:.{digits}f} ({self.threshold.description})"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats become None)."""
        out = asdict(self)
        out["similarity"] = self.threshold.similarity
        return _finite(out)


def compare_images(
    run: TrainedRun,
    image_a: str | os.PathLike,
    image_b: str | os.PathLike,
    threshold: Threshold | float | None = None,
    device: str | torch.device = "auto",
    flip: bool | None = None,
) -> Comparison:
    """Score two images with the run's model and decide same/different.

    The images get the preprocessing of the threshold's validation set (the first one for a
    manual threshold), so they are embedded exactly as the pairs the threshold was set on.

    Args:
        run: From :func:`load_run`.
        image_a: First image file.
        image_b: Second image file.
        threshold: A :class:`Threshold`, a plain number (rule ``manual``, in the run's
            similarity unit), or None for :func:`stored_eer_threshold`.
        device: Where to run the model.
        flip: Flip test; None follows the run's ``flip_test``.

    Raises:
        FileNotFoundError: An image does not exist.
        ImageReadError: An image cannot be decoded.
        ValueError: No stored threshold (see :func:`stored_eer_threshold`).
    """
    images = [load_image(image_a), load_image(image_b)]
    if threshold is None:
        threshold = stored_eer_threshold(run)
    elif not isinstance(threshold, Threshold):
        threshold = Threshold(
            value=float(threshold),
            similarity=run.similarity,
            rule="manual",
            description="threshold given by the user",
        )
    if threshold.similarity != run.similarity:
        raise ValueError(
            f"the threshold is in {threshold.similarity!r} units but the run scores with "
            f"{run.similarity!r}."
        )
    flip = run.resolve_flip(flip)
    transform = run.preprocessing(threshold.valset).transform()
    tensors = []
    for path, image in zip((image_a, image_b), images, strict=True):
        try:
            tensors.append(transform(image))
        except ValueError as err:  # e.g. an image smaller than the run's centre crop
            raise ValueError(f"cannot preprocess {os.fspath(path)}: {err}") from err
    batch = torch.stack(tensors)
    emb = run.model.encode(batch, batch_size=2, device=device, flip=flip)
    score = float(get_similarity(run.similarity).paired(emb[:1], emb[1:])[0])
    return Comparison(
        image_a=os.fspath(image_a),
        image_b=os.fspath(image_b),
        score=score,
        same=score >= threshold.value,
        threshold=threshold,
        flip=flip,
        checkpoint=os.fspath(run.checkpoint),
    )


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# Export


class EmbeddingExport(nn.Module):
    """The deployable part of a model: backbone, optional flip test, L2 normalisation.

    Shapes: images ``(B, 3, S, S)`` float32 in ``[-1, 1]`` (the run's preprocessing) ->
    ``embedding (B, D)`` L2-normalised and ``norm (B,)``, the raw embedding norm (MagFace's
    quality score), exactly what ``FaceEmbeddingModel.encode(..., return_norms=True)`` gives.

    Args:
        backbone: The trained backbone, in eval mode.
        flip: Add the embedding of the mirrored image before normalising.
    """

    def __init__(self, backbone: nn.Module, flip: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.flip = flip

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.backbone(images)
        norm = raw.norm(dim=1)
        if self.flip:
            raw = raw + self.backbone(torch.flip(images, dims=[3]))
        return nn.functional.normalize(raw, dim=1), norm


class ExportParityError(RuntimeError):
    """An exported model's outputs differ from PyTorch's beyond the tolerance."""


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_model` wrote and how closely it matches PyTorch.

    Attributes:
        path: The written file.
        format: ``onnx`` or ``torchscript``.
        exporter: ONNX exporter used (None for TorchScript).
        opset: ONNX opset of the file (None for TorchScript).
        batch_sizes: Batch sizes the parity check ran on.
        embedding_error: Largest absolute difference of the normalised embeddings.
        norm_error: Largest relative difference ``|norm - norm_ref| / norm_ref`` of the norms.
        num_bytes: File size.
    """

    path: Path
    format: str
    exporter: str | None
    opset: int | None
    batch_sizes: tuple[int, ...]
    embedding_error: float
    norm_error: float
    num_bytes: int

    def summary(self) -> str:
        how = f"{self.format}" + (
            f", {self.exporter} exporter, opset {self.opset}" if self.exporter else ""
        )
        return (
            f"wrote {self.path} ({how}, {self.num_bytes / 1e6:.1f} MB); parity with PyTorch on "
            f"batch sizes {list(self.batch_sizes)}: max |d embedding| "
            f"{self.embedding_error:.2e}, max relative |d norm| {self.norm_error:.2e}"
        )


def export_model(
    model: TrainedRun | FaceEmbeddingModel | nn.Module,
    out: str | os.PathLike,
    format: str = "onnx",
    *,
    image_size: int | None = None,
    flip: bool | None = None,
    exporter: str = "dynamo",
    opset: int | None = None,
    batch_sizes: Sequence[int] = (1, 5),
    atol: float = 1e-4,
    rtol: float = 1e-4,
    metadata: Mapping[str, Any] | None = None,
) -> ExportReport:
    """Export backbone + L2 normalisation with a dynamic batch size, checked against PyTorch.

    The graph has one input ``images`` (B, 3, S, S) float32 in ``[-1, 1]`` (the run's
    preprocessing, not included) and two outputs: ``embedding`` (B, D), L2-normalised, and
    ``norm`` (B,), the raw embedding norm (see :class:`EmbeddingExport`). The export runs on
    the CPU. Before anything is written, the exported model is run (ONNX under ONNX Runtime,
    TorchScript reloaded from its bytes) on seeded random batches of each size in
    ``batch_sizes`` (all different from the batch of 2 used for tracing, which proves the batch
    size is dynamic), and must match PyTorch within ``atol`` on the embeddings and ``rtol``
    relative on the norms. Preprocessing facts (image size, crop, similarity, stored EER
    threshold) go into the file's metadata (ONNX ``metadata_props``; TorchScript extra file
    ``femb.json``).

    Args:
        model: A :class:`TrainedRun` (its metadata is recorded), a ``FaceEmbeddingModel`` or a
            bare backbone.
        out: Output file, written atomically.
        format: ``"onnx"`` or ``"torchscript"``.
        image_size: Input side; default: the run's preprocessing, else ``backbone.input_size``.
        flip: Bake flip test into the graph; None follows the run's ``flip_test`` (False for a
            bare model).
        exporter: ONNX only: ``"dynamo"`` (``torch.onnx.export(dynamo=True)``, PyTorch's
            default, needs ``onnxscript``) or ``"legacy"`` (the TorchScript-based exporter,
            ``dynamo=False``; deprecated by PyTorch but needs no extra package).
        opset: ONNX opset; None lets torch pick its recommended one.
        batch_sizes: Batch sizes of the parity check.
        atol: Tolerance on the embeddings.
        rtol: Relative tolerance on the norms.
        metadata: Extra string metadata to store.

    Returns:
        The report with the measured parity errors.

    Raises:
        ValueError: Unknown ``format`` or ``exporter``, or no image size known.
        ModuleNotFoundError: ``onnx``/``onnxruntime`` (or ``onnxscript`` for the dynamo
            exporter) is not installed.
        ExportParityError: The exported model does not match PyTorch; nothing is written.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; use one of {sorted(EXPORT_FORMATS)}.")
    if format == "onnx" and exporter not in ONNX_EXPORTERS:
        raise ValueError(
            f"unknown ONNX exporter {exporter!r}; use one of {sorted(ONNX_EXPORTERS)}."
        )
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes={batch_sizes!r} must be non-empty and all >= 1.")

    meta: dict[str, str] = {}
    if isinstance(model, TrainedRun):
        run = model
        prep = run.preprocessing()
        flip = run.resolve_flip(flip)
        image_size = image_size or prep.image_size
        meta.update(_run_metadata(run, prep))
        backbone = run.model.backbone
    else:
        backbone = model.backbone if isinstance(model, FaceEmbeddingModel) else model
        flip = bool(flip)
        image_size = image_size or getattr(backbone, "input_size", None)
        if image_size is None:
            raise ValueError("pass image_size=...: the backbone has no input_size attribute.")
    meta["femb.flip"] = str(flip).lower()
    meta["femb.outputs"] = "embedding: (B, D) L2-normalised; norm: (B,) raw embedding norm"
    meta.update({k: str(v) for k, v in (metadata or {}).items()})

    module = EmbeddingExport(copy.deepcopy(backbone).cpu().eval(), flip=flip).eval()
    # Batch 2 for tracing: torch.export specialises a dimension of size 1 to a constant.
    example = torch.zeros(2, 3, int(image_size), int(image_size))
    generator = torch.Generator().manual_seed(0)
    inputs = [
        torch.rand(b, 3, int(image_size), int(image_size), generator=generator) * 2 - 1
        for b in batch_sizes
    ]
    with torch.no_grad():
        expected = [module(x) for x in inputs]

    opset_used = None
    if format == "onnx":
        data, opset_used = _export_onnx(module, example, exporter, opset, meta)
        actual = _run_onnx(data, inputs)
    else:
        data = _export_torchscript(module, example, meta)
        actual = _run_torchscript(data, inputs)

    emb_err, norm_err = _parity(expected, actual)
    log.info(
        "%s parity on batch sizes %s: max |d embedding| %.3g, max relative |d norm| %.3g",
        format,
        list(batch_sizes),
        emb_err,
        norm_err,
    )
    if not (emb_err <= atol and norm_err <= rtol):
        other = "legacy" if exporter == "dynamo" else "dynamo"
        raise ExportParityError(
            f"{format} export does not match PyTorch: max |d embedding| {emb_err:.3g} "
            f"(tolerance {atol:g}), max relative |d norm| {norm_err:.3g} (tolerance {rtol:g}) "
            f"on batch sizes {list(batch_sizes)}; {out} was not written. "
            + (f"Try exporter={other!r}." if format == "onnx" else "")
        )
    out = Path(out)
    atomic_write(out, lambda f: f.write(data))
    return ExportReport(
        path=out,
        format=format,
        exporter=exporter if format == "onnx" else None,
        opset=opset_used,
        batch_sizes=tuple(int(b) for b in batch_sizes),
        embedding_error=emb_err,
        norm_error=norm_err,
        num_bytes=len(data),
    )


def _run_metadata(run: TrainedRun, prep: Preprocessing) -> dict[str, str]:
    meta = {
        "femb.checkpoint": os.fspath(run.checkpoint),
        "femb.global_step": str(run.global_step),
        "femb.image_size": str(prep.image_size),
        "femb.center_crop": json.dumps(prep.center_crop),
        "femb.preprocessing": prep.describe(),
        "femb.similarity": run.similarity,
    }
    if run.valsets:
        key = f"{run.valsets[0]}/eer_threshold"
        if key in run.metrics:
            meta["femb.valset"] = run.valsets[0]
            meta["femb.eer_threshold"] = repr(run.metrics[key])
    return meta


def _export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    exporter: str,
    opset: int | None,
    meta: Mapping[str, str],
) -> tuple[bytes, int]:
    try:
        import onnx
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "ONNX export needs onnx and onnxruntime: pip install 'femb[export]'."
        ) from err
    names = {"input_names": ["images"], "output_names": ["embedding", "norm"]}
    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401  (torch's dynamo exporter imports it lazily)
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                "the dynamo ONNX exporter needs onnxscript (pip install onnxscript); or use "
                "exporter='legacy'."
            ) from err
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=opset,
            verbose=False,
            external_data=False,
            **names,
        )
        proto = program.model_proto
    else:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            _ignore_shape_check_warnings()
            torch.onnx.export(
                module,
                (example,),
                buffer,
                dynamo=False,
                dynamic_axes={
                    "images": {0: "batch"},
                    "embedding": {0: "batch"},
                    "norm": {0: "batch"},
                },
                opset_version=opset,
                **names,
            )
        proto = onnx.load_model_from_string(buffer.getvalue())
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return proto.SerializeToString(), int(opset_used)


def _run_onnx(data: bytes, inputs: Sequence[torch.Tensor]) -> list[tuple[np.ndarray, ...]]:
    try:
        import onnxruntime
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the ONNX parity check needs onnxruntime: pip install 'femb[export]'."
        ) from err
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return [tuple(session.run(["embedding", "norm"], {"images": x.numpy()})) for x in inputs]


def _export_torchscript(
    module: nn.Module, example: torch.Tensor, meta: Mapping[str, str]
) -> bytes:
    with warnings.catch_warnings():
        _ignore_shape_check_warnings()
        # The parity check below replaces trace's own re-run check (which would cost a
        # second trace) and covers batch sizes the trace never saw.
        traced = torch.jit.trace(module, (example,), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={"femb.json": json.dumps(dict(meta))})
    return buffer.getvalue()


def _run_torchscript(data: bytes, inputs: Sequence[torch.Tensor]) -> list[tuple[np.ndarray, ...]]:
    with warnings.catch_warnings():
        # femb's own parity check; the user asked for TorchScript (its deprecation is in the
        # README and shows when they load the file themselves).
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*jit.*")
        loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.no_grad():
        return [tuple(t.numpy() for t in loaded(x)) for x in inputs]


def _ignore_shape_check_warnings() -> None:
    # Tracing turns the backbones' input checks (channels, height, width) into constants;
    # those dimensions are fixed in an exported model, and the batch size, the one dynamic
    # dimension, is covered by the parity check on several batch sizes.
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)


def _parity(
    expected: Sequence[tuple[torch.Tensor, torch.Tensor]],
    actual: Sequence[tuple[np.ndarray, ...]],
) -> tuple[float, float]:
    emb_err = norm_err = 0.0
    for (emb, norm), (emb_out, norm_out) in zip(expected, actual, strict=True):
        if emb_out.shape != tuple(emb.shape) or norm_out.shape != tuple(norm.shape):
            return math.inf, math.inf
        emb_err = max(emb_err, float(np.max(np.abs(emb_out - emb.numpy()))))
        rel = np.abs(norm_out - norm.numpy()) / np.maximum(np.abs(norm.numpy()), 1e-12)
        norm_err = max(norm_err, float(np.max(rel)))
    return emb_err, norm_err
