"""A record of bad inputs femb was tried on: each must end in a message naming the problem.

Configs, files, tensors and outputs; the signal and resume cases live in ``test_resume.py``.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.errors import ConfigCompositionException
from PIL import Image

from femb.backbones import build_backbone
from femb.config_check import ConfigError, check_config
from femb.data import (
    BinVerificationDataset,
    IdentityFolderDataset,
    ImageReadError,
    SkipBadImages,
    read_pairs_file,
)
from femb.evaluation import VerificationEvaluator
from femb.headers import ArcFaceHeader
from femb.run_io import RunWriter, write_csv
from femb.train import build_scheduler, load_model

from .conftest import compose_train

# --- configs ---------------------------------------------------------------------------------


def test_unknown_option_name_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigCompositionException, match="Available options") as err:
        compose_train(["backbone=resnet-50"], tmp_path)
    assert "iresnet50" in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=-0.1", r"optimizer.lr=-0.1: expected a number > 0"),
        ("embed_dim=0", r"embed_dim=0: expected an int >= 1"),
        ("batch_size=abc", r"batch_size='abc': expected an int >= 2"),
        ("batch_size=1", r"batch_size=1: expected an int >= 2 \(BatchNorm"),
        ("device=gpu", r"device='gpu': expected auto, cpu, mps, cuda or cuda:N"),
        ("image_size=100", r"image_size=100: expected a positive multiple of 16"),
        ("optimizer.momentum=1.5", r"optimizer.momentum=1.5: expected a number in \[0, 1\)"),
        ("header.in_features=128", r"header.in_features=128 but backbone.embed_dim=512"),
        ("max_epochs=-3", r"max_epochs=-3: expected an int >= 0"),
        ("tensorboard=maybe", r"tensorboard='maybe': expected true or false"),
    ],
)
def test_impossible_values_fail_fast_with_key_value_and_fix(tmp_path, override, message):
    cfg = compose_train([override], tmp_path)
    with pytest.raises(ConfigError, match=message) as err:
        check_config(cfg)
    assert "e.g." in str(err.value)  # every problem says what a valid value looks like


@pytest.mark.parametrize("override", ["loss.label_smoothing=0.1", "+loss.weight=[1.0]"])
def test_partial_fc_with_a_loss_it_would_ignore(tmp_path, override):
    cfg = compose_train(["header=partial_fc", override], tmp_path)
    with pytest.raises(ConfigError, match="PartialFCHeader computes its own softmax") as err:
        check_config(cfg)
    assert "e.g. loss=cross_entropy loss.label_smoothing=0.0" in str(err.value)
    check_config(compose_train(["header=partial_fc"], tmp_path))


def test_a_misspelt_added_key_is_caught_and_a_new_one_only_warned_about(tmp_path, caplog):
    cfg = compose_train(["+max_trainig_steps=3"], tmp_path)
    with pytest.raises(ConfigError, match="did you mean max_training_steps") as err:
        check_config(cfg)
    assert "e.g. max_training_steps=3" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="femb"):
        check_config(compose_train(["+tag=baseline"], tmp_path))
    assert "tag='baseline' is not one femb reads" in caplog.text


def test_known_keys_are_the_keys_of_the_default_config(tmp_path):
    from femb.config_check import KNOWN_KEYS

    assert set(compose_train([], tmp_path).keys()) == KNOWN_KEYS


def test_both_stop_criteria_zero(tmp_path):
    cfg = compose_train(["max_training_steps=0", "max_epochs=0"], tmp_path)
    with pytest.raises(ConfigError, match="training would never stop"):
        check_config(cfg)


def test_evaluation_steps_without_a_validation_set(tmp_path):
    cfg = compose_train(["evaluation_steps=100", "~dataset.val"], tmp_path)
    with pytest.raises(ConfigError, match="evaluation_steps=100 but the dataset has no valid"):
        check_config(cfg)


def test_all_problems_are_reported_at_once(tmp_path):
    cfg = compose_train(["optimizer.lr=0", "embed_dim=0", "num_workers=-1"], tmp_path)
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert len(err.value.problems) == 3


def test_the_default_config_passes(tmp_path):
    check_config(compose_train([], tmp_path))


def test_unknown_scheduler_interval(tmp_path):
    cfg = compose_train(["scheduler.interval=batch"], tmp_path)
    params = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match=r"scheduler.interval='batch'; use one of"):
        build_scheduler(cfg.scheduler, torch.optim.SGD(params, lr=0.1), total_steps=10)


def test_unknown_backbone_and_similarity_names_list_the_choices():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet'.*iresnet18"):
        build_backbone(backbone="resnet", embed_dim=8)
    with pytest.raises(ValueError, match=r"unknown similarity 'dot'.*\['cos', 'l2'\]"):
        VerificationEvaluator(similarity="dot")


# --- files -----------------------------------------------------------------------------------


def _write_identity_tree(root, corrupt: int = 0, people: int = 2, per_person: int = 5):
    """people x per_person small JPEGs; the first ``corrupt`` files hold garbage bytes."""
    count = 0
    for p in range(people):
        folder = root / f"person{p}"
        folder.mkdir(parents=True)
        for i in range(per_person):
            path = folder / f"{i}.jpg"
            if count < corrupt:
                path.write_bytes(b"this is not a jpeg")
            else:
                Image.new("RGB", (16, 16), (10 * p, 20 * i, 30)).save(path)
            count += 1
    return root


def test_missing_data_folder_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="FEMB_DATA_ROOT") as err:
        IdentityFolderDataset(tmp_path / "casia")
    assert str(tmp_path / "casia") in str(err.value)


def test_corrupt_image_names_its_path(tmp_path):
    dataset = IdentityFolderDataset(_write_identity_tree(tmp_path / "d", corrupt=1))
    with pytest.raises(ImageReadError, match="0.jpg"):
        dataset[0]


def test_identity_folder_without_images_is_reported(tmp_path, caplog):
    root = _write_identity_tree(tmp_path / "d")
    (root / "empty_person").mkdir()
    with caplog.at_level(logging.WARNING):
        dataset = IdentityFolderDataset(root)
    assert dataset.num_classes == 2
    assert "empty_person" in caplog.text


def test_skip_bad_images_counts_and_logs_each_file(tmp_path, caplog):
    dataset = SkipBadImages(
        IdentityFolderDataset(_write_identity_tree(tmp_path / "d", corrupt=1, per_person=50)),
        max_bad_fraction=0.05,
    )
    with caplog.at_level(logging.WARNING):
        image, label = dataset[0]  # bad: replaced by the next readable sample
    assert image.shape == (3, 112, 112) and label == 0
    assert dataset.bad_paths == [dataset.paths[0]]
    assert "skipping unreadable image" in caplog.text and "1 skipped so far" in caplog.text
    assert dataset.num_classes == 2  # the wrapper forwards the dataset's attributes


def test_skip_bad_images_fails_past_the_stated_fraction(tmp_path):
    dataset = SkipBadImages(
        IdentityFolderDataset(_write_identity_tree(tmp_path / "d", corrupt=3)),
        max_bad_fraction=0.1,  # 10 images: at most 1 may be bad
    )
    with pytest.raises(RuntimeError, match=r"2 unreadable images, more than max_bad_fraction"):
        dataset[0]


def test_skip_bad_images_from_the_config(tmp_path):
    from femb.train import build

    root = _write_identity_tree(tmp_path / "d", corrupt=1, per_person=50)
    overrides = ["dataset=folder", f"dataset.train.root={root}", "~dataset.val"]
    parts = build(compose_train([*overrides, "skip_bad_images=true"], tmp_path / "run"))
    assert isinstance(parts["train_set"], SkipBadImages)
    assert parts["train_set"][0][0].shape == (3, 112, 112)
    parts = build(compose_train(overrides, tmp_path / "run"))
    with pytest.raises(ImageReadError):
        parts["train_set"][0]


def test_malformed_pairs_line_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("1\t1\nAlice\t1\t2\nBob\t1\tCarol\n")
    with pytest.raises(ValueError, match=r"pairs.txt:3"):
        read_pairs_file(path)


def test_bin_file_in_another_layout(tmp_path):
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps({"images": [], "issame": []}))
    with pytest.raises(ValueError, match="bins, issame_list"):
        BinVerificationDataset(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoints/last.pt"):
        load_model(tmp_path)


# --- tensors ---------------------------------------------------------------------------------


def test_labels_outside_the_classifier_are_caught_before_the_header_math():
    header = ArcFaceHeader(in_features=4, out_features=3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*got values in \[0, 7\]"):
        header(torch.randn(2, 4), torch.tensor([0, 7]))


def test_float_labels_are_rejected():
    header = ArcFaceHeader(in_features=4, out_features=3)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        header(torch.randn(2, 4), torch.tensor([0.0, 1.0]))


def test_grey_images_to_a_backbone_say_how_to_fix_them():
    backbone = build_backbone(backbone="tv_resnet18", embed_dim=8, input_size=32)
    with pytest.raises(ValueError, match="repeat greyscale images to 3 channels"):
        backbone(torch.zeros(2, 1, 32, 32))


def test_nan_embeddings_are_an_error_not_a_score():
    embeddings = torch.randn(6, 4)
    embeddings[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf in 1 of 6 rows"):
        VerificationEvaluator()(embeddings, torch.tensor([0, 0, 1, 1, 2, 2]))


# --- outputs ---------------------------------------------------------------------------------


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OSError, match="cannot create the run directory"):
        RunWriter(blocker / "run", tensorboard=False)


def test_disk_full_leaves_the_previous_csv_intact(tmp_path, monkeypatch):
    path = tmp_path / "verification.csv"
    write_csv(path, [{"step": 1, "val/eer": 0.5}])

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"cannot write .*verification.csv: No space left"):
        write_csv(path, [{"step": 1, "val/eer": 0.5}, {"step": 2, "val/eer": 0.4}])
    monkeypatch.undo()
    assert pd.read_csv(path)["step"].tolist() == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["verification.csv"]  # no temp left


def test_written_files_get_the_usual_mode_not_mkstemps_0600(tmp_path):
    """Run folders and datasets are read by others: atomic writes apply the umask as open()."""
    from femb.data import write_bin, write_recordio
    from femb.run_io import save_checkpoint

    umask = os.umask(0o022)
    os.umask(umask)
    write_csv(tmp_path / "verification.csv", [{"step": 1, "val/eer": 0.5}])
    save_checkpoint({"step": 1}, tmp_path / "checkpoints" / "last.pt")
    jpeg = (tmp_path / "face.jpg", Image.new("RGB", (8, 8)))
    jpeg[1].save(jpeg[0])
    write_bin(tmp_path / "pairs.bin", [jpeg[0].read_bytes()] * 2, [True])
    write_recordio(tmp_path / "train", [(jpeg[0].read_bytes(), 0)])
    files = ["verification.csv", "checkpoints/last.pt", "pairs.bin", "train.rec", "train.idx"]
    for name in files:
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_loss_that_is_not_finite_stops_with_the_step(tmp_path):
    from femb import FaceEmbeddingModel
    from femb.data import SyntheticFaceDataset

    class Exploding(torch.nn.Module):
        embed_dim = 4

        def forward(self, x):
            return torch.full((x.shape[0], 4), float("inf")) * x.mean()

    train_set = SyntheticFaceDataset(num_identities=2, images_per_identity=4, image_size=16)
    header = ArcFaceHeader(in_features=4, out_features=2)
    model = FaceEmbeddingModel(Exploding(), header, torch.nn.CrossEntropyLoss())
    with pytest.raises(FloatingPointError, match="at global step 0"):
        model.fit(
            train_dataset=train_set,
            batch_size=4,
            device="cpu",
            optimizer=torch.optim.SGD(model.params, lr=0.1),
            max_training_steps=2,
            out_dir=tmp_path,
            progress=False,
        )
    assert np.isfinite(header.weight.detach().numpy()).all()  # no update from the bad step


def test_a_failing_multirun_job_does_not_stop_the_others(tmp_path):
    import subprocess
    import sys

    from .conftest import REPO

    command = [
        sys.executable, "scripts/train.py", "-m", "debug=fast", "max_training_steps=0",
        "max_epochs=0,1", f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${hydra.job.num}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0  # the sweep reports the failure...
    assert "training would never stop" in done.stderr
    assert "training would never stop" in (tmp_path / "0" / "error.txt").read_text()
    assert (tmp_path / "1" / "metrics.json").is_file()  # ...after the other job finished

    from femb.analysis import load_runs

    sweep = load_runs([tmp_path])
    (problem,) = sweep.problems.itertuples()
    assert problem.status == "failed" and Path(problem.run_dir).name == "0"
    assert problem.problem.startswith("failed: femb.config_check.ConfigError: invalid config")
    assert "training would never stop" in problem.problem


def test_a_user_error_in_a_single_run_is_one_message_without_traceback(tmp_path):
    import subprocess
    import sys

    from .conftest import REPO

    command = [
        sys.executable, "scripts/train.py", "debug=fast", "optimizer.lr=-1",
        f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert "optimizer.lr=-1: expected a number > 0" in output
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output
    assert f"traceback in {tmp_path / 'error.txt'}" in output
    assert "Traceback" in (tmp_path / "error.txt").read_text()
