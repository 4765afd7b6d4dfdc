"""Benchmark: shard-local averaging under ZeRO-3 or FSDP2 against gather-then-average.

Gather-then-average is the common recipe: `deepspeed.zero.GatheredParameters(params,
modifier_rank=0)` gathers every parameter, rank 0 lerps its full fp32 copy, and the exit
re-partitions (under FSDP2: `DTensor.full_tensor()` per parameter). Ours lerps each rank's fp32
master partition (FSDP2: local shard) in place. Both run on the same
engine, alternating (order flipped each round); bytes are measured by framework.distributed.comm_meter.

  accelerate launch --config_file accelerate_config.yaml benchmarks/bench_zero_averaging.py \
      recipes/quickstart.yaml backend.type=deepspeed backend.zero_stage=3 [--rounds 7] [--updates 10]
  (or backend.type=fsdp)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--updates", type=int, default=10)
    args, rest = parser.parse_known_args()

    from framework.recipe.cli import load_or_exit

    recipe = load_or_exit(rest, quiet_rank=os.environ.get("LOCAL_RANK", "0") != "0")
    fsdp = recipe.backend.type == "fsdp"
    if not fsdp and (recipe.backend.type != "deepspeed" or recipe.backend.zero_stage != 3):
        raise SystemExit("error: this benchmark needs backend.type=fsdp, or deepspeed with backend.zero_stage=3")

    import torch
    import torch.distributed as dist

    from framework.averaging import AVERAGERS, WeightAverager, create_rule
    from framework.averaging.views import create_view
    from framework.distributed.comm_meter import CommMeter
    from framework.training.builders import create_accelerator, create_optimizer

    accelerator, _ = create_accelerator(recipe.backend, recipe.data.batch_size, recipe.optimizer.clip_grad)
    from framework.training.models import create_model

    model, _ = create_model(recipe.model, recipe.data.image_size)
    if fsdp:
        from framework.distributed.fsdp import shard_model

        engine = shard_model(model.to(accelerator.device), "fp32", True, False)
    else:
        optimizer = create_optimizer(recipe.optimizer, model, recipe.data.batch_size * accelerator.num_processes)
        engine, _ = accelerator.prepare(model, optimizer)
    module = accelerator.unwrap_model(engine)
    params = list(module.parameters())
    rank0 = accelerator.is_main_process

    ours = WeightAverager(create_rule("ema", AVERAGERS["ema"].Options(decay=0.999)), create_view(accelerator, engine).sources,
                          start_step=1, every_steps=1, offload=False)
    full = [torch.zeros(p.shape if fsdp else p.ds_shape, dtype=torch.float32) for p in params] if rank0 else []
    steps = iter(range(1, 10**9))

    def update_ours():
        ours.maybe_update(next(steps))

    def update_gathered():
        if fsdp:
            whole = [p.full_tensor() for p in params]  # every process gathers (a collective per parameter)
            if rank0:
                torch._foreach_lerp_(full, [w.detach().float() for w in whole], 0.001)
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if rank0:
                torch._foreach_lerp_(full, [p.detach().float() for p in params], 0.001)

    def timed(fn, meter):
        dist.barrier()
        start = time.perf_counter()
        with meter.measure():
            for _ in range(args.updates):
                fn()
        return (time.perf_counter() - start) / args.updates

    meters = {"ours": CommMeter(), "gathered": CommMeter()}
    fns = {"ours": update_ours, "gathered": update_gathered}
    for name in fns:  # warm-up
        timed(fns[name], CommMeter())
    times = {name: [] for name in fns}
    for r in range(args.rounds):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            times[name].append(timed(fns[name], meters[name]))
    n_updates = args.rounds * args.updates
    t = {k: accelerator.reduce(torch.tensor(statistics.median(v)), "max").item() for k, v in times.items()}
    b = {k: m.bytes / n_updates for k, m in meters.items()}
    if rank0:
        numel = sum(p.numel() if fsdp else p.ds_numel for p in params)
        print(f"{recipe.model.name}: {numel / 1e6:.1f}M parameters, {'FSDP2' if fsdp else 'ZeRO-3'}, "
              f"{accelerator.num_processes} processes on "
              f"{accelerator.device.type}; averaged state per process: ours {ours.avg.nbytes() / 2**20:.1f} MiB, "
              f"gather-then-average {4 * numel / 2**20:.1f} MiB on rank 0")
        for k in fns:
            print(f"  {k:9s} {1000 * t[k]:9.2f} ms / update  {b[k] / 2**20:9.2f} MiB through collectives / update / process")
        print(f"ratio time ours / gather-then-average : {t['ours'] / t['gathered']:.4f} (goal: well under 1)")
        print(f"ratio bytes ours / gather-then-average: {b['ours'] / max(b['gathered'], 1):.4f} (goal: 0 bytes; ours {b['ours']:.0f})")
    accelerator.wait_for_everyone()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
