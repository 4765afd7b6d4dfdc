"""Weight averaging: a registry of rules (how much each update weighs) and the averager that applies them.

A new strategy is one file with a class (`Options` dataclass, `zero_stages`, `weight(n)`,
`sets_lr`, `adjust_lr`, `state_dict`, `load_state_dict`) plus one line in `AVERAGERS`; the recipe schema
(`averaging.<name>` options) and the shared tests pick it up.
"""

from __future__ import annotations

import time

import torch

from framework.averaging.ema import EMA
from framework.averaging.swa import SWA
from framework.averaging.tensors import AveragedTensors
from framework.distributed.comm_meter import CommMeter

AVERAGERS = {"swa": SWA, "ema": EMA}


def create_rule(name: str, options):
    import dataclasses

    return AVERAGERS[name](**dataclasses.asdict(options))


class UpdateTimer:
    """Mean time per update without a host sync per update: CUDA events are read once, at the end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list = []
        self.seconds = 0.0
        self.count = 0

    def __enter__(self):
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.count += 1
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((self._start, end))
        else:
            self.seconds += time.perf_counter() - self._t

    def mean_ms(self) -> float:
        if self.cuda and self.events:
            torch.cuda.synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self.events) / 1000
            self.events.clear()
        return 1000 * self.seconds / max(self.count, 1)


class WeightAverager:
    """Averages a model's parameters (fp32, on device or offloaded) from `start_step`, every `every_steps`.

    `listeners` are called after each update with (weight, n): the BN-statistics sources use
    this to snapshot or average BN buffers in step with the weights.
    """

    def __init__(self, rule, params: list[torch.Tensor], start_step: int, every_steps: int, offload: bool):
        self.rule, self.params = rule, params
        self.start_step, self.every_steps = start_step, every_steps
        self.avg = AveragedTensors(params, offload)
        self.n = 0
        self.listeners: list = []
        self.timer = UpdateTimer(params[0].device)
        self.comm = CommMeter()  # every update is measured: shard-local averaging must send nothing

    @property
    def started(self) -> bool:
        return self.n > 0

    def maybe_update(self, step: int) -> bool:
        """Call after optimizer step number `step` (1-based)."""
        if step < self.start_step or (step - self.start_step) % self.every_steps:
            return False
        with self.timer, self.comm.measure():
            weight = self.rule.weight(self.n)
            self.avg.lerp_(self.params, weight)
            for listener in self.listeners:
                listener(weight, self.n)
        self.n += 1
        return True

    def state_dict(self) -> dict:
        # start_step and every_steps come from the recipe, in this run's updates (another world size has others)
        return {"n": self.n, "rule": self.rule.state_dict(), "tensors": self.avg.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]
        self.rule.load_state_dict(state["rule"])
        self.avg.load_state_dict(state["tensors"])
