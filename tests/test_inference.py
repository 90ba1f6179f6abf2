"""Using a trained run: load and encode, preprocessing, embed/verify/export scripts.

One tiny MobileFaceNet is trained on ORL through the real config (module fixture), then every
test reads its run directory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from femb.data import ORLDataset
from femb.evaluation import VerificationEvaluator
from femb.inference import (
    ExportParityError,
    Preprocessing,
    TrainedRun,
    export_model,
    load_embeddings,
    load_run,
    preprocess_from_config,
    preprocessing_from_config,
    read_checkpoint,
)
from femb.model import FaceEmbeddingModel
from femb.train import train

from .conftest import DATA_ROOT, REPO, compose_train

pytestmark = [
    pytest.mark.skipif(
        not (DATA_ROOT / "orl").is_dir(), reason=f"ORL is not staged at {DATA_ROOT / 'orl'}"
    ),
    # TorchScript and the legacy ONNX exporter are deprecated upstream; femb says so in its docs.
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

IMAGE_SIZE = 32
STEPS = 6
OVERRIDES = [
    "dataset=orl",
    "backbone=mobilefacenet",
    "embed_dim=64",
    f"image_size={IMAGE_SIZE}",
    f"max_training_steps={STEPS}",
    f"evaluation_steps={STEPS}",
    "batch_size=8",
    "tensorboard=false",
    "log_every=100",
]


def _load_script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(
        f"femb_script_{name}", REPO / "scripts" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


embed_cli = _load_script("embed")
verify_cli = _load_script("verify")
export_cli = _load_script("export")
evaluate_cli = _load_script("evaluate")


@pytest.fixture(autouse=True)
def _restore_logging() -> Any:
    """The scripts' ``main`` configures logging as a CLI would; undo it for later tests."""
    femb_logger, root = logging.getLogger("femb"), logging.getLogger()
    level, handlers = femb_logger.level, list(root.handlers)
    yield
    femb_logger.setLevel(level)
    root.handlers[:] = handlers


class Trained:
    """The run directory, the in-memory model that trained and the returned metrics."""

    def __init__(self, run: Path, model: FaceEmbeddingModel, metrics: dict[str, float]) -> None:
        self.run = run
        self.model = model
        self.metrics = metrics


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    run = tmp_path_factory.mktemp("inference") / "run"
    cfg = compose_train(OVERRIDES, run)
    captured: dict[str, FaceEmbeddingModel] = {}
    original_fit = FaceEmbeddingModel.fit

    def recording_fit(self: FaceEmbeddingModel, *args: Any, **kwargs: Any) -> dict[str, float]:
        captured["model"] = self
        return original_fit(self, *args, **kwargs)

    # train() keeps its model to itself; record the object that fit() trained.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FaceEmbeddingModel, "fit", recording_fit)
        metrics = train(cfg)
    return Trained(run, captured["model"], metrics)


@pytest.fixture(scope="module")
def val_set() -> ORLDataset:
    return ORLDataset(root=DATA_ROOT / "orl", split="val", image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def raw_embeddings(trained: Trained, val_set: ORLDataset) -> torch.Tensor:
    """(100, 64) raw embeddings of ORL s31..s40 from the in-memory model that trained."""
    return trained.model.encode(val_set, batch_size=16, normalize=False)


@pytest.fixture(scope="module")
def val_embeddings(raw_embeddings: torch.Tensor) -> torch.Tensor:
    """(100, 64) unit embeddings of ORL s31..s40 from the in-memory model that trained."""
    return torch.nn.functional.normalize(raw_embeddings, dim=1)


@pytest.fixture(scope="module")
def run(trained: Trained) -> TrainedRun:
    return load_run(trained.run)


# --------------------------------------------------------------------------------------------
# Loading and encoding


def test_loaded_model_encodes_like_the_model_that_trained(
    trained, run, val_set, raw_embeddings, val_embeddings
):
    emb, norms = run.model.encode(val_set, batch_size=16, return_norms=True)
    torch.testing.assert_close(emb, val_embeddings, atol=1e-6, rtol=0)
    torch.testing.assert_close(norms, raw_embeddings.norm(dim=1), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(val_set)))

    # The checkpoint's metrics are those of these very embeddings.
    eer = VerificationEvaluator()(raw_embeddings, val_set.labels)["eer"]
    assert run.metrics["orl/eer"] == pytest.approx(eer, abs=1e-9)
    assert run.metrics["orl/eer"] == pytest.approx(trained.metrics["orl/eer"])
    assert run.global_step == STEPS
    assert run.similarity == "cos" and run.flip_test is False and run.valsets == ["orl"]

    # A .pt file and the checkpoints folder name the same weights.
    for path in (trained.run / "checkpoints" / "last.pt", trained.run / "checkpoints"):
        model = FaceEmbeddingModel.load(path)
        assert not model.training
        torch.testing.assert_close(model.encode(val_set[0][0][None]), val_embeddings[:1])


