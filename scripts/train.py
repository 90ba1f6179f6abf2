"""Train a face-embedding model: python scripts/train.py [group=option ...] [key=value ...].

Sweep with -m, e.g. python scripts/train.py -m header=sphereface,cosface,arcface,magface.
"""

import hydra
from omegaconf import DictConfig

from femb.train import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # Sweepers (e.g. Optuna) optimise the returned value: the best monitored metric.
    return next((v for k, v in metrics.items() if k.startswith("best/")), None)


if __name__ == "__main__":
    main()
