"""``femb.analysis`` and ``scripts/aggregate.py``: run tables, seed statistics, plots, HParams.

Hand-made run directories (exact values) test the arithmetic; one real 4-job multirun of
``experiment=compare_heads_orl debug=fast`` (module fixture, ~20 s) tests the whole path from
``scripts/train.py -m`` to the report, TensorBoard and the notebook.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from femb import analysis

from .conftest import REPO, compose_train

HEADERS = ["sphereface", "cosface", "arcface", "magface"]

# One thread per process: the 2-core machine is shared and subprocess startup dominates.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}

#: A multirun of the real preset, shrunk to seconds: the preset sweeps the four headers,
#: seed=0 replaces its seed sweep, debug=fast switches to synthetic data.
TINY = [
    "debug=fast",
    "seed=0",
    "image_size=32",
    "embed_dim=16",
    "max_training_steps=2",
    "evaluation_steps=1",
    "log_every=1",
    "projection_samples=0",
    "progress=false",
]


def aggregate_script() -> ModuleType:
    """``scripts/aggregate.py`` imported as a module, to call its ``main(argv)`` in-process."""
    spec = importlib.util.spec_from_file_location(
        "femb_aggregate_script", REPO / "scripts" / "aggregate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Hand-made run directories


def fake_run(
    root: Path,
    num: int,
    overrides: dict,
    evals: list[dict],
    *,
    csv: bool = True,
    summary: bool = True,
    seconds: float = 90.5,
    choices: dict | None = None,
) -> Path:
    """A run directory as scripts/train.py -m writes it, with the given CSV rows."""
    name = f"{num}_" + ",".join(f"{k}={v}" for k, v in overrides.items())
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create({"seed": overrides.get("seed", 0)}), run / ".hydra" / "config.yaml"
    )
    OmegaConf.save(
        OmegaConf.create([f"{k}={v}" for k, v in overrides.items()]),
        run / ".hydra" / "overrides.yaml",
    )
    OmegaConf.save(
        OmegaConf.create(
            {
                "hydra": {
                    "job": {"num": num},
                    "runtime": {
                        "choices": {
                            "backbone": "mobilefacenet",
                            "header": overrides.get("header", "arcface"),
                            "hydra/launcher": "basic",
                            **(choices or {}),
                        }
                    },
                }
            }
        ),
        run / ".hydra" / "hydra.yaml",
    )
    start, end = pd.Timestamp("2024-05-01 10:00:00"), pd.Timestamp("2024-05-01 10:00:00")
    end += pd.Timedelta(seconds=seconds)
    (run / "train.log").write_text(
        f"[{start:%Y-%m-%d %H:%M:%S},000][femb.train][INFO] - Instantiating train dataset\n"
        f"[{end:%Y-%m-%d %H:%M:%S},{end.microsecond // 1000:03d}][femb.train][INFO] - done\n"
    )
    if csv:
        pd.DataFrame(evals).to_csv(run / "verification.csv", index=False)
    if summary:
        (run / "metrics.json").write_text(
            json.dumps({"global_step": int(evals[-1]["step"]), "epoch": int(evals[-1]["epoch"])})
        )
    return run


def evals(eers: list[float], aucs: list[float]) -> list[dict]:
    return [
        {
            "step": 10 * (i + 1),
            "epoch": i + 1,
            "train_loss": 5.0 - i,
            "lr": 0.1,
            "val/n_genuine": 6.0,
            "val/eer": e,
            "val/eer_threshold": 0.5,
            "val/auc": a,
        }
        for i, (e, a) in enumerate(zip(eers, aucs, strict=True))
    ]


# EER and AUC after evaluations 1, 2, 3 of each (header, seed).
CURVES = {
    ("arcface", 0): ([0.30, 0.10, 0.20], [0.70, 0.95, 0.90]),
    ("arcface", 1): ([0.25, 0.15, 0.05], [0.80, 0.85, 0.97]),
    ("cosface", 0): ([0.40, 0.30, 0.35], [0.60, 0.70, 0.65]),
    ("cosface", 1): ([0.45, 0.20, 0.25], [0.55, 0.80, 0.75]),
}


@pytest.fixture
def fake_sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun"
    for num, ((header, seed), (eers, aucs)) in enumerate(CURVES.items()):
        fake_run(
            root, num, {"header": header, "seed": seed}, evals(eers, aucs), seconds=60.0 + num
        )
    return root


def test_run_table_has_overrides_final_best_steps_and_wall_time(fake_sweep):
    sweep = analysis.load_runs(fake_sweep)
    runs = sweep.runs
    assert runs["run"].tolist() == [
        "0_header=arcface,seed=0",
        "1_header=arcface,seed=1",
        "2_header=cosface,seed=0",
        "3_header=cosface,seed=1",
    ]
    assert runs["header"].tolist() == ["arcface", "arcface", "cosface", "cosface"]
    assert runs["seed"].tolist() == [0, 1, 0, 1]
    assert runs["backbone"].tolist() == ["mobilefacenet"] * 4  # from hydra.yaml choices
    assert sweep.metrics == ["val/eer", "val/auc"]  # counts and thresholds are not scores
    assert sweep.group_keys == ["header"]
    assert (runs["status"] == "complete").all() and sweep.problems.empty

    first = runs.iloc[0]
    assert first["final/val/eer"] == 0.20 and first["best/val/eer"] == 0.10  # lower is better
    assert first["final/val/auc"] == 0.90 and first["best/val/auc"] == 0.95  # higher is better
    assert first["final/train_loss"] == 3.0
    assert first["steps"] == 30 and first["epochs"] == 3
    assert runs["wall_time_s"].tolist() == [60.0, 61.0, 62.0, 63.0]


def test_group_table_is_the_mean_and_std_over_seeds(fake_sweep):
    groups = analysis.group_table(analysis.load_runs(fake_sweep))
    assert groups["header"].tolist() == ["arcface", "cosface"]
    assert groups["n"].tolist() == [2, 2]
    assert groups["seeds"].tolist() == ["0,1", "0,1"]
    arc = groups.iloc[0]
    # final EERs 0.20 and 0.05; sample std of two values a, b is |a - b| / sqrt(2).
    assert arc["final/val/eer_mean"] == pytest.approx(0.125)
    assert arc["final/val/eer_std"] == pytest.approx(0.15 / math.sqrt(2))
    assert arc["best/val/eer_mean"] == pytest.approx((0.10 + 0.05) / 2)
    assert arc["best/val/auc_mean"] == pytest.approx((0.95 + 0.97) / 2)
    cos = groups.iloc[1]
    assert cos["best/val/eer_std"] == pytest.approx(0.10 / math.sqrt(2))
    assert cos["wall_time_s_mean"] == pytest.approx(62.5)

    text = analysis.to_markdown(groups[["header", "n", "final/val/eer_mean", "final/val/eer_std"]])
    assert text.splitlines()[0] == "| header | n | final/val/eer |"
    assert "| arcface | 2 | 0.1250 ± 0.1061 |" in text


def test_single_seed_groups_have_nan_std_and_bare_metric_names_expand(tmp_path):
    root = tmp_path / "mr"
    fake_run(root, 0, {"header": "arcface"}, evals([0.3, 0.2], [0.7, 0.8]))
    sweep = analysis.load_runs(root, metrics=["eer"])
    assert sweep.metrics == ["val/eer"]
    groups = analysis.group_table(sweep)
    assert groups["n"].tolist() == [1] and math.isnan(groups["final/val/eer_std"].iloc[0])
    with pytest.raises(ValueError, match=r"metric 'lfw/eer' is in no run.*'val/auc'"):
        analysis.load_runs(root, metrics=["lfw/eer"])


def test_incomplete_runs_are_reported_not_dropped(fake_sweep, tmp_path, caplog, capsys):
    fake_run(fake_sweep, 4, {"header": "magface", "seed": 0}, evals([0.5], [0.5]), csv=False)
    fake_run(fake_sweep, 5, {"header": "magface", "seed": 1}, evals([0.5], [0.5]), summary=False)
    with caplog.at_level(logging.WARNING, logger="femb.analysis"):
        sweep = analysis.load_runs(fake_sweep)
    assert len(sweep.runs) == 6
    assert sweep.runs["status"].tolist() == ["complete"] * 4 + ["incomplete"] * 2
    problems = sweep.problems.set_index("run_dir")["problem"]
    assert len(problems) == 2
    missing_csv = problems[str(fake_sweep / "4_header=magface,seed=0")]
    assert missing_csv.startswith("missing verification.csv;")
    assert "last log line" in missing_csv
    assert problems[str(fake_sweep / "5_header=magface,seed=1")].startswith("missing metrics.json")
    assert "4_header=magface,seed=0: missing verification.csv" in caplog.text
    # Incomplete runs never enter the statistics.
    assert analysis.group_table(sweep)["header"].tolist() == ["arcface", "cosface"]

    out = tmp_path / "report"
    status = aggregate_script().main([str(fake_sweep), "--out", str(out), "--strict"])
    printed = capsys.readouterr().out
    assert status == 1  # --strict: problems fail the command
    assert "2 run(s) with problems" in printed
    assert "4_header=magface,seed=0: missing verification.csv" in printed
    table = pd.read_csv(out / "problems.csv")
    assert sorted(Path(p).name for p in table["run_dir"]) == [
        "4_header=magface,seed=0",
        "5_header=magface,seed=1",
    ]
    assert (out / "curves_val_eer.png").stat().st_size > 0


def test_missing_folder_and_empty_folder_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analysis.load_runs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no run directory.*hydra.sweep.dir"):
        analysis.load_runs(tmp_path / "empty")


def test_aggregate_of_a_mistyped_path_exits_1_and_creates_nothing(tmp_path, caplog):
    assert aggregate_script().main([str(tmp_path / "typo")]) == 1
    assert "does not exist" in caplog.text
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    assert aggregate_script().main([str(tmp_path / "empty")]) == 1
    assert list((tmp_path / "empty").iterdir()) == []


def test_interpolate_tpr_takes_the_top_of_vertical_segments():
    fpr = np.array([0.0, 0.0, 0.5, 0.5, 1.0])
    tpr = np.array([0.0, 0.4, 0.6, 0.9, 1.0])
    grid = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(
        analysis.interpolate_tpr(fpr, tpr, grid), [0.4, 0.5, 0.9, 0.95, 1.0]
    )


def test_roc_files_are_read_final_step_wins_and_absence_is_logged(fake_sweep, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="femb.analysis"):
        assert analysis.load_rocs(analysis.load_runs(fake_sweep)).empty
    assert "no ROC files" in caplog.text

    for run in sorted(fake_sweep.iterdir()):
        (run / "roc").mkdir()
        pd.DataFrame({"fpr": [0, 0, 1], "tpr": [0, 0.5, 1]}).to_csv(run / "roc" / "val_step10.csv")
        pd.DataFrame({"FAR": [0, 0.5, 1], "TAR": [0, 1, 1]}).to_csv(run / "roc" / "val_step30.csv")
        # The trainer's own layout: roc/<valset>/step_<N>.csv.
        (run / "roc" / "other").mkdir()
        early, late = (
            run / "roc" / "other" / "step_00000002.csv",
            run / "roc" / "other" / "step_9.csv",
        )
        pd.DataFrame({"fpr": [0, 1], "tpr": [0, 1]}).to_csv(early)
        pd.DataFrame({"fpr": [0, 0, 1], "tpr": [0, 1, 1]}).to_csv(late)
    sweep = analysis.load_runs(fake_sweep)
    rocs = analysis.load_rocs(sweep)
    assert sorted(rocs["valset"].unique().tolist()) == ["other", "val"]
    val = rocs[rocs["valset"] == "val"]
    assert val.groupby("run_dir")["fpr"].apply(list).tolist() == [[0, 0.5, 1]] * 4
    other = rocs[rocs["valset"] == "other"]
    assert other.groupby("run_dir")["tpr"].apply(list).tolist() == [[0, 1, 1]] * 4

    report = analysis.write_report(fake_sweep, tmp_path / "out", metrics=["val/eer"])
    names = {p.name for p in report["files"]}
    assert {
        "runs.csv",
        "runs.md",
        "groups.csv",
        "groups.md",
        "problems.csv",
        "curves_val_eer.png",
        "roc_val.png",
    } <= names


# ---------------------------------------------------------------------------------------------
# A real multirun


@pytest.fixture(scope="module")
def multirun(tmp_path_factory) -> Path:
    """``scripts/train.py -m experiment=compare_heads_orl debug=fast ...``: 4 synthetic jobs."""
    sweep_dir = tmp_path_factory.mktemp("multirun") / "compare"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/train.py",
            "-m",
            "experiment=compare_heads_orl",
            *TINY,
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=SUBPROCESS_ENV,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return sweep_dir


def test_preset_sweeps_the_four_headers_into_self_describing_run_dirs(multirun):
    runs = sorted((p for p in multirun.iterdir() if p.is_dir()), key=lambda p: p.name)
    assert [p.name.split("_", 1)[0] for p in runs] == ["0", "1", "2", "3"]
    for run, header in zip(runs, HEADERS, strict=True):
        overrides = OmegaConf.load(run / ".hydra" / "overrides.yaml")
        assert f"header={header}" in overrides and "experiment=compare_heads_orl" in overrides
        assert (run / "verification.csv").is_file() and (run / "metrics.json").is_file()


def test_aggregate_script_on_a_real_multirun(multirun, tmp_path):
    out = tmp_path / "report"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/aggregate.py",
            str(multirun),
            "--out",
            str(out),
            "--metric",
            "synthetic/eer",
            "--metric",
            "auc",
            "--plot-metric",
            "synthetic/eer",
            "--plot-metric",
            "train_loss",
            "--roc",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=SUBPROCESS_ENV,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    runs = pd.read_csv(out / "runs.csv")
    assert runs["header"].tolist() == HEADERS
    assert (runs["status"] == "complete").all()
    assert runs["steps"].tolist() == [2, 2, 2, 2]
    assert (runs["wall_time_s"] > 0).all()
    for _, run in runs.iterrows():
        rows = pd.read_csv(Path(run["run_dir"]) / "verification.csv")
        assert run["final/synthetic/eer"] == pytest.approx(rows["synthetic/eer"].iloc[-1])
        assert run["best/synthetic/eer"] == pytest.approx(rows["synthetic/eer"].min())
        assert run["best/synthetic/auc"] == pytest.approx(rows["synthetic/auc"].max())
    groups = pd.read_csv(out / "groups.csv")
    # Groups: overrides minus seed; the command-line keys are the same in every job.
    assert groups["header"].tolist() == HEADERS and groups["n"].tolist() == [1, 1, 1, 1]
    assert pd.read_csv(out / "problems.csv").empty
    markdown = (out / "groups.md").read_text()
    assert markdown.startswith("| header | experiment | debug |")
    assert "| arcface | compare_heads_orl | fast |" in markdown
    for name in ("curves_synthetic_eer.png", "curves_train_loss.png", "roc_synthetic.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name

    # The trainer's ROC of the last evaluation reproduces the run's final AUC...
    for _, run in runs.iterrows():
        final = sorted((Path(run["run_dir"]) / "roc" / "synthetic").glob("step_*.csv"))[-1]
        roc = pd.read_csv(final)
        auc = np.trapezoid(roc["tpr"], roc["fpr"])
        assert auc == pytest.approx(run["final/synthetic/auc"], abs=1e-6)

    # ...and --roc recomputes it from checkpoints/last.pt for a run that has no ROC files.
    copy = tmp_path / "copy"
    shutil.copytree(multirun, copy)
    first = sorted(p for p in copy.iterdir() if (p / ".hydra").is_dir())[0]
    shutil.rmtree(first / "roc")
    written = analysis.compute_rocs(analysis.load_runs(copy), tmp_path / "rocs")
    assert [p.parent.name for p in written] == [first.name]
    roc = pd.read_csv(written[0])
    auc = np.trapezoid(roc["tpr"], roc["fpr"])
    assert auc == pytest.approx(runs["final/synthetic/auc"].iloc[0], abs=1e-6)


def test_tensorboard_runs_share_one_tag_layout(multirun):
    """``tensorboard --logdir <multirun>`` sees one TB run per job with comparable tags."""
    runs = sorted(p for p in multirun.iterdir() if (p / ".hydra").is_dir())
    assert len(runs) == 4
    shared = {
        "train/loss",
        "train/loss/cls",
        "train/lr",
        "train/embedding_norm_mean",
        "train/images_per_s",
    }
    val_layouts = []
    for run in runs:
        scalars = analysis.read_scalars(run)
        tags = set(scalars["tag"])
        assert shared <= tags, run.name
        assert {t.split("/", 1)[0] for t in tags} <= {"train", "header", "synthetic", "hparams"}
        assert scalars.loc[scalars["tag"] == "synthetic/eer", "step"].tolist() == [1, 2]
        val_layouts.append({t for t in tags if t.startswith("synthetic/")})
    # Every job logs the same validation tags, so TensorBoard overlays them run by run.
    assert {"synthetic/eer", "synthetic/auc", "synthetic/rank1"} <= val_layouts[0]
    assert all(layout == val_layouts[0] for layout in val_layouts)


def test_write_hparams_reads_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg = compose_train(
        [
            "header=cosface",
            "backbone=mobilefacenet",
            "optimizer.lr=0.03",
            "seed=3",
            "header.m=0.4",
        ],
        tmp_path / "run",
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    metrics = {
        "orl/eer": 0.125,
        "orl/n_genuine": 450.0,
        "orl/tar@far=1e-3": math.nan,
        "best/orl/eer": 0.1,
        "train/loss": 2.5,
    }
    folder = analysis.write_hparams(tmp_path / "run", resolved, metrics, step=7)

    events = EventAccumulator(str(folder))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info.hparams
    assert start["header"].string_value == "cosface"
    assert start["header.m"].number_value == pytest.approx(0.4)
    assert start["header.s"].number_value == 64.0
    assert start["backbone"].string_value == "mobilefacenet"
    assert start["optimizer"].string_value == "SGD"
    assert start["optimizer.lr"].number_value == pytest.approx(0.03)
    assert start["seed"].number_value == 3 and start["image_size"].number_value == 112
    assert start["dataset"].string_value == "ORLDataset"
    assert "header_lr" not in start  # None is left out
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]
    ).experiment
    assert sorted(m.name.tag for m in experiment.metric_infos) == [
        "hparams/best/orl/eer",
        "hparams/orl/eer",
        "hparams/train/loss",
    ]
    eer = events.Scalars("hparams/orl/eer")
    assert [(e.step, e.value) for e in eer] == [(7, 0.125)]

    names = analysis.hparams_from_config(
        resolved, choices={"header": "cosface", "optimizer": "sgd"}
    )
    assert names["optimizer"] == "sgd" and names["header"] == "cosface"


# ---------------------------------------------------------------------------------------------
# The notebook


def test_notebook_runs_headless_on_the_multirun(multirun, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    source = REPO / "notebooks" / "aggregate.ipynb"
    nb = nbformat.read(source, as_version=4)
    for cell in nb.cells:  # the committed file carries no outputs
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None

    # A kernel spec that runs this interpreter (the venv's), whatever "python3" maps to.
    spec = tmp_path / "jupyter" / "kernels" / "femb-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "femb test",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("FEMB_MULTIRUN", str(multirun))
    monkeypatch.setenv("FEMB_AGGREGATE_OUT", str(tmp_path / "nb_report"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    client = nbclient.NotebookClient(
        nb, kernel_name="femb-test", timeout=120, resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()
    text = "\n".join(
        str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", ""))
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )
    assert "complete runs: 4" in text
    assert "arcface" in text
    assert (tmp_path / "nb_report" / "groups.csv").is_file()
    shutil.rmtree(tmp_path / "jupyter")
