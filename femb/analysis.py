"""Compare runs the way papers do: read multirun folders, aggregate over seeds, plot.

A **run directory** is a folder holding ``.hydra/config.yaml`` (every ``scripts/train.py`` job
writes one). It is **complete** when it also holds ``verification.csv`` and ``metrics.json``
(written by ``femb.train.train`` at the end of training). What is read from it:

- ``.hydra/overrides.yaml``: the command-line and sweeper overrides of the job; they become the
  columns that identify a run (``header``, ``seed``, ``optimizer.lr``, ...).
- ``.hydra/hydra.yaml``: the job number and the chosen option of every config group
  (``header``, ``backbone``, ``dataset``, ...), added as columns when not overridden.
- ``verification.csv``: one row per evaluation (``step``, ``epoch``, ``train_loss``, ``lr``,
  ``<valset>/<metric>``), giving the final and the best value of each metric and the curves.
- ``metrics.json``: the final summary (``global_step``, ``epoch``).
- ``train.log`` (Hydra's job log): its first and last time stamps give the wall time.
- ``roc/*.csv`` (optional): ROC curves with ``fpr`` and ``tpr`` columns, one file per
  validation set (``<valset>.csv``; with a step suffix such as ``<valset>_step1200.csv`` the
  highest step is the final one). :func:`compute_rocs` writes such files into the report
  folder from ``checkpoints/last.pt``.

A **group** is a set of runs whose overrides are equal once ``seed`` (and the keys of
:data:`GROUP_IGNORE`, which change how a run executes but not what it computes) are removed:
the seeds of one configuration. Groups report the mean, the sample standard deviation
(``ddof=1``; NaN for a single run) and the count ``n`` of complete runs.

Entry points: :func:`load_runs` (tables), :func:`group_table`, :func:`plot_curves`,
:func:`plot_rocs`, :func:`write_report` (everything ``scripts/aggregate.py`` writes), and
:func:`write_hparams` (TensorBoard HParams of one run).

Example::

    from femb import analysis
    sweep = analysis.load_runs(["outputs/multirun/2024-05-01/10-00-00"])
    groups = analysis.group_table(sweep)
    fig = analysis.plot_curves(sweep, "orl/eer")
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from femb.model import LOWER_IS_BETTER
from femb.run_io import CSV_NAME, ERROR_NAME, TENSORBOARD_DIR, write_csv

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

__all__ = [
    "GROUP_IGNORE",
    "Sweep",
    "compute_rocs",
    "find_run_dirs",
    "group_labels",
    "group_table",
    "hparams_from_config",
    "interpolate_tpr",
    "load_rocs",
    "load_runs",
    "plot_curves",
    "plot_rocs",
    "read_scalars",
    "to_markdown",
    "write_hparams",
    "write_report",
]

METRICS_NAME = "metrics.json"
ROC_DIR = "roc"

#: Override keys left out of the group key: the seed (aggregated over) and settings that change
#: how a run executes, not what it computes.
GROUP_IGNORE = (
    "seed",
    "data_root",
    "device",
    "num_workers",
    "progress",
    "log_every",
    "tensorboard",
    "projection_samples",
    "output_dir",
)

#: Config groups whose chosen option becomes a column when the runs do not override it.
CHOICE_GROUPS = ("header", "backbone", "loss", "optimizer", "scheduler", "dataset")

# Per-set columns of verification.csv that are counts or operating points, not scores: they
# are left out of the default metrics (ask for them by name to include them).
_NOT_SCORES = ("n_genuine", "n_impostor", "eer_threshold", "accuracy_threshold", "accuracy_std")

# Hydra's job log line: "[2024-05-01 10:00:00,123][module][INFO] - message".
_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\]")
# ROC file stems: "lfw", "lfw_step1200", "lfw-1200", "lfw@1200".
_ROC_STEM = re.compile(r"^(?P<set>.+?)(?:[_@-](?:step)?(?P<step>\d+))?$")


@dataclass
class Sweep:
    """Everything read from a set of run directories.

    Attributes:
        runs: One row per run directory: ``run`` (its path relative to the common parent of
            all runs), the override and choice columns, ``status`` (``complete``,
            ``incomplete``, or ``failed`` when the job left an ``error.txt``), ``steps``,
            ``epochs``, ``wall_time_s``, ``final/train_loss``, ``final/<metric>`` and
            ``best/<metric>`` for each metric in ``metrics``, and ``run_dir`` (absolute path).
        curves: All rows of every run's ``verification.csv`` plus a ``run_dir`` column.
        problems: One row per failed, incomplete or unreadable run: ``run_dir``, ``status``,
            ``problem`` (a failed job's error message; else what is missing and the last
            error line of its log, if any).
        metrics: The chosen ``<valset>/<metric>`` names.
        overrides: The override keys found, in first-seen order (columns of ``runs``).
        group_keys: The columns that define a group (``overrides`` minus ``GROUP_IGNORE``).
    """

    runs: pd.DataFrame
    curves: pd.DataFrame
    problems: pd.DataFrame
    metrics: list[str]
    overrides: list[str] = field(default_factory=list)
    group_keys: list[str] = field(default_factory=list)

    @property
    def complete(self) -> pd.DataFrame:
        """The rows of :attr:`runs` whose status is ``complete``."""
        return self.runs[self.runs["status"] == "complete"]


# ---------------------------------------------------------------------------------------------
# Reading run directories


def find_run_dirs(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Every run directory (a folder holding ``.hydra/config.yaml``) under ``paths``.

    Args:
        paths: Multirun folders, single run folders or any folder above them.

    Returns:
        Absolute paths, sorted by multirun folder and Hydra job number (then name).

    Raises:
        FileNotFoundError: If a path does not exist, or no run directory is found at all.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist; pass a multirun folder such as "
                "outputs/multirun/<date>/<time> or a run directory."
            )
        found.update(
            cfg.parent.parent.resolve()
            for cfg in path.rglob("config.yaml")
            if cfg.parent.name == ".hydra"
        )
    if not found:
        raise FileNotFoundError(
            f"no run directory (a folder with .hydra/config.yaml) under {[str(p) for p in paths]}"
            "; pass the folder a `scripts/train.py -m ...` sweep wrote (hydra.sweep.dir)."
        )
    return sorted(found, key=_run_sort_key)


def load_runs(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    metrics: Sequence[str] | None = None,
    group_ignore: Sequence[str] = GROUP_IGNORE,
) -> Sweep:
    """Read every run directory under ``paths`` into tables.

    Args:
        paths: Multirun folders or run directories (see :func:`find_run_dirs`).
        metrics: Validation metrics to report: ``<valset>/<metric>`` names (``"lfw/eer"``) or
            bare metric names (``"eer"``: every validation set's EER). Default: every score
            column of the CSVs (all but counts, thresholds and ``accuracy_std``).
        group_ignore: Override keys that do not define a group (default :data:`GROUP_IGNORE`).

    Returns:
        A :class:`Sweep`. Incomplete runs are kept in ``runs`` (status ``incomplete``, with
        whatever their partial CSV holds) and listed in ``problems``; they are logged as
        warnings, never dropped silently.

    Raises:
        FileNotFoundError: If no run directory is found.
        ValueError: If a requested metric is in no run's CSV.
    """
    run_dirs = find_run_dirs(paths)
    parent = Path(os.path.commonpath(run_dirs)) if len(run_dirs) > 1 else run_dirs[0].parent

    infos, curves, problems = [], [], []
    for run_dir in run_dirs:
        info, table, problem = _read_run(run_dir)
        info["run"] = run_dir.relative_to(parent).as_posix()
        infos.append(info)
        if table is not None:
            curves.append(table.assign(run_dir=str(run_dir)))
        if problem:
            problems.append(
                {"run_dir": str(run_dir), "status": info["status"], "problem": problem}
            )
            log.warning("%s: %s", run_dir, problem)

    curves_df = (
        pd.concat(curves, ignore_index=True)
        if curves
        else pd.DataFrame(columns=["step", "run_dir"])
    )
    chosen = _resolve_metrics(curves_df.columns, metrics)
    overrides = list(dict.fromkeys(k for info in infos for k in info["overrides"]))
    choices = [
        g
        for g in CHOICE_GROUPS
        if g not in overrides and any(g in info["choices"] for info in infos)
    ]

    rows = []
    for info in infos:
        run_curve = curves_df[curves_df["run_dir"] == str(info["run_dir"])]
        row: dict[str, Any] = {"run": info["run"]}
        row.update({k: info["overrides"].get(k) for k in overrides})
        row.update({g: info["choices"].get(g) for g in choices})
        row.update(
            status=info["status"],
            steps=info["steps"],
            epochs=info["epochs"],
            wall_time_s=info["wall_time_s"],
        )
        row.update(_final_and_best(run_curve, chosen))
        row["run_dir"] = str(info["run_dir"])
        rows.append(row)
    runs = pd.DataFrame(rows)
    for key in overrides:
        runs[key] = _maybe_numeric(runs[key])

    keys = [k for k in overrides if k not in set(group_ignore)]
    problems_df = pd.DataFrame(problems, columns=["run_dir", "status", "problem"])
    return Sweep(
        runs=runs,
        curves=curves_df,
        problems=problems_df,
        metrics=chosen,
        overrides=overrides,
        group_keys=keys,
    )


def _read_run(run_dir: Path) -> tuple[dict[str, Any], pd.DataFrame | None, str]:
    """``(info, verification table or None, problem text or "")`` of one run directory."""
    hydra_dir = run_dir / ".hydra"
    info: dict[str, Any] = {
        "run_dir": run_dir,
        "overrides": _read_overrides(hydra_dir),
        "choices": {},
        "steps": np.nan,
        "epochs": np.nan,
    }
    hydra_yaml = hydra_dir / "hydra.yaml"
    if hydra_yaml.is_file():
        runtime = OmegaConf.load(hydra_yaml).hydra
        info["choices"] = {
            k: v for k, v in runtime.runtime.choices.items() if not k.startswith("hydra/")
        }

    missing = [name for name in (CSV_NAME, METRICS_NAME) if not (run_dir / name).is_file()]
    notes = [f"missing {name}" for name in missing]
    table = None
    if CSV_NAME not in missing:
        try:
            table = pd.read_csv(run_dir / CSV_NAME)
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
            notes.append(f"unreadable {CSV_NAME} ({err})")
        else:
            if table.empty:
                notes.append(f"{CSV_NAME} has no evaluation row")
                table = None
            else:
                info["steps"] = table["step"].iloc[-1]
                info["epochs"] = table["epoch"].iloc[-1] if "epoch" in table else np.nan
    if METRICS_NAME not in missing:
        try:
            summary = json.loads((run_dir / METRICS_NAME).read_text())
        except json.JSONDecodeError as err:
            notes.append(f"unreadable {METRICS_NAME} ({err})")
        else:
            info["steps"] = summary.get("global_step", info["steps"])
            info["epochs"] = summary.get("epoch", info["epochs"])

    info["wall_time_s"], last_line, error = _log_times(run_dir)
    if math.isnan(info["wall_time_s"]):
        info["wall_time_s"] = _mtime_span(run_dir)
    info["status"] = "incomplete" if notes else "complete"
    failure = _read_error(run_dir)
    if failure:
        info["status"] = "failed"
        notes.insert(0, f"failed: {failure}")
    elif notes:
        hint = "still running, killed or failed"
        if error:
            hint += f"; last error in the log: {error}"
        elif last_line:
            hint += f"; last log line: {last_line}"
        notes.append(hint)
    return info, table, "; ".join(notes)


def _read_error(run_dir: Path) -> str:
    """The error message of a failed job (the first paragraph of its error.txt), or ""."""
    path = run_dir / ERROR_NAME
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    message = " ".join(text.split("\n\n", 1)[0].split())
    return message[:300] + ("..." if len(message) > 300 else "")


def _read_overrides(hydra_dir: Path) -> dict[str, Any]:
    """``.hydra/overrides.yaml`` as ``{key: value}`` (``+``/``++`` prefixes dropped)."""
    path = hydra_dir / "overrides.yaml"
    if not path.is_file():
        return {}
    lines = [str(x) for x in (OmegaConf.load(path) or [])]
    out: dict[str, Any] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        if override.is_delete():
            continue
        key = override.key_or_group + (f"@{override.package}" if override.package else "")
        value = override.value()
        out[key] = (
            value
            if isinstance(value, (str, int, float, bool)) or value is None
            else override.get_value_element_as_str()
        )
    return out


def _log_times(run_dir: Path) -> tuple[float, str, str]:
    """``(seconds between the first and last log time stamps, last line, last ERROR line)``."""
    logs = sorted(run_dir.glob("*.log"), key=lambda p: (p.name != "train.log", p.name))
    if not logs:
        return math.nan, "", ""
    first = last = None
    last_line = error = ""
    with open(logs[0], encoding="utf-8", errors="replace") as f:
        for line in f:
            match = _LOG_TIME.match(line)
            if match:
                stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
                stamp = stamp.replace(microsecond=int(match.group(2)) * 1000)
                first = first or stamp
                last = stamp
            if line.strip():
                last_line = line.strip()
                if "[ERROR]" in line or "[CRITICAL]" in line:
                    error = last_line
    span = (last - first).total_seconds() if first is not None else math.nan
    return span, last_line[:200], error[:200]


def _mtime_span(run_dir: Path) -> float:
    """Seconds from ``.hydra/config.yaml`` (job start) to ``metrics.json`` (job end)."""
    start = run_dir / ".hydra" / "config.yaml"
    end = run_dir / METRICS_NAME
    if not (start.is_file() and end.is_file()):
        return math.nan
    return end.stat().st_mtime - start.stat().st_mtime


def _run_sort_key(run_dir: Path) -> tuple[str, int, str]:
    match = re.match(r"^(\d+)_", run_dir.name)
    return str(run_dir.parent), int(match.group(1)) if match else -1, run_dir.name


def _maybe_numeric(column: pd.Series) -> pd.Series:
    """The column as numbers when every non-null value is one, else unchanged."""
    try:
        return pd.to_numeric(column)
    except (TypeError, ValueError):
        return column


def _resolve_metrics(columns: Iterable[str], requested: Sequence[str] | None) -> list[str]:
    """Expand the requested metric names against the ``<valset>/<metric>`` CSV columns."""
    available = [c for c in columns if "/" in c and c != "run_dir"]
    if requested is None:
        return [c for c in available if c.split("/", 1)[1] not in _NOT_SCORES]
    chosen: list[str] = []
    for name in requested:
        hits = [
            c for c in available if c == name or ("/" not in name and c.split("/", 1)[1] == name)
        ]
        if not hits:
            raise ValueError(
                f"metric {name!r} is in no run's {CSV_NAME}; available: "
                f"{sorted(available)} (or a bare metric name such as 'eer')."
            )
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def _is_lower_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER


def _final_and_best(curve: pd.DataFrame, metrics: Sequence[str]) -> dict[str, float]:
    """``final/train_loss``, then ``final/<m>`` and ``best/<m>`` of one run's CSV rows."""
    out: dict[str, float] = {"final/train_loss": np.nan}
    if len(curve) and "train_loss" in curve:
        out["final/train_loss"] = float(curve["train_loss"].iloc[-1])
    for m in metrics:
        values = curve[m].astype(float) if m in curve else pd.Series(dtype=float)
        out[f"final/{m}"] = float(values.iloc[-1]) if len(values) else np.nan
        if values.notna().any():
            out[f"best/{m}"] = float(values.min() if _is_lower_better(m) else values.max())
        else:
            out[f"best/{m}"] = np.nan
    return out


# ---------------------------------------------------------------------------------------------
# Aggregation over seeds


def group_table(sweep: Sweep, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean, standard deviation and count over the seeds of each configuration.

    Args:
        sweep: From :func:`load_runs`; only complete runs are aggregated.
        columns: Numeric columns of ``sweep.runs`` to aggregate; default ``steps``,
            ``wall_time_s``, ``final/train_loss`` and every ``final/...``/``best/...`` column.

    Returns:
        One row per group, in order of first appearance: the group keys, ``n`` (complete
        runs), ``seeds`` (comma-separated, when runs override ``seed``), then ``<col>_mean``
        and ``<col>_std`` (``ddof=1``, NaN when ``n`` is 1) for each column.
    """
    runs = sweep.complete
    if columns is None:
        columns = ["steps", "wall_time_s"] + [
            c for c in runs.columns if c.startswith(("final/", "best/"))
        ]
    keys = list(sweep.group_keys)
    if runs.empty:
        return pd.DataFrame(columns=[*keys, "n"])
    grouping = keys if keys else (lambda _: "all")
    rows = []
    for key, members in runs.groupby(grouping, sort=False, dropna=False):
        values = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(keys, values, strict=False)) if keys else {}
        row["n"] = len(members)
        if "seed" in members:
            row["seeds"] = ",".join(str(s) for s in members["seed"].tolist())
        for col in columns:
            numbers = pd.to_numeric(members[col], errors="coerce")
            row[f"{col}_mean"] = numbers.mean()
            row[f"{col}_std"] = numbers.std(ddof=1)
        rows.append(row)
    return pd.DataFrame(rows)


def group_labels(sweep: Sweep) -> pd.Series:
    """A short label per run naming its group by the keys that differ between groups.

    Returns:
        ``"header=arcface"`` for a sweep over headers and seeds; ``"all"`` when every run
        belongs to one group. Indexed like ``sweep.runs``.
    """
    keys = [k for k in sweep.group_keys if sweep.runs[k].nunique(dropna=False) > 1]
    if not keys:
        return pd.Series("all", index=sweep.runs.index)
    return sweep.runs[keys].apply(
        lambda r: ",".join(f"{k}={_fmt(v)}" for k, v in zip(keys, r, strict=True)), axis=1
    )


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib Figure objects, no pyplot: headless and notebook-friendly)


def _new_figure(width: float = 6.4, height: float = 4.2) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'femb[analysis]'") from err
    return Figure(figsize=(width, height), layout="constrained")


def plot_curves(sweep: Sweep, metric: str, x: str = "step") -> Figure:
    """A metric over training, one line per group (mean over seeds, band of +-1 std).

    Args:
        sweep: From :func:`load_runs` (complete runs are plotted).
        metric: A column of the CSVs, e.g. ``"lfw/eer"`` or ``"train_loss"``.
        x: ``"step"`` (global step) or ``"epoch"``.

    Returns:
        The figure (save it with ``fig.savefig(path)``; a notebook displays it).

    Raises:
        ValueError: If ``metric`` or ``x`` is not a CSV column.
    """
    if metric not in sweep.curves:
        raise ValueError(
            f"metric {metric!r} is not a {CSV_NAME} column; available: "
            f"{sorted(c for c in sweep.curves.columns if c != 'run_dir')}"
        )
    if x not in ("epoch", "step"):
        raise ValueError(f"x={x!r}; use one of ['epoch', 'step'].")
    fig = _new_figure()
    ax = fig.add_subplot()
    labels = group_labels(sweep)
    complete = sweep.runs["status"] == "complete"
    for label in dict.fromkeys(labels[complete]):
        members = sweep.runs.loc[complete & (labels == label), "run_dir"]
        rows = sweep.curves[sweep.curves["run_dir"].isin(members)]
        stats = rows.groupby(x)[metric].agg(["mean", "std", "count"]).sort_index()
        if stats["mean"].isna().all():
            continue
        (line,) = ax.plot(
            stats.index,
            stats["mean"],
            marker="." if len(stats) < 30 else None,
            label=f"{label} (n={len(members)})",
        )
        band = stats["count"] > 1
        if band.any():
            ax.fill_between(
                stats.index[band],
                (stats["mean"] - stats["std"])[band],
                (stats["mean"] + stats["std"])[band],
                alpha=0.2,
                color=line.get_color(),
                linewidth=0,
            )
    ax.set_xlabel("global step" if x == "step" else "epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: mean over seeds, band = 1 std")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    return fig


def load_rocs(sweep: Sweep, extra_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """The final ROC of every complete run and validation set, where a ROC file exists.

    Looks in ``<run_dir>/roc/<valset>/step_<N>.csv`` (written by the trainer at every
    evaluation; the highest step wins), ``<run_dir>/roc/*.csv`` and, if given,
    ``<extra_dir>/<run>/*.csv`` (where :func:`compute_rocs` writes). Files need ``fpr`` and
    ``tpr`` columns (``far``/``tar`` are accepted too); others are skipped with a warning.

    Returns:
        Long table with columns ``run_dir``, ``valset``, ``fpr``, ``tpr`` (empty, with those
        columns, when no run has a ROC file; an info message says so).
    """
    frames = []
    for _, run in sweep.complete.iterrows():
        folders = [Path(run["run_dir"]) / ROC_DIR]
        if extra_dir is not None:
            folders.append(Path(extra_dir) / run["run"])
        for valset, path in _final_roc_files(folders).items():
            table = pd.read_csv(path).rename(columns=str.lower)
            table = table.rename(columns={"far": "fpr", "tar": "tpr"})
            if not {"fpr", "tpr"} <= set(table.columns):
                log.warning(
                    "skipping ROC file %s: it has columns %s, not fpr and tpr",
                    path,
                    list(table.columns),
                )
                continue
            frames.append(
                pd.DataFrame(
                    {
                        "run_dir": run["run_dir"],
                        "valset": valset,
                        "fpr": table["fpr"].astype(float),
                        "tpr": table["tpr"].astype(float),
                    }
                )
            )
    if not frames:
        log.info(
            "no ROC files (roc/*.csv) in the runs; skipping ROC plots (compute them "
            "from checkpoints/last.pt with scripts/aggregate.py --roc)"
        )
        return pd.DataFrame(columns=["run_dir", "valset", "fpr", "tpr"])
    return pd.concat(frames, ignore_index=True)


def _final_roc_files(folders: Sequence[Path]) -> dict[str, Path]:
    """``{valset: path}`` of the highest-step ROC CSV per validation set (later folders win)."""
    best: dict[str, tuple[int, Path]] = {}

    def offer(valset: str, step: int, path: Path) -> None:
        if valset not in best or step >= best[valset][0]:
            best[valset] = (step, path)

    for folder in folders:
        if not folder.is_dir():
            continue
        # The trainer writes roc/<valset>/step_<N>.csv, one file per evaluation.
        for path in sorted(folder.glob("*/step_*.csv")):
            offer(path.parent.name, int(path.stem.split("_", 1)[1]), path)
        # compute_rocs and hand-made files: roc/<valset>[_step<N>].csv.
        for path in sorted(folder.glob("*.csv")):
            match = _ROC_STEM.match(path.stem)
            offer(match.group("set"), int(match.group("step") or -1), path)
    return {k: v[1] for k, v in best.items()}


def interpolate_tpr(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """TPR of a ROC polyline at the FPR values of ``grid`` (vertical averaging).

    At an FPR where the curve has a vertical segment, the top of the segment is taken (the
    highest TPR with FPR <= the grid value, as TAR@FAR is defined); between points the value
    is linear.

    Args:
        fpr: (K,) non-decreasing.
        tpr: (K,) non-decreasing.
        grid: (G,) FPR values in [0, 1].

    Returns:
        (G,) TPR values.
    """
    fpr = np.asarray(fpr, dtype=float)
    tpr = np.asarray(tpr, dtype=float)
    j = np.clip(np.searchsorted(fpr, grid, side="right") - 1, 0, len(fpr) - 1)
    k = np.minimum(j + 1, len(fpr) - 1)
    span = fpr[k] - fpr[j]
    weight = np.where(span > 0, (grid - fpr[j]) / np.where(span > 0, span, 1.0), 0.0)
    return tpr[j] + np.clip(weight, 0.0, 1.0) * (tpr[k] - tpr[j])


def plot_rocs(sweep: Sweep, rocs: pd.DataFrame, valset: str, points: int = 200) -> Figure:
    """Final ROC curves of one validation set, one line per group (mean TPR over seeds).

    Curves are averaged vertically on a log-spaced FPR grid from the smallest non-zero FPR
    of the runs (1 / impostor pairs) to 1; the band is +-1 std where a group has > 1 run.

    Args:
        sweep: From :func:`load_runs`.
        rocs: From :func:`load_rocs` (or :func:`compute_rocs` + :func:`load_rocs`).
        valset: A value of ``rocs["valset"]``.
        points: Grid size.

    Raises:
        ValueError: If ``rocs`` has no curve for ``valset``.
    """
    subset = rocs[rocs["valset"] == valset]
    if subset.empty:
        raise ValueError(
            f"no ROC for valset {valset!r}; available: {sorted(rocs['valset'].unique())}"
        )
    positive = subset.loc[subset["fpr"] > 0, "fpr"]
    # At least one decade on the axis, also when the runs have few impostor pairs.
    low = min(max(float(positive.min()) if len(positive) else 1e-4, 1e-6), 0.1)
    grid = np.logspace(np.log10(low), 0.0, points)
    labels = group_labels(sweep)
    by_run = dict(zip(sweep.runs["run_dir"], labels, strict=True))

    fig = _new_figure()
    ax = fig.add_subplot()
    curves: dict[str, list[np.ndarray]] = {}
    for run_dir, roc in subset.groupby("run_dir", sort=False):
        curves.setdefault(by_run[run_dir], []).append(
            interpolate_tpr(roc["fpr"].to_numpy(), roc["tpr"].to_numpy(), grid)
        )
    for label, members in curves.items():
        stack = np.stack(members)
        mean = stack.mean(axis=0)
        (line,) = ax.plot(grid, mean, label=f"{label} (n={len(members)})")
        if len(members) > 1:
            std = stack.std(axis=0, ddof=1)
            ax.fill_between(
                grid,
                mean - std,
                np.minimum(mean + std, 1.0),
                alpha=0.2,
                color=line.get_color(),
                linewidth=0,
            )
    ax.set_xscale("log")
    ax.set_xlim(low, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(f"{valset}: final ROC, mean over seeds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="lower right")
    return fig


def compute_rocs(
    sweep: Sweep,
    out_dir: str | os.PathLike,
    device: str = "cpu",
    data_root: str | os.PathLike | None = None,
) -> list[Path]:
    """Final ROCs of the complete runs from ``checkpoints/last.pt``, written as CSV files.

    Each run's model is rebuilt from its checkpoint (``femb.train.load_model``), its
    validation sets and evaluator from ``.hydra/config.yaml``, and
    ``VerificationEvaluator.compute`` gives the ROC. Runs that already have ROC files (in
    ``roc/`` or in ``out_dir``) and runs without ``last.pt`` are skipped with a log message.

    Args:
        sweep: From :func:`load_runs`.
        out_dir: Files go to ``<out_dir>/<run>/<valset>.csv`` (columns ``fpr``, ``tpr``,
            ``threshold``); run directories are never modified.
        device: Where to encode (``"cpu"``, ``"cuda"``, ``"auto"``).
        data_root: Replaces the runs' ``data_root`` (when the data moved since training).

    Returns:
        The files written.
    """
    from femb.train import instantiate, load_model  # femb.train imports this module

    written: list[Path] = []
    for _, run in sweep.complete.iterrows():
        run_dir = Path(run["run_dir"])
        target = Path(out_dir) / run["run"]
        if _final_roc_files([run_dir / ROC_DIR, target]):
            continue
        checkpoint = run_dir / "checkpoints" / "last.pt"
        if not checkpoint.is_file():
            log.warning("%s: no checkpoints/last.pt, so no ROC", run_dir)
            continue
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        if data_root is not None:
            cfg.data_root = str(data_root)
        val_nodes = cfg.dataset.get("val") or {}
        if not val_nodes:
            log.info("%s: no validation set in its config, so no ROC", run_dir)
            continue
        model = load_model(checkpoint)
        evaluator = instantiate(cfg.evaluator)
        for name, node in val_nodes.items():
            dataset = instantiate(node)
            embeddings = model.encode(
                dataset,
                batch_size=int(cfg.batch_size),
                device=device,
                flip=bool(cfg.get("flip_test", False)),
                normalize=False,
            )
            labels = getattr(dataset, "labels", None)
            if labels is None:
                labels = [int(dataset[i][1]) for i in range(len(dataset))]
            result = evaluator.compute(
                embeddings,
                np.asarray(labels),
                pairs=getattr(dataset, "pairs", None),
                issame=getattr(dataset, "issame", None),
                folds=getattr(dataset, "folds", None),
            )
            path = target / f"{name}.csv"
            write_csv(
                path,
                [
                    {"fpr": f, "tpr": t, "threshold": th}
                    for f, t, th in zip(
                        result.roc.fpr.tolist(),
                        result.roc.tpr.tolist(),
                        result.roc.thresholds.tolist(),
                        strict=True,
                    )
                ],
            )
            log.info("ROC of %s on %s -> %s", run["run"], name, path)
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# Report


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        if digits == 0:
            return f"{value:.0f}"
        return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def _integral(column: pd.Series) -> bool:
    """Whether a non-metric column holds whole numbers only (steps, counts, seeds)."""
    if "/" in str(column.name):  # metrics keep their decimals even when 0 or 1
        return False
    values = pd.to_numeric(column, errors="coerce").dropna()
    return len(values) > 0 and bool(np.all(np.mod(values.to_numpy(dtype=float), 1.0) == 0))


def to_markdown(table: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table (floats with ``digits`` decimals, NaN as blank).

    ``<col>_mean``/``<col>_std`` column pairs (from :func:`group_table`) are shown as one
    ``mean ± std`` column named ``<col>``. Columns of whole numbers (steps, counts) are shown
    without decimals; metric columns (names with ``/``) always get ``digits`` decimals.
    """
    columns: list[tuple[str, Any]] = []
    for col in table.columns:
        if col.endswith("_std") and f"{col[:-4]}_mean" in table.columns:
            continue
        if col.endswith("_mean") and f"{col[:-5]}_std" in table.columns:
            base = col[:-5]
            places = 0 if _integral(table[col]) and _integral(table[f"{base}_std"]) else digits

            def cell(row: pd.Series, base: str = base, places: int = places) -> str:
                mean = _fmt(row[f"{base}_mean"], places)
                std = _fmt(row[f"{base}_std"], places)
                return f"{mean} ± {std}" if mean and std else mean

            columns.append((base, cell))
        else:
            places = 0 if _integral(table[col]) else digits
            columns.append((col, lambda row, col=col, places=places: _fmt(row[col], places)))
    lines = [
        "| " + " | ".join(name for name, _ in columns) + " |",
        "|" + "|".join(" --- " for _ in columns) + "|",
    ]
    for _, row in table.iterrows():
        cells = [fn(row).replace("|", "\\|") for _, fn in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _safe_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", metric).strip("_")


def write_report(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    metrics: Sequence[str] | None = None,
    plot_metrics: Sequence[str] | None = None,
    roc: bool = False,
    device: str = "cpu",
    data_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Read the runs under ``paths`` and write tables and plots into ``out_dir``.

    Files: ``runs.csv``/``runs.md`` (one row per run), ``groups.csv``/``groups.md`` (mean, std
    and n over seeds), ``problems.csv`` (incomplete runs; header only when there is none),
    ``curves_<metric>.png`` (one per plotted metric) and ``roc_<valset>.png`` (when ROC files
    exist, or with ``roc=True``, which computes them into ``out_dir/roc/``).

    Args:
        paths: Multirun folders or run directories.
        out_dir: Report folder (created).
        metrics: Metrics for the tables (see :func:`load_runs`).
        plot_metrics: Metrics to plot over steps; default: the table metrics.
        roc: Compute missing final ROCs from the checkpoints (costs one encoding of each
            validation set per run).
        device: Device for ``roc=True``.
        data_root: Replaces the runs' ``data_root`` for ``roc=True``.

    Returns:
        ``{"sweep": Sweep, "groups": DataFrame, "files": [Path, ...]}``.
    """
    sweep = load_runs(paths, metrics)
    groups = group_table(sweep)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)  # only now: a mistyped path leaves no folder behind
    files = []

    for name, table in (("runs", sweep.runs), ("groups", groups)):
        table.to_csv(out / f"{name}.csv", index=False)
        (out / f"{name}.md").write_text(
            to_markdown(table.drop(columns=["run_dir"], errors="ignore"))
        )
        files += [out / f"{name}.csv", out / f"{name}.md"]
    sweep.problems.to_csv(out / "problems.csv", index=False)
    files.append(out / "problems.csv")

    plotted = sweep.metrics
    if plot_metrics:
        # Plain CSV columns (train_loss, lr) are plotted as they are; names with a set resolve.
        plain = [m for m in plot_metrics if m in sweep.curves and "/" not in m]
        named = [m for m in plot_metrics if m not in plain]
        plotted = plain + (_resolve_metrics(sweep.curves.columns, named) if named else [])
    for metric in plotted:
        if sweep.curves[metric].isna().all() or sweep.complete.empty:
            log.info("not plotting %s: no value in any complete run", metric)
            continue
        path = out / f"curves_{_safe_name(metric)}.png"
        plot_curves(sweep, metric).savefig(path, dpi=120)
        files.append(path)

    roc_dir = out / ROC_DIR
    if roc:
        files += compute_rocs(sweep, roc_dir, device=device, data_root=data_root)
    rocs = load_rocs(sweep, extra_dir=roc_dir)
    for valset in dict.fromkeys(rocs["valset"]):
        path = out / f"roc_{_safe_name(valset)}.png"
        plot_rocs(sweep, rocs, valset).savefig(path, dpi=120)
        files.append(path)

    n_complete = len(sweep.complete)
    log.info(
        "%d runs (%d complete, %d with problems) in %d groups -> %s",
        len(sweep.runs),
        n_complete,
        len(sweep.problems),
        len(groups),
        out,
    )
    return {"sweep": sweep, "groups": groups, "files": files}


# ---------------------------------------------------------------------------------------------
# TensorBoard


def _short_target(node: Any) -> str | None:
    target = node.get("_target_") if isinstance(node, Mapping) else None
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else None


def _scalars(node: Any, prefix: str, skip: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(node, Mapping):
        return {}
    return {
        f"{prefix}.{k}": v
        for k, v in node.items()
        if not str(k).startswith("_") and k not in skip and isinstance(v, (bool, int, float, str))
    }


def hparams_from_config(
    cfg: Mapping[str, Any] | DictConfig, choices: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The flat hyperparameters of a resolved training config, for TensorBoard's HParams.

    Keys mirror the config paths users override: ``header`` (the option name), ``header.s``,
    ``header.m`` (every scalar of the header node), ``backbone`` (its registry name),
    ``backbone.dropout``, ``optimizer`` and ``optimizer.lr``/``.momentum``/``.weight_decay``,
    ``scheduler`` and its scalars, ``loss``, ``dataset``, and the top-level ``seed``,
    ``batch_size``, ``embed_dim``, ``image_size``, ``max_epochs``, ``max_training_steps``,
    ``header_lr``, ``header_weight_decay``, ``flip_test``, ``monitor``. None values are left
    out (HParams needs one type per key across runs).

    Args:
        cfg: The config of ``conf/train.yaml`` (resolved dict or DictConfig).
        choices: Hydra's ``runtime.choices`` (group -> option name); when given, the group
            names come from it (``arcface``), else from the ``_target_`` class.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    choices = dict(choices or {})
    hp: dict[str, Any] = {}

    header = cfg.get("header") or {}
    name = _short_target(header)
    hp["header"] = choices.get("header") or (
        name[: -len("Header")].lower() if name and name.endswith("Header") else name
    )
    hp.update(_scalars(header, "header", skip=("in_features", "out_features")))

    backbone = cfg.get("backbone") or {}
    hp["backbone"] = backbone.get("backbone") or choices.get("backbone") or _short_target(backbone)
    hp.update(_scalars(backbone, "backbone", skip=("backbone", "embed_dim", "input_size")))

    optimizer = cfg.get("optimizer") or {}
    hp["optimizer"] = choices.get("optimizer") or _short_target(optimizer)
    hp.update(_scalars(optimizer, "optimizer"))

    scheduler = (cfg.get("scheduler") or {}).get("scheduler")
    hp["scheduler"] = choices.get("scheduler") or _short_target(scheduler) or "none"
    hp.update(_scalars(scheduler, "scheduler"))

    loss = cfg.get("loss") or {}
    hp["loss"] = choices.get("loss") or _short_target(loss)
    hp.update(_scalars(loss, "loss"))
    hp["dataset"] = choices.get("dataset") or _short_target(
        (cfg.get("dataset") or {}).get("train")
    )

    for key in (
        "seed",
        "batch_size",
        "embed_dim",
        "image_size",
        "max_epochs",
        "max_training_steps",
        "header_lr",
        "header_weight_decay",
        "flip_test",
        "monitor",
    ):
        hp[key] = cfg.get(key)
    return {k: v for k, v in hp.items() if v is not None}


def write_hparams(
    run_dir: str | os.PathLike,
    cfg: Mapping[str, Any] | DictConfig,
    metrics: Mapping[str, Any],
    step: int | None = None,
    choices: Mapping[str, Any] | None = None,
) -> Path:
    """Add the run's hyperparameters and final metrics to its TensorBoard folder.

    Writes one more event file into ``<run_dir>/tensorboard``: the HParams summaries (so the
    hyperparameters attach to the same TensorBoard run as the training curves) and one scalar
    ``hparams/<metric>`` per finite metric. ``tensorboard --logdir <multirun folder>`` then
    lists every job in the HParams tab with its hyperparameters and metrics.

    Args:
        run_dir: The run directory.
        cfg: Its resolved config (see :func:`hparams_from_config`).
        metrics: Final metrics, e.g. what ``femb.train.train`` returns (``lfw/eer``,
            ``best/lfw/eer``, ``train/loss``); counts (``n_genuine``, ``n_impostor``) and
            non-finite values are left out.
        step: Global step of the metric scalars.
        choices: Hydra's ``runtime.choices``, for the option names.

    Returns:
        The TensorBoard folder.
    """
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    hp = hparams_from_config(cfg, choices)
    values = {
        f"hparams/{k}": float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
        and not k.endswith(("n_genuine", "n_impostor"))
    }
    experiment, start, end = hparams(hp, values)
    folder = Path(run_dir) / TENSORBOARD_DIR
    writer = SummaryWriter(log_dir=str(folder))
    try:
        events = writer._get_file_writer()
        for summary in (experiment, start, end):
            events.add_summary(summary)
        for tag, value in values.items():
            writer.add_scalar(tag, value, global_step=step)
    finally:
        writer.close()
    return folder


def read_scalars(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Every scalar of a run's TensorBoard folder.

    Returns:
        Columns ``tag``, ``step``, ``value``, ``wall_time`` (empty when there is no
        ``tensorboard/`` folder).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = Path(run_dir) / TENSORBOARD_DIR
    columns = ["tag", "step", "value", "wall_time"]
    if not folder.is_dir():
        return pd.DataFrame(columns=columns)
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    rows = [
        (tag, e.step, e.value, e.wall_time)
        for tag in events.Tags()["scalars"]
        for e in events.Scalars(tag)
    ]
    return pd.DataFrame(rows, columns=columns)
