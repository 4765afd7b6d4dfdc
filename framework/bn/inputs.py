"""`bn.recompute_inputs`: which images the recompute pass normalises.

- `train`: the training loader's batches, through the train transform (crops, flips, RandAugment,
  random erasing), unmixed.
- `mixed`: those batches mixed as training mixes them, while training mixes (up to
  `mixup.off_epoch`). The draws come from a stream of the pass's own, restarted for every pass,
  so training's Mixup draws are untouched and each pass mixes alike.
- `eval`: the training images through the evaluation transform (resize and centre crop, no
  augmentation), which is what the evaluated images look like.

Training normalises mixed, augmented images and evaluation clean ones. Measured on the digits and
Fashion-MNIST (`studies/measure_recompute_inputs.py`, docs/RESULTS.md), no kind beat another beyond
the noise (`mixed` was never better); the default, `train`, needs no second loader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

RECOMPUTE_INPUTS = ("train", "mixed", "eval")
PASS_STREAM_OFFSET = 104729  # the pass's Mixup stream, apart from training's (framework/data/mixup.py)


def create_recompute_inputs(kind: str, train_loader, eval_loader, make_mixup: Callable | None,
                            epoch: Callable[[], int]) -> Callable[[], Iterable]:
    """A function giving the batches of one recompute pass. `make_mixup()` builds a fresh MixupStream
    for the pass; `epoch()` is the epoch being trained (Mixup stops at its off_epoch)."""
    if kind == "eval":
        return lambda: eval_loader
    if kind == "mixed" and make_mixup is not None:
        def mixed():
            stream, e = make_mixup(), epoch()
            return (stream(images, targets, e) for images, targets in train_loader)

        return mixed
    return lambda: train_loader


def create_pass_inputs(recipe, module, train_loader, epoch: Callable[[], int], rank: int, world: int,
                       pin_memory: bool, on_device: Callable | None = None) -> Callable[[], Iterable]:
    """The recipe's choice, built: the eval-transform loader and the pass's Mixup streams as needed.
    `on_device(loader, train)`: with CUDA's prefetcher, how loaders' uint8 batches reach the device."""
    from framework.data.loaders import create_datasets, create_plain_train_loader
    from framework.data.mixup import create_mixup

    kind, m = recipe.bn.recompute_inputs, recipe.model
    eval_loader = None
    if kind == "eval":
        train_eval = create_datasets(recipe.data, module, m.num_classes, m.in_chans, recipe.seed,
                                     pretrained=m.pretrained or m.pretrained_file is not None, train_transform="eval",
                                     device_side=on_device is not None)[0]
        eval_loader = create_plain_train_loader(recipe.data, train_eval, rank, world, recipe.seed, pin_memory)
        eval_loader = on_device(eval_loader, False) if on_device is not None else eval_loader

    def make_mixup():
        return create_mixup(recipe.mixup, recipe.loss, m.num_classes, recipe.seed + PASS_STREAM_OFFSET, rank)

    return create_recompute_inputs(kind, train_loader, eval_loader, make_mixup if recipe.mixup.active else None, epoch)


def check_recompute_inputs(kind: str, mixup_active: bool, errors: list[str]) -> None:
    if kind == "mixed" and not mixup_active:
        errors.append("bn.recompute_inputs = 'mixed': training mixes nothing (mixup.mixup_alpha and cutmix_alpha are 0); "
                      "use 'train' or 'eval'")
