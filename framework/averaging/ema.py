"""EMA: avg = decay * avg + (1 - decay) * weights, with timm's optional decay warmup."""

from __future__ import annotations

from dataclasses import dataclass

from framework.recipe.fields import spec


@dataclass(kw_only=True)
class EMAOptions:
    decay: float = spec(0.999, gt=0.0, lt=1.0)
    warmup: bool = spec(False, doc="decay = 1 - (1 + n / warmup_gamma) ** -warmup_power, capped at decay")
    warmup_gamma: float = spec(1.0, gt=0.0)
    warmup_power: float = spec(2 / 3, gt=0.0)


class EMA:
    """The first update copies the weights (as AveragedModel does); update n>0 lerps by 1 - decay(n)."""

    Options = EMAOptions
    zero_stages = (0, 1, 2, 3)  # shard-local: it only lerps whatever tensors it is given

    def __init__(self, decay: float = 0.999, warmup: bool = False, warmup_gamma: float = 1.0, warmup_power: float = 2 / 3):
        self.decay, self.warmup, self.warmup_gamma, self.warmup_power = decay, warmup, warmup_gamma, warmup_power

    def current_decay(self, n: int) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, max(0.0, 1 - (1 + n / self.warmup_gamma) ** -self.warmup_power))

    def weight(self, n: int) -> float:
        return 1.0 if n == 0 else 1.0 - self.current_decay(n)

    sets_lr = False

    def adjust_lr(self, optimizer, steps_since_start: int, steps_per_epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "warmup_gamma": self.warmup_gamma, "warmup_power": self.warmup_power}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.warmup = state["decay"], state["warmup"]
        self.warmup_gamma, self.warmup_power = state["warmup_gamma"], state["warmup_power"]
