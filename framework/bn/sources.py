"""Where the averaged weights get their BN statistics: one small class per way, evaluated side by side.

Each source is built at the start of training with the live BN buffers, hears every averaging
update through `on_update(weight, n)`, has a `state_dict` for checkpoints, and gives the
statistics to evaluate with via `get(ctx)`, where `ctx.recompute()` runs a fresh pass for the
averaged weights. A new way is one class
here (or one file) plus a line in `BN_SOURCES`; the summary, table and tests pick it up.
"""

from __future__ import annotations

import torch

from framework.averaging.tensors import AveragedTensors
from framework.bn import clone_all


class _Snapshot:
    """A source that holds one copy of the BN statistics (None until it has one)."""

    stats: list[torch.Tensor] | None

    def get(self, ctx) -> list[torch.Tensor]:
        return clone_all(self.stats)

    def state_dict(self) -> dict:
        return {"stats": self.stats}

    def load_state_dict(self, state: dict) -> None:
        self.stats = clone_all(state["stats"]) if state["stats"] is not None else None


class Initial(_Snapshot):
    """Statistics before training: what toggling track_running_stats, or restoring a pre-loop snapshot, ends with."""

    def __init__(self, live: list[torch.Tensor]):
        self.stats = clone_all(live)

    def on_update(self, weight: float, n: int) -> None:
        pass


class SwaStart(_Snapshot):
    """The live model's statistics when averaging began."""

    def __init__(self, live: list[torch.Tensor]):
        self.live, self.stats = live, None

    def on_update(self, weight: float, n: int) -> None:
        if n == 0:
            self.stats = clone_all(self.live)


class Online(_Snapshot):
    """The live statistics at the last averaging update (AveragedModel's default, use_buffers=False)."""

    def __init__(self, live: list[torch.Tensor]):
        self.live, self.stats = live, clone_all(live)

    def on_update(self, weight: float, n: int) -> None:
        torch._foreach_copy_(self.stats, self.live)


class Averaged:
    """Statistics averaged along with the weights (AveragedModel(use_buffers=True))."""

    def __init__(self, live: list[torch.Tensor]):
        self.live, self.avg = live, None

    def on_update(self, weight: float, n: int) -> None:
        if self.avg is None:
            self.avg = AveragedTensors(self.live)
        self.avg.lerp_(self.live, weight)

    def get(self, ctx) -> list[torch.Tensor]:
        return clone_all(self.avg.tensors())

    def state_dict(self) -> dict:
        return {"stats": self.avg.tensors() if self.avg is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.avg = None
        if state["stats"] is not None:
            self.avg = AveragedTensors(self.live)
            torch._foreach_copy_(self.avg.avg, state["stats"])


class Recompute:
    """Fresh statistics for the averaged weights from a pass over training data (framework.bn.recompute)."""

    def __init__(self, live: list[torch.Tensor]):
        pass

    def on_update(self, weight: float, n: int) -> None:
        pass

    def get(self, ctx) -> list[torch.Tensor]:
        return ctx.recompute()

    def state_dict(self) -> dict:
        return {"stats": None}

    def load_state_dict(self, state: dict) -> None:
        pass


BN_SOURCES = {"initial": Initial, "swa_start": SwaStart, "online": Online, "averaged": Averaged, "recompute": Recompute}


class NoStats:
    """A model without BN running statistics (LayerNorm, GroupNorm, EvoNorm, norm-free, or BN with
    track_running_stats=False): its averaged weights need none, so they are evaluated once."""

    def __init__(self, live: list[torch.Tensor]):
        pass

    def on_update(self, weight: float, n: int) -> None:
        pass

    def get(self, ctx) -> list[torch.Tensor]:
        return []

    def state_dict(self) -> dict:
        return {"stats": None}

    def load_state_dict(self, state: dict) -> None:
        pass


NO_STATS = "none"  # the single evaluation's name where no source applies: eval/averaged/none/top1


def create_sources(model: torch.nn.Module, export: str) -> tuple[dict, str, dict]:
    """The sources that apply to `model` (listening to its live BN buffers), the one its export uses, and
    what the run reports about them."""
    from framework.bn import bn_buffers, norm_layer_census

    live, census = bn_buffers(model), norm_layer_census(model)
    if live:
        why = (f"{census['bn_with_stats']} BatchNorm layers keep running statistics; each source gives them "
               "to the averaged weights" + (f" (other normalisation, untouched: {', '.join(census['other'])})"
                                            if census["other"] else ""))
        return {name: cls(live) for name, cls in BN_SOURCES.items()}, export, {**census, "sources": list(BN_SOURCES), "why": why}
    kinds = ", ".join(census["other"]) or "no normalisation layers"
    why = (f"no BatchNorm layer keeps running statistics ({kinds}"
           + (f"; {census['bn_without_stats']} BatchNorm layers use batch statistics" if census["bn_without_stats"] else "")
           + "): the averaged weights need no BN statistics, so they are evaluated once and no recompute pass runs")
    return {NO_STATS: NoStats(live)}, NO_STATS, {**census, "sources": [NO_STATS], "why": why}
