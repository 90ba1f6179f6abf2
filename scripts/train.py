"""Train a face-embedding model: python scripts/train.py [group=option ...] [key=value ...].

Sweep with -m, e.g. python scripts/train.py -m header=sphereface,cosface,arcface,magface.
"""

import logging
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from femb.cli import USER_ERRORS
from femb.run_io import ERROR_NAME, atomic_write
from femb.train import train

log = logging.getLogger("femb.train")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except Exception as err:
        # The failed job's run dir keeps its message and traceback (scripts/aggregate.py lists
        # the message); in a multirun Hydra still runs the remaining jobs, then exits non-zero.
        message = "".join(traceback.format_exception_only(err)).strip()
        text = f"{message}\n\n{traceback.format_exc()}"
        path = Path(cfg.output_dir) / ERROR_NAME
        atomic_write(path, lambda f: f.write(text.encode()))
        if isinstance(err, USER_ERRORS) and HydraConfig.get().mode == RunMode.RUN:
            # A bad value or a missing file: its message names the fix; a traceback would
            # only bury it (it is in error.txt). Bugs keep Hydra's traceback.
            log.error("%s\n(traceback in %s)", message, path)
            raise SystemExit(1) from None
        raise
    # A resumed run that once failed is not a failed run any more.
    (Path(cfg.output_dir) / ERROR_NAME).unlink(missing_ok=True)
    # Sweepers (e.g. Optuna) optimise the returned value: the best monitored metric.
    return next((v for k, v in metrics.items() if k.startswith("best/")), None)


if __name__ == "__main__":
    main()
