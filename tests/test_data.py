"""Tests for femb.data: datasets, pair protocols, .bin files and the preprocessing transform."""

from __future__ import annotations

import io
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from femb.data import (
    LFW_CENTER_CROP,
    BinVerificationDataset,
    IdentityFolderDataset,
    ImageReadError,
    LFWDataset,
    ORLDataset,
    PairsDataset,
    SyntheticFaceDataset,
    consecutive_folds,
    default_data_root,
    face_transform,
    pairs_from_labels,
    read_bin,
    read_pairs_file,
    write_bin,
)
from femb.data.transforms import CheckedCenterCrop

# --------------------------------------------------------------------------------------------
# helpers and fixtures


def _real_root(name: str) -> Path:
    try:
        root = default_data_root() / name
    except FileNotFoundError as err:
        pytest.skip(f"real data not available: {err}")
    if not root.is_dir():
        pytest.skip(f"real data folder {root} not found (set FEMB_DATA_ROOT)")
    return root


@pytest.fixture(scope="module")
def orl_root() -> Path:
    return _real_root("orl")


@pytest.fixture(scope="module")
def lfw_root() -> Path:
    return _real_root("lfw")


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _rgb(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _jpeg_bytes(seed: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_rgb(seed, size)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_text(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# transforms


def test_transform_normalises_exactly_to_minus_one_one():
    # A 4x4 grey image at the output size: resize is the identity, so each pixel p must map
    # to p / 255 * 2 - 1 on all three channels.
    pixels = np.array([[0, 51, 102, 255]] * 4, dtype=np.uint8)
    out = face_transform(train=False, image_size=4)(Image.fromarray(pixels, mode="L"))
    expected = torch.from_numpy(pixels.astype(np.float32) / 255.0 * 2.0 - 1.0)
    assert out.shape == (3, 4, 4) and out.dtype == torch.float32
    for channel in range(3):
        torch.testing.assert_close(out[channel], expected, atol=1e-6, rtol=0)


def test_flip_only_in_train_transform():
    # Left half white, right half black: a flip is visible as a sign change of the first column.
    array = np.zeros((8, 8, 3), dtype=np.uint8)
    array[:, :4] = 255
    image = Image.fromarray(array)

    torch.manual_seed(0)
    eval_tf, train_tf = face_transform(False, 8), face_transform(True, 8)
    eval_left = {float(eval_tf(image)[0, 0, 0]) for _ in range(20)}
    train_left = {float(train_tf(image)[0, 0, 0]) for _ in range(40)}
    assert eval_left == {1.0}
    assert train_left == {1.0, -1.0}


def test_center_crop_on_original_pixels():
    # 20x20 image: black border, white central 10x10 square; crop 10 then resize to 5 -> all 1.
    array = np.zeros((20, 20, 3), dtype=np.uint8)
    array[5:15, 5:15] = 255
    out = face_transform(False, image_size=5, center_crop=10)(Image.fromarray(array))
    assert torch.all(out == 1.0)
    uncropped = face_transform(False, image_size=5)(Image.fromarray(array))
    assert uncropped.min() < 0


def test_center_crop_larger_than_image_raises():
    with pytest.raises(ValueError, match="larger than the image"):
        CheckedCenterCrop(30)(Image.fromarray(_rgb(0, 20)))


def test_transform_rejects_non_pil_input():
    with pytest.raises(TypeError, match="PIL"):
        face_transform(False)(torch.zeros(3, 8, 8))


# --------------------------------------------------------------------------------------------
# IdentityFolderDataset


@pytest.fixture()
def folder_tree(tmp_path: Path) -> Path:
    root = tmp_path / "faces"
    # Deliberately created in non-sorted order; "carol" has no images, "dave" only a .txt.
    _save(root / "zoe" / "b.png", _rgb(1))
    _save(root / "zoe" / "a.jpg", _rgb(2))
    _save(root / "alice" / "2.png", _rgb(3))
    _save(root / "alice" / "10.png", _rgb(4))
    _save(root / "alice" / "1.png", _rgb(5))
    (root / "carol").mkdir()
    (root / "dave").mkdir()
    (root / "dave" / "notes.txt").write_text("not an image")
    _save(root / "bob" / "x.bmp", _rgb(6))
    return root


def test_identity_folder_sorted_and_empty_skipped(folder_tree: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="femb.data.base"):
        ds = IdentityFolderDataset(folder_tree, image_size=16)
    assert ds.identities == ["alice", "bob", "zoe"]
    assert ds.num_classes == 3
    assert ds.labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert ds.labels.dtype == np.int64
    names = [Path(p).relative_to(folder_tree).as_posix() for p in ds.paths]
    expected_names = ["alice/1.png", "alice/10.png", "alice/2.png", "bob/x.bmp"]
    assert names == expected_names + ["zoe/a.jpg", "zoe/b.png"]
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "carol" in warning and "dave" in warning

    image, label = ds[3]
    assert image.shape == (3, 16, 16) and label == 1
    # bob/x.bmp is lossless and already 16x16, so the tensor is the exact normalised pixels.
    expected = torch.from_numpy(_rgb(6)).permute(2, 0, 1).float() / 255 * 2 - 1
    torch.testing.assert_close(image, expected, atol=1e-6, rtol=0)


def test_identity_folder_missing_root_message(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        IdentityFolderDataset(missing)
    message = str(info.value)
    for fragment in (str(missing), "root/<identity>/<image>", "FEMB_DATA_ROOT", "data_root"):
        assert fragment in message


def test_identity_folder_without_identities_or_images(tmp_path: Path):
    (tmp_path / "loose.jpg").write_bytes(_jpeg_bytes(0))
    with pytest.raises(FileNotFoundError, match="no identity folders"):
        IdentityFolderDataset(tmp_path)
    (tmp_path / "empty_id").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        IdentityFolderDataset(tmp_path)


def test_identity_folder_corrupt_image_names_path(folder_tree: Path):
    bad = folder_tree / "bob" / "y.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    ds = IdentityFolderDataset(folder_tree, image_size=16)
    index = ds.paths.index(str(bad))
    with pytest.raises(ImageReadError, match="y.jpg") as info:
        ds[index]
    assert str(bad) in str(info.value)


def test_identity_folder_extensions_filter(folder_tree: Path):
    ds = IdentityFolderDataset(folder_tree, extensions=(".PNG",))
    assert ds.identities == ["alice", "zoe"]
    assert len(ds) == 4
    assert IdentityFolderDataset(folder_tree, extensions=".bmp").identities == ["bob"]


# --------------------------------------------------------------------------------------------
# ORL


def test_orl_splits(orl_root: Path):
    train = ORLDataset(orl_root, split="train")
    val = ORLDataset(orl_root, split="val")
    assert (len(train), train.num_classes) == (300, 30)
    assert (len(val), val.num_classes) == (100, 10)
    assert train.identities == [f"s{i}" for i in range(1, 31)]
    assert val.identities == [f"s{i}" for i in range(31, 41)]
    assert np.bincount(train.labels).tolist() == [10] * 30
    assert not set(train.paths) & set(val.paths)
    # Numeric order: label 9 is s10 (string order would put s10 at label 1).
    assert all(Path(p).parent.name == "s10" for p in np.array(train.paths)[train.labels == 9])
    assert [Path(p).name for p in train.paths[:10]] == [f"{i}.pgm" for i in range(1, 11)]


def test_orl_item_is_grey_replicated_in_range(orl_root: Path):
    val = ORLDataset(orl_root, split="val")
    image, label = val[0]
    assert label == 0 and val.identities[0] == "s31"
    assert image.shape == (3, 112, 112) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0 and image.std() > 0.1
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_orl_val_pairs_agree_with_labels(orl_root: Path):
    assert not hasattr(ORLDataset(orl_root, split="val"), "pairs")  # default: all pairs
    val = ORLDataset(orl_root, split="val", protocol="balanced_pairs")
    same = val.labels[val.pairs[:, 0]] == val.labels[val.pairs[:, 1]]
    assert np.array_equal(same, val.issame)
    assert val.issame.sum() == 10 * 45 and (~val.issame).sum() == 450
    assert set(val.folds.tolist()) == set(range(10))


def test_orl_all_and_split_boundary(orl_root: Path):
    assert len(ORLDataset(orl_root, split="all")) == 400
    train = ORLDataset(orl_root, split="train", num_train_identities=35)
    val = ORLDataset(orl_root, split="val", num_train_identities=35)
    assert (len(train), len(val)) == (350, 50)
    assert val.identities == [f"s{i}" for i in range(36, 41)]
    with pytest.raises(ValueError, match="num_train_identities"):
        ORLDataset(orl_root, split="train", num_train_identities=40)


def test_orl_bad_split_lists_choices(orl_root: Path):
    with pytest.raises(ValueError, match=r"\['all', 'train', 'val'\].*'test'"):
        ORLDataset(orl_root, split="test")


# --------------------------------------------------------------------------------------------
# LFW


def test_lfw_train_val_disjoint_and_counts(lfw_root: Path):
    train = LFWDataset(lfw_root, split="train")
    val = LFWDataset(lfw_root, split="val")
    assert (len(train), train.num_classes) == (4077, 547)
    assert (len(val), val.num_classes) == (807, 435)
    assert not set(train.identities) & set(val.identities)
    assert train.identities == sorted(train.identities)
    assert not hasattr(train, "pairs")

    # Independent references shipped with the data: the train identity list and image roles.
    listed = (lfw_root / "train_identities.txt").read_text().split()
    assert train.identities == sorted(listed)
    rows = [line.split("\t") for line in (lfw_root / "subset_images.tsv").read_text().splitlines()]
    by_role: dict[str, set[str]] = {}
    for row in rows[1:]:
        by_role.setdefault(row[3], set()).add(row[2])
    assert {Path(p).relative_to(lfw_root).as_posix() for p in val.paths} == by_role["eval_fold1"]
    assert {Path(p).relative_to(lfw_root).as_posix() for p in train.paths} == by_role["train"]


def test_lfw_val_pairs(lfw_root: Path):
    val = LFWDataset(lfw_root, split="val")
    assert val.pairs.shape == (600, 2) and val.pairs.dtype == np.int64
    assert val.issame.sum() == 300 and val.issame[:300].all()
    assert np.array_equal(val.folds, np.zeros(600, dtype=np.int64))
    same = val.labels[val.pairs[:, 0]] == val.labels[val.pairs[:, 1]]
    assert np.array_equal(same, val.issame)
    # First line of pairs_fold1.txt: "Abel_Pacheco 1 4".
    first = [Path(val.paths[i]).name for i in val.pairs[0]]
    assert first == ["Abel_Pacheco_0001.jpg", "Abel_Pacheco_0004.jpg"]


def test_lfw_items_use_center_crop(lfw_root: Path):
    val = LFWDataset(lfw_root, split="val")
    image, label = val[0]
    assert image.shape == (3, 112, 112) and -1 <= image.min() and image.max() <= 1
    assert label == val.labels[0]
    # Independent reference: crop the central 150 px box by hand, then resize with PIL.
    full = Image.open(val.paths[0]).convert("RGB")
    crop = full.crop((50, 50, 200, 200)).resize((112, 112), Image.BILINEAR)
    expected = face_transform(False, 112)(crop)
    assert LFW_CENTER_CROP == 150
    torch.testing.assert_close(image, expected, atol=2 / 255, rtol=0)


def _tiny_lfw(tmp_path: Path) -> Path:
    root = tmp_path / "lfw"
    for name, count in (("Ann", 2), ("Bo", 1), ("Cy", 3), ("Dee", 0)):
        (root / "images" / name).mkdir(parents=True)
        for i in range(1, count + 1):
            _save(root / "images" / name / f"{name}_{i:04d}.jpg", _rgb(i, 20))
    lines = ["1\t2", "Ann\t1\t2", "Ann\t1\t3", "Ann\t1\tBo\t1", "Ann\t2\tBo\t1"]
    _write_text(root / "pairs.txt", lines)
    return root


def test_lfw_missing_images_error_or_skip(tmp_path: Path, caplog):
    root = _tiny_lfw(tmp_path)
    with pytest.raises(FileNotFoundError, match="Ann_0003.jpg"):
        LFWDataset(root, split="val", pairs_file="pairs.txt")
    with caplog.at_level(logging.WARNING, logger="femb.data.lfw"):
        val = LFWDataset(root, split="val", pairs_file="pairs.txt", missing="skip", center_crop=16)
    assert "skipped 1 of 4 pairs" in caplog.text
    assert val.identities == ["Ann", "Bo"]
    assert val.issame.tolist() == [True, False, False]
    assert [Path(p).name for p in val.paths] == ["Ann_0001.jpg", "Ann_0002.jpg", "Bo_0001.jpg"]
    assert val.pairs.tolist() == [[0, 1], [0, 2], [1, 2]]

    with caplog.at_level(logging.WARNING, logger="femb.data.base"):
        train = LFWDataset(root, split="train", pairs_file="pairs.txt", center_crop=16)
    assert train.identities == ["Cy"] and "Dee" in caplog.text
    with pytest.raises(ValueError, match=r"\['error', 'skip'\]"):
        LFWDataset(root, split="val", pairs_file="pairs.txt", missing="ignore")


def test_lfw_missing_root_message(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="FEMB_DATA_ROOT"):
        LFWDataset(tmp_path / "lfw")


# --------------------------------------------------------------------------------------------
# pairs files


def test_read_pairs_view2(tmp_path: Path):
    lines = [
        "2\t2",
        "A\t1\t2",
        "B 3 4",
        "A\t1\tC\t2",
        "B\t2\tD\t7",
        "",
        "E\t1\t3",
        "F\t2\t5",
        "E\t4\tG\t1",
        "F  1  H  1",
    ]
    protocol = read_pairs_file(_write_text(tmp_path / "p.txt", lines))
    assert (protocol.num_folds, protocol.pairs_per_fold, len(protocol)) == (2, 2, 8)
    assert protocol.issame.tolist() == [True, True, False, False] * 2
    assert protocol.folds.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    first, third, last = protocol.records[0], protocol.records[2], protocol.records[-1]
    assert (first.name1, first.index1, first.name2, first.index2) == ("A", 1, "A", 2)
    assert (third.name1, third.index1, third.name2, third.index2) == ("A", 1, "C", 2)
    assert (last.name1, last.name2, last.line) == ("F", "H", 10)  # blank line 6 counted
    assert protocol.names == set("ABCDEFGH")
    assert protocol.image_keys()[:3] == [("A", 1), ("A", 2), ("B", 2)]


def test_read_pairs_view1_header(tmp_path: Path):
    protocol = read_pairs_file(_write_text(tmp_path / "v1.txt", ["1", "A 1 2", "A 1 B 1"]))
    assert (protocol.num_folds, protocol.pairs_per_fold) == (1, 1)
    assert protocol.issame.tolist() == [True, False]
    assert protocol.folds.tolist() == [0, 0]


@pytest.mark.parametrize(
    ("lines", "where", "pattern"),
    [
        (["1 1", "A 1 2 3", "A 1 B 1"], 2, "matched line"),
        (["1 1", "A 1 2", "A 1 B"], 3, "mismatched line"),
        (["1 1", "A x 2", "A 1 B 1"], 2, "must be an integer"),
        (["1 1", "A 0 2", "A 1 B 1"], 2, ">= 1"),
        (["1 2", "A 1 2", "A 1 B 1"], 3, "announces 4 pair lines"),
        (["1 1", "A 1 2", "A 1 B 1", "C 1 2"], 4, "announces 2 pair lines"),
        (["1 1 1", "A 1 2", "A 1 B 1"], 1, "header"),
        (["ten", "A 1 2", "A 1 B 1"], 1, "must be an integer"),
        (["0 3"], 1, "positive"),
    ],
)
def test_read_pairs_malformed(tmp_path: Path, lines: list[str], where: int, pattern: str):
    path = _write_text(tmp_path / "bad.txt", lines)
    with pytest.raises(ValueError, match=pattern) as info:
        read_pairs_file(path)
    assert f"{path}:{where}:" in str(info.value)


def test_read_official_pairs_file(lfw_root: Path):
    full = read_pairs_file(lfw_root / "pairs.txt")
    assert (full.num_folds, full.pairs_per_fold, len(full)) == (10, 300, 6000)
    assert np.array_equal(full.issame, np.tile(np.repeat([True, False], 300), 10))
    fold1 = read_pairs_file(lfw_root / "pairs_fold1.txt")
    assert [r.keys for r in fold1.records] == [r.keys for r in full.records[:600]]
    dev = read_pairs_file(lfw_root / "pairsDevTrain.txt")
    assert (dev.num_folds, len(dev), int(dev.issame.sum())) == (1, 2200, 1100)


def test_pairs_from_labels_balanced_and_deterministic():
    labels = np.repeat(np.arange(4), 3)  # 4 classes x 3 -> 12 positive pairs
    pairs, issame, folds = pairs_from_labels(labels, num_folds=3, seed=1)
    assert issame.sum() == 12 and (~issame).sum() == 12
    assert np.array_equal(labels[pairs[:, 0]] == labels[pairs[:, 1]], issame)
    assert (pairs[:, 0] < pairs[:, 1]).all()
    assert len({tuple(p) for p in pairs.tolist()}) == 24
    assert [int(((folds == k) & issame).sum()) for k in range(3)] == [4, 4, 4]
    again = pairs_from_labels(labels, num_folds=3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((pairs, issame, folds), again, strict=True))
    with pytest.raises(ValueError, match="no label occurs twice"):
        pairs_from_labels(np.arange(5))


def test_pairs_dataset(tmp_path: Path):
    paths = [_save(tmp_path / f"{i}.png", _rgb(i, 8)) for i in range(4)]
    ds = PairsDataset(paths, [[0, 1], [2, 3]], [True, False], image_size=8)
    assert ds.num_classes == 4 and ds.folds.tolist() == [0, 0]
    assert ds[2][0].shape == (3, 8, 8) and ds[2][1] == 2
    with pytest.raises(ValueError, match="pair indices"):
        PairsDataset(paths, [[0, 4]], [True])


# --------------------------------------------------------------------------------------------
# insightface .bin


def test_bin_round_trip_insightface_layout(tmp_path: Path):
    images = [_jpeg_bytes(i) for i in range(6)]
    issame = [True, False, True]
    path = tmp_path / "tiny.bin"
    # Written exactly as insightface's files are laid out (protocol 2, as under Python 2).
    with open(path, "wb") as handle:
        pickle.dump((images, issame), handle, protocol=2)

    bins, flags = read_bin(path)
    assert bins == images and flags.tolist() == issame

    ds = BinVerificationDataset(path, image_size=16)
    assert len(ds) == 6
    assert ds.pairs.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert ds.issame.tolist() == issame
    assert ds.labels.tolist() == [0, 0, 1, 2, 3, 3]
    assert ds.num_classes == 4
    assert ds.folds.tolist() == [0, 1, 2]  # 3 pairs -> 3 folds (warned), one pair each
    image, _ = ds[3]
    expected = face_transform(False, 16)(Image.open(io.BytesIO(images[3])))
    torch.testing.assert_close(image, expected)


def test_write_bin_atomic_and_readable(tmp_path: Path):
    arrays = [_rgb(i, 8) for i in range(4)]
    path = tmp_path / "out.bin"
    write_bin(path, [Image.fromarray(a) for a in arrays[:2]] + arrays[2:], np.array([0, 1]))
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]  # no temp file left behind
    bins, flags = read_bin(path)
    assert flags.tolist() == [False, True]
    for blob, array in zip(bins, arrays, strict=True):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(blob))), array)  # PNG: lossless
    with pytest.raises(ValueError, match="2 images per pair"):
        write_bin(path, arrays[:3], [True])


