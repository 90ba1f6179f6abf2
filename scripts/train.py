"""Train a face-embedding model: python scripts/train.py [group=option ...] [key=value ...].

Sweep with -m, e.g. python scripts/train.py -m header=sphereface,cosface,arcface,magface.
"""

import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from femb.run_io import atomic_write
from femb.train import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except Exception:
        # The failed job's own run dir keeps its traceback (scripts/aggregate.py lists it);
        # in a multirun Hydra still runs the remaining jobs, then exits non-zero.
        text = traceback.format_exc()
        atomic_write(Path(cfg.output_dir) / "error.txt", lambda f: f.write(text.encode()))
        raise
    # Sweepers (e.g. Optuna) optimise the returned value: the best monitored metric.
    return next((v for k, v in metrics.items() if k.startswith("best/")), None)


if __name__ == "__main__":
    main()
