"""Checkpoints, exact resume, stop signals and non-finite losses (issues 6 and 7).

The reference for every resume test is the same run without interruption: an interrupted and
resumed run must end with bitwise equal weights and optimizer state, and the same
``verification.csv`` and ROC files, with no row lost or duplicated.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from femb import FaceEmbeddingModel
from femb.data import SyntheticFaceDataset
from femb.evaluation import VerificationEvaluator
from femb.headers import ArcFaceHeader
from femb.model import TrainingInterrupted

from .conftest import REPO
from .test_fit import SIZE, TinyBackbone

TOTAL_STEPS = 14  # 4 steps per epoch: crosses 3 epoch ends; evaluations at 3, 6, 9, 12, 14


class HookedBackbone(nn.Module):
    """TinyBackbone that acts at chosen training forward passes (1-based call numbers).

    Args:
        signal_at: Send SIGTERM to this process during this forward pass.
        kill_at: SIGKILL this process during this forward pass.
        nan_at: Return NaN embeddings on these forward passes (``"all"``: always).
    """

    def __init__(
        self,
        signal_at: int | None = None,
        kill_at: int | None = None,
        nan_at: set[int] | str = frozenset(),
    ) -> None:
        super().__init__()
        self.body = TinyBackbone()
        self.embed_dim = 8
        self.signal_at, self.kill_at, self.nan_at = signal_at, kill_at, nan_at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if not self.training:
            return out
        self.calls += 1
        if self.calls == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.nan_at == "all" or self.calls in self.nan_at:
            out = out * float("nan")
        return out


def datasets() -> tuple[SyntheticFaceDataset, SyntheticFaceDataset]:
    # 18 images, batch 4: 4 steps per epoch, 2 images dropped.
    train = SyntheticFaceDataset(
        num_identities=6, images_per_identity=3, image_size=SIZE, split="train", seed=0
    )
    val = SyntheticFaceDataset(
        num_identities=3, images_per_identity=3, image_size=SIZE, split="val", seed=0
    )
    return train, val


def run(out_dir: Path, steps: int = TOTAL_STEPS, hooks: dict | None = None, **kwargs):
    """One fit with momentum, weight decay, a step and an epoch schedule and evaluations."""
    train_set, val_set = datasets()
    torch.manual_seed(1)
    model = FaceEmbeddingModel(
        backbone=HookedBackbone(**(hooks or {})),
        header=ArcFaceHeader(in_features=8, out_features=train_set.num_classes),
        loss=nn.CrossEntropyLoss(),
    )
    optimizer = torch.optim.SGD(model.params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    args = dict(
        train_dataset=train_set,
        batch_size=4,
        device="cpu",
        optimizer=optimizer,
        lr_global_step_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 3, gamma=0.7),
        lr_epoch_scheduler=torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9),
        evaluator=VerificationEvaluator(),
        val_dataset=val_set,
        evaluation_steps=3,
        max_training_steps=steps,
        out_dir=out_dir,
        progress=False,
        seed=5,
    )
    args.update(kwargs)
    metrics = model.fit(**args)
    return model, metrics


def assert_same_run(a: Path, b: Path) -> None:
    """Same final checkpoint (weights, optimizer, counters), CSV and ROC files."""
    last_a = torch.load(a / "checkpoints" / "last.pt", weights_only=True)
    last_b = torch.load(b / "checkpoints" / "last.pt", weights_only=True)
    for key in ("backbone", "header"):
        assert last_a[key].keys() == last_b[key].keys()
        for name, tensor in last_a[key].items():
            assert torch.equal(tensor, last_b[key][name]), f"{key}.{name} differs"
    momenta_a = [s["momentum_buffer"] for s in last_a["optimizer"]["state"].values()]
    momenta_b = [s["momentum_buffer"] for s in last_b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momenta_a, momenta_b, strict=True))
    assert last_a["optimizer"]["param_groups"] == last_b["optimizer"]["param_groups"]
    assert (last_a["global_step"], last_a["epoch"]) == (last_b["global_step"], last_b["epoch"])
    best_a = torch.load(a / "checkpoints" / "best.pt", weights_only=True)
    best_b = torch.load(b / "checkpoints" / "best.pt", weights_only=True)
    assert best_a["global_step"] == best_b["global_step"]
    assert torch.equal(best_a["header"]["weight"], best_b["header"]["weight"])
    assert (a / "verification.csv").read_text() == (b / "verification.csv").read_text()
    rocs_a = sorted(p.relative_to(a) for p in (a / "roc").rglob("*.csv"))
    assert rocs_a == sorted(p.relative_to(b) for p in (b / "roc").rglob("*.csv"))
    for path in rocs_a:
        assert (a / path).read_text() == (b / path).read_text()


def csv_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "verification.csv").read_text().strip().splitlines()[1:]
    return [int(line.split(",")[0]) for line in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every resume test is compared with."""
    out = tmp_path_factory.mktemp("reference")
    run(out)
    return out


