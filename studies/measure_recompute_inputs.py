"""Measure `bn.recompute_inputs` (and Mixup's `off_epoch` against averaging's start) on real data.

Trains SWA runs with Mixup/CutMix and random erasing (a DeiT-style recipe) on the bundled digits or
Fashion-MNIST, with mixing to the end or switched off where averaging starts, over seeds (finished
runs are skipped). Then, for each run's exported averaged weights, recomputes the BN statistics
over the whole training set from each kind of input (train, mixed, eval: framework/bn/inputs.py)
and evaluates them on the validation set, one process. The same weights under three kinds of
statistics: differences are paired, with the 95% Student-t rule of framework/reporting/reading.py.

  python studies/measure_recompute_inputs.py [--dataset digits|fashion_mnist] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIXING = ["mixup.mixup_alpha=0.8", "mixup.cutmix_alpha=1.0", "loss.name=soft_ce", "data.augment.re_prob=0.25",
          "averaging.strategy=swa", "logging.wandb.mode=disabled", "resume=auto"]
SETUPS = {  # recipe, overrides, the epoch averaging starts (and mixing stops, in the `off` variant)
    "digits": ("recipes/quickstart.yaml", [], 4),
    "fashion_mnist": ("recipes/fashion_mnist.yaml", ["data.train_subset=24000"], 3),
}
VARIANTS = ("to_end", "off_at_start")


def rebuild(out: Path, overrides=()):
    """A finished run's recipe, its exported averaged weights in a fresh model, and one process's loaders."""
    import torch
    from accelerate.utils import set_seed
    from safetensors.torch import load_file

    from framework.data.loaders import create_datasets, create_loaders
    from framework.recipe.resolve import resolve_recipe
    from framework.training.models import create_model

    recipe = resolve_recipe(out / "recipe.yaml", ["resume=never", f"output.dir={out}-measure", *overrides])
    set_seed(recipe.seed)
    model = create_model(recipe.model, recipe.data.image_size)[0]
    model.load_state_dict(load_file(out / "model_averaged.safetensors"))
    m = recipe.model
    train_ds, val_ds = create_datasets(recipe.data, model, m.num_classes, m.in_chans, recipe.seed)
    loaders = create_loaders(recipe.data, train_ds, val_ds, 0, 1, recipe.seed, pin_memory=False)
    loaders.train_sampler.set_epoch(recipe.schedule.epochs - 1)
    return recipe, model, loaders, torch.device("cpu")


def top1_after_pass(model, batches, max_batches, loaders, num_classes: int, device) -> float:
    """Recompute the BN statistics from `batches` (at most `max_batches`), then evaluate."""
    import contextlib

    from framework.bn.recompute import recompute_bn_stats
    from framework.training.evaluation import evaluate

    recompute_bn_stats(model, batches, max_batches, device)
    return evaluate(model, loaders.val, device, num_classes, contextlib.nullcontext)["top1"]


def measure_run(out: Path) -> dict[str, float]:
    """Top-1 of the run's averaged weights with BN statistics from each kind of input, and the live top-1."""
    import json

    from framework.bn.inputs import RECOMPUTE_INPUTS, create_pass_inputs

    recipe, model, loaders, device = rebuild(out)
    last = recipe.schedule.epochs - 1
    result = {"live": json.loads((out / "summary.json").read_text())["eval"]["online"]["top1"]}
    for kind in RECOMPUTE_INPUTS:
        if kind == "mixed" and not recipe.mixup.active:
            continue
        r = dataclasses.replace(recipe, bn=dataclasses.replace(recipe.bn, recompute_inputs=kind))
        batches = create_pass_inputs(r, model, loaders.train, lambda: last, 0, 1, pin_memory=False)()
        result[kind] = top1_after_pass(model, batches, None, loaders, recipe.model.num_classes, device)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=list(SETUPS), default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    from run_grid import run_one  # studies/ is this script's own folder

    from framework.reporting.reading import diff

    recipe, extra, start = SETUPS[args.dataset]
    out = args.out or ROOT / "runs" / f"recompute-inputs-{args.dataset}"
    results: dict[str, list[dict]] = {}
    for variant in VARIANTS:
        off = [f"mixup.off_epoch={start}"] if variant == "off_at_start" else []
        for seed in args.seeds:
            run = out / f"{variant}-seed{seed}"
            seconds, ran = run_one(recipe, [*MIXING, *extra, f"averaging.start_epoch={start}", *off, f"seed={seed}"],
                                   run, args.nproc)
            print(f"{run.name}: {'trained in' if ran else 'done before,'} {seconds:.0f} s", flush=True)
            results.setdefault(variant, []).append(measure_run(run))
    kinds = [k for k in ("train", "mixed", "eval") if all(k in r for rs in results.values() for r in rs)]
    print(f"\n{args.dataset}, SWA from epoch {start}, Mixup 0.8 / CutMix 1.0, random erasing 0.25, seeds {args.seeds}; "
          "top-1 % (mean ± std), differences paired on the same weights")
    print("| mixing | live | " + " | ".join(f"averaged, `{k}` inputs" for k in kinds) + " | "
          + " | ".join(f"`{k}` - `train`" for k in kinds if k != "train") + " |")
    print("|---" * (2 + 2 * len(kinds) - 1) + "|")
    for variant, rs in results.items():
        cells = [f"{statistics.fmean(r[k] for r in rs):.2f} ± {statistics.stdev(r[k] for r in rs) if len(rs) > 1 else 0:.2f}"
                 for k in ("live", *kinds)]
        diffs = [str(diff([r[k] - r["train"] for r in rs])) for k in kinds if k != "train"]
        print(f"| {variant.replace('_', ' ')} | " + " | ".join(cells + diffs) + " |")
    for k in ("live", "train"):
        d = diff([b[k] - a[k] for a, b in zip(results["to_end"], results["off_at_start"], strict=True)])
        print(f"off at start - to end, {k} top-1 (same seed): {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
