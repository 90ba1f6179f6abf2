"""insightface RecordIO training sets (``train.rec`` + ``train.idx``), without mxnet.

CASIA-WebFace, MS1MV2/MS1MV3 and Glint360K are distributed by insightface as one folder::

    root/train.rec    the records (dmlc-core RecordIO, as MXNet's MXIndexedRecordIO writes it)
    root/train.idx    text, one line per record: "<key>\\t<byte offset in train.rec>"
    root/property     text "num_classes,height,width", e.g. "85742,112,112" (informational)
    root/*.bin        verification pairs (lfw.bin, cfp_fp.bin, agedb_30.bin; femb.data.binfile)

Record framing (all integers little-endian uint32). Each record starts at a 4-byte aligned
offset with the magic word 0xced7230a and a length word ``cflag << 29 | length`` (length in the
lower 29 bits), followed by ``length`` payload bytes and zero padding to the next multiple of 4.
A writer may not leave the magic word at an aligned position inside a payload (readers that
resynchronise on it would split the record there), so such payloads are stored as several
chunks: cflag 1 (first), 2 (middle), 3 (last), 0 (the whole record in one chunk), and the reader
puts the magic word back between consecutive chunks.

Payload (MXNet's ``IRHeader``): struct ``<IfQQ`` = flag uint32, label float32, id uint64,
id2 uint64 (24 bytes); when flag > 0, ``flag`` float32 labels follow (and the scalar label is
unused); the rest is the encoded image (JPEG).

insightface layout of the records:

- record 0 is a header with flag 2 and labels ``[first_identity_key, end_key]``;
- records ``1 .. first_identity_key - 1`` are images whose label is the identity label;
- records ``first_identity_key .. end_key - 1`` are identity records, one per identity, whose
  labels ``[start, end]`` are the image keys ``start .. end - 1`` of that identity.

Variants met in the wild: a header ``[N + 1, num_classes]`` without identity records (many
third-party converters; arcface_torch reads only the first value), and files whose record 0 is
an ordinary image (plain ``im2rec`` output), where every record in the index is an image.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from femb.data.base import DATA_ROOT_HINT, FaceDataset, ImageReadError
from femb.data.transforms import ToRGB, face_transform
from femb.run_io import apply_umask, atomic_write

log = logging.getLogger(__name__)

#: First word of every RecordIO chunk (dmlc-core ``RecordIOWriter::kMagic``).
RECORD_MAGIC = 0xCED7230A

_MAGIC_BYTES = struct.pack("<I", RECORD_MAGIC)
_CHUNK_HEAD = struct.Struct("<II")
_IR_HEADER = struct.Struct("<IfQQ")
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
# Where the float32 labels of a single-chunk record start: after the chunk head and IRHeader.
_LABELS_AT = _CHUNK_HEAD.size + _IR_HEADER.size
# cflag of a chunk: whole record, first, middle, last (dmlc-core recordio.cc).
_WHOLE, _FIRST, _MIDDLE, _LAST = 0, 1, 2, 3

# Labels and identity key ranges are float32 in the format: integers are exact up to 2^24.
_FLOAT32_EXACT = 1 << 24

# Bytes read per pread when the record size is not known yet: one typical 112x112 face JPEG
# (5-10 kB) plus its headers fits, so most records take a single system call.
_READ_AHEAD = 16384
_LAYOUT = (
    "an insightface RecordIO folder: root/train.rec and root/train.idx (plus root/property), "
    "or the path of a .rec file with its .idx beside it"
)

DECODERS = ("pil", "torchvision")
LABEL_SOURCES = ("auto", "identity_records", "image_headers")


class CorruptRecordError(ImageReadError):
    """A ``.rec`` file does not hold a valid record where its index says one starts."""


class IRHeader(NamedTuple):
    """MXNet's image-record header.

    Attributes:
        flag: Number of float32 labels stored after the header; 0 for a single label.
        label: The scalar label (flag 0), or the tuple of ``flag`` labels.
        id: Record id (insightface: the record key, or 0).
        id2: Upper 64 bits of a 128-bit id; 0 in practice.
    """

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


# --------------------------------------------------------------------------------------------
# payload and framing


def pack_irecord(label: float | Sequence[float], data: bytes = b"", id: int = 0) -> bytes:
    """Build a record payload: IRHeader, labels, then ``data`` (as MXNet's ``recordio.pack``).

    Args:
        label: One number (stored in the header, flag 0) or a sequence of numbers (stored as
            float32 after the header, flag = their count).
        data: The encoded image, or nothing for header and identity records.
        id: The record id.

    Returns:
        The payload bytes (without RecordIO framing; see :func:`frame_record`).
    """
    if isinstance(label, Sequence) and not isinstance(label, str | bytes):
        labels = np.asarray(label, dtype="<f4")
        return _IR_HEADER.pack(labels.size, 0.0, id, 0) + labels.tobytes() + bytes(data)
    return _IR_HEADER.pack(0, float(label), id, 0) + bytes(data)


def unpack_irecord(payload: bytes) -> tuple[IRHeader, bytes]:
    """Split a record payload into its :class:`IRHeader` and the image bytes.

    Raises:
        ValueError: The payload is shorter than its header says.
    """
    if len(payload) < _IR_HEADER.size:
        raise ValueError(
            f"record payload of {len(payload)} bytes is shorter than an IRHeader "
            f"({_IR_HEADER.size} bytes)"
        )
    flag, label, rec_id, id2 = _IR_HEADER.unpack_from(payload)
    start = _IR_HEADER.size
    if flag > 0:
        end = start + 4 * flag
        if len(payload) < end:
            raise ValueError(
                f"record header says {flag} float32 labels follow, but the payload has only "
                f"{len(payload) - start} more bytes"
            )
        label = tuple(
            float(v) for v in np.frombuffer(payload, dtype="<f4", count=flag, offset=start)
        )
        start = end
    return IRHeader(flag, label, rec_id, id2), payload[start:]


def frame_record(payload: bytes) -> bytes:
    """RecordIO framing of one payload: magic, length word, data, padding (module docstring).

    Payloads holding the magic word at a 4-byte aligned position are split into chunks there,
    exactly as dmlc-core's writer does, so the result reads back with MXNet as well.

    Raises:
        ValueError: The payload is 2^29 bytes or larger (the format's limit).
    """
    if len(payload) >= 1 << _LENGTH_BITS:
        raise ValueError(f"a RecordIO record must be < 2^29 bytes, got {len(payload)}")
    view = memoryview(payload)
    words = np.frombuffer(view[: len(payload) // 4 * 4], dtype="<u4")
    cuts = (np.flatnonzero(words == RECORD_MAGIC) * 4).tolist()
    out = bytearray()
    start = 0
    for cut in cuts:
        out += _CHUNK_HEAD.pack(
            RECORD_MAGIC, (_MIDDLE if start else _FIRST) << _LENGTH_BITS | (cut - start)
        )
        out += view[start:cut]
        start = cut + 4  # the magic word itself is dropped; the reader restores it
    tail = len(payload) - start
    out += _CHUNK_HEAD.pack(RECORD_MAGIC, (_LAST if cuts else _WHOLE) << _LENGTH_BITS | tail)
    out += view[start:]
    out += bytes(-len(out) % 4)
    return bytes(out)


def read_index(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a RecordIO ``.idx`` file.

    Args:
        path: The index, lines ``"<key>\\t<offset>"``.

    Returns:
        ``(keys, offsets)``, int64 ``(R,)`` each, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: A line is not two integers, a key repeats, or an offset is negative.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"RecordIO index {os.fspath(path)!r} not found; expected {_LAYOUT}"
        )
    if path.stat().st_size == 0:
        raise ValueError(f"RecordIO index {os.fspath(path)!r} is empty")
    try:
        # numpy's C parser: ~7 M lines/s, and its error names the bad line.
        table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except ValueError as err:
        raise ValueError(
            f"{os.fspath(path)!r} is not a RecordIO index (lines '<key>\\t<offset>'): {err}"
        ) from err
    if table.shape[1] != 2:
        raise ValueError(
            f"{os.fspath(path)!r} is not a RecordIO index: expected 2 columns "
            f"'<key>\\t<offset>', got {table.shape[1]}"
        )
    keys, offsets = table[:, 0].copy(), table[:, 1].copy()
    if len(np.unique(keys)) != len(keys):
        raise ValueError(f"RecordIO index {os.fspath(path)!r} lists some keys more than once")
    if offsets.min() < 0:
        raise ValueError(f"RecordIO index {os.fspath(path)!r} has a negative offset")
    return keys, offsets


def resolve_recordio_paths(root: str | os.PathLike) -> tuple[Path, Path]:
    """``(rec, idx)`` for a dataset folder (``train.rec``/``train.idx``) or a ``.rec`` file.

    Raises:
        FileNotFoundError: Either file is missing; the message shows the expected layout.
    """
    root = Path(root)
    if root.is_dir():
        rec, idx = root / "train.rec", root / "train.idx"
    elif root.suffix == ".rec" or root.with_suffix(".rec").is_file():
        rec, idx = root.with_suffix(".rec"), root.with_suffix(".idx")
    else:
        raise FileNotFoundError(
            f"RecordIO dataset {os.fspath(root)!r} does not exist; expected {_LAYOUT}. "
            f"{DATA_ROOT_HINT}"
        )
    for path in (rec, idx):
        if not path.is_file():
            raise FileNotFoundError(
                f"RecordIO file {os.fspath(path)!r} not found; expected {_LAYOUT}. "
                f"{DATA_ROOT_HINT}"
            )
    return rec, idx


# --------------------------------------------------------------------------------------------
# random-access reader


class RecordFile:
    """Random access to the records of a ``.rec`` file by byte offset, safe in DataLoader workers.

    The file is opened on first use in each process (and again after a fork), and the open
    handle is not pickled, so a dataset holding a ``RecordFile`` can be sent to ``spawn`` or
    ``forkserver`` workers. Reads use ``os.pread`` where available (no shared file position).

    Args:
        path: The ``.rec`` file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_fd": None, "_pid": None}

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close the handle of this process, if open (it reopens on the next read)."""
        if self._fd is not None:
            os.close(self._fd)  # after a fork this closes only this process's copy
        self._fd = self._pid = None

    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            # A descriptor inherited through fork shares its file position with the parent
            # (which matters for the lseek fallback): give each process its own.
            self.close()
            self._fd, self._pid = (
                os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0)),
                os.getpid(),
            )
        return self._fd

    def _pread(self, size: int, offset: int) -> bytes:
        fd = self._handle()
        if hasattr(os, "pread"):
            return os.pread(fd, size, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, size)

    def read(self, offset: int, limit: int | None = None) -> bytes:
        """The payload of the record starting at ``offset``, with chunks joined.

        Args:
            offset: Byte offset of the record (from the ``.idx``).
            limit: Stop after the chunk that brings the payload to at least this many bytes
                (reading a header without the image); None reads the whole record.

        Raises:
            CorruptRecordError: No valid record there: wrong magic word, bad chunk sequence
                or a truncated file. The message names the file and the offset.
        """
        parts: list[bytes] = []
        size = 0
        pos = offset
        buf, buf_start = b"", offset
        first = True
        while True:
            # Make sure [pos, pos + 8) is buffered, then the chunk's data.
            if pos + _CHUNK_HEAD.size > buf_start + len(buf):
                want = (limit + 64) if limit is not None else _READ_AHEAD
                buf, buf_start = self._pread(max(want, _CHUNK_HEAD.size), pos), pos
                if len(buf) < _CHUNK_HEAD.size:
                    raise self._error(offset, pos, "the file ends inside the record head")
            magic, lrec = _CHUNK_HEAD.unpack_from(buf, pos - buf_start)
            if magic != RECORD_MAGIC:
                raise self._error(
                    offset, pos, f"magic word 0x{magic:08x} instead of 0x{RECORD_MAGIC:08x}"
                )
            cflag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
            if cflag not in ((_WHOLE, _FIRST) if first else (_MIDDLE, _LAST)):
                raise self._error(offset, pos, f"chunk flag {cflag} out of sequence")
            data_start = pos + _CHUNK_HEAD.size
            if data_start + length > buf_start + len(buf):
                more = self._pread(
                    data_start + length - (buf_start + len(buf)) + 64, buf_start + len(buf)
                )
                buf += more
                if data_start + length > buf_start + len(buf):
                    raise self._error(offset, pos, "the file ends inside the record")
            parts.append(buf[data_start - buf_start : data_start - buf_start + length])
            size += length
            if cflag in (_WHOLE, _LAST) or (limit is not None and size >= limit):
                break
            parts.append(_MAGIC_BYTES)
            size += 4
            pos = data_start + length + (-length % 4)
            first = False
        return b"".join(parts)

    def _error(self, offset: int, pos: int, problem: str) -> CorruptRecordError:
        where = f"byte offset {offset}" + (f" (chunk at {pos})" if pos != offset else "")
        return CorruptRecordError(
            f"corrupt RecordIO file {os.fspath(self.path)!r}: no valid record at {where}: "
            f"{problem}. The file is damaged or truncated, or the .idx belongs to another .rec"
        )

    def header(self, offset: int, num_labels: int = 2) -> IRHeader:
        """The :class:`IRHeader` of the record at ``offset``, without reading the image.

        Args:
            offset: Byte offset of the record.
            num_labels: Read at most this many of the float32 labels of a flag > 0 record;
                ``label`` then holds ``min(flag, num_labels)`` values.
        """
        # Fast path, one pread and no numpy: the record's first chunk holds the whole header
        # (always so for insightface files; a chunked header falls through to read()).
        want = _IR_HEADER.size + 4 * num_labels
        head = self._pread(_CHUNK_HEAD.size + want, offset)
        if len(head) >= _CHUNK_HEAD.size + _IR_HEADER.size:
            magic, lrec = _CHUNK_HEAD.unpack_from(head)
            length = lrec & _LENGTH_MASK
            if magic == RECORD_MAGIC and length >= _IR_HEADER.size:
                flag, label, rec_id, id2 = _IR_HEADER.unpack_from(head, _CHUNK_HEAD.size)
                count = min(flag, num_labels)
                if flag == 0:
                    return IRHeader(flag, label, rec_id, id2)
                if length >= _IR_HEADER.size + 4 * count and len(head) >= _LABELS_AT + 4 * count:
                    values = struct.unpack_from(f"<{count}f", head, _LABELS_AT)
                    return IRHeader(flag, values, rec_id, id2)

        payload = self.read(offset, limit=want)
        if len(payload) < _IR_HEADER.size:
            raise self._error(offset, offset, f"payload of {len(payload)} bytes has no IRHeader")
        flag, label, rec_id, id2 = _IR_HEADER.unpack_from(payload)
        if flag > 0:
            count = min(flag, num_labels)
            if len(payload) < _IR_HEADER.size + 4 * count:
                raise self._error(offset, offset, f"flag {flag} but too few label bytes")
            label = struct.unpack_from(f"<{count}f", payload, _IR_HEADER.size)
        return IRHeader(flag, label, rec_id, id2)


def _first_label(header: IRHeader) -> float:
    return header.label[0] if isinstance(header.label, tuple) else header.label


# --------------------------------------------------------------------------------------------
# dataset


class _RecordPaths(Sequence[str]):
    """``paths`` of a RecordIO dataset, built on access: ``"<file>#<key>"`` per sample.

    A list of 17 M strings (Glint360K) would take ~1.5 GB in every DataLoader worker.
    """

    def __init__(self, rec_path: Path, keys: np.ndarray) -> None:
        self._prefix = f"{os.fspath(rec_path)}#"
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [f"{self._prefix}{k}" for k in self._keys[index].tolist()]
        return f"{self._prefix}{int(self._keys[index])}"

    def __iter__(self) -> Iterator[str]:
        return (f"{self._prefix}{k}" for k in self._keys.tolist())


def _tensor_pipeline(pipeline: v2.Compose) -> v2.Compose:
    """``face_transform``'s steps for a decoded ``uint8 (3, H, W)`` RGB tensor.

    The decoder already produced an RGB tensor, so the PIL-only steps (RGB conversion, PIL to
    tensor) are dropped; crop, resize, flip and normalisation are the very same objects.
    """
    return v2.Compose(
        [t for t in pipeline.transforms if not isinstance(t, ToRGB | v2.PILToTensor)]
    )


class RecordIODataset(FaceDataset):
    """Face images of an insightface RecordIO training set (CASIA, MS1MV2/3, Glint360K, ...).

    Follows femb's dataset contract: ``dataset[i]`` is ``(image (3, S, S) float32 in [-1, 1],
    label)``; ``num_classes``, ``labels``, ``identities`` and ``paths`` are set at
    construction. Images are read by random access through the index and decoded per item.

    Labels. The stored labels (float32, usually ``0 .. C - 1``) are mapped to contiguous
    ``0 .. C - 1`` in increasing order of their value; ``identities[label]`` is the stored
    value as a string (``"0"``, ``"1"``, ...). ``label_source`` selects how they are read at
    construction, without decoding any image:

    * ``"identity_records"``: the insightface identity records give each identity's key range,
      and the header of the first image of each identity gives its label: 2 small reads per
      identity (MS1MV2, 85 k identities: 170 k reads, a few seconds at most);
    * ``"image_headers"``: the header of every image is read: one small read per image (~10 us
      each from the page cache, measured on a loaded 2-core machine: about a minute for the
      5.8 M images of MS1MV2; the reads walk the file in order, so from a cold disk they cost
      about as much as reading the whole ``.rec`` once);
    * ``"auto"`` (default): identity records when record 0 is an insightface header and the
      identity ranges tile the image keys exactly, otherwise (plain im2rec files, or ranges
      that float32 cannot represent exactly beyond 2^24 keys) image headers, with a log line.

    ``paths`` are ``"<rec file>#<key>"``. Memory: a few int64 arrays of length N.

    Args:
        root: Folder holding ``train.rec`` and ``train.idx``, or the ``.rec`` file (its
            ``.idx`` beside it, same stem).
        image_size: Output side ``S``; ignored if ``transform`` is given.
        train: Training preprocessing (random horizontal flip); ignored if ``transform`` is
            given.
        transform: Replaces ``face_transform(train, image_size)``. It receives what the
            decoder yields: a PIL image (``"pil"``) or a ``uint8 (3, H, W)`` RGB tensor
            (``"torchvision"``).
        decoder: ``"pil"`` (Pillow) or ``"torchvision"`` (``torchvision.io.decode_image``
            to a tensor, skipping the PIL round trip).
        label_source: ``"auto"``, ``"identity_records"`` or ``"image_headers"`` (see above).

    Raises:
        FileNotFoundError: ``train.rec`` or ``train.idx`` is missing.
        ValueError: Unknown ``decoder`` or ``label_source``, a malformed index, or labels that
            are not non-negative integers.
        CorruptRecordError: A record read at construction is damaged (later reads raise it
            from ``__getitem__``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = 112,
        train: bool = True,
        transform: Callable | None = None,
        decoder: str = "pil",
        label_source: str = "auto",
    ) -> None:
        if decoder not in DECODERS:
            raise ValueError(f"decoder={decoder!r}; choose one of {sorted(DECODERS)}")
        if label_source not in LABEL_SOURCES:
            raise ValueError(
                f"label_source={label_source!r}; choose one of {sorted(LABEL_SOURCES)}"
            )
        self.rec_path, self.idx_path = resolve_recordio_paths(root)
        self.root = self.rec_path.parent
        self.decoder = decoder
        self._file = RecordFile(self.rec_path)
        keys, offsets = read_index(self.idx_path)
        order = np.argsort(keys, kind="stable")
        self._sorted_keys, self._sorted_offsets = keys[order], offsets[order]
        image_keys, raw_labels, source = self._scan_labels(label_source)
        self._keys = image_keys
        self._offsets = self._offset_of(image_keys)
        self._sorted_keys = self._sorted_offsets = np.empty(0, dtype=np.int64)  # free memory

        raw = np.asarray(raw_labels, dtype=np.float64)
        if len(raw) == 0:
            raise ValueError(f"RecordIO dataset {os.fspath(self.rec_path)!r} holds no images")
        if not np.all(np.isfinite(raw)) or raw.min() < 0 or not np.all(raw == np.round(raw)):
            raise ValueError(
                f"{os.fspath(self.rec_path)!r}: image labels must be non-negative integers, got "
                f"values in [{raw.min()}, {raw.max()}]"
            )
        values, labels = np.unique(raw.astype(np.int64), return_inverse=True)
        if transform is None:
            transform = face_transform(train, image_size)
            if decoder == "torchvision":
                transform = _tensor_pipeline(transform)
        self.paths = _RecordPaths(self.rec_path, self._keys)
        self.labels = labels.astype(np.int64).reshape(-1)
        self.identities = [str(v) for v in values.tolist()]
        self.num_classes = len(self.identities)
        self.transform = transform
        self._check_property()
        log.info(
            "RecordIODataset %s: %d images of %d identities (labels from %s, decoder %s)",
            self.rec_path,
            len(self),
            self.num_classes,
            source,
            decoder,
        )

    # ------------------------------------------------------------------ construction

    def _offset_of(self, keys: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self._sorted_keys, keys)
        pos_clipped = np.minimum(pos, len(self._sorted_keys) - 1)
        missing = self._sorted_keys[pos_clipped] != keys
        if missing.any():
            raise ValueError(
                f"{os.fspath(self.idx_path)!r} has no entry for record key(s) "
                f"{keys[missing][:5].tolist()}, which the record headers refer to; the index "
                "does not match the .rec file"
            )
        return self._sorted_offsets[pos_clipped]

    def _scan_labels(self, label_source: str) -> tuple[np.ndarray, np.ndarray, str]:
        """``(image keys, stored labels, how they were read)``."""
        keys = self._sorted_keys
        first_id = end_id = 0
        if keys[0] == 0:
            # An insightface header carries two labels and no image; an im2rec file's record 0
            # is an ordinary image (possibly multi-label), which has image bytes after them.
            header0, rest = unpack_irecord(self._file.read(int(self._sorted_offsets[0])))
            if header0.flag >= 2 and not rest:
                first_id, end_id = int(header0.label[0]), int(header0.label[1])
        if first_id == 0:
            if label_source == "identity_records":
                raise ValueError(
                    f"label_source='identity_records', but record 0 of "
                    f"{os.fspath(self.rec_path)!r} is not an insightface header (2 labels, no "
                    "image); use label_source='image_headers' or 'auto'"
                )
            return keys, self._labels_from_headers(keys), "image headers (no header record)"

        image_keys = keys[(keys >= 1) & (keys < first_id)]
        if label_source != "image_headers":
            labels = self._labels_from_identities(image_keys, first_id, end_id)
            if labels is not None:
                return image_keys, labels, "identity records"
            if label_source == "identity_records":
                raise ValueError(
                    f"{os.fspath(self.rec_path)!r}: no identity records that tile the image "
                    f"keys 1 .. {first_id - 1}; use label_source='image_headers'"
                )
            log.info(
                "%s: no identity records that tile the image keys; reading every image header",
                self.rec_path,
            )
        return image_keys, self._labels_from_headers(image_keys), "image headers"

    def _labels_from_headers(self, keys: np.ndarray) -> np.ndarray:
        offsets = self._offset_of(keys)
        return np.fromiter(
            (_first_label(self._file.header(int(o), 1)) for o in offsets.tolist()),
            dtype=np.float64,
            count=len(offsets),
        )

    def _labels_from_identities(
        self, image_keys: np.ndarray, first_id: int, end_id: int
    ) -> np.ndarray | None:
        """Labels from identity records, or None when there are none or they do not tile the
        image keys. Many third-party converters write a header ``[N + 1, num_classes]`` and no
        identity records (arcface_torch reads only the first value)."""
        id_keys = np.arange(first_id, end_id, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted_keys, id_keys), len(self._sorted_keys) - 1)
        if len(id_keys) == 0 or np.any(self._sorted_keys[pos] != id_keys):
            return None
        headers = [self._file.header(int(o)) for o in self._sorted_offsets[pos].tolist()]
        if any(not isinstance(h.label, tuple) or len(h.label) < 2 for h in headers):
            return None
        ranges = np.array([h.label[:2] for h in headers], dtype=np.float64)
        starts, ends = ranges[:, 0].astype(np.int64), ranges[:, 1].astype(np.int64)
        order = np.argsort(starts, kind="stable")
        starts, ends = starts[order], ends[order]
        contiguous = (
            len(starts) > 0
            and starts[0] == 1
            and np.all(ends > starts)
            and np.all(starts[1:] == ends[:-1])
            and ends[-1] == first_id
            and len(image_keys) == first_id - 1
        )
        if not contiguous:
            return None
        first_labels = self._labels_from_headers(starts)
        return np.repeat(first_labels, ends - starts)

    def _check_property(self) -> None:
        prop = read_property(self.root) if self.rec_path.name == "train.rec" else None
        if prop is not None and prop[0] != self.num_classes:
            log.warning(
                "%s/property says %d classes, but the records hold %d identities",
                self.root,
                prop[0],
                self.num_classes,
            )

    # ------------------------------------------------------------------ access

    def read_image_bytes(self, index: int) -> bytes:
        """The encoded image of sample ``index``, as stored."""
        payload = self._file.read(int(self._offsets[index]))
        try:
            return unpack_irecord(payload)[1]
        except ValueError as err:
            raise CorruptRecordError(
                f"corrupt record {self.paths[index]!r} at byte offset "
                f"{int(self._offsets[index])}: {err}"
            ) from err

    def load(self, index: int) -> Image.Image:
        """Decode sample ``index`` to a PIL image, before any transform."""
        data = self.read_image_bytes(index)
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageReadError(f"cannot decode image {self.paths[index]!r}: {err}") from err
        return image

    def _decode_tensor(self, index: int) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_image

        data = torch.frombuffer(bytearray(self.read_image_bytes(index)), dtype=torch.uint8)
        try:
            return decode_image(data, mode=ImageReadMode.RGB)
        except RuntimeError as err:
            raise ImageReadError(f"cannot decode image {self.paths[index]!r}: {err}") from err

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Return ``(image (3, S, S) float32 in [-1, 1], label)``."""
        image = self._decode_tensor(index) if self.decoder == "torchvision" else self.load(index)
        return self.transform(image), int(self.labels[index])


# --------------------------------------------------------------------------------------------
# writing


class RecordIOSummary(NamedTuple):
    """What :func:`write_recordio` wrote."""

    rec_path: Path
    idx_path: Path
    num_images: int
    num_classes: int


def _check_label(label: object, previous: int, count: int) -> int:
    if isinstance(label, bool) or not isinstance(label, int | np.integer):
        raise TypeError(f"sample {count}: label must be an int, got {label!r}")
    label = int(label)
    if label not in (previous, previous + 1):
        raise ValueError(
            f"sample {count}: label {label} after label {previous}; samples must come grouped "
            "by identity with labels 0, 1, 2, ... in increasing order (one identity record "
            "per label)"
        )
    return label


def write_recordio(
    out_prefix: str | os.PathLike, samples: Iterable[tuple[bytes, int]]
) -> RecordIOSummary:
    """Write an insightface RecordIO training set: ``<prefix>.rec`` and ``<prefix>.idx``.

    Layout (module docstring): record 0 is the header ``[N + 1, N + 1 + C]``, records
    ``1 .. N`` the images in the given order (label = identity label, id = key), records
    ``N + 1 .. N + C`` one identity record ``[start, end)`` per label. Both files are written
    to temporary files beside the targets and moved into place at the end, so an interrupted
    run leaves any previous files untouched (the ``.rec`` is replaced just before the ``.idx``).

    Args:
        out_prefix: Output path without suffix, e.g. ``data/casia/train`` (a trailing
            ``.rec`` is dropped).
        samples: ``(encoded image bytes, label)`` pairs, grouped by identity, labels
            ``0, 1, 2, ...`` in increasing order (as :class:`~femb.data.IdentityFolderDataset`
            orders them). Consumed once, lazily.

    Returns:
        The paths and counts written.

    Raises:
        ValueError: No samples, labels out of order, or more than 2^24 records (the float32
            labels of the format cannot address more exactly).
        TypeError: A label is not an int, or an image is not bytes.
    """
    prefix = Path(out_prefix)
    if prefix.suffix in (".rec", ".idx"):
        prefix = prefix.with_suffix("")
    rec_path, idx_path = (
        prefix.with_name(prefix.name + ".rec"),
        prefix.with_name(prefix.name + ".idx"),
    )
    rec_path.parent.mkdir(parents=True, exist_ok=True)
    temps: list[str] = []
    try:
        fd_rec, tmp_rec = tempfile.mkstemp(
            prefix=f".{rec_path.name}.", suffix=".tmp", dir=rec_path.parent
        )
        temps.append(tmp_rec)
        fd_idx, tmp_idx = tempfile.mkstemp(
            prefix=f".{idx_path.name}.", suffix=".tmp", dir=idx_path.parent
        )
        temps.append(tmp_idx)
        apply_umask(fd_rec)  # datasets are usually shared: not mkstemp's 0600
        apply_umask(fd_idx)
        with os.fdopen(fd_rec, "wb") as rec, os.fdopen(fd_idx, "w", encoding="ascii") as idx:
            num_images, starts = _write_records(rec, idx, samples)
            rec.flush()
            os.fsync(rec.fileno())
            idx.flush()
            os.fsync(idx.fileno())
        os.replace(tmp_rec, rec_path)
        os.replace(tmp_idx, idx_path)
        temps.clear()
    finally:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
    log.info(
        "Wrote %s and %s: %d images of %d identities", rec_path, idx_path, num_images, len(starts)
    )
    return RecordIOSummary(rec_path, idx_path, num_images, len(starts))


def _write_records(
    rec: io.BufferedWriter, idx: io.TextIOBase, samples: Iterable
) -> tuple[int, list[int]]:
    """Stream the records; return the image count and each identity's first key."""

    def put(key: int, payload: bytes) -> None:
        idx.write(f"{key}\t{rec.tell()}\n")
        rec.write(frame_record(payload))

    # Record 0 has a fixed size (two float32 labels), so a placeholder is rewritten in place
    # once the counts are known: the header stays the first record in the file, where
    # sequential readers expect it.
    header_at = rec.tell()
    put(0, pack_irecord([0.0, 0.0]))
    starts: list[int] = []
    label = -1
    key = 0
    for count, sample in enumerate(samples):
        try:
            data, new_label = sample
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"sample {count}: expected (image bytes, label), got {sample!r:.80}"
            ) from err
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(
                f"sample {count}: image must be encoded bytes, got {type(data).__name__}"
            )
        new_label = _check_label(new_label, label if count else -1, count)
        key = count + 1
        if key >= _FLOAT32_EXACT:
            raise ValueError(
                f"more than {_FLOAT32_EXACT - 1} images: insightface RecordIO stores keys as "
                "float32 labels, which are exact only up to 2^24; split the dataset"
            )
        if new_label != label:
            starts.append(key)
            label = new_label
        put(key, pack_irecord(float(label), data, id=key))
    if not starts:
        raise ValueError("write_recordio got no samples")

    num_images = key
    first_id = num_images + 1
    ends = starts[1:] + [first_id]
    if first_id + len(starts) > _FLOAT32_EXACT:
        raise ValueError(
            f"{num_images} images and {len(starts)} identities exceed the 2^24 keys that "
            "float32 labels address exactly; split the dataset"
        )
    for offset, (start, end) in enumerate(zip(starts, ends, strict=True)):
        put(first_id + offset, pack_irecord([float(start), float(end)], id=first_id + offset))

    end_pos = rec.tell()
    header = frame_record(pack_irecord([float(first_id), float(first_id + len(starts))]))
    rec.seek(header_at)
    rec.write(header)
    # Positive float32 labels have a clear sign bit, so they never equal the magic word
    # (sign bit set): the header keeps the placeholder's single-chunk size.
    assert rec.tell() == header_at + len(frame_record(pack_irecord([0.0, 0.0])))
    rec.seek(end_pos)
    return num_images, starts


def write_property(folder: str | os.PathLike, num_classes: int, height: int, width: int) -> Path:
    """Write insightface's ``property`` file (``"num_classes,height,width"``), atomically."""
    path = Path(folder) / "property"
    atomic_write(path, lambda f: f.write(f"{num_classes},{height},{width}".encode()))
    return path


def read_property(folder: str | os.PathLike) -> tuple[int, int, int] | None:
    """``(num_classes, height, width)`` from ``folder/property``, or None if there is none.

    Raises:
        ValueError: The file is not three comma-separated integers.
    """
    path = Path(folder) / "property"
    if not path.is_file():
        return None
    text = path.read_text().strip()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ValueError(
            f"{os.fspath(path)!r} should read 'num_classes,height,width', got {text!r:.60}"
        )
    return values


__all__ = [
    "DECODERS",
    "LABEL_SOURCES",
    "RECORD_MAGIC",
    "CorruptRecordError",
    "IRHeader",
    "RecordFile",
    "RecordIODataset",
    "RecordIOSummary",
    "frame_record",
    "pack_irecord",
    "read_index",
    "read_property",
    "resolve_recordio_paths",
    "unpack_irecord",
    "write_property",
    "write_recordio",
]
