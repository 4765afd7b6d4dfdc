"""channels_last, gradient checkpointing and torch.compile, applied after the BN conversion.

Each keeps the module and its tensors where they are, so BN buffers, averaging views and
checkpoints see the same objects: the channels_last copy happens once before training, and
`nn.Module.compile` compiles in place (state_dict keys unchanged, no `_orig_mod.` prefix).
"""

from __future__ import annotations

import torch


def _to_channels_last(module, args):
    x = args[0]
    return (x.contiguous(memory_format=torch.channels_last), *args[1:]) if x.dim() == 4 else None


def apply_channels_last(model: torch.nn.Module) -> None:
    """NHWC weights, and every 4-D input made NHWC at the model's door: training, evaluation and the
    BN recompute pass all go through it."""
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(_to_channels_last)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1  # the autograd engine is running: a checkpoint's recompute


def _freeze_stats(module, args):
    if module.training and module.track_running_stats and _in_backward():
        module._recompute_saved = (module.momentum, module.num_batches_tracked.clone())
        module.momentum = 0.0  # running = (1 - 0) * running: unchanged


def _thaw_stats(module, args, output):
    saved = getattr(module, "_recompute_saved", None)
    if saved is not None:
        module.momentum = saved[0]
        module.num_batches_tracked.copy_(saved[1])
        del module._recompute_saved


def enable_grad_checkpointing(model: torch.nn.Module) -> None:
    """timm's checkpointing reruns each block's forward in backward; its BN layers would move their running
    statistics a second time there. Hooks hold them still during the rerun: they move once per step."""
    model.set_grad_checkpointing(True)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(_freeze_stats)
            m.register_forward_hook(_thaw_stats)


def apply_speed_options(model: torch.nn.Module, channels_last: bool, grad_checkpointing: bool, compile_mode: str | None) -> None:
    if channels_last:
        apply_channels_last(model)
    if grad_checkpointing:
        enable_grad_checkpointing(model)
    if compile_mode is not None:
        model.compile(mode=None if compile_mode == "default" else compile_mode)


def apply_model_options(model: torch.nn.Module, cfg, backend, precision: str) -> bool:
    """The recipe's speed options, then under FSDP2 the sharding (framework/distributed/fsdp.py), which compiles
    each unit before sharding it instead of the whole model. Returns whether the model is FSDP2's."""
    compile_mode = cfg.compile_mode if cfg.compile else None
    fsdp = backend.type == "fsdp"
    apply_speed_options(model, cfg.channels_last, cfg.grad_checkpointing, None if fsdp else compile_mode)
    if fsdp:
        from framework.distributed.fsdp import shard_model

        shard_model(model, precision, backend.reshard_after_forward, backend.offload_params, compile_mode)
    return fsdp
