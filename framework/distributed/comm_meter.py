"""Count the bytes a block of code sends through torch.distributed collectives (measured, not assumed).

Patches the collective functions of `torch.distributed` for the duration of the block; DeepSpeed's
comm layer calls them through the same module attributes, so its traffic is counted too.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "send", "recv",
                "isend", "irecv", "all_gather_object", "broadcast_object_list")


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


class CommMeter:
    def __init__(self):
        self.bytes = 0
        self.calls = 0

    @contextlib.contextmanager
    def measure(self):
        originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

        def counting(name, fn):
            def wrapper(*args, **kwargs):
                self.calls += 1
                # the first tensor argument is what this rank sends (or receives into, for a gather)
                self.bytes += _nbytes(args[0]) if args else _nbytes(next(iter(kwargs.values()), None))
                return fn(*args, **kwargs)
            return wrapper

        for name, fn in originals.items():
            setattr(dist, name, counting(name, fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
