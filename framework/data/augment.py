"""timm's augmentation policies (RandAugment, AutoAugment, AugMix), safe at every magnitude on this Pillow.

timm's posterize ops map some magnitudes to 0 bits kept, or fewer: `PosterizeIncreasing` at the top
magnitude (so `rand-m9-mstd0.5-inc1`, DeiT's policy, reaches it at random), `Posterize` (AutoAugment
`v0`) at the bottom, and both past it under `mmax`. Pillow up to 10 turned 0 bits into a black image,
as the TensorFlow original does; Pillow 11 and later raise `ValueError`, in a loader worker, hours into
a run. Pinning an old Pillow would hold back its security fixes, so the built transform's posterize
ops get `posterize` below, which keeps the policy's meaning: 0 bits or fewer is a black image.
Every other op of timm's is left as it is (tests/test_augment.py runs them all at the extremes).
"""

from __future__ import annotations

from PIL import Image, ImageOps


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Keep the `bits_to_keep` most significant bits; 0 or fewer keeps none (black), 8 or more all."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # every bit masked: black, in the image's own mode
    return ImageOps.posterize(img, bits_to_keep)


def _replacements() -> dict:
    from timm.data import auto_augment

    return {auto_augment.posterize: posterize}


def augment_ops(transform) -> list:
    """Every timm `AugmentOp` inside a transform: Compose, RandAugment, AutoAugment sub-policies, AugMix."""
    from timm.data.auto_augment import AugmentOp

    if isinstance(transform, AugmentOp):
        return [transform]
    if isinstance(transform, (list, tuple)):  # a Compose's list, AutoAugment's sub-policies
        return [op for child in transform for op in augment_ops(child)]
    children = (getattr(transform, attr, None) for attr in ("transforms", "ops", "policy"))
    return [op for c in children if isinstance(c, (list, tuple)) for op in augment_ops(c)]


def make_policies_safe(transform):
    """Swap in our version of each op whose timm version fails on some magnitude (see the module's note)."""
    safe = _replacements()
    for op in augment_ops(transform):
        op.aug_fn = safe.get(op.aug_fn, op.aug_fn)
    return transform
