"""FSDP2 (torch's `fully_shard`) as an engine, applied by the framework on CPU and GPU alike.

Accelerate 1.15 ignores its FSDP plugin on a CPU-only machine (the model stays unsharded), so the
framework calls `torch.distributed.fsdp.fully_shard` itself, under the process group Accelerate (or
`init_fsdp_group` for one process) joined: the CPU tests run the code a GPU user runs.

Units come from the timm model's own `group_matcher` (fine): timm groups a model's modules by block
for layer decay, so each group's common module (`layer1.0`, `blocks.3`, `stages.1.blocks.0`) is one
unit, whatever the family; groups without one (a stem of loose layers, the head) stay with the root.
A module-class policy would need a class list per family; the matcher is already written for each.

16-bit: blocks gather their parameters in bf16/fp16 and reduce gradients in fp32 (the sharded master
copy stays fp32). BatchNorm layers are units of their own with fp32 parameters, as FSDP1 kept them
(its mixed precision ignored the BN classes): BN's running statistics are fp32, and a CPU BatchNorm
refuses 16-bit weights beside them. The framework's autocast runs around the forward as under DDP.
"""

from __future__ import annotations

import contextlib

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def init_fsdp_group(cuda: bool, timeout_s: int) -> None:
    """`fully_shard` needs a process group, even for one process (Accelerate joins one only for several)."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from framework.training.builders import _single_process_env

    _single_process_env()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for segment in zip(*parts, strict=False):
        if len(set(segment)) != 1:
            break
        prefix.append(segment[0])
    return ".".join(prefix)


_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)


def _called(model: torch.nn.Module, name: str) -> list[str]:
    """FSDP2 gathers in a unit's forward hooks, so a unit must be a module that is called: a list or dict is
    never called, and timm's gradient checkpointing (`checkpoint_seq`) calls a Sequential's children one by
    one. Such a container gives its children instead."""
    module = model.get_submodule(name)
    if not isinstance(module, _CONTAINERS):
        return [name]
    return [n for child, m in module.named_children() if any(True for _ in m.parameters())
            for n in _called(model, f"{name}.{child}")]


def fsdp_units(model: torch.nn.Module) -> list[str]:
    """Names of the modules that become units, deepest first (an inner unit is sharded before its parent),
    in the same order on every process."""
    from timm.models import group_modules

    groups = group_modules(model, model.group_matcher(coarse=False))
    units = {unit for names in groups.values() if (prefix := _common_prefix(names)) for unit in _called(model, prefix)}
    return sorted(units, key=lambda name: (-name.count("."), name))


def _own_output(module, args, output):
    """A unit that returns a view (ConvNeXt's stem ends in a permute) gets a copy instead: FSDP2 hangs its
    pre-backward hook on the output, and an in-place op on a view would drop it (torch warns of this)."""
    if isinstance(output, torch.Tensor) and output._is_view():
        return output.clone()
    return None


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module, precision: str, reshard_after_forward: bool, offload_params: bool,
                compile_mode: str | None = None) -> torch.nn.Module:
    """`fully_shard` per unit, then the root (in place; the model's class becomes an FSDPModule)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    dtype = _DTYPES.get(precision)
    blocks = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload_params else OffloadPolicy()
    if dtype is not None:
        fp32 = MixedPrecisionPolicy(cast_forward_inputs=False)  # BN takes the autocast dtype with fp32 weights
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                fully_shard(module, mp_policy=fp32, reshard_after_forward=False, offload_policy=offload)
    for name in fsdp_units(model):
        unit = model.get_submodule(name)
        if compile_mode is not None:  # per block, in place, before sharding (torchtitan's order)
            unit.compile(mode=None if compile_mode == "default" else compile_mode)
        fully_shard(unit, mp_policy=blocks, reshard_after_forward=reshard_after_forward, offload_policy=offload)
        unit.register_forward_hook(_own_output, prepend=True)  # before FSDP2's own post-forward hook
    fully_shard(model, mp_policy=blocks, reshard_after_forward=reshard_after_forward, offload_policy=offload)
    return model


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered copy: the next forward gathers the shards as they are now (after a swap).
    The root keeps its parameters gathered after an eval forward, which has no backward to free them."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def gradient_sync(accelerator, model: torch.nn.Module, sync: bool):
    """Inner batches of an update skip the gradient reduction (DDP's all-reduce, FSDP2's reduce-scatter):
    it runs once, on the update's last backward."""
    if not hasattr(model, "set_requires_gradient_sync"):  # per batch: an attribute, not an import (FSDPModule has it)
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view of the sharded parameter), or the tensor itself. Asked per gradient each
    step: DTensor is told by its method, so a DDP run never imports torch.distributed.tensor (0.8 s here)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the whole state dict on the main process as CPU copies ({} elsewhere), gathered once."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


# Updates that are elementwise, so each shard's step is the whole tensor's step restricted to it.
# LAMB, LARS, AdamP, Adafactor, NovoGrad, MARS, Muon and the like take a norm or a shape per tensor.
ELEMENTWISE_OPTIMIZERS = ("sgd", "sgdw", "momentum", "nesterov", "adam", "adamw", "nadam", "nadamw", "radam", "adamax",
                          "adagrad", "adadelta", "rmsprop", "rmsproptf", "lion", "adan", "laprop", "adabelief")


def fsdp_refusals(recipe) -> list[str]:
    """Recipe values FSDP2 cannot run, each as one line (validation, before any process starts)."""
    errors = []
    name = recipe.optimizer.name.lower()
    if name not in ELEMENTWISE_OPTIMIZERS:
        errors.append(f"optimizer.name = {recipe.optimizer.name!r}: not under backend.type = 'fsdp', which holds each "
                      f"parameter as shards and steps them apart (an update that takes a norm or shape per tensor would "
                      f"see a shard); choose one of {', '.join(ELEMENTWISE_OPTIMIZERS)}, or ddp/deepspeed")
    if recipe.optimizer.clip_grad is not None and recipe.optimizer.clip_mode == "agc":
        errors.append("optimizer.clip_mode = 'agc': not under backend.type = 'fsdp' (a unit-wise norm of a sharded "
                      "vector sees one shard); use 'norm' (FSDP2 takes the norm over every shard) or 'value'")
    if recipe.model.channels_last:
        errors.append("model.channels_last = True: not under backend.type = 'fsdp'; torch 2.15's fully_shard refuses "
                      "NHWC (non-contiguous) parameters")
    if recipe.checkpoint.engine_copy:
        errors.append("checkpoint.engine_copy = True: DeepSpeed only; an FSDP2 checkpoint's dcp/ folder is already "
                      "torch.distributed.checkpoint's own format")
    return errors
