"""insightface RecordIO: framing, the dataset, the writer, scripts/folder_to_rec.py, the config."""

from __future__ import annotations

import importlib.util
import io
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from femb.data import IdentityFolderDataset, write_bin
from femb.data.recordio import (
    RECORD_MAGIC,
    CorruptRecordError,
    RecordIODataset,
    frame_record,
    pack_irecord,
    read_index,
    read_property,
    unpack_irecord,
    write_recordio,
)
from femb.train import build, train

from .conftest import REPO

MAGIC = struct.pack("<I", RECORD_MAGIC)


def _script():
    spec = importlib.util.spec_from_file_location(
        "femb_script_folder_to_rec", REPO / "scripts" / "folder_to_rec.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _face(seed: int, size: tuple[int, int] = (40, 32)) -> np.ndarray:
    """A smooth RGB image (height, width, 3): JPEG keeps such images within a few grey levels."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    channels = [
        127 + 100 * np.sin(2 * np.pi * (rng.uniform(0.3, 1.2) * x + rng.uniform(0.3, 1.2) * y))
        for _ in range(3)
    ]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """root/<identity>/<image>: 3 identities (unsorted names), JPEG, PNG and a grey image."""
    root = tmp_path_factory.mktemp("faces")
    layout = {"zoe": 3, "adam": 2, "mia": 4}
    seed = 0
    for name, count in layout.items():
        (root / name).mkdir()
        for k in range(count):
            image = Image.fromarray(_face(seed))
            seed += 1
            if name == "mia" and k == 0:
                image.save(root / name / f"{k}.png")
            elif name == "mia" and k == 1:
                image.convert("L").save(root / name / f"{k}.jpg", quality=98)
            else:
                image.save(root / name / f"{k}.jpg", quality=98)
    return root


@pytest.fixture(scope="module")
def rec_root(faces, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rec")
    assert _script().main([str(faces), str(out / "train"), "--quality", "95", "-q"]) == 0
    return out


def _parse_rec(data: bytes) -> list[tuple[int, bytes]]:
    """Independent sequential reader of a .rec: (offset, payload) per record, chunks joined."""
    records, pos = [], 0
    while pos < len(data):
        start, payload = pos, b""
        while True:
            magic, lrec = struct.unpack_from("<II", data, pos)
            assert magic == RECORD_MAGIC
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            payload += data[pos + 8 : pos + 8 + length]
            pos += 8 + (length + 3) // 4 * 4
            if cflag in (0, 3):
                break
            payload += MAGIC
        records.append((start, payload))
    return records


# --------------------------------------------------------------------------------------------
# round trip through scripts/folder_to_rec.py


def test_folder_round_trip_labels_identities_and_pixels(faces, rec_root):
    folder = IdentityFolderDataset(faces, train=False, image_size=32)
    ds = RecordIODataset(rec_root, image_size=32, train=False)

    assert len(ds) == len(folder) == 9
    assert ds.num_classes == folder.num_classes == 3
    np.testing.assert_array_equal(ds.labels, folder.labels)  # adam, mia, zoe -> 0, 1, 2
    assert ds.identities == ["0", "1", "2"]
    assert ds.paths[0] == f"{rec_root / 'train.rec'}#1" and len(list(ds.paths)) == 9
    assert read_property(rec_root) == (3, 40, 32)

    for i in range(len(ds)):
        original = np.asarray(Image.open(folder.paths[i]).convert("RGB"), dtype=np.float64)
        stored = np.asarray(ds.load(i), dtype=np.float64)
        assert stored.shape == original.shape == (40, 32, 3)
        assert np.abs(stored - original).mean() < 2.0  # JPEG quality 95 on smooth images
        image, label = ds[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert label == folder.labels[i]
        assert (image - folder[i][0]).abs().mean() < 0.02  # same preprocessing, in [-1, 1]


def test_cli_subprocess_resizes_and_writes_property(faces, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "scripts/folder_to_rec.py",
            str(faces),
            str(tmp_path / "train"),
            "--image-size",
            "16",
            "-q",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 9 images of 3 identities" in result.stdout
    assert (tmp_path / "property").read_text() == "3,16,16"
    ds = RecordIODataset(tmp_path / "train.rec", image_size=16, train=False)
    assert ds.load(0).size == (16, 16) and len(ds) == 9


def test_cli_reports_user_errors(tmp_path, capsys):
    assert _script().main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert _script().main([str(tmp_path), str(tmp_path / "out"), "--quality", "0"]) == 2


def test_pass_through_keeps_the_file_bytes(faces, tmp_path):
    assert _script().main([str(faces), str(tmp_path / "train"), "--pass-through", "-q"]) == 0
    folder = IdentityFolderDataset(faces)
    ds = RecordIODataset(tmp_path)
    for i in range(len(ds)):
        assert ds.read_image_bytes(i) == Path(folder.paths[i]).read_bytes()


def test_random_access_is_order_independent(rec_root):
    ds = RecordIODataset(rec_root, image_size=32, train=False)
    sequential = [ds[i] for i in range(len(ds))]
    fresh = RecordIODataset(rec_root, image_size=32, train=False)
    for i in np.random.default_rng(0).permutation(len(ds)).tolist() + [3, 3, 0]:
        image, label = fresh[i]
        torch.testing.assert_close(image, sequential[i][0], rtol=0, atol=0)
        assert label == sequential[i][1]


# spawn workers re-import torch (~25 s on 2 busy cores); pickling is covered below either way.
@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_dataloader_workers(rec_root, context):
    ds = RecordIODataset(rec_root, image_size=32, train=False)
    ds[0]  # opens the file in this process: workers must not reuse the handle
    loader = DataLoader(
        ds, batch_size=4, num_workers=2, multiprocessing_context=context, shuffle=False
    )
    images, labels = zip(*loader, strict=True)
    torch.testing.assert_close(torch.cat(images), torch.stack([ds[i][0] for i in range(len(ds))]))
    assert torch.cat(labels).tolist() == ds.labels.tolist()


def test_pickling_drops_the_file_handle(rec_root):
    ds = RecordIODataset(rec_root, image_size=32, train=False)
    expected = ds[2][0]
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._file._fd is None
    torch.testing.assert_close(copy[2][0], expected)


# torchvision 0.29 deprecates its image decoders in favour of torchcodec; not ours to fix.
@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_train_flip_and_torchvision_decoder(rec_root):
    pil = RecordIODataset(rec_root, image_size=32, train=False)
    tv = RecordIODataset(rec_root, image_size=32, train=False, decoder="torchvision")
    for i in range(len(pil)):
        # Two JPEG decoders and two resize implementations: equal up to rounding.
        assert (tv[i][0] - pil[i][0]).abs().mean() < 0.02
    flips = RecordIODataset(rec_root, image_size=32, train=True)
    torch.manual_seed(0)
    plain, mirrored = pil[0][0], pil[0][0].flip(-1)
    draws = [flips[0][0] for _ in range(16)]
    assert all(torch.equal(d, plain) or torch.equal(d, mirrored) for d in draws)
    assert {torch.equal(d, plain) for d in draws} == {True, False}  # flipped about half the time


def test_bad_choices_list_the_valid_ones(rec_root):
    with pytest.raises(ValueError, match=r"decoder='cv2'.*\['pil', 'torchvision'\]"):
        RecordIODataset(rec_root, decoder="cv2")
    with pytest.raises(ValueError, match=r"label_source='x'.*'identity_records'"):
        RecordIODataset(rec_root, label_source="x")


# --------------------------------------------------------------------------------------------
# errors


def test_missing_files_name_the_path_and_layout(rec_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*train\.rec and root/train\.idx"):
        RecordIODataset(tmp_path / "nowhere")
    (tmp_path / "train.rec").write_bytes((rec_root / "train.rec").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"train\.idx' not found"):
        RecordIODataset(tmp_path)


def test_corrupt_magic_names_file_and_offset(rec_root, tmp_path):
    for name in ("train.rec", "train.idx"):
        (tmp_path / name).write_bytes((rec_root / name).read_bytes())
    keys, offsets = read_index(tmp_path / "train.idx")
    offset = int(offsets[keys == 4][0])
    data = bytearray((tmp_path / "train.rec").read_bytes())
    data[offset : offset + 4] = b"\x00\x01\x02\x03"
    (tmp_path / "train.rec").write_bytes(bytes(data))

    ds = RecordIODataset(tmp_path)  # identity records and first images are intact
    with pytest.raises(
        CorruptRecordError, match=rf"train\.rec'.*byte offset {offset}.*0x03020100"
    ):
        ds[3]
    ds[2]  # the neighbours still read
    with pytest.raises(CorruptRecordError, match=rf"byte offset {offset}"):
        RecordIODataset(tmp_path, label_source="image_headers")


def test_truncated_file_and_bad_index(rec_root, tmp_path):
    data = (rec_root / "train.rec").read_bytes()
    keys, offsets = read_index(rec_root / "train.idx")
    (tmp_path / "train.rec").write_bytes(data[: int(offsets[keys == 9][0]) + 20])
    (tmp_path / "train.idx").write_bytes((rec_root / "train.idx").read_bytes())
    with pytest.raises(CorruptRecordError, match="ends inside"):
        RecordIODataset(tmp_path)
    (tmp_path / "train.idx").write_text("0\t0\n1\tabc\n")
    with pytest.raises(ValueError, match=r"not a RecordIO index"):
        RecordIODataset(tmp_path)


# --------------------------------------------------------------------------------------------
# the format itself, written by hand


def _chunk(cflag: int, data: bytes) -> bytes:
    return struct.pack("<II", RECORD_MAGIC, cflag << 29 | len(data)) + data + bytes(-len(data) % 4)


def _payload(label: float | list[float], data: bytes = b"", rec_id: int = 0) -> bytes:
    if isinstance(label, list):
        head = struct.pack("<IfQQ", len(label), 0.0, rec_id, 0)
        return head + struct.pack(f"<{len(label)}f", *label) + data
    return struct.pack("<IfQQ", 0, float(label), rec_id, 0) + data


def _jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(_face(seed, (20, 20))).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _write_by_hand(folder: Path, records: dict[int, bytes]) -> None:
    rec, idx = bytearray(), []
    for key, framed in records.items():
        idx.append(f"{key}\t{len(rec)}\n")
        rec += framed
    (folder / "train.rec").write_bytes(bytes(rec))
    (folder / "train.idx").write_text("".join(idx))


def test_reads_a_hand_written_insightface_file(tmp_path):
    # Stored labels 5 and 7 (not contiguous): femb labels 0 and 1, identities "5" and "7".
    # Image 2 carries its label as a float array (flag 2), image 3 holds the magic word at an
    # aligned position and is stored in chunks 1 + 3, as dmlc-core's writer splits it.
    jpegs = [_jpeg(i) for i in range(4)]
    tricky = jpegs[2][:8] + MAGIC + jpegs[2][8:]
    payload3 = _payload(7.0, tricky, 3)
    cut = 24 + 8
    assert payload3[cut : cut + 4] == MAGIC
    records = {
        0: _chunk(0, _payload([5.0, 7.0])),
        1: _chunk(0, _payload(5.0, jpegs[0], 1)),
        2: _chunk(0, _payload([5.0, 0.0], jpegs[1], 2)),
        3: _chunk(1, payload3[:cut]) + _chunk(3, payload3[cut + 4 :]),
        4: _chunk(0, _payload(7.0, jpegs[3], 4)),
        5: _chunk(0, _payload([1.0, 3.0])),
        6: _chunk(0, _payload([3.0, 5.0])),
    }
    _write_by_hand(tmp_path, records)

    for source in ("identity_records", "image_headers", "auto"):
        ds = RecordIODataset(tmp_path, image_size=20, train=False, label_source=source)
        assert ds.labels.tolist() == [0, 0, 1, 1]
        assert ds.identities == ["5", "7"] and ds.num_classes == 2
    assert ds.read_image_bytes(0) == jpegs[0]
    assert ds.read_image_bytes(1) == jpegs[1]
    assert ds.read_image_bytes(2) == tricky
    assert ds[3][0].shape == (3, 20, 20)
    # The chunked record's frame is exactly what femb's writer produces.
    assert frame_record(payload3) == records[3]


def test_reads_a_plain_im2rec_file_without_header(tmp_path):
    records = {k: _chunk(0, _payload(float(k % 2), _jpeg(k), k)) for k in range(4)}
    _write_by_hand(tmp_path, records)
    ds = RecordIODataset(tmp_path, image_size=20, train=False)
    assert ds.labels.tolist() == [0, 1, 0, 1] and ds.paths[0].endswith("#0")
    with pytest.raises(ValueError, match="not an insightface header"):
        RecordIODataset(tmp_path, label_source="identity_records")


def test_reads_a_header_without_identity_records(tmp_path):
    # Third-party converters: header [N + 1, num_classes], images 1..N, nothing else.
    records = {0: _chunk(0, _payload([4.0, 2.0]))}
    records |= {k: _chunk(0, _payload(float(k > 2), _jpeg(k), k)) for k in range(1, 4)}
    _write_by_hand(tmp_path, records)
    ds = RecordIODataset(tmp_path, image_size=20)
    assert ds.labels.tolist() == [0, 0, 1] and ds.num_classes == 2
    with pytest.raises(ValueError, match="no identity records"):
        RecordIODataset(tmp_path, label_source="identity_records")


def test_writer_output_parses_with_an_independent_reader(tmp_path):
    samples = [(_jpeg(i), label) for i, label in enumerate([0, 0, 1, 2, 2, 2])]
    summary = write_recordio(tmp_path / "train.rec", samples)  # a .rec suffix is dropped
    assert summary.rec_path == tmp_path / "train.rec" and summary.num_classes == 3

    records = _parse_rec((tmp_path / "train.rec").read_bytes())
    keys, offsets = read_index(tmp_path / "train.idx")
    assert keys.tolist() == list(range(10))
    assert offsets.tolist() == [offset for offset, _ in records]
    header = [unpack_irecord(payload)[0] for _, payload in records]
    assert header[0].flag == 2 and header[0].label == (7.0, 10.0)
    assert [h.label for h in header[1:7]] == [0.0, 0.0, 1.0, 2.0, 2.0, 2.0]
    assert [h.id for h in header[1:7]] == list(range(1, 7))
    assert [h.label for h in header[7:]] == [(1.0, 3.0), (3.0, 4.0), (4.0, 7.0)]
    assert [unpack_irecord(p)[1] for _, p in records[1:7]] == [s[0] for s in samples]


def test_frame_record_splits_at_aligned_magic_words():
    # Aligned magic at 4 and 8 (consecutive: an empty middle chunk), unaligned one at 13.
    payload = b"abcd" + MAGIC + MAGIC + b"x" + MAGIC + b"yz"
    expected = _chunk(1, b"abcd") + _chunk(2, b"") + _chunk(3, b"x" + MAGIC + b"yz")
    assert frame_record(payload) == expected
    assert _parse_rec(expected) == [(0, payload)]
    assert frame_record(b"abc") == _chunk(0, b"abc")
    header, data = unpack_irecord(pack_irecord([1.5, 2.0], b"img", id=9))
    assert header == (2, (1.5, 2.0), 9, 0) and data == b"img"


def test_writer_validates_and_leaves_no_partial_files(tmp_path):
    with pytest.raises(ValueError, match="grouped by identity"):
        write_recordio(tmp_path / "a", [(b"x", 0), (b"y", 1), (b"z", 0)])
    with pytest.raises(ValueError, match="label 1 after label -1"):
        write_recordio(tmp_path / "a", [(b"x", 1)])
    with pytest.raises(ValueError, match="no samples"):
        write_recordio(tmp_path / "a", [])
    with pytest.raises(TypeError, match="encoded bytes"):
        write_recordio(tmp_path / "a", [(np.zeros(3), 0)])
    assert list(tmp_path.iterdir()) == []

    write_recordio(tmp_path / "train", [(_jpeg(0), 0)])
    before = (tmp_path / "train.rec").read_bytes()

    def failing():
        yield _jpeg(1), 0
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        write_recordio(tmp_path / "train", failing())
    assert (tmp_path / "train.rec").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.idx", "train.rec"]


# --------------------------------------------------------------------------------------------
# the config


def test_recordio_config_trains_end_to_end(rec_root, make_cfg, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.rec", "train.idx", "property"):
        (data / name).write_bytes((rec_root / name).read_bytes())
    images = [Image.fromarray(_face(100 + i)) for i in range(8)]
    write_bin(data / "lfw.bin", images, [True, False, True, False])
    cfg = make_cfg(
        [
            "dataset=recordio",
            f"dataset.train.root={data}",
            "~dataset.val.cfp_fp",
            "~dataset.val.agedb_30",
            "backbone=mobilefacenet",
            "image_size=32",
            "max_training_steps=2",
            "batch_size=4",
            "tensorboard=false",
        ]
    )
    metrics = train(cfg)
    assert "lfw/eer" in metrics and np.isfinite(metrics["train/loss"])

    # Without validation sets (dataset.val=null) the trainer builds no evaluator.
    no_val = make_cfg(
        [
            "dataset=recordio",
            f"dataset.train.root={data}",
            "dataset.val=null",
            "max_training_steps=1",
            "batch_size=4",
        ],
        subdir="no_val",
    )
    parts = build(no_val)
    assert parts["val_sets"] == {} and parts["evaluator"] is None
    assert parts["train_set"].num_classes == 3
