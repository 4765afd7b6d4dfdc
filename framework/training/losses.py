"""The training loss from the recipe's `loss` section, through timm.loss where timm has it.

With Mixup on, targets are soft (label smoothing is applied by Mixup), as in timm's train.py.
Evaluation does not use this: it is plain cross-entropy on hard labels (training/evaluation.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from framework.recipe.schema import LossConfig


class CrossEntropy(torch.nn.Module):
    """Cross-entropy on hard labels (with label smoothing) or on soft targets, as torch's own takes both."""

    def __init__(self, smoothing: float):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        soft = targets.dim() == logits.dim()
        return F.cross_entropy(logits, targets, label_smoothing=0.0 if soft else self.smoothing)


def create_loss(cfg: LossConfig, mixup_active: bool) -> torch.nn.Module:
    from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

    smoothing = 0.0 if mixup_active else cfg.smoothing  # Mixup smooths the targets it makes
    if cfg.name == "bce":
        return BinaryCrossEntropy(smoothing=smoothing, target_threshold=cfg.bce_target_thresh)
    if cfg.name == "soft_ce":
        return SoftTargetCrossEntropy()
    return CrossEntropy(smoothing)


def check_loss(cfg: LossConfig, mixup_active: bool, errors: list[str]) -> None:
    if cfg.name == "soft_ce" and not mixup_active:
        errors.append("loss.name = 'soft_ce': needs the soft targets of mixup or cutmix (mixup.mixup_alpha or "
                      "mixup.cutmix_alpha > 0); use 'ce', which takes label smoothing")
    if cfg.bce_target_thresh is not None and cfg.name != "bce":
        errors.append(f"loss.bce_target_thresh = {cfg.bce_target_thresh}: only with loss.name = 'bce' (got {cfg.name!r})")
