"""Model files that timm loads alone: `timm.create_model(name, num_classes=..., checkpoint_path=FILE)`."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_state_dict(state: dict[str, torch.Tensor], path: Path) -> None:
    """A state dict as safetensors, written under a temporary name and renamed."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