def test_the_reference_run_evaluates_and_checkpoints_as_documented(reference):
    assert csv_steps(reference) == [3, 6, 9, 12, 14]
    state = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    assert state["global_step"] == TOTAL_STEPS and state["epoch"] == 3
    resume = state["resume"]
    assert resume["samples_in_epoch"] == 2 * 4  # step 14 = batch 2 of epoch 3
    assert [row["step"] for row in resume["rows"]] == [3, 6, 9, 12, 14]
    assert resume["settings"] == {
        "batch_size": 4,
        "world_size": 1,
        "seed": 5,
        "precision": "fp32",
        "train_size": 18,
    }


# Stops at evaluation steps (a stop elsewhere adds a final evaluation): mid-epoch, and at the
# last batch of an epoch, before the epoch's end (epoch counter, epoch scheduler) is processed.
@pytest.mark.parametrize("stop_at", [6, 12])
def test_resume_after_a_step_limit_equals_the_uninterrupted_run(reference, tmp_path, stop_at):
    run(tmp_path, steps=stop_at)
    run(tmp_path, resume_from="auto")
    assert_same_run(reference, tmp_path)


def test_resume_from_a_run_dir_writes_the_continuation_elsewhere(reference, tmp_path):
    run(tmp_path / "first", steps=6)
    run(tmp_path / "second", resume_from=tmp_path / "first")
    assert_same_run(reference, tmp_path / "second")
    assert csv_steps(tmp_path / "first") == [3, 6]


