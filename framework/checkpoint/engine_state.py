"""The model and optimizer part of a checkpoint, per backend, as tensors and plain data only.

- DDP and DeepSpeed stage 0: every process holds whole parameters, so the module's and the
  optimizer's state_dicts; a run with another world size can load rank 0's.
- ZeRO 1-3: each process holds only its partition of the fp32 master weights and of the
  optimizer state. The ZeRO optimizer's own `state_dict()` (partitions included) is saved per
  process, minus the objects DeepSpeed would pickle (the loss scaler is kept as its scalar
  fields), and goes back through its own `load_state_dict`, so nothing is ever unpickled.
  Under ZeRO-3, parameters are placeholders in `module.state_dict()`; the module part is its
  buffers (BN statistics, which no ZeRO stage partitions). Where each parameter's pieces lie
  in the partitions is saved too, so another world size can re-cut them (`zero_reshard.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from framework.checkpoint import zero_reshard

ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


def _plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))


class ReplicatedState:
    partitioned = False  # another world size loads rank 0's state as it is
    sharded = False  # FSDP2's DTensors (fsdp_state.py) go through DCP instead

    def __init__(self, module: torch.nn.Module, optimizer, engine=None):
        self.module, self.optimizer, self.engine = module, optimizer, engine

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "engine": self._counters()}

    def load_state_dict(self, saved: dict) -> None:
        self.module.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self._set_counters(saved["engine"])

    def buffer_names(self) -> set[str]:
        return {name for name, _ in self.module.named_buffers()}

    def extra_writer(self, engine_copy: bool):
        """What every process adds to a checkpoint folder (checkpoint.engine_copy: DeepSpeed's own copy)."""
        return self.save_engine_checkpoint if engine_copy else None

    def save_engine_checkpoint(self, folder: Path) -> None:
        """DeepSpeed's own checkpoint (collective), for its tools (zero_to_fp32.py); resume never
        reads it (it pickles). Nothing without an engine."""
        if self.engine is not None:
            self.engine.save_checkpoint(str(folder / "deepspeed"), tag="engine", save_latest=False)

    def _counters(self) -> dict:
        return {k: getattr(self.engine, k) for k in ENGINE_COUNTERS} if self.engine is not None else {}

    def _set_counters(self, counters: dict) -> None:
        for key, value in counters.items():
            setattr(self.engine, key, value)


class ZeroState(ReplicatedState):
    partitioned = True  # another world size re-cuts every old process's partitions (reshard)

    def __init__(self, module: torch.nn.Module, engine, stage: int):
        super().__init__(module, engine.optimizer, engine)
        self.stage = stage
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def layout(self) -> dict:
        master = zero_reshard.master_fragments(self.module, self.optimizer, self.stage, self.rank)
        return {"master": master, "optim_order": zero_reshard.optimizer_partition_order(self.optimizer, self.stage),
                "averaged": zero_reshard.averaged_fragments(self.module, self.stage, self.rank, master)}

    def reshard(self, old: list[dict], averaged_sizes: list[int]) -> dict:
        """Every old process's saved state, re-cut for this process (another world size)."""
        flats = self.optimizer.fp32_partitioned_groups_flat if self.stage == 3 else self.optimizer.single_partition_of_fp32_groups
        layout = {**self.layout(), "master_sizes": [t.numel() for t in flats]}
        return zero_reshard.reshard(old, self.state_dict(), self.stage, layout, averaged_sizes)

    def state_dict(self) -> dict:
        full = self.optimizer.state_dict()
        # What is left out is rebuilt from the live optimizer on load (parameter-slice maps,
        # used only by DeepSpeed's universal checkpoints, and the loss scaler object).
        zero = {k: v for k, v in full.items() if _plain(v)}
        zero["loss_scaler"] = {k: v for k, v in vars(self.optimizer.loss_scaler).items() if _plain(v)}
        return {"model": dict(self.module.named_buffers()), "optimizer": zero, "engine": self._counters(),
                "layout": self.layout()}

    def load_state_dict(self, saved: dict) -> None:
        with torch.no_grad():
            for name, buffer in self.module.named_buffers():
                buffer.copy_(saved["model"][name])
        zero = dict(saved["optimizer"])
        scaler = self.optimizer.loss_scaler
        for key, value in zero.pop("loss_scaler").items():
            setattr(scaler, key, value)
        zero["loss_scaler"] = scaler
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        per_rank = [None] * world
        per_rank[self.rank] = zero  # the rigid (same layout) path reads only this process's entry
        self.optimizer.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)
        if self.stage in (1, 2):
            self.optimizer.update_lp_params()  # ZeRO-3's load already copies fp32 into the parameter partitions
        self._set_counters(saved["engine"])


def create_engine_state(accelerator, model, optimizer):
    """`model` and `optimizer` as returned by accelerator.prepare (or framework.distributed.fsdp.shard_model)."""
    from framework.distributed.fsdp import is_fsdp

    module = accelerator.unwrap_model(model)
    if is_fsdp(module):
        from framework.checkpoint.fsdp_state import FSDPState

        return FSDPState(module, optimizer)
    stage = model.zero_optimization_stage() if hasattr(model, "zero_optimization_stage") else None
    if stage is None:
        return ReplicatedState(module, optimizer)
    if stage == 0:
        return ReplicatedState(module, model.optimizer, model)
    return ZeroState(module, model, stage)

