"""Model files that timm loads alone: `timm.create_model(name, num_classes=..., checkpoint_path=FILE)`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from framework.checkpoint.paths import temp_beside


def detached_state_dict(accelerator, model) -> dict[str, torch.Tensor]:
    """The full state dict as CPU copies, taken now: a plain state_dict references the live tensors,
    which a swap context restores on exit. Call on every process (ZeRO-3 and FSDP2 gather onto the main one)."""
    from framework.distributed.fsdp import full_state_dict, is_fsdp, reshard

    if is_fsdp(model):
        reshard(model)  # gathered copies from an eval forward could predate a swap
        return full_state_dict(model)
    state = accelerator.get_state_dict(model)  # None on the other processes under ZeRO-3
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()} if state is not None else {}


def save_state_dict(state: dict[str, torch.Tensor], path: Path) -> None:
    """A state dict as safetensors, written under a temporary name and renamed."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in state.items()}
    tmp = temp_beside(path)
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
