"""Benchmark: our averaging update against torch's AveragedModel and timm's ModelEmaV3, and the recompute cost.

Same model (default resnet50, 25.6M parameters), alternating in one run (order flipped each round).
Prints time per update and the ratios ours / theirs (goal: at most 1.0), then the BN recompute
pass as a fraction of one training epoch on the quickstart recipe.

  python benchmarks/bench_averaging.py [--model resnet50] [--rounds 7] [--updates 20] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _timed(fn, n: int, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def bench_updates(args, device) -> None:
    import timm
    from timm.utils import ModelEmaV3
    from torch.optim.swa_utils import AveragedModel

    from framework.averaging import AVERAGERS, WeightAverager, create_rule
    from framework.bn import bn_buffers
    from framework.bn.sources import BN_SOURCES

    model = timm.create_model(args.model, num_classes=1000).to(device)
    params = list(model.parameters())
    print(f"{args.model}: {sum(p.numel() for p in params) / 1e6:.1f}M parameters on {device}")

    def ours(name, with_bn_sources):
        averager = WeightAverager(create_rule(name, AVERAGERS[name].Options(decay=0.999) if name == "ema" else AVERAGERS[name].Options()),
                                  params, start_step=1, every_steps=1, offload=False)
        if with_bn_sources:
            sources = [cls(bn_buffers(model)) for cls in BN_SOURCES.values()]
            averager.listeners = [s.on_update for s in sources]
        step = iter(range(1, 10**9))
        return lambda: averager.maybe_update(next(step))

    swa_ref = AveragedModel(model)
    ema_ref = ModelEmaV3(model, decay=0.999, foreach=True)
    candidates = {
        "ours swa (weights)": ours("swa", False),
        "ours swa (+5 BN sources)": ours("swa", True),
        "AveragedModel swa": lambda: swa_ref.update_parameters(model),
        "ours ema (weights)": ours("ema", False),
        "ours ema (+5 BN sources)": ours("ema", True),
        "timm ModelEmaV3": lambda: ema_ref.update(model),
    }
    for fn in candidates.values():  # warm-up
        _timed(fn, 3, device)
    times = {k: [] for k in candidates}
    for r in range(args.rounds):
        for k in (list(candidates) if r % 2 == 0 else list(reversed(candidates))):
            times[k].append(_timed(candidates[k], args.updates, device))
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:28s} {v:8.3f} ms / update")
    print(f"ratio ours swa / AveragedModel      : {med['ours swa (weights)'] / med['AveragedModel swa']:.3f} "
          f"(with BN sources {med['ours swa (+5 BN sources)'] / med['AveragedModel swa']:.3f}; goal <= 1.0)")
    print(f"ratio ours ema / timm ModelEmaV3    : {med['ours ema (weights)'] / med['timm ModelEmaV3']:.3f} "
          f"(with BN sources {med['ours ema (+5 BN sources)'] / med['timm ModelEmaV3']:.3f}; goal <= 1.0)")


def bench_recompute(device) -> None:
    """One quickstart training epoch against one recompute pass over the same training data."""
    import torch

    from framework.bn.recompute import recompute_bn_stats
    from framework.data.loaders import create_datasets, create_loaders
    from framework.recipe.resolve import resolve_recipe
    from framework.training.builders import create_optimizer, create_scheduler
    from framework.training.loop import TrainState, train_one_epoch

    class _Acc:  # a one-process stand-in for the accelerator: the step needs only these
        def __init__(self, device):
            self.device = device

        def autocast(self):
            return torch.autocast(device.type, enabled=False)

        def backward(self, loss):
            loss.backward()

    recipe = resolve_recipe(os.path.join(os.path.dirname(__file__), "..", "recipes", "quickstart.yaml"))
    from framework.training.models import create_model

    model = create_model(recipe.model, recipe.data.image_size)[0].to(device)
    train_ds, val_ds = create_datasets(recipe.data, model, 10, 3, 0)
    loaders = create_loaders(recipe.data, train_ds, val_ds, 0, 1, 0, pin_memory=False)
    opt = create_optimizer(recipe.optimizer, model, recipe.data.batch_size)
    state = TrainState(model, opt, create_scheduler(recipe.schedule, opt, len(loaders.train)), _Acc(device), None)
    train_one_epoch(state, loaders.train)  # warm-up
    epoch_s = statistics.median(train_one_epoch(state, loaders.train)["seconds"] for _ in range(3))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        recompute_bn_stats(model, loaders.train, None, device)
        times.append(time.perf_counter() - start)
    recompute_s = statistics.median(times)
    print(f"recompute pass over all {len(loaders.train)} training batches: {recompute_s:.2f} s; one training epoch: "
          f"{epoch_s:.2f} s; fraction {recompute_s / epoch_s:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bench_updates(args, device)
    bench_recompute(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
