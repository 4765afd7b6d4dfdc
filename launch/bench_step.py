"""Benchmark: the framework's training step against a minimal hand-written Accelerate loop.

Same model architecture and initial weights, same data loader and batch size, alternating
in one run (the order flips every round), so machine noise hits both alike. Prints the
throughput ratio framework / hand-written (goal: >= 0.97).

  accelerate launch --config_file accelerate_config.yaml launch/bench_step.py recipes/bench_synthetic.yaml [--rounds 6] [--steps 20] [overrides]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hand_written_steps(model, optimizer, accelerator, loader, steps: int, autocast, scaler) -> float:
    """The loop every Accelerate and torch.amp tutorial shows, nothing more. Returns seconds."""
    import torch.nn.functional as F

    from framework.training.loop import _sync

    model.train()
    _sync(accelerator.device)
    start = time.perf_counter()
    for i, (images, targets) in enumerate(loader):
        if i == steps:
            break
        images, targets = images.to(accelerator.device), targets.to(accelerator.device)
        with autocast():
            loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            accelerator.backward(loss)
            optimizer.step()
        else:
            accelerator.backward(scaler.scale(loss))
            scaler.step(optimizer)
            scaler.update()
    _sync(accelerator.device)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed block")
    args, rest = parser.parse_known_args()

    from framework.recipe.cli import load_or_exit

    recipe = load_or_exit(rest, quiet_rank=os.environ.get("LOCAL_RANK", "0") != "0")

    import copy

    import torch.distributed as dist
    from accelerate.utils import set_seed

    from framework.averaging.views import create_view
    from framework.data.loaders import create_datasets, create_loaders
    from framework.distributed.faults import StepControl
    from framework.training.amp import create_precision
    from framework.training.builders import create_accelerator, create_optimizer, create_scheduler
    from framework.training.loop import TrainState, create_averaging, train_one_epoch
    from framework.training.models import create_model

    accelerator, precision = create_accelerator(recipe.backend, recipe.data.batch_size, recipe.optimizer.clip_grad,
                                                recipe.faults.collective_timeout_s)
    set_seed(recipe.seed)
    ours, _ = create_model(recipe.model, recipe.data.image_size)
    theirs = copy.deepcopy(ours)
    train_ds, val_ds = create_datasets(recipe.data, ours, recipe.model.num_classes, recipe.model.in_chans, recipe.seed)
    loaders = create_loaders(recipe.data, train_ds, val_ds, accelerator.process_index, accelerator.num_processes,
                             recipe.seed, pin_memory=accelerator.device.type == "cuda")
    global_batch = recipe.data.batch_size * accelerator.num_processes
    opt_ours = create_optimizer(recipe.optimizer, ours, global_batch)
    opt_theirs = create_optimizer(recipe.optimizer, theirs, global_batch)
    ours, opt_ours, theirs, opt_theirs = accelerator.prepare(ours, opt_ours, theirs, opt_theirs)
    # the framework's step as training runs it: with the recipe's averaging and its BN sources listening
    view = create_view(accelerator, ours)
    averager = create_averaging(recipe, accelerator.unwrap_model(ours), view, len(loaders.train))[0]
    state = TrainState(ours, opt_ours, create_scheduler(recipe.schedule, opt_ours, len(loaders.train)), accelerator,
                       recipe.optimizer.clip_grad, next(accelerator.unwrap_model(ours).parameters()).dtype, averager,
                       len(loaders.train))
    engine, scale = ours if recipe.backend.type == "deepspeed" else None, recipe.backend.loss_scale
    state.amp = create_precision(precision, engine, accelerator.device, scale.init, scale.growth_interval)
    plain = create_precision(precision, None, accelerator.device, scale.init, scale.growth_interval)
    steps = min(args.steps, len(loaders.train))
    images_per_block = steps * recipe.data.batch_size * accelerator.num_processes

    control = StepControl(recipe.faults.nonfinite, recipe.faults.max_consecutive_skips, accelerator.device,
                          deferred=not state.amp.can_overflow)

    def run_ours() -> float:  # with the per-step agreement on stop requests and non-finite values
        return train_one_epoch(state, loaders.train, max_steps=steps, control=control)["seconds"]

    def run_unchecked() -> float:  # what the per-step agreement costs (shown, not the goal's figure)
        return train_one_epoch(state, loaders.train, max_steps=steps)["seconds"]

    def run_theirs() -> float:
        return hand_written_steps(theirs, opt_theirs, accelerator, loaders.train, steps, plain.autocast, plain.scaler)

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
        print(f"averaging {recipe.averaging.strategy} from step {averager.start_step if averager else '-'}, "
              f"{averager.n if averager else 0} updates timed in")
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
