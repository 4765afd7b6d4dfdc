"""`bnswa eval WEIGHTS_OR_FOLDER RECIPE [overrides] [--recompute-bn] [--num-processes N]`.

Evaluates saved weights on the recipe's validation data, every image counted once across processes:
a model folder (`model_online/`, `model_averaged/`, ... or any folder timm loads as `local-dir:`; the
folder's config gives the architecture and the preprocessing, unless the recipe sets `data.mean`, ...),
or a weights file of the recipe's `model` (safetensors or a `weights_only` torch file). With
`--recompute-bn` the BN statistics are first recomputed on the recipe's training data by the pass
training uses (`bn.recompute_batches`, `bn.recompute_inputs`, `bn.mode`), identical on every process.

The recipe's process group, precision and BN mode apply. The weights are whole (an export is), so the
model runs whole on each process: a sharding engine (DeepSpeed ZeRO) has nothing to shard for inference.
Bad input is one line, exit 2, before any launch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

USAGE = "usage: bnswa eval WEIGHTS_OR_FOLDER RECIPE.yaml [key=value ...] [--recompute-bn] [--num-processes N]"
FOLDER_FILES = ("config.json", "model.safetensors")


def split_args(argv: list[str]) -> tuple[str | None, bool, list[str]]:
    """(weights, --recompute-bn, the recipe and its overrides)."""
    recompute = "--recompute-bn" in argv
    rest = [a for a in argv if a != "--recompute-bn"]
    return (rest[0] if rest else None), recompute, rest[1:]


def _meta_model(path: Path, recipe) -> tuple[torch.nn.Module, Path]:
    """The model the weights are for, built on the meta device, and the weights file."""
    import timm

    from framework.training.models import build_plain

    with torch.device("meta"):
        if path.is_dir():
            cfg = json.loads((path / "config.json").read_text())
            return timm.create_model(cfg["architecture"], pretrained=False, **cfg.get("model_args", {})), path / FOLDER_FILES[1]
        return build_plain(recipe.model, recipe.data.image_size), path


def check_weights(weights: str, recipe) -> list[str]:
    """One line per problem: the path, what it holds, whether its tensors fit the model and the recipe's classes."""
    from timm.models import load_state_dict

    path = Path(weights)
    if not path.exists():
        return [f"weights = {weights!r}: no such file or folder"]
    if path.is_dir():
        missing = [name for name in FOLDER_FILES if not (path / name).is_file()]
        if missing:
            return [f"weights = {weights!r}: a model folder holds {' and '.join(FOLDER_FILES)} (what bnswa train exports "
                    f"as model_online/, model_averaged/); missing: {', '.join(missing)}"]
    try:
        model, file = _meta_model(path, recipe)
        state = load_state_dict(str(file), use_ema=False, weights_only=True)
    except Exception as err:  # a bad config.json, an unknown architecture, a file that is not weights
        return [f"weights = {weights!r}: cannot be read as timm weights ({type(err).__name__}: {str(err)[:200]})"]
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or extra or shapes:
        parts = [f"missing {', '.join(missing[:3])}" if missing else "", f"unexpected {', '.join(extra[:3])}" if extra else "",
                 "; ".join(shapes[:3])]
        name = type(model).__name__ if path.is_dir() else recipe.model.name
        return [f"weights = {weights!r}: does not fit {name} ({'; '.join(p for p in parts if p)})"]
    if path.is_dir() and model.num_classes != recipe.model.num_classes:
        return [f"model.num_classes = {recipe.model.num_classes}: the folder's model has {model.num_classes} classes; "
                f"set model.num_classes={model.num_classes}"]
    return []


def _load(path: Path, recipe) -> tuple[torch.nn.Module, bool]:
    """(model with the weights, whether its preprocessing comes from a folder's config)."""
    import timm
    from timm.models import load_state_dict

    from framework.training.models import build_plain

    if path.is_dir():
        return timm.create_model(f"local-dir:{path.resolve()}", pretrained=True), True
    model = build_plain(recipe.model, recipe.data.image_size)
    model.load_state_dict(load_state_dict(str(path), use_ema=False, weights_only=True), strict=True)
    return model, False


def evaluate_saved(weights: str, recipe, recompute: bool) -> dict:
    """On every process of the launch; returns the results (the same on every process)."""
    from accelerate.utils import set_seed

    from framework.bn import BN_MODES, bn_buffers
    from framework.bn.inputs import create_pass_inputs
    from framework.bn.recompute import recompute_bn_stats
    from framework.data.device import create_device_batches
    from framework.data.loaders import create_datasets, create_loaders, resolve_run_pipeline
    from framework.data.sampling import seed_process_streams
    from framework.training.amp import create_precision
    from framework.training.builders import create_accelerator
    from framework.training.evaluation import evaluate, harmonized_bn

    backend = dataclasses.replace(recipe.backend, type="ddp")  # the process group and precision; nothing to shard
    accelerator, precision = create_accelerator(backend, recipe.data.batch_size, None, recipe.faults.collective_timeout_s)
    device, cuda = accelerator.device, accelerator.device.type == "cuda"
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(recipe.seed)
    model, from_folder = _load(Path(weights), recipe)
    bn_mode = BN_MODES[recipe.bn.mode]()
    model = bn_mode.convert(model, cuda).to(device)
    seed_process_streams(recipe.seed, rank)
    amp = create_precision(precision, None, device, 1.0, 1)
    num_classes, in_chans = model.num_classes, recipe.model.in_chans
    pipeline = resolve_run_pipeline(recipe.data, model, in_chans, from_folder)
    on_device = create_device_batches(recipe.data, pipeline.mean, pipeline.std, device) if cuda and recipe.data.prefetcher else None
    train_ds, val_ds = create_datasets(recipe.data, model, num_classes, in_chans, recipe.seed, pretrained=from_folder,
                                       device_side=on_device is not None, pipeline=pipeline)
    loaders = create_loaders(recipe.data, train_ds, val_ds, rank, world, recipe.seed, pin_memory=cuda, on_device=on_device)
    bn = "as saved"
    if recompute:
        loaders.train_sampler.set_epoch(0)
        inputs = create_pass_inputs(recipe, model, loaders.train, lambda: 0, rank, world, cuda, on_device)
        used = recompute_bn_stats(model, inputs(), recipe.bn.recompute_batches, device, amp.autocast)
        bn = f"recomputed ({used} batches per process, {recipe.bn.recompute_inputs} inputs)"
    with harmonized_bn(bn_mode, bn_buffers(model)):
        ev = evaluate(model, loaders.val, device, num_classes, amp.autocast)
    return {"weights": str(weights), "bn": bn, **{k: ev[k] for k in ("top1", "top5", "loss", "images")},
            "world_size": world, "precision": precision}


def eval_main(argv: list[str]) -> int:
    """The front door: check everything here (one line each, exit 2), then launch `framework/entry/eval.py`."""
    from framework.distributed.launcher import _pop_option, exec_launch, plan_launch
    from framework.recipe.cli import USER_ERROR, load_or_exit
    from framework.recipe.errors import print_errors

    num_processes, argv = _pop_option(argv, "--num-processes")
    weights, _, recipe_argv = split_args(argv)
    if weights is None or not recipe_argv or weights.startswith("-") or "=" in weights:
        print_errors([USAGE])
        return USER_ERROR
    launch = plan_launch(num_processes)
    if launch is None:
        return USER_ERROR
    recipe = load_or_exit(recipe_argv, world_size=launch[0])
    errors = check_weights(weights, recipe)
    if errors:
        print_errors(errors)
        return USER_ERROR
    return exec_launch("eval.py", argv, launch)
