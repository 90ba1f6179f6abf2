"""The benchmark scripts run and print their tables (figures are measured by hand, not here)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys

import pytest

from .conftest import REPO


def _load(name: str, monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def gpu_sh_flags() -> list[str]:
    """The ``throughput.py`` flags that ``benchmarks/gpu.sh`` passes."""
    script = (REPO / "benchmarks" / "gpu.sh").read_text()
    call = script.split('exec "$PYTHON" benchmarks/throughput.py', 1)[1].split('"$@"', 1)[0]
    return shlex.split(call.replace("\\\n", " "))


def options(flags: list[str]) -> dict[str, str | None]:
    """``--flag value`` and ``--switch`` (None) pairs."""
    values: dict[str, str | None] = {}
    for index, flag in enumerate(flags):
        if flag.startswith("--"):
            following = flags[index + 1] if index + 1 < len(flags) else "--"
            values[flag] = None if following.startswith("--") else following
    return values


def test_gpu_sh_measures_what_the_issue_asks():
    flags = gpu_sh_flags()
    values = options(flags)
    assert values["--device"] == "cuda" and values["--backbones"] == "iresnet50"
    assert values["--batch-size"] == "256" and values["--precision"] == "bf16"
    assert "--channels-last" in flags


def test_throughput_measures_femb_and_the_bare_loop(capsys, monkeypatch):
    """gpu.sh's switches with CPU-sized numbers: one backbone, a few tiny steps."""
    module = _load("throughput", monkeypatch)
    sizes = {"--device": "cpu", "--backbones": "mobilefacenet", "--batch-size": "4",
             "--image-size": "32", "--precision": "fp32", "--classes": "50", "--warmup": "1",
             "--steps": "2", "--repeats": "1"}  # fmt: skip
    args = []
    for flag, value in options(gpu_sh_flags()).items():
        if value is None:
            args.append(flag)  # a switch such as --channels-last
        elif flag in sizes:
            args += [flag, sizes[flag]]
    assert "--channels-last" in args
    assert module.main(args) == 0
    out = capsys.readouterr().out
    row = re.search(
        r"^\| mobilefacenet \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([-+][\d.]+) %", out, re.M
    )
    assert row is not None, out
    femb_rate, bare_rate = float(row.group(2)), float(row.group(3))
    assert femb_rate > 0 and bare_rate > 0
    assert "channels_last" in out and "matmul peak" in out
