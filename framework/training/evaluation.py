"""Evaluation of the live model and of the averaged weights under each source of BN statistics.

The averaged weights are evaluated in the live model's own parameters (swapped in and back),
never in a deep copy: the same path works when parameters are sharded. BN statistics are made
identical across processes by the `bn.mode` before any evaluation, so every process evaluates
the same model and the reduced top-1 is that model's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from framework.bn import clone_all, swapped
from framework.bn.recompute import recompute_bn_stats


def _reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model, loader, device, num_classes: int, autocast=contextlib.nullcontext, dtype=torch.float32) -> dict:
    """Top-1/top-5/loss over the whole validation set; padded items (target -1) are not counted."""
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, count
    start = time.perf_counter()
    for images, targets in loader:
        images, targets = images.to(device, dtype), targets.to(device)
        with autocast():
            logits = model(images).float()
        valid = targets >= 0
        logits, targets = logits[valid], targets[valid]
        topk = logits.topk(k, dim=1).indices == targets[:, None]
        sums += torch.stack([
            F.cross_entropy(logits, targets, reduction="sum").double(),
            topk[:, 0].sum().double(), topk.any(dim=1).sum().double(), valid.sum().double(),
        ])
    loss, top1, top5, count = _reduce_sum(sums).cpu().tolist()
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "loss": loss / count,
            "images": int(count), "seconds": time.perf_counter() - start}


@contextlib.contextmanager
def isolated_rng(device: torch.device):
    """Evaluation and BN passes leave every training stream (torch, CUDA, Python, NumPy) as they found it:
    a DataLoader draws its base seed from torch's generator and timm's crop draws from Python's, so without
    this the live model would depend on how much is evaluated (averaging settings, recompute batches)."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextlib.contextmanager
def harmonized_bn(mode, live_bn: list[torch.Tensor]):
    """The live BN statistics as the mode evaluates them: kept (reduce) or swapped in for the block."""
    if mode.persist:
        mode.harmonize(live_bn)
        yield
        return
    stats = clone_all(live_bn)
    mode.harmonize(stats)
    with swapped(live_bn, stats):
        yield


@dataclass
class AveragedEval:
    """Everything needed to evaluate the averaged weights; `recompute` is the BN pass on training data."""

    module: torch.nn.Module
    view: object  # framework.averaging.views: how averaged tensors are swapped into the model
    live_bn: list[torch.Tensor]
    mode: object
    recompute_inputs: Callable[[], Iterable]  # framework.bn.inputs: one pass's batches
    recompute_batches: int | None
    device: torch.device
    autocast: object
    dtype: torch.dtype
    recompute_seconds: dict[str, list[float]] = field(default_factory=dict)  # per averager: each pass's seconds
    _track: str = ""  # the averager being evaluated, whose passes `recompute` times

    def recompute(self) -> list[torch.Tensor]:
        """Fresh statistics for the weights now in `module`; live buffers and RNG streams are left as they were."""
        start = time.perf_counter()
        with swapped(self.live_bn, clone_all(self.live_bn)), isolated_rng(self.device):
            recompute_bn_stats(self.module, self.recompute_inputs(), self.recompute_batches, self.device, self.autocast, self.dtype)
            stats = clone_all(self.live_bn)
        self.recompute_seconds.setdefault(self._track, []).append(time.perf_counter() - start)
        return stats

    def run(self, track: str, averaged: list[torch.Tensor], sources: dict, val_loader, num_classes: int):
        """Evaluate averager `track`'s weights with each of `sources`' statistics. Returns (results, stats per source)."""
        results, stats_by_source = {}, {}
        self._track = track
        with self.view.swapped_in(averaged):
            for name, source in sources.items():
                start = time.perf_counter()
                stats = source.get(self)
                self.mode.harmonize(stats)
                with swapped(self.live_bn, stats):
                    ev = evaluate(self.module, val_loader, self.device, num_classes, self.autocast, self.dtype)
                ev["seconds"] = time.perf_counter() - start
                results[name], stats_by_source[name] = ev, stats
        return results, stats_by_source