def test_bin_folds_match_kfold():
    sklearn = pytest.importorskip("sklearn.model_selection")
    folds = consecutive_folds(23, 10)
    for k, (_, test_index) in enumerate(sklearn.KFold(10, shuffle=False).split(np.arange(23))):
        assert np.array_equal(np.flatnonzero(folds == k), test_index)


@pytest.mark.parametrize(
    "content",
    [
        {"bins": [], "issame": []},
        ([b"a", b"b", b"c"], [True]),
        ([b"a", 3], [True]),
        ([b"a", b"b"], [2]),
        ([b"a", b"b"], [True], "extra"),
    ],
)
def test_bin_wrong_layout(tmp_path: Path, content):
    path = tmp_path / "wrong.bin"
    with open(path, "wb") as handle:
        pickle.dump(content, handle)
    with pytest.raises(ValueError, match=r"expected an insightface verification \.bin"):
        BinVerificationDataset(path)


def test_bin_not_a_pickle_and_unsafe_pickle(tmp_path: Path):
    text = tmp_path / "text.bin"
    text.write_text("hello")
    with pytest.raises(ValueError, match="cannot unpickle"):
        read_bin(text)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([Exploit(), b"x"], [True])))
    with pytest.raises(ValueError, match="not allowed"):
        read_bin(evil)


