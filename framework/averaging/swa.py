"""SWA: the equal-weight mean of the weights seen at each update, with optional SWALR annealing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from framework.recipe.fields import spec


@dataclass(kw_only=True)
class SWAOptions:
    lr: float | None = spec(None, gt=0.0, doc="SWALR: anneal the learning rate to this value once averaging starts")
    anneal_epochs: int = spec(1, ge=0)
    anneal_strategy: Literal["cos", "linear"] = spec("cos")


class SWA:
    """Update n (from 0) moves the average by 1/(n+1): the arithmetic mean of all snapshots."""

    Options = SWAOptions
    zero_stages = (0, 1, 2, 3)  # shard-local: it only lerps whatever tensors it is given

    def __init__(self, lr: float | None = None, anneal_epochs: int = 1, anneal_strategy: str = "cos"):
        self.lr, self.anneal_epochs, self.anneal_strategy = lr, anneal_epochs, anneal_strategy
        self.start_lrs: list[float] | None = None

    def weight(self, n: int) -> float:
        return 1.0 / (n + 1)

    @property
    def sets_lr(self) -> bool:
        """SWALR: this rule sets the learning rate once averaging starts."""
        return self.lr is not None

    def adjust_lr(self, optimizer, steps_since_start: int, steps_per_epoch: int) -> None:
        """SWALR: from the schedule's learning rate at the start to `lr`, then constant."""
        if self.lr is None:
            return
        if self.start_lrs is None:
            self.start_lrs = [g["lr"] for g in optimizer.param_groups]
        span = self.anneal_epochs * steps_per_epoch
        t = 1.0 if span == 0 else min(1.0, steps_since_start / span)
        f = (1 - math.cos(math.pi * t)) / 2 if self.anneal_strategy == "cos" else t
        for group, start in zip(optimizer.param_groups, self.start_lrs, strict=True):
            # layer decay: each group keeps its scale of the SWA rate, as timm's schedulers keep it of theirs
            group["lr"] = start * (1 - f) + self.lr * group.get("lr_scale", 1.0) * f

    def state_dict(self) -> dict:
        return {"lr": self.lr, "anneal_epochs": self.anneal_epochs, "anneal_strategy": self.anneal_strategy,
                "start_lrs": self.start_lrs}

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.anneal_epochs, self.anneal_strategy = state["lr"], state["anneal_epochs"], state["anneal_strategy"]
        self.start_lrs = state["start_lrs"]
