"""timm's Mixup/CutMix on a stream of its own.

timm.data.Mixup draws from NumPy's global generator. Here each call swaps in this process's own
NumPy state, seeded by (seed, rank) and saved in the process's checkpoint, so a resumed run draws
the same mixes and the draws do not depend on anything else that uses NumPy (augmentation in the
main process, say).
"""

from __future__ import annotations

import numpy as np
import torch

from framework.recipe.schema import LossConfig, MixupConfig

STREAM_OFFSET = 7919  # keeps this stream apart from the process's own (seed + rank) streams


class MixupStream:
    def __init__(self, cfg: MixupConfig, loss: LossConfig, num_classes: int, seed: int, rank: int):
        from timm.data import Mixup

        self.off_epoch = cfg.off_epoch
        self.mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, cutmix_minmax=cfg.cutmix_minmax,
                           prob=cfg.prob, switch_prob=cfg.switch_prob, mode=cfg.mode, label_smoothing=loss.smoothing,
                           num_classes=num_classes)
        self.numpy_state = np.random.RandomState((seed + rank + STREAM_OFFSET) % 2**32).get_state()

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images and soft targets; after `off_epoch`, the images as they are with (smoothed) one-hot targets."""
        self.mixup.mixup_enabled = self.off_epoch is None or epoch < self.off_epoch
        outer = np.random.get_state()
        np.random.set_state(self.numpy_state)
        try:
            return self.mixup(images, targets)
        finally:
            self.numpy_state = np.random.get_state()
            np.random.set_state(outer)

    def state_dict(self) -> dict:
        return {"numpy": self.numpy_state}

    def load_state_dict(self, state: dict) -> None:
        self.numpy_state = tuple(state["numpy"])


def create_mixup(cfg: MixupConfig, loss: LossConfig, num_classes: int, seed: int, rank: int) -> MixupStream | None:
    return MixupStream(cfg, loss, num_classes, seed, rank) if cfg.active else None


def check_mixup(cfg: MixupConfig, batch_size: int, epochs: int, errors: list[str]) -> None:
    if not cfg.active:
        return
    if batch_size % 2:
        errors.append(f"data.batch_size = {batch_size}: mixup and cutmix need an even batch per process (they pair "
                      "each image with the batch flipped)")
    if cfg.cutmix_minmax is not None and (len(cfg.cutmix_minmax) != 2 or not 0 < cfg.cutmix_minmax[0] < cfg.cutmix_minmax[1] <= 1):
        errors.append(f"mixup.cutmix_minmax = {cfg.cutmix_minmax!r}: expected [min, max] with 0 < min < max <= 1")
    if cfg.off_epoch is not None and cfg.off_epoch >= epochs:
        errors.append(f"mixup.off_epoch = {cfg.off_epoch}: mixing would never stop; must be < schedule.epochs ({epochs}) "
                      "or null")
