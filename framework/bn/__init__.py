"""BatchNorm during training (`bn.mode`) and helpers over a model's BN buffers.

DDP runs with broadcast_buffers=False under every mode, as DeepSpeed does: training forwards
use batch statistics, so running statistics matter only for evaluation, and each mode says
how they are made identical across processes before one:
- local:  each process keeps its own; evaluation and export use rank 0's (what DDP's default
          buffer broadcast gives, without a broadcast every step). The live buffers are not changed.
- sync:   SyncBatchNorm (torch/timm on GPU, `gloo_sync` on CPU): statistics of the global batch,
          identical on every process by construction.
- reduce: plain BN; before each evaluation the live buffers are averaged across processes (timm's
          dist-bn reduce), and kept.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def bn_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def bn_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """running_mean and running_var of every BN layer, in module order (the live tensors)."""
    return [t for m in bn_modules(model) for t in (m.running_mean, m.running_var)]


NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase)


def norm_layer_census(model: torch.nn.Module) -> dict:
    """How the model normalises: BN layers with and without running statistics, and the other kinds by class name."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with_stats = sum(m.track_running_stats for m in bns)
    other = sorted({type(m).__name__ for m in model.modules()
                    if not isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                    and (isinstance(m, NORM_TYPES) or "Norm" in type(m).__name__ and not list(m.children()))})
    return {"bn_with_stats": with_stats, "bn_without_stats": len(bns) - with_stats, "other": other}


def clone_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


@contextlib.contextmanager
def swapped(live: list[torch.Tensor], values: list[torch.Tensor]):
    """Temporarily copy `values` into the `live` tensors (parameters or BN buffers), then restore."""
    backup = clone_all(live)
    with torch.no_grad():
        for t, v in zip(live, values, strict=True):
            t.copy_(v)
    try:
        yield
    finally:
        if live:  # a model without BN statistics swaps nothing (foreach ops refuse empty lists)
            with torch.no_grad():
                torch._foreach_copy_(live, backup)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _flat_collective(tensors: list[torch.Tensor], fn) -> None:
    if _world() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    fn(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


class LocalBN:
    persist = False

    def convert(self, model, cuda: bool):
        return model

    def harmonize(self, tensors: list[torch.Tensor]) -> None:
        _flat_collective(tensors, lambda flat: dist.broadcast(flat, src=0))


class SyncBN:
    persist = False

    def convert(self, model, cuda: bool):
        if cuda:
            from timm.layers import convert_sync_batchnorm  # keeps BatchNormAct2d's fused activation

            return convert_sync_batchnorm(model)
        from framework.bn.gloo_sync import convert_gloo_sync_batchnorm

        return convert_gloo_sync_batchnorm(model)

    def harmonize(self, tensors: list[torch.Tensor]) -> None:
        pass  # identical by construction


class ReduceBN:
    persist = True

    def convert(self, model, cuda: bool):
        return model

    def harmonize(self, tensors: list[torch.Tensor]) -> None:
        world = _world()
        _flat_collective(tensors, lambda flat: (dist.all_reduce(flat), flat.div_(world)))


BN_MODES = {"local": LocalBN, "sync": SyncBN, "reduce": ReduceBN}