def test_load_errors_say_what_is_wrong(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="no run directory or checkpoint"):
        load_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="without checkpoints/last.pt"):
        load_run(tmp_path)
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a .*PyTorch checkpoint"):
        load_run(tmp_path / "notes.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="not a femb checkpoint"):
        FaceEmbeddingModel.load(tmp_path / "tensor.pt")
    _, state = read_checkpoint(trained.run)
    state["config"] = None
    torch.save(state, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="holds no config"):
        load_run(tmp_path / "plain.pt")


# --------------------------------------------------------------------------------------------
# Preprocessing


def test_preprocessing_comes_from_the_validation_node(run, val_set, tmp_path):
    assert run.preprocessing() == Preprocessing(IMAGE_SIZE, None, "dataset.val.orl")
    transform = preprocess_from_config(run.config)
    image = Image.open(val_set.paths[7])
    assert torch.equal(transform(image), val_set[7][0])

    # LFW's node leaves center_crop to LFWDataset, whose default is a 150 px crop.
    lfw = compose_train(["dataset=lfw", "image_size=64"], tmp_path)
    assert preprocessing_from_config(lfw) == Preprocessing(64, 150, "dataset.val.lfw")
    lfw = compose_train(["dataset=lfw", "+dataset.val.lfw.center_crop=120"], tmp_path)
    assert preprocessing_from_config(lfw).center_crop == 120
    # Without a validation set the training node is used (its transform minus the flip).
    no_val = compose_train(["dataset=orl", "~dataset.val"], tmp_path)
    assert preprocessing_from_config(no_val).source == "dataset.train"
    with pytest.raises(ValueError, match="unknown validation set 'lfw'"):
        preprocessing_from_config(run.config, "lfw")


# --------------------------------------------------------------------------------------------
# verify


def _pick_pairs(val_set: ORLDataset, emb: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """The most similar genuine pair of two different images and the least similar impostor."""
    sim = emb @ emb.T
    labels = torch.as_tensor(val_set.labels)
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool)
    genuine = torch.where(same & off_diagonal, sim, torch.tensor(-2.0)).argmax()
    impostor = torch.where(~same, sim, torch.tensor(2.0)).argmin()
    n = len(labels)
    return (int(genuine // n), int(genuine % n)), (int(impostor // n), int(impostor % n))


def _verify(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, dict | str, str]:
    rc = verify_cli.main(argv)
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if "--json" in argv and rc == 0 else out), err


def test_verify_decides_at_the_stored_eer_threshold(trained, val_set, val_embeddings, capsys):
    threshold = trained.metrics["orl/eer_threshold"]
    (g1, g2), (i1, i2) = _pick_pairs(val_set, val_embeddings)
    sim = val_embeddings @ val_embeddings.T
    # The EER operating point accepts some genuine pairs (FRR < 1) and rejects some impostors.
    assert sim[g1, g2] >= threshold > sim[i1, i2]

    results = {}
    cases = {"self": (g1, g1), "genuine": (g1, g2), "impostor": (i1, i2)}
    for name, (a, b) in cases.items():
        argv = [str(trained.run), val_set.paths[a], val_set.paths[b], "--json", "-q"]
        rc, result, _ = _verify(argv, capsys)
        assert rc == 0, name
        results[name] = result
        expected = 1.0 if a == b else float(sim[a, b])
        assert result["score"] == pytest.approx(expected, abs=1e-5), name
        assert result["threshold"]["value"] == pytest.approx(threshold)
        assert result["threshold"]["rule"] == "eer" and result["similarity"] == "cos"
    assert results["self"]["same"] and results["genuine"]["same"]
    assert not results["impostor"]["same"]
    assert results["self"]["score"] >= results["genuine"]["score"] > results["impostor"]["score"]

    # A manual threshold above every cosine rejects even an image against itself.
    argv = [str(trained.run), val_set.paths[g1], val_set.paths[g1], "--threshold", "1.5", "-q"]
    rc, line, _ = _verify(argv, capsys)
    assert rc == 0
    assert line.startswith("different people: cos similarity 1.0000 < threshold 1.5000 (")
    assert "given by the user" in line


def test_verify_far_threshold_is_recomputed_on_the_validation_set(
    trained, val_set, val_embeddings, capsys
):
    scores = VerificationEvaluator().compute(val_embeddings, val_set.labels).scores
    expected = scores.tar_at_far([1e-2])
    argv = [str(trained.run), val_set.paths[0], val_set.paths[1], "--far", "1e-2", "--json"]
    rc, result, _ = _verify(argv + ["-q"], capsys)
    assert rc == 0
    th = result["threshold"]
    assert th["rule"] == "far" and th["far_target"] == 1e-2 and th["valset"] == "orl"
    assert th["value"] == pytest.approx(float(expected.thresholds[0]), abs=1e-6)
    assert th["far"] <= 1e-2
    # The same operating point the training evaluation reported.
    assert th["tar"] == pytest.approx(trained.metrics["orl/tar@far=1e-2"])

    rc, _, err = _verify([*argv[:3], "--far", "2", "-q"], capsys)
    assert rc == 1 and "must lie in (0, 1]" in err


def test_verify_errors_exit_nonzero_with_a_message(trained, val_set, tmp_path, capsys):
    good = val_set.paths[0]
    rc, _, err = _verify([str(trained.run), good, str(tmp_path / "nope.jpg")], capsys)
    assert rc == 1 and "nope.jpg" in err
    (tmp_path / "fake.jpg").write_text("not an image")
    rc, _, err = _verify([str(trained.run), good, str(tmp_path / "fake.jpg")], capsys)
    assert rc == 1 and "cannot read image" in err
    rc, _, err = _verify([str(tmp_path / "no_run"), good, good], capsys)
    assert rc == 1 and "no run directory or checkpoint" in err


def test_evaluate_reproduces_the_training_evaluation(trained, capsys):
    """scripts/evaluate.py rebuilds the validation set from the checkpoint and scores it as
    training did; --flip scores the same model with flip test; errors exit 1."""
    argv = [str(trained.run), "-q", "--device", "cpu", "--batch-size", "8"]  # as in training
    assert evaluate_cli.main([*argv, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    # Re-encoding moves embeddings by ~1e-7, which reorders a few of the 4,950 near-tied pairs.
    for key in ("orl/eer", "orl/auc", "orl/tar@far=1e-2", "orl/rank1"):
        assert metrics[key] == pytest.approx(trained.metrics[key], abs=1e-4), key

    assert evaluate_cli.main([*argv, "--flip"]) == 0
    lines = dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines())
    flipped = float(lines["orl/auc"])
    assert 0.5 < flipped <= 1.0 and flipped != pytest.approx(metrics["orl/auc"], abs=1e-9)

    assert evaluate_cli.main([str(trained.run.parent / "no_run"), "-q"]) == 1
    assert "no run directory or checkpoint" in capsys.readouterr().err


def test_verify_cli_runs_as_a_subprocess(trained, val_set):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "verify.py"),
            str(trained.run),
            val_set.paths[0],
            val_set.paths[0],
            "--json",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["same"] is True and result["score"] == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------------------------
# embed


def test_embed_writes_every_image_of_the_tree(trained, val_set, val_embeddings, tmp_path, capsys):
    src = Path(val_set.paths[0]).parent  # s31
    tree = tmp_path / "faces"
    (tree / "b" / "deep" / "er").mkdir(parents=True)
    (tree / ".hidden").mkdir()
    (tree / "a.pgm").write_bytes((src / "1.pgm").read_bytes())
    (tree / "b" / "deep" / "er" / "z.PGM").write_bytes((src / "2.pgm").read_bytes())
    Image.open(src / "3.pgm").save(tree / "b" / "c.png")
    (tree / ".hidden" / "x.pgm").write_bytes((src / "4.pgm").read_bytes())
    (tree / "notes.txt").write_text("not an image")

    out = tmp_path / "emb.npz"
    assert embed_cli.main([str(trained.run), str(tree), "--out", str(out), "-q"]) == 0
    with np.load(out) as data:  # plain arrays, no pickle needed
        assert data["paths"].tolist() == ["a.pgm", "b/c.png", "b/deep/er/z.PGM"]
        assert data["embeddings"].shape == (3, 64) and data["embeddings"].dtype == np.float32
        assert data["norms"].shape == (3,)
        np.testing.assert_allclose(np.linalg.norm(data["embeddings"], axis=1), 1.0, atol=1e-5)
        # s31/1.pgm is val image 0 and s31/2.pgm val image 1.
        expected = val_embeddings[[0, 1]].numpy()
        np.testing.assert_allclose(data["embeddings"][[0, 2]], expected, atol=1e-5)
    assert load_embeddings(out).paths == ["a.pgm", "b/c.png", "b/deep/er/z.PGM"]
    assert "wrote 3 embeddings of dimension 64" in capsys.readouterr().out

    # An unreadable image stops the run unless it is skipped.
    (tree / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    assert embed_cli.main([str(trained.run), str(tree), "--out", str(out), "-q"]) == 1
    assert "broken.jpg" in capsys.readouterr().err
    argv = [str(trained.run), str(tree), "--out", str(out), "--skip-unreadable", "-q"]
    assert embed_cli.main(argv) == 0
    assert load_embeddings(out).paths == ["a.pgm", "b/c.png", "b/deep/er/z.PGM"]


def test_embed_output_formats_and_errors(trained, val_set, tmp_path, capsys):
    folder = str(Path(val_set.paths[0]).parent)
    parquet = tmp_path / "emb.parquet"
    rc = embed_cli.main([str(trained.run), folder, "--out", str(parquet), "-q"])
    if importlib.util.find_spec("pyarrow") is None:
        assert rc == 1 and "pyarrow" in capsys.readouterr().err and not parquet.exists()
    else:
        assert rc == 0 and load_embeddings(parquet).embeddings.shape == (10, 64)
    assert embed_cli.main([str(trained.run), folder, "--out", str(tmp_path / "e.csv")]) == 1
    assert "'.csv'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert embed_cli.main([str(trained.run), str(empty), "--out", str(tmp_path / "e.npz")]) == 1
    assert "no images under" in capsys.readouterr().err
    assert not (tmp_path / "e.npz").exists()


# --------------------------------------------------------------------------------------------
# export


def _real_batch(val_set: ORLDataset, n: int) -> torch.Tensor:
    return torch.stack([val_set[i][0] for i in range(n)])


# The default exporter on the run's own setting, and the legacy one with flip test baked in.
@pytest.mark.parametrize(("exporter", "flip"), [("dynamo", None), ("legacy", True)])
def test_onnx_export_matches_pytorch(trained, run, val_set, tmp_path, exporter, flip):
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        pytest.skip("the dynamo exporter needs onnxscript")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    report = export_model(run, out, "onnx", exporter=exporter, flip=flip)
    assert report.embedding_error < 1e-4 and report.norm_error < 1e-4
    assert report.batch_sizes == (1, 5) and report.exporter == exporter

    # Independently of the exporter's own check: real faces, the in-memory model.
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["embedding", "norm"]
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["femb.image_size"] == str(IMAGE_SIZE) and meta["femb.similarity"] == "cos"
    assert meta["femb.flip"] == ("true" if flip else "false")
    for n in (1, 5):
        images = _real_batch(val_set, n)
        emb, norm = session.run(None, {"images": images.numpy()})
        ref, ref_norm = trained.model.encode(images, flip=bool(flip), return_norms=True)
        np.testing.assert_allclose(emb, ref.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(norm, ref_norm.numpy(), rtol=1e-4)


def test_torchscript_export_matches_pytorch(trained, val_set, tmp_path, capsys):
    out = tmp_path / "model.torchscript.pt"
    argv = [str(trained.run), "--format", "torchscript", "--out", str(out), "--json", "-q"]
    assert export_cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["embedding_error"] < 1e-4 and report["norm_error"] < 1e-4

    extra = {"femb.json": ""}
    module = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["femb.json"])["femb.image_size"] == str(IMAGE_SIZE)
    for n in (1, 5):
        images = _real_batch(val_set, n)
        # export_model checked the optimised executor; this checks the saved graph as is
        # (and skips the executor's costly warm-up runs).
        with torch.no_grad(), torch.jit.optimized_execution(False):
            emb, norm = module(images)
        ref, ref_norm = trained.model.encode(images, return_norms=True)
        torch.testing.assert_close(emb, ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(norm, ref_norm, atol=0, rtol=1e-4)


def test_export_fails_loudly_and_writes_nothing(trained, run, tmp_path, monkeypatch, capsys):
    import femb.inference as inference

    def off_by_a_bit(data: bytes, inputs: list[torch.Tensor]) -> list[tuple[np.ndarray, ...]]:
        # A stand-in exported model: PyTorch's outputs, embeddings moved by 1e-3.
        outputs = [run.model.encode(x, return_norms=True) for x in inputs]
        return [(emb.numpy() + 1e-3, norm.numpy()) for emb, norm in outputs]

    # The real trace is tested above; here only the check and the no-write guarantee.
    monkeypatch.setattr(inference, "_export_torchscript", lambda *args: b"stub")
    monkeypatch.setattr(inference, "_run_torchscript", off_by_a_bit)
    out = tmp_path / "bad.pt"
    with pytest.raises(ExportParityError, match=r"max \|d embedding\| 0.001"):
        export_model(run, out, "torchscript")
    assert not out.exists() and not list(tmp_path.iterdir())

    with pytest.raises(SystemExit) as exit_info:
        export_cli.main([str(trained.run), "--format", "tflite"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_model(run, out, "tflite")
    assert export_cli.main([str(tmp_path / "no_run"), "--format", "onnx"]) == 1
