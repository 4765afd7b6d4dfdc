"""With CUDA (`data.prefetcher`, timm's flag): the CPU decodes and crops only; the device does the rest.

Loader workers hand over uint8 batches (timm's transforms with `use_prefetcher=True` stop at a uint8
tensor), in pinned memory. `DeviceBatches` copies each batch to the device with `non_blocking` on a
side stream, one batch ahead of the step, then normalises it there and applies random erasing to
training batches (timm's `RandomErasing` on the device), as timm's `PrefetchLoader` does: a quarter
of the bytes cross the bus, and the CPU's share per image shrinks. channels_last inputs come from the
model's own pre-forward hook (framework/training/speed.py), on the device too. Without CUDA the loaders
are used as they are: normalisation and erasing stay in the CPU transform.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from framework.recipe.schema import DataConfig


class DeviceBatches:
    """Iterates `loader`'s (uint8 images, targets) as normalised float images on `device`."""

    def __init__(self, loader, device: torch.device, mean, std, erasing=None):
        self.loader, self.device, self.erasing = loader, device, erasing
        shape = (1, len(mean), 1, 1)
        self.mean = torch.tensor([255.0 * m for m in mean], device=device).view(shape)
        self.std = torch.tensor([255.0 * s for s in std], device=device).view(shape)

    def __len__(self) -> int:
        return len(self.loader)

    def _prepare(self, images: torch.Tensor, targets: torch.Tensor):
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:  # synthetic data arrives normalised already
            images = images.float().sub_(self.mean).div_(self.std)
            if self.erasing is not None:
                images = self.erasing(images)
        return images, targets

    def __iter__(self):
        if self.device.type != "cuda":
            yield from (self._prepare(*batch) for batch in self.loader)
            return
        stream, current = torch.cuda.Stream(self.device), None
        for batch in self.loader:
            with torch.cuda.stream(stream):  # the next batch's copy and normalisation overlap this step
                upcoming = self._prepare(*batch)
            if current is not None:
                yield current
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t in upcoming:
                t.record_stream(torch.cuda.current_stream(self.device))
            current = upcoming
        if current is not None:
            yield current


def create_device_batches(cfg: DataConfig, mean, std, device: torch.device) -> Callable:
    """`wrap(loader, train)`: the loader's batches prepared on the device (training batches also erased)."""
    def wrap(loader, train: bool) -> DeviceBatches:
        erasing = None
        if train and cfg.augment.re_prob > 0:
            from timm.data.random_erasing import RandomErasing

            a = cfg.augment
            erasing = RandomErasing(a.re_prob, mode=a.re_mode, max_count=a.re_count, device=device)
        return DeviceBatches(loader, device, mean, std, erasing)

    return wrap
