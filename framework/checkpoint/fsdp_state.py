"""The FSDP2 part of a checkpoint: sharded tensors through torch.distributed.checkpoint (DCP).

Parameters, the optimizer's state and every averager's fp32 shards are DTensors (an averager's
local shards are wrapped with their parameter's mesh and placements), written by every process
into `dcp/` with DCP's safetensors writer: no pickle on disk, each file holds one process's shards
with DCP's sharding information in its header. Loading reads them into this run's own shards,
whatever the old world size: DCP's planner cuts them, no code of ours does. What is not a tensor
(the optimizer's param groups, an averager's count) stays in the process's JSON part, with each
tensor's place held by its DCP key. BN buffers are not sharded: they are the process's own, as
under DDP.
"""

from __future__ import annotations

from pathlib import Path

import torch

from framework.checkpoint.store import decode, encode

DCP_FOLDER = "dcp"


def _split(obj, key: str, tensors: dict):
    """Plain data with each tensor replaced by {"__tensor__": key}; keys follow names, so they are
    the same for every world size."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[encode(k, {}), _split(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    return encode(obj, {})  # param groups, counts: plain data


class FSDPState:
    partitioned = False  # not re-cut by zero_reshard.py: DCP reshards on load
    sharded = True

    def __init__(self, module: torch.nn.Module, optimizer):
        self.module, self.optimizer = module, optimizer
        self.names = [n for n, _ in module.named_parameters()]
        self.params = [p for _, p in module.named_parameters()]
        self._tensors: dict = {}

    def buffer_names(self) -> set[str]:
        return {name for name, _ in self.module.named_buffers()}

    def _live(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {"params": dict(zip(self.names, self.params, strict=True)),
                "optimizer": get_optimizer_state_dict(self.module, self.optimizer)}  # creates empty state on a fresh one

    def _averaged(self, tensors: list[torch.Tensor]) -> dict:
        """An averager's local shards as DTensors laid out like their parameters (so DCP can reshard them). An
        offloaded average (averaging.offload) is copied to the parameter's device for this; `read` copies it back."""
        from torch.distributed.tensor import DTensor

        return {name: DTensor.from_local(t.to(p.to_local().device), p.device_mesh, p.placements, run_check=False,
                                         shape=p.shape, stride=p.stride())
                for name, p, t in zip(self.names, self.params, tensors, strict=True)}

    def state_dict(self) -> dict:
        return {"model": dict(self.module.named_buffers()), **self._live(), "engine": {}}

    def split(self, own: dict) -> dict:
        """`own` (capture's per-process state) with its sharded tensors moved out, for `write_extra`."""
        tensors: dict = {}
        own = dict(own)
        for key in ("params", "optimizer"):
            own[key] = _split(own[key], key, tensors)
        own["averager"] = {name: {**state, "tensors": _split(self._averaged(list(state["tensors"].values())),
                                                             f"averager.{name}", tensors)}
                           for name, state in own["averager"].items()}
        self._tensors = tensors
        return own

    def write_extra(self, folder: Path) -> None:
        """Collective: every process writes its shards."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageWriter

        try:
            dcp.save(self._tensors, storage_writer=HuggingFaceStorageWriter(str(folder / DCP_FOLDER), save_distributed=True))
        except CheckpointException as err:  # every process gets it: the store's one-line error (a full disk) follows
            failures = [f[0] if isinstance(f, tuple) else f for f in err.failures.values()]
            first = failures[0] if failures else err
            raise OSError(f"torch.distributed.checkpoint: {type(first).__name__}: {first}") from err
        finally:
            self._tensors = {}

    def read(self, path: Path, saved: dict, averagers: dict) -> dict:
        """Collective: `saved` (a process's JSON part) with its tensors read from `path/dcp` into this run's
        shards. `averagers`: this run's averagers by name, whose tensors receive theirs in place."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        live = self._live()
        targets: dict = {}
        for key in ("params", "optimizer"):
            _split(live[key], key, targets)
        for name, averager in averagers.items():
            _split(self._averaged(averager.avg.tensors()), f"averager.{name}", targets)
        # parameters and averages are read in place; the optimizer's state into fresh tensors, set below
        loaded = {k: torch.empty_like(v) if k.startswith("optimizer.") else v for k, v in targets.items()}
        dcp.load(loaded, storage_reader=HuggingFaceStorageReader(str(path / DCP_FOLDER)))
        from framework.distributed.fsdp import local

        saved = dict(saved)
        for key in ("params", "optimizer"):
            saved[key] = decode(saved[key], loaded)
        saved["averager"] = {name: {**state, "tensors": {f"t{i}": local(t) for i, t in enumerate(
            decode(state["tensors"], loaded).values())}} for name, state in saved["averager"].items()}
        return saved

    def load_state_dict(self, saved: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        with torch.no_grad():
            for name, buffer in self.module.named_buffers():
                buffer.copy_(saved["model"][name])
            for p, name in zip(self.params, self.names, strict=True):
                p.to_local().copy_(saved["params"][name].to_local())
        set_optimizer_state_dict(self.module, self.optimizer, saved["optimizer"])

    def extra_writer(self, engine_copy: bool):
        """The DCP folder, always (checkpoint.engine_copy has no other engine copy to add)."""
        return self.write_extra
