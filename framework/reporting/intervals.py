"""`logging.interval_steps`: train loss, learning rate and images/s every N optimizer updates.

At each point every process all-reduces its loss sum and image count since the last point: one
small collective every N updates and no host sync in between (timm's train.py reduces its loss at
its log interval the same way). The loss is the mean over every process's images; images/s counts
all processes over the wall time since the last point. Points restart with each epoch, so
evaluation time never counts as training time.
"""

from __future__ import annotations

import time

import torch

STEP_PREFIX = "train_step/"  # what wandb plots against `update`; epoch records are plotted against `epoch`


class IntervalMeter:
    def __init__(self, every: int | None, accelerator):
        self.every, self.acc = every, accelerator
        self.last_update = -1
        self.start_epoch(None)

    def start_epoch(self, stats: dict | None) -> None:
        """Count from here: `stats` are a mid-epoch resume's counts so far, or None for a fresh epoch."""
        self.loss_sum = stats["loss_sum"].clone() if stats else 0.0
        self.images = stats["images"] if stats else 0
        self.since = time.perf_counter()

    def __call__(self, stats: dict, update: int, lr: float) -> dict | None:
        """The record for this point, on every process alike, or None between points (and after a refused
        update, which leaves `update` where it was)."""
        if self.every is None or update % self.every or update == self.last_update:
            return None
        now = time.perf_counter()
        local = torch.stack([(stats["loss_sum"] - self.loss_sum).double().reshape(()).to(self.acc.device),
                             torch.tensor(float(stats["images"] - self.images), dtype=torch.float64, device=self.acc.device)])
        loss_sum, images = self.acc.reduce(local, reduction="sum").tolist()
        seconds = now - self.since
        self.loss_sum, self.images, self.since, self.last_update = stats["loss_sum"].clone(), stats["images"], now, update
        return {"update": update, f"{STEP_PREFIX}loss": loss_sum / max(images, 1), f"{STEP_PREFIX}lr": lr,
                f"{STEP_PREFIX}images_per_s": images / seconds if seconds > 0 else 0.0}


def epoch_records(lines: list[dict]) -> list[dict]:
    """The per-epoch records of a metrics.jsonl (its per-update lines have no `epoch`)."""
    return [r for r in lines if "epoch" in r]