def test_resume_from_an_older_checkpoint_drops_the_newer_rows(reference, tmp_path):
    with pytest.raises(TrainingInterrupted):
        run(tmp_path, hooks={"signal_at": 2})  # stops before the first evaluation: no CSV
    assert not (tmp_path / "verification.csv").exists()
    early = tmp_path / "early.pt"
    early.write_bytes((tmp_path / "checkpoints" / "last.pt").read_bytes())
    run(tmp_path, resume_from="auto", steps=7)
    assert csv_steps(tmp_path) == [3, 6, 7]
    run(tmp_path, resume_from=early)  # back to step 2: rows 3, 6, 7 and their ROCs dropped
    assert_same_run(reference, tmp_path)


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_resumes_exactly(reference, tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    # SIGTERM arrives during the forward pass of step 5, between two evaluations.
    with pytest.raises(TrainingInterrupted) as stop:
        run(tmp_path, hooks={"signal_at": 5})
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers are restored
    assert stop.value.signum == signal.SIGTERM and stop.value.global_step == 5
    assert stop.value.checkpoint == tmp_path / "checkpoints" / "last.pt"
    state = torch.load(stop.value.checkpoint, weights_only=True)
    assert state["global_step"] == 5 and state["resume"]["samples_in_epoch"] == 4
    assert csv_steps(tmp_path) == [3]

    run(tmp_path, resume_from=stop.value.checkpoint)
    assert_same_run(reference, tmp_path)


# A training process that SIGKILLs itself at a chosen moment: during a training step, or
# while writing a checkpoint (after the CSV row of that evaluation was written).
KILLED_RUN = textwrap.dedent(
    """
    import sys
    import torch
    import femb.run_io
    from tests.test_resume import run

    out, mode, at, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    if mode == "checkpoint":
        import os, signal
        save, calls = femb.run_io.save_checkpoint, []

        def dying_save(state, path):
            calls.append(path)
            if len(calls) == at:
                os.kill(os.getpid(), signal.SIGKILL)
            save(state, path)

        femb.run_io.save_checkpoint = dying_save
        run(out, checkpoint_steps=2)
    else:
        run(out, checkpoint_steps=2, hooks={"kill_at": at})
    """
)


@pytest.mark.parametrize(
    "mode, at, checkpoint_step, rows_on_disk",
    [
        # Killed in step 8: checkpoints at 2, 3 (eval), 4, 6 (eval); rows 3 and 6.
        ("step", 8, 6, [3, 6]),
        # Killed writing the checkpoint of the evaluation at step 6, the 5th write (last.pt at
        # 2, last.pt and best.pt at 3, last.pt at 4, 6): its CSV row is on disk, it is not.
        ("checkpoint", 5, 4, [3, 6]),
    ],
)
def test_sigkill_loses_no_row_and_duplicates_none(
    reference, tmp_path, mode, at, checkpoint_step, rows_on_disk
):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    command = [sys.executable, str(script), str(tmp_path), mode, str(at)]
    done = subprocess.run(
        [*command, str(torch.get_num_threads())], env=env, cwd=REPO, capture_output=True
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert csv_steps(tmp_path) == rows_on_disk
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["global_step"] == checkpoint_step

    run(tmp_path, resume_from="auto", checkpoint_steps=2)
    assert_same_run(reference, tmp_path)


# A run with DataLoader workers, for a SIGTERM to the whole process group (a batch scheduler's
# way): the workers leave quietly, the trainer still finishes its step and checkpoints.
WORKERS_RUN = textwrap.dedent(
    """
    import logging, sys, time
    import torch
    from femb.model import TrainingInterrupted
    from tests.test_resume import datasets, run

    class Slow(torch.utils.data.Dataset):
        def __init__(self):
            self.data = datasets()[0]
            self.num_classes = self.data.num_classes

        def __len__(self):
            return len(self.data)

        def __getitem__(self, index):
            time.sleep(0.02)  # the trainer mostly waits for the workers
            return self.data[index]

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    try:
        run(sys.argv[1], steps=10**6, train_dataset=Slow(), num_workers=2, log_every=1,
            evaluator=None, val_dataset=None, lr_epoch_scheduler=None)
    except TrainingInterrupted as stop:
        print("stopped at", stop.global_step, flush=True)
        sys.exit(3)
    """
)


def test_sigterm_to_the_process_group_with_workers_still_checkpoints(tmp_path):
    script = tmp_path / "workers_run.py"
    script.write_text(WORKERS_RUN)
    log_path = tmp_path / "out.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "run")],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so killpg reaches only it
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if "step 3/" in log_path.read_text(errors="replace"):
                break
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)
    text = log_path.read_text(errors="replace")
    assert process.returncode == 3, text[-3000:]
    stopped_at = int(text.split("stopped at ")[1].split()[0])
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["global_step"] == stopped_at >= 3
    assert "exited unexpectedly" not in text and "Traceback" not in text


def test_resume_auto_without_a_checkpoint_starts_fresh(reference, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="femb"):
        run(tmp_path, resume_from="auto")
    assert "no checkpoint in" in caplog.text and "starting a fresh run" in caplog.text
    assert_same_run(reference, tmp_path)


def test_resume_from_a_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        run(tmp_path / "new", resume_from=tmp_path / "nowhere")


def test_resuming_a_finished_run_changes_nothing(reference, tmp_path, caplog):
    run(tmp_path)
    before = (tmp_path / "verification.csv").read_text()
    with caplog.at_level(logging.INFO, logger="femb"):
        run(tmp_path, resume_from="auto")
    assert "already complete" in caplog.text
    assert (tmp_path / "verification.csv").read_text() == before
    assert_same_run(reference, tmp_path)


def test_resume_warns_which_value_wins(tmp_path, caplog):
    run(tmp_path, steps=3)
    with caplog.at_level(logging.WARNING, logger="femb"):
        run(tmp_path, steps=5, resume_from="auto", batch_size=2, seed=9)
    text = caplog.text
    assert "batch_size is 4 in the checkpoint but 2 now" in text
    assert "no longer an exact continuation" in text
    assert "seed is 5 in the checkpoint but 9 now" in text and "checkpoint's seed is kept" in text


def test_a_checkpoint_without_training_state_cannot_be_resumed(tmp_path):
    model, _ = run(tmp_path, steps=1)
    torch.save(model.checkpoint_state(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="no training state to resume from"):
        run(tmp_path / "new", resume_from=tmp_path / "weights.pt")


def test_nonfinite_loss_raises_with_the_step_and_the_last_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError) as err:
        run(tmp_path, hooks={"nan_at": {5}})
    message = str(err.value)
    assert "non-finite loss nan at global step 4 (epoch 1, batch 1 of the epoch)" in message
    assert str(tmp_path / "checkpoints" / "last.pt") in message  # written at step 3
    assert "nonfinite=skip" in message


def test_nonfinite_skip_drops_the_batch_and_counts(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="femb"):
        model, metrics = run(tmp_path, hooks={"nan_at": {2, 7}}, nonfinite="skip")
    assert model.global_step == TOTAL_STEPS  # skipped batches are not optimizer steps
    assert "batch skipped (1 in a row, 2 in all)" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["resume"]["nonfinite"] == {"consecutive": 0, "total": 2}
    # 14 optimizer steps and 2 skipped batches: 16 batches, the last one of epoch 3.
    assert state["epoch"] == 3 and state["resume"]["samples_in_epoch"] == 4 * 4


def test_nonfinite_skip_gives_up_after_consecutive_skips(tmp_path):
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite losses"):
        run(tmp_path, hooks={"nan_at": "all"}, nonfinite="skip", max_nonfinite_skips=3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(nonfinite="ignore"), r"nonfinite='ignore'; use one of \['raise', 'skip'\]"),
        (dict(max_nonfinite_skips=0), "max_nonfinite_skips=0"),
        (dict(checkpoint_steps=-1), "checkpoint_steps=-1"),
        (dict(prefetch_factor=2), "num_workers=0"),
    ],
)
def test_bad_fault_options_are_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, **kwargs)


