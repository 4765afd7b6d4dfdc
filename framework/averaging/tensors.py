"""fp32 running averages of a list of tensors, updated with multi-tensor (foreach) lerps.

The weight of each update is computed on the host from a Python counter, so an update
never waits for the device. With `offload`, the averages live in CPU memory: sources are
staged into pinned buffers with an async copy, and the CPU lerp of one update runs at the
next update (or `flush`), when that copy has long finished.
"""

from __future__ import annotations

import torch


class AveragedTensors:
    def __init__(self, sources: list[torch.Tensor], offload: bool = False):
        device = torch.device("cpu") if offload else sources[0].device
        self.avg = [s.detach().to(device=device, dtype=torch.float32, copy=True) for s in sources]
        self._staged = offload and sources[0].device.type == "cuda"
        self._staging = [torch.empty_like(a).pin_memory() for a in self.avg] if self._staged else None
        self._pending: tuple[torch.cuda.Event, float] | None = None

    def lerp_(self, sources: list[torch.Tensor], weight: float) -> None:
        """avg += weight * (source - avg), for every tensor at once."""
        if self._staged:
            self.flush()
            torch._foreach_copy_(self._staging, [s.detach().float() for s in sources], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (event, weight)
            return
        src = [s.detach() if s.dtype == torch.float32 else s.detach().float() for s in sources]
        if src[0].device != self.avg[0].device:
            src = [s.to(self.avg[0].device) for s in src]
        torch._foreach_lerp_(self.avg, src, weight)

    def flush(self) -> None:
        if self._pending is not None:
            event, weight = self._pending
            event.synchronize()
            torch._foreach_lerp_(self.avg, self._staging, weight)
            self._pending = None

    def tensors(self) -> list[torch.Tensor]:
        self.flush()
        return self.avg

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.avg)

    def state_dict(self) -> dict:
        return {f"t{i}": a for i, a in enumerate(self.tensors())}

    def load_state_dict(self, state: dict) -> None:
        for i, a in enumerate(self.avg):
            a.copy_(state[f"t{i}"])
