"""Where femb looks for datasets on disk."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

ENV_VAR = "FEMB_DATA_ROOT"

# femb/data/data_root.py -> parents[2] is the repository root for a source checkout or an
# editable install; the default data folder sits next to the repository, in ../shared/data.
_DEFAULT_RELATIVE = Path("..") / "shared" / "data"


def default_data_root() -> Path:
    """Return the folder holding femb's datasets (``orl/``, ``lfw/``, ...).

    Resolution order:

    1. the ``FEMB_DATA_ROOT`` environment variable, if set and non-empty;
    2. ``<repo root>/../shared/data``, with the repo root found from this file's location.

    Raises:
        FileNotFoundError: ``FEMB_DATA_ROOT`` points to a missing folder, or it is unset and
            the default folder does not exist. The message says how to fix it.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        root = Path(env).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(
                f"{ENV_VAR}={env!r} is not a directory; set {ENV_VAR} to the folder that "
                "contains the dataset folders (e.g. orl/, lfw/)"
            )
        return root

    repo_root = Path(__file__).resolve().parents[2]
    root = (repo_root / _DEFAULT_RELATIVE).resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"no data folder found: {ENV_VAR} is not set and the default {root} (repo root "
            f"{repo_root} + {_DEFAULT_RELATIVE.as_posix()}) does not exist. Put the datasets "
            f"there (orl/, lfw/, ...), or set {ENV_VAR}=/path/to/data, or pass the dataset "
            "root explicitly (config key `data_root`)"
        )
    return root


def resolve_root(root: str | os.PathLike | None, subfolder: str) -> Path:
    """``Path(root)`` if given, else ``default_data_root() / subfolder``."""
    return Path(root) if root is not None else default_data_root() / subfolder
