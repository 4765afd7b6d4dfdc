"""Benchmark: the framework's training step against a minimal hand-written Accelerate loop.

Same model architecture and initial weights, same data loader and batch size, alternating
in one run (the order flips every round), so machine noise hits both alike. Prints the
throughput ratio framework / hand-written (goal: >= 0.97).

  accelerate launch --config_file accelerate_config.yaml benchmarks/bench_step.py recipes/bench_synthetic.yaml [--rounds 6] [--steps 20] [overrides]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hand_written_steps(model, optimizer, accelerator, loader, steps: int, autocast, scaler, loss_fn, mixup=None,
                       accumulate: int = 1, channels_last: bool = False) -> float:
    """The loop every Accelerate, torch.amp and timm tutorial shows, doing what the recipe asks (Mixup,
    gradient accumulation with DDP's no_sync, channels_last inputs) and nothing more. Returns seconds."""
    import contextlib

    import torch

    from framework.training.loop import _sync

    model.train()
    _sync(accelerator.device)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(loader):
        if i == steps:
            break
        images, targets = images.to(accelerator.device), targets.to(accelerator.device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            images, targets = mixup(images, targets)
        last = (i + 1) % accumulate == 0
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2's switch for its reduce-scatter
            model.set_requires_gradient_sync(last)
        with contextlib.nullcontext() if last or hasattr(model, "set_requires_gradient_sync") else accelerator.no_sync(model):
            with autocast():
                loss = loss_fn(model(images), targets) / accumulate
            accelerator.backward(loss if scaler is None else scaler.scale(loss))
        if not last:
            continue
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
    _sync(accelerator.device)
    return time.perf_counter() - start


def hand_written_deepspeed_steps(engine, loader, steps: int, loss_fn, device) -> float:
    """DeepSpeed's own loop (its docs' `engine(x)`, `engine.backward`, `engine.step`; the engine counts the
    accumulation). Returns seconds."""
    from framework.training.loop import _sync

    engine.train()
    dtype = next(engine.module.parameters()).dtype
    _sync(device)
    start = time.perf_counter()
    for i, (images, targets) in enumerate(loader):
        if i == steps:
            break
        loss = loss_fn(engine(images.to(device, dtype)), targets.to(device))
        engine.backward(loss)
        engine.step()
    _sync(device)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed block")
    args, rest = parser.parse_known_args()

    from framework.recipe.cli import load_or_exit

    recipe = load_or_exit(rest, quiet_rank=os.environ.get("LOCAL_RANK", "0") != "0")

    import copy

    import torch
    import torch.distributed as dist
    from accelerate.utils import set_seed

    from framework.averaging.tracks import create_tracks
    from framework.averaging.views import create_view
    from framework.data.loaders import create_datasets, create_loaders
    from framework.data.mixup import create_mixup
    from framework.distributed.faults import StepControl
    from framework.training.amp import create_precision
    from framework.training.builders import (
        create_accelerator,
        create_grad_clipper,
        create_optimizer,
        create_scheduler,
    )
    from framework.training.loop import TrainState, train_one_epoch
    from framework.training.losses import create_loss
    from framework.training.models import create_model
    from framework.training.speed import apply_model_options

    accelerator, precision = create_accelerator(recipe.backend, recipe.data.batch_size, recipe.optimizer.clip_grad,
                                                recipe.faults.collective_timeout_s, recipe.optimizer.accumulate_steps)
    set_seed(recipe.seed)
    ours, _ = create_model(recipe.model, recipe.data.image_size)
    theirs = copy.deepcopy(ours)
    m = recipe.model
    fsdp = apply_model_options(ours.to(accelerator.device), m, recipe.backend, precision)  # as training does
    if m.channels_last:
        theirs = theirs.to(memory_format=torch.channels_last)
    if fsdp:  # the same FSDP2 units (one fully_shard per timm block), applied to the hand-written loop's copy
        from framework.distributed.fsdp import shard_model

        shard_model(theirs.to(accelerator.device), precision, recipe.backend.reshard_after_forward,
                    recipe.backend.offload_params, m.compile_mode if m.compile else None)
    train_ds, val_ds = create_datasets(recipe.data, ours, recipe.model.num_classes, recipe.model.in_chans, recipe.seed)
    loaders = create_loaders(recipe.data, train_ds, val_ds, accelerator.process_index, accelerator.num_processes,
                             recipe.seed, pin_memory=accelerator.device.type == "cuda")
    global_batch = recipe.data.batch_size * accelerator.num_processes
    opt_ours = create_optimizer(recipe.optimizer, ours, global_batch)
    opt_theirs = create_optimizer(recipe.optimizer, theirs, global_batch)
    deepspeed = recipe.backend.type == "deepspeed"
    if deepspeed:  # Accelerate takes one DeepSpeed model per accelerator: the hand-written side is DeepSpeed's own
        import deepspeed as ds

        from framework.training.builders import create_deepspeed_config

        ours, opt_ours = accelerator.prepare(ours, opt_ours)
        config = create_deepspeed_config(recipe.backend, recipe.data.batch_size, recipe.optimizer.clip_grad,
                                         recipe.optimizer.accumulate_steps)
        config.update({k: {**config[k], "enabled": precision == k} for k in ("bf16", "fp16") if k in config})
        config["zero_allow_untested_optimizer"] = True  # the recipe's timm optimizer, as Accelerate allows it
        theirs, opt_theirs, _, _ = ds.initialize(model=theirs, optimizer=opt_theirs, config=config)
    elif not fsdp:
        ours, opt_ours, theirs, opt_theirs = accelerator.prepare(ours, opt_ours, theirs, opt_theirs)
    # the framework's step as training runs it: with the recipe's averaging and its BN sources listening
    view = create_view(accelerator, ours)
    accumulate = recipe.optimizer.accumulate_steps
    updates = -(-len(loaders.train) // accumulate)
    tracks = create_tracks(recipe, accelerator.unwrap_model(ours), view, updates)[0]
    state = TrainState(ours, opt_ours, create_scheduler(recipe.schedule, opt_ours, updates), accelerator,
                       create_grad_clipper(recipe.optimizer, recipe.backend.type == "deepspeed"),
                       next(accelerator.unwrap_model(ours).parameters()).dtype, [t.averager for t in tracks], updates,
                       accumulate_steps=accumulate, loss_fn=create_loss(recipe.loss, recipe.mixup.active),
                       mixup=create_mixup(recipe.mixup, recipe.loss, m.num_classes, recipe.seed, accelerator.process_index))
    # theirs: timm's Mixup and loss as its train.py builds them, on the same settings
    their_mixup = create_mixup(recipe.mixup, recipe.loss, m.num_classes, recipe.seed + 1, accelerator.process_index)
    their_loss = create_loss(recipe.loss, recipe.mixup.active)
    engine, scale = ours if recipe.backend.type == "deepspeed" else None, recipe.backend.loss_scale
    state.amp = create_precision(precision, engine, accelerator.device, scale.init, scale.growth_interval, fsdp)
    plain = create_precision(precision, None, accelerator.device, scale.init, scale.growth_interval, fsdp)
    steps = min(args.steps, len(loaders.train))
    steps -= steps % accumulate  # whole updates only, in both loops
    images_per_block = steps * recipe.data.batch_size * accelerator.num_processes

    control = StepControl(recipe.faults.nonfinite, recipe.faults.max_consecutive_skips, accelerator.device,
                          deferred=not state.amp.can_overflow)

    def run_ours() -> float:  # with the per-step agreement on stop requests and non-finite values
        return train_one_epoch(state, loaders.train, max_steps=steps, control=control)["seconds"]

    def run_unchecked() -> float:  # what the per-step agreement costs (shown, not the goal's figure)
        return train_one_epoch(state, loaders.train, max_steps=steps)["seconds"]

    def run_theirs() -> float:
        if deepspeed:
            return hand_written_deepspeed_steps(theirs, loaders.train, steps, their_loss, accelerator.device)
        return hand_written_steps(theirs, opt_theirs, accelerator, loaders.train, steps, plain.autocast, plain.scaler,
                                  their_loss, their_mixup and their_mixup.mixup, accumulate, m.channels_last)

    run_ours(), run_unchecked(), run_theirs()  # warm-up: allocator, kernels, caches
    ratios, ours_ips, theirs_ips, unchecked_ips = [], [], [], []
    for r in range(args.rounds):
        order = (run_ours, run_unchecked, run_theirs) if r % 2 == 0 else (run_theirs, run_unchecked, run_ours)
        times = {fn: fn() for fn in order}
        # the slowest process sets the pace
        t_ours, t_unchecked, t_theirs = (
            accelerator.reduce(__import__("torch").tensor(times[f], device=accelerator.device), "max").item()
            for f in (run_ours, run_unchecked, run_theirs))
        ours_ips.append(images_per_block / t_ours)
        unchecked_ips.append(images_per_block / t_unchecked)
        theirs_ips.append(images_per_block / t_theirs)
        ratios.append(t_theirs / t_ours)
    if accelerator.is_main_process:
        print("averaging: " + (", ".join(f"{t.name} from step {t.averager.start_step}, {t.averager.n} updates timed in"
                                         for t in tracks) or "none"))
        extras = [f"{k} {v}" for k, v in (("mixup", recipe.mixup.active), ("loss", recipe.loss.name),
                                             ("accumulate_steps", accumulate), ("channels_last", m.channels_last))]
        print(", ".join(extras))
        print(f"model {recipe.model.name} ({precision}), data {recipe.data.source} {recipe.data.image_size}px, batch {recipe.data.batch_size}"
              f" x {accelerator.num_processes} processes on {accelerator.device.type}, {args.rounds} rounds x {steps} steps")
        print(f"framework     : {statistics.median(ours_ips):9.1f} images/s (median)")
        print(f"  (no checks) : {statistics.median(unchecked_ips):9.1f} images/s (median; without the per-step agreement)")
        print(f"hand-written  : {statistics.median(theirs_ips):9.1f} images/s (median)")
        print(f"ratio framework / hand-written: {statistics.median(ratios):.3f} (median of per-round ratios; "
              f"min {min(ratios):.3f}, max {max(ratios):.3f}; goal >= 0.97)")
    accelerator.wait_for_everyone()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
