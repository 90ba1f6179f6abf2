"""Validate a composed training config before any work is done.

Hydra already rejects an unknown option name (``header=arcfce``) and lists the valid ones. What
it cannot know is which values make sense: a negative learning rate, ``embed_dim=0``, both stop
criteria 0, ``evaluation_steps`` with no validation set, or a header whose ``in_features`` does
not match the backbone's embedding. :func:`check_config` finds all such problems at once and
raises one :class:`ConfigError` listing each with its key, its value and the fix, so a typo
costs seconds instead of a crashed job hours later.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

#: The top-level keys of ``conf/train.yaml`` and its groups: what femb reads. A key outside
#: this set was added with ``+key=value``; one close to a known key is taken for a typo.
KNOWN_KEYS = frozenset(
    """backbone batch_size channels_last checkpoint_steps clip_grad_norm compile data_root
    dataset device embed_dim evaluation_steps evaluator flip_test handle_signals header
    header_lr header_weight_decay image_size log_every loss max_bad_fraction max_epochs
    max_nonfinite_skips max_training_steps monitor nonfinite num_workers optimizer output_dir
    persistent_workers pin_memory precision prefetch_factor progress projection_samples resume
    scheduler seed skip_bad_images sync_batchnorm tensorboard valset_dir""".split()
)


class ConfigError(ValueError):
    """One or more config values are impossible; the message lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid config ({len(problems)} problem(s)):\n{lines}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def check_config(cfg: DictConfig) -> None:
    """Check the values of a composed ``conf/train.yaml``.

    Args:
        cfg: The composed config (interpolations are resolved here, not mutated).

    Raises:
        ConfigError: Listing every impossible value, with the key, the value and the fix.
    """
    problems: list[str] = []

    def need(key: str, ok: Callable[[Any], bool], expected: str, example: str) -> Any:
        value = _get(cfg, key)
        if not ok(value):
            problems.append(f"{key}={value!r}: expected {expected}; e.g. {key}={example}")
        return value

    def nonneg_int(v: Any) -> bool:
        return _is_int(v) and v >= 0

    def positive_int(v: Any) -> bool:
        return _is_int(v) and v >= 1

    need(
        "batch_size",
        lambda v: _is_int(v) and v >= 2,
        "an int >= 2 (BatchNorm needs two images per batch)",
        "64",
    )
    steps = need("max_training_steps", nonneg_int, "an int >= 0 (0: use max_epochs)", "20000")
    epochs = need("max_epochs", nonneg_int, "an int >= 0", "20")
    if steps == 0 and epochs == 0:
        problems.append(
            "max_training_steps=0 and max_epochs=0: training would never stop; "
            "set max_training_steps>0 (it wins) or max_epochs>0"
        )
    evaluation_steps = need(
        "evaluation_steps", nonneg_int, "an int >= 0 (0: evaluate every epoch)", "500"
    )
    need("embed_dim", positive_int, "an int >= 1 (the embedding size)", "512")
    need(
        "image_size",
        lambda v: _is_int(v) and v >= 16 and v % 16 == 0,
        "a positive multiple of 16 (pixels)",
        "112",
    )
    need("num_workers", nonneg_int, "an int >= 0", "4")
    need("log_every", positive_int, "an int >= 1", "10")
    need("seed", _is_int, "an int", "0")
    need(
        "device",
        lambda v: isinstance(v, str) and _DEVICE.match(v) is not None,
        "auto, cpu, mps, cuda or cuda:N",
        "auto",
    )
    need("max_bad_fraction", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)", "0.01")
    for key in ("tensorboard", "progress", "flip_test", "skip_bad_images"):
        need(key, lambda v: isinstance(v, bool), "true or false", "true")
    need(
        "header_lr",
        lambda v: v is None or (_is_number(v) and v > 0),
        "null or a number > 0",
        "0.1",
    )
    need(
        "header_weight_decay",
        lambda v: v is None or (_is_number(v) and v >= 0),
        "null or a number >= 0",
        "5e-4",
    )

    _check_optimizer(cfg, problems)

    val = _get(cfg, "dataset.val") or {}
    if _is_int(evaluation_steps) and evaluation_steps > 0 and not val:
        problems.append(
            f"evaluation_steps={evaluation_steps} but the dataset has no validation "
            "set (dataset.val is empty): set evaluation_steps=0 or pick a dataset "
            "with a validation set"
        )

    embed_dim = _get(cfg, "backbone.embed_dim")
    in_features = _get(cfg, "header.in_features")
    if _is_int(embed_dim) and _is_int(in_features) and embed_dim != in_features:
        problems.append(
            f"header.in_features={in_features} but backbone.embed_dim={embed_dim}: "
            "the header reads the backbone's embedding; make them equal, e.g. drop the "
            "override to keep header.in_features=${backbone.embed_dim}"
        )

    _check_loss_header(cfg, problems)
    _check_unknown_keys(cfg, problems)

    if problems:
        raise ConfigError(problems)


def _check_unknown_keys(cfg: DictConfig, problems: list[str]) -> None:
    """``+max_trainig_steps=3`` composes fine and changes nothing: catch it."""
    for key in sorted(set(cfg.keys()) - KNOWN_KEYS):
        value = _get(cfg, str(key))
        match = difflib.get_close_matches(str(key), KNOWN_KEYS, n=1, cutoff=0.8)
        if match:
            problems.append(
                f"{key}={value!r} is not a femb config key, so it would change nothing; did "
                f"you mean {match[0]}? e.g. {match[0]}={value} (without the +)"
            )
        else:
            log.warning(
                "config key %s=%r is not one femb reads: it is stored with the run (e.g. as a "
                "tag) but changes nothing",
                key,
                value,
            )


def _check_loss_header(cfg: DictConfig, problems: list[str]) -> None:
    """A header that computes its own loss (Partial FC) would silently ignore ``loss``."""
    target = _get(cfg, "header._target_")
    if not isinstance(target, str) or not target.endswith("PartialFCHeader"):
        return
    loss_target = _get(cfg, "loss._target_")
    smoothing = _get(cfg, "loss.label_smoothing") or 0.0
    extra = {
        key for key in (_get(cfg, "loss") or {}) if key not in ("_target_", "label_smoothing")
    }
    if loss_target != "torch.nn.CrossEntropyLoss" or smoothing != 0.0 or extra:
        problems.append(
            f"header={target.rsplit('.', 1)[-1]} computes its own softmax cross-entropy over "
            f"the sharded classes, so loss={loss_target} with "
            f"{ {k: _get(cfg, 'loss.' + k) for k in sorted(extra | {'label_smoothing'})} } "
            "would be ignored; e.g. loss=cross_entropy loss.label_smoothing=0.0"
        )


def _check_optimizer(cfg: DictConfig, problems: list[str]) -> None:
    lr = _get(cfg, "optimizer.lr")
    if lr is not None and not (_is_number(lr) and lr > 0):
        problems.append(f"optimizer.lr={lr!r}: expected a number > 0; e.g. optimizer.lr=0.1")
    wd = _get(cfg, "optimizer.weight_decay")
    if wd is not None and not (_is_number(wd) and wd >= 0):
        problems.append(
            f"optimizer.weight_decay={wd!r}: expected a number >= 0; "
            "e.g. optimizer.weight_decay=5e-4"
        )
    momentum = _get(cfg, "optimizer.momentum")
    if momentum is not None and not (_is_number(momentum) and 0 <= momentum < 1):
        problems.append(
            f"optimizer.momentum={momentum!r}: expected a number in [0, 1); "
            "e.g. optimizer.momentum=0.9"
        )