# --------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_deterministic():
    a = SyntheticFaceDataset(num_identities=4, images_per_identity=3, image_size=32, seed=7)
    b = SyntheticFaceDataset(num_identities=4, images_per_identity=3, image_size=32, seed=7)
    c = SyntheticFaceDataset(num_identities=4, images_per_identity=3, image_size=32, seed=8)
    assert len(a) == 12 and a.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for i in (0, 5, 11):
        x, y = a[i]
        assert torch.equal(x, b[i][0]) and y == b[i][1] == i // 3
        assert not torch.equal(x, c[i][0])
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(a[4][0], a[4][0])  # repeated access gives the same tensor
    assert not torch.equal(a[3][0], a[4][0])  # two samples of one identity differ


def test_synthetic_splits_disjoint_and_learnable():
    kw = dict(num_identities=6, images_per_identity=4, image_size=32, seed=0)
    train = SyntheticFaceDataset(split="train", **kw)
    val = SyntheticFaceDataset(split="val", protocol="balanced_pairs", **kw)
    assert not hasattr(SyntheticFaceDataset(split="val", **kw), "pairs")
    with pytest.raises(ValueError, match="protocol must be one of"):
        SyntheticFaceDataset(split="val", protocol="some", **kw)
    assert not set(train.identities) & set(val.identities)
    train_protos = torch.stack([train.prototype(k).flatten() for k in range(6)])
    val_protos = torch.stack([val.prototype(k).flatten() for k in range(6)])
    # Different identities: no val prototype is (nearly) a train prototype.
    assert torch.cdist(val_protos, train_protos).min() > 5.0
    # Learnable: every sample's nearest prototype is its own identity's.
    samples = torch.stack([train[i][0].flatten() for i in range(len(train))])
    nearest = torch.cdist(samples, train_protos).argmin(dim=1)
    assert nearest.tolist() == train.labels.tolist()
    same = val.labels[val.pairs[:, 0]] == val.labels[val.pairs[:, 1]]
    assert np.array_equal(same, val.issame) and not hasattr(train, "pairs")
    with pytest.raises(ValueError, match=r"\['train', 'val'\]"):
        SyntheticFaceDataset(split="test")


def test_synthetic_works_with_dataloader():
    ds = SyntheticFaceDataset(num_identities=2, images_per_identity=2, image_size=16)
    images, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 0, 1, 1]


# --------------------------------------------------------------------------------------------
# data root


def test_default_data_root_env(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FEMB_DATA_ROOT", str(tmp_path))
    assert default_data_root() == tmp_path.resolve()
    monkeypatch.setenv("FEMB_DATA_ROOT", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="FEMB_DATA_ROOT"):
        default_data_root()


def test_default_data_root_fallback(monkeypatch):
    monkeypatch.delenv("FEMB_DATA_ROOT", raising=False)
    import femb.data.data_root as module

    expected = (Path(module.__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()
    if expected.is_dir():
        assert default_data_root() == expected
    else:
        with pytest.raises(FileNotFoundError, match="FEMB_DATA_ROOT"):
            default_data_root()