def test_the_script_exits_143_on_sigterm_and_resume_auto_continues(tmp_path):
    """``scripts/train.py``: SIGTERM -> checkpoint, exit status 143; ``resume=auto`` goes on."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "scripts/train.py",
        "debug=fast",
        "image_size=32",
        "max_training_steps=100000",
        "evaluation_steps=0",
        "log_every=1",
        "progress=false",
        "tensorboard=false",
        f"hydra.run.dir={run_dir}",
    ]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    log_file = run_dir / "train.log"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if log_file.is_file() and "step 2/100000" in log_file.read_text():
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 128 + signal.SIGTERM, stderr.decode()[-3000:]
    text = log_file.read_text()
    assert "Stopped by SIGTERM" in text
    stopped_at = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["global_step"]
    assert stopped_at >= 2

    resumed = [c for c in command if not c.startswith("max_training_steps")]
    resumed += [f"max_training_steps={stopped_at + 2}", "resume=auto"]
    done = subprocess.run(resumed, cwd=REPO, capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["global_step"] == stopped_at + 2
    # 32 images, batch 8: an evaluation at every 4th step (epoch end) and one at the end.
    expected = [s for s in range(4, stopped_at + 2, 4)] + [stopped_at + 2]
    assert csv_steps(run_dir) == expected  # no row lost, none repeated
