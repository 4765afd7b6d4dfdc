"""What the averager averages on each backend, and how the averaged values are put to use.

- Replicated (DDP, ZeRO-0): every process holds whole parameters; they are averaged and
  swapped in for evaluation.
- ZeRO-1/2: the optimizer's fp32 flat partitions (this rank's slice of the master weights) are
  averaged. For evaluation they are swapped into those partitions and the engine regathers its
  parameters (one all-gather), then the live partitions go back and are regathered again.
- ZeRO-3: each parameter's fp32 master partition is averaged; for evaluation the averaged
  partitions are copied into the engine's own parameter partitions (`ds_tensor`) and back.
- FSDP2: each parameter is a DTensor; its local shard (a view of the sharded fp32 parameter) is
  averaged. For evaluation the averaged shards are copied into those views, and every unit's
  gathered copy is freed first, so the next forward gathers the averaged shards.
Updates are shard-local (a foreach lerp, no collective), and no process ever holds a second
full model: the averaged state is 1/N of the fp32 model under ZeRO 1-3 and FSDP2.
"""

from __future__ import annotations

import contextlib

import torch

from framework.bn import swapped


class ReplicatedView:
    def __init__(self, module: torch.nn.Module):
        self.sources = list(module.parameters())

    def swapped_in(self, averaged: list[torch.Tensor]):
        return swapped(self.sources, averaged)


class Zero12View:
    def __init__(self, zero_optimizer):
        self.opt = zero_optimizer
        self.sources = list(zero_optimizer.single_partition_of_fp32_groups)

    @contextlib.contextmanager
    def swapped_in(self, averaged: list[torch.Tensor]):
        try:
            with swapped(self.sources, averaged):
                self.opt.update_lp_params()
                yield
        finally:
            self.opt.update_lp_params()  # the live master partitions are back: regather them


class Zero3View:
    def __init__(self, module: torch.nn.Module, zero_optimizer):
        self.params = params = [p for p in module.parameters() if p.requires_grad]
        # Resolved once: the views into the fp32 flat partitions stay valid, and asking DeepSpeed
        # per update (safe_get_local_fp32_param) would synchronise a stream each time.
        self.sources = [zero_optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=False)[0] for p in params]
        for s, t in zip(self.sources, [p.ds_tensor for p in params], strict=True):
            if s.numel() != t.numel():
                raise RuntimeError(f"ZeRO-3 fp32 partition ({s.numel()}) and parameter partition ({t.numel()}) differ")

    def _release(self) -> None:
        """Drop gathered copies: a parameter left whole after an eval forward would not see the swap."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        for p in self.params:
            if p.ds_status == ZeroParamStatus.AVAILABLE:
                p.partition()

    @contextlib.contextmanager
    def swapped_in(self, averaged: list[torch.Tensor]):
        self._release()
        try:
            with swapped([p.ds_tensor for p in self.params], averaged):
                yield
                self._release()
        finally:
            self._release()


class FSDPView:
    def __init__(self, module: torch.nn.Module):
        from framework.distributed.fsdp import local

        self.module = module
        self.sources = [local(p) for p in module.parameters()]  # views that stay valid: FSDP2 steps in place

    @contextlib.contextmanager
    def swapped_in(self, averaged: list[torch.Tensor]):
        from framework.distributed.fsdp import reshard

        reshard(self.module)
        try:
            with swapped(self.sources, averaged):
                yield
                reshard(self.module)
        finally:
            reshard(self.module)


def create_view(accelerator, model) -> ReplicatedView | Zero12View | Zero3View | FSDPView:
    """`model` as returned by accelerator.prepare (or by framework.distributed.fsdp.shard_model)."""
    from framework.distributed.fsdp import is_fsdp

    module = accelerator.unwrap_model(model)
    if is_fsdp(module):
        return FSDPView(module)
    engine_optimizer = getattr(model, "optimizer", None)  # a DeepSpeedEngine's ZeRO optimizer
    stage = model.zero_optimization_stage() if hasattr(model, "zero_optimization_stage") else 0
    if stage in (1, 2):
        return Zero12View(engine_optimizer)
    if stage == 3:
        return Zero3View(module, engine_optimizer)
    return ReplicatedView(module)
