"""The training loop: per epoch, train, evaluate, log. One readable function per step of it."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from framework.averaging import WeightAverager, create_rule
from framework.averaging.views import create_view
from framework.bn import BN_MODES, bn_buffers, swapped
from framework.bn.sources import BN_SOURCES
from framework.builders import create_accelerator, create_model, create_optimizer, create_scheduler
from framework.data import create_datasets, create_loaders
from framework.evaluation import AveragedEval, evaluate, harmonized_bn
from framework.export import detached_state_dict, save_state_dict
from framework.recipe import recipe_to_dict
from framework.schema import Recipe


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    accelerator: object
    clip_grad: float | None
    input_dtype: torch.dtype = torch.float32  # DeepSpeed bf16/fp16 engines take inputs in their dtype
    averager: WeightAverager | None = None
    steps_per_epoch: int = 1
    num_updates: int = 0

    def after_update(self) -> None:
        """Schedule, then averaging (whose SWALR, once started, overrides the schedule's lr)."""
        self.num_updates += 1
        self.scheduler.step_update(num_updates=self.num_updates)
        if self.averager is not None:
            self.averager.maybe_update(self.num_updates)
            self.adjust_lr()

    def adjust_lr(self) -> None:
        if self.averager is not None and self.averager.started:
            self.averager.rule.adjust_lr(self.optimizer, self.num_updates - self.averager.start_step, self.steps_per_epoch)


def _reduce(accelerator, values: list[float] | torch.Tensor, op: str = "sum") -> torch.Tensor:
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
    return accelerator.reduce(t.to(accelerator.device), reduction=op).cpu()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one_epoch(state: TrainState, loader, max_steps: int | None = None, progress=None) -> dict:
    """Train over `loader`; returns this process's counts and timings (no host sync per step)."""
    acc, model, opt = state.accelerator, state.model, state.optimizer
    model.train()
    loss_sum = torch.zeros((), device=acc.device, dtype=torch.float64)
    images_seen, steps, data_wait = 0, 0, 0.0
    _sync(acc.device)
    start = time.perf_counter()
    batches = iter(loader)
    while max_steps is None or steps < max_steps:
        t = time.perf_counter()
        try:
            images, targets = next(batches)
        except StopIteration:
            break
        images = images.to(acc.device, state.input_dtype, non_blocking=True)
        targets = targets.to(acc.device, non_blocking=True)
        data_wait += time.perf_counter() - t
        with acc.autocast():
            loss = F.cross_entropy(model(images), targets)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        if state.clip_grad is not None:
            acc.clip_grad_norm_(model.parameters(), state.clip_grad)
        opt.step()
        state.after_update()
        loss_sum += loss.detach().double() * images.shape[0]
        images_seen += images.shape[0]
        steps += 1
        if progress is not None:
            progress.update(1)
    _sync(acc.device)
    return {"loss_sum": loss_sum, "images": images_seen, "steps": steps, "seconds": time.perf_counter() - start, "data_wait": data_wait}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def epoch_record(epoch: int, stats: dict, ev: dict, averaged: dict, lr: float, accelerator) -> dict:
    world = accelerator.num_processes
    loss_sum, images, data_wait = _reduce(accelerator, torch.stack([
        stats["loss_sum"].double().cpu(), torch.tensor(float(stats["images"]), dtype=torch.float64),
        torch.tensor(stats["data_wait"], dtype=torch.float64)])).tolist()
    seconds, peak = _reduce(accelerator, [stats["seconds"], peak_memory_mb(accelerator.device)], "max").tolist()
    steps = max(stats["steps"], 1)
    return {
        "epoch": epoch,
        "train/loss": loss_sum / max(images, 1),
        "train/lr": lr,
        "eval/online/top1": ev["top1"], "eval/online/top5": ev["top5"], "eval/online/loss": ev["loss"],
        "eval/images": ev["images"],
        "throughput/train_images_per_s": images / seconds,
        "throughput/train_images_per_s_per_process": images / seconds / world,
        "throughput/step_time_s": seconds / steps,
        "throughput/data_wait_s": data_wait / world / steps,
        "memory/peak_mb": peak,
        "time/epoch_s": seconds,
        **{f"eval/averaged/{name}/{k}": r[k] for name, r in averaged.items() for k in ("top1", "top5", "loss")},
    }


def _mean(records: list[dict], key: str) -> float:
    # The first epoch pays for warm-up (allocator, caches): leave it out when there are others.
    values = [r[key] for r in (records[1:] if len(records) > 1 else records)]
    return sum(values) / len(values)


def build_summary(records: list[dict], ev: dict, averaged: dict, averaging: dict, accelerator, recipe: Recipe,
                  precision: str, recipe_hashes: list[str]) -> dict:
    return {
        "status": "completed",
        "name": recipe.name,
        "world_size": accelerator.num_processes,
        "backend": recipe.backend.type,
        "zero_stage": recipe.backend.zero_stage if recipe.backend.type == "deepspeed" else None,
        "device": accelerator.device.type,
        "precision": precision,
        "epochs": len(records),
        "recipe_sha256_per_rank": recipe_hashes,
        "throughput": {
            "train_images_per_s": _mean(records, "throughput/train_images_per_s"),
            "train_images_per_s_per_process": _mean(records, "throughput/train_images_per_s_per_process"),
            "step_time_s": _mean(records, "throughput/step_time_s"),
            "data_wait_s": _mean(records, "throughput/data_wait_s"),
            "averaging_update_ms": averaging.get("update_ms"),
            "bn_recompute_s": averaging.get("recompute_s"),
            "averaging_state_bytes_per_process": averaging.get("state_bytes_per_process"),
            "averaging_comm_bytes_per_update": averaging.get("comm_bytes_per_update"),
        },
        "averaging": averaging,
        "eval": {
            "online": {k: ev[k] for k in ("top1", "top5", "loss", "images")},
            "averaged": {name: {k: r[k] for k in ("top1", "top5", "loss", "seconds")} for name, r in averaged.items()},
        },
        "memory": {"peak_mb": max(r["memory/peak_mb"] for r in records)},
    }


def _progress_bar(enabled: bool, total: int, epoch: int):
    if not enabled or os.environ.get("CI", "").lower() in ("1", "true") or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)


def format_record(r: dict) -> str:
    line = (f"epoch {r['epoch']:3d} | loss {r['train/loss']:.4f} | top1 {r['eval/online/top1']:6.2f} "
            f"| top5 {r['eval/online/top5']:6.2f} | eval loss {r['eval/online/loss']:.4f} | lr {r['train/lr']:.2e} "
            f"| {r['throughput/train_images_per_s']:8.1f} img/s | step {1000 * r['throughput/step_time_s']:.1f} ms")
    averaged = [(k.split("/")[2], v) for k, v in r.items() if k.startswith("eval/averaged/") and k.endswith("/top1")]
    return line + ("".join(f"\n    averaged[{name}] top1 {v:6.2f}" for name, v in averaged) if averaged else "")


def format_table(online: dict, averaged: dict) -> str:
    """The end-of-run comparison: the live model and the averaged weights under each BN source."""
    rows = [("online (live model)", online)] + [(f"averaged + {name}", r) for name, r in averaged.items()]
    lines = [f"{'model / BN statistics':28s} {'top1':>7s} {'top5':>7s} {'loss':>8s}"]
    lines += [f"{label:28s} {r['top1']:7.2f} {r['top5']:7.2f} {r['loss']:8.4f}" for label, r in rows]
    return "\n".join(lines)


def gather_digests(tensors: list[torch.Tensor]) -> list[str]:
    """sha256 of these tensors on every rank: equal digests mean bitwise-identical values."""
    from accelerate.utils import gather_object

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return gather_object([h.hexdigest()])


def check_same_recipe(recipe: Recipe, accelerator) -> list[str]:
    """Every rank must have resolved the same recipe (overrides reach each rank on its own command line)."""
    from accelerate.utils import gather_object

    digest = hashlib.sha256(json.dumps(recipe_to_dict(recipe), sort_keys=True).encode()).hexdigest()
    hashes = gather_object([digest])
    if len(set(hashes)) != 1:
        raise SystemExit(f"ranks resolved different recipes (sha256 per rank: {hashes}); "
                         "pass the same recipe and overrides to every process")
    return hashes


def create_averaging(recipe: Recipe, module, view, steps_per_epoch: int):
    """The weight averager over the view's tensors, and the BN-statistics sources listening to it."""
    cfg = recipe.averaging
    if cfg.strategy == "none":
        return None, {}
    total = recipe.schedule.epochs * steps_per_epoch
    start = cfg.start_epoch * steps_per_epoch if cfg.start_epoch is not None else int(cfg.start * total)
    averager = WeightAverager(create_rule(cfg.strategy, getattr(cfg, cfg.strategy)), view.sources,
                              start_step=max(start, 1), every_steps=cfg.every_steps, offload=cfg.offload)
    live_bn = bn_buffers(module)
    sources = {name: cls(live_bn) for name, cls in BN_SOURCES.items()}
    averager.listeners = [s.on_update for s in sources.values()]
    return averager, sources


def train(recipe: Recipe) -> dict:
    """Run a validated recipe on the current launch. Returns the summary (on every process)."""
    from accelerate.utils import set_seed

    from framework.tracking import RunLogger

    accelerator, precision = create_accelerator(recipe.backend, recipe.data.batch_size, recipe.optimizer.clip_grad)
    recipe_hashes = check_same_recipe(recipe, accelerator)
    device, cuda = accelerator.device, accelerator.device.type == "cuda"
    set_seed(recipe.seed)  # same seed on every rank: identical initial weights
    bn_mode = BN_MODES[recipe.bn.mode]()
    model = bn_mode.convert(create_model(recipe.model), cuda)
    train_ds, val_ds = create_datasets(recipe.data, model, recipe.model.num_classes, recipe.model.in_chans, recipe.seed)
    loaders = create_loaders(recipe.data, train_ds, val_ds, accelerator.process_index, accelerator.num_processes,
                             recipe.seed, pin_memory=cuda)
    if len(loaders.train) == 0:
        raise SystemExit(f"data.batch_size = {recipe.data.batch_size}: larger than this process's shard "
                         f"({len(loaders.train_sampler)} images); lower it or use fewer processes")
    optimizer = create_optimizer(recipe.optimizer, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    module = accelerator.unwrap_model(model)  # evaluation and BN passes run without DDP's collectives
    dtype = next(module.parameters()).dtype
    scheduler = create_scheduler(recipe.schedule, optimizer, len(loaders.train))
    view = create_view(accelerator, model)
    averager, sources = create_averaging(recipe, module, view, len(loaders.train))
    state = TrainState(model, optimizer, scheduler, accelerator, recipe.optimizer.clip_grad, dtype, averager,
                       len(loaders.train))
    live_bn = bn_buffers(module)
    avg_eval = AveragedEval(module, view, live_bn, bn_mode, loaders.train, recipe.bn.recompute_batches, device,
                            accelerator.autocast, dtype)
    evaluate_live = lambda: evaluate(module, loaders.val, device, recipe.model.num_classes, accelerator.autocast, dtype)  # noqa: E731

    logger = None
    if accelerator.is_main_process:
        logger = RunLogger(Path(recipe.output.dir), recipe_to_dict(recipe), recipe.logging.wandb, recipe.name)
    records, averaged, bn_stats = [], {}, {}
    for epoch in range(recipe.schedule.epochs):
        loaders.train_sampler.set_epoch(epoch)
        bar = _progress_bar(recipe.logging.progress and accelerator.is_main_process, len(loaders.train), epoch + 1)
        stats = train_one_epoch(state, loaders.train, progress=bar)
        if bar is not None:
            bar.close()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step(epoch + 1)
        state.adjust_lr()
        with harmonized_bn(bn_mode, live_bn):
            ev = evaluate_live()
        if averager is not None and averager.started:
            averaged, bn_stats = avg_eval.run(averager.avg.tensors(), sources, loaders.val, recipe.model.num_classes)
        record = epoch_record(epoch + 1, stats, ev, averaged, lr, accelerator)
        records.append(record)
        if logger is not None:
            logger.log(record)
            print(format_record(record), flush=True)

    averaging = {}
    if averager is not None:
        averaging = {"strategy": recipe.averaging.strategy, "updates": averager.n, "start_step": averager.start_step,
                     "update_ms": averager.timer.mean_ms(),
                     "recompute_s": sum(avg_eval.recompute_seconds) / max(len(avg_eval.recompute_seconds), 1),
                     "state_bytes_per_process": averager.avg.nbytes(),
                     "comm_bytes_per_update": averager.comm.bytes / max(averager.n, 1),
                     "export_stats": recipe.bn.export_stats if averaged else None,
                     "recompute_bn_sha256_per_rank": gather_digests(bn_stats.get("recompute", []))}
    summary = build_summary(records, ev, averaged, averaging, accelerator, recipe, precision, recipe_hashes)
    out = Path(recipe.output.dir)
    # Exports gather on every process (ZeRO-3 consolidates onto the main one), which alone writes.
    with harmonized_bn(bn_mode, live_bn):
        online_state = detached_state_dict(accelerator, model)
    if logger is not None:
        save_state_dict(online_state, out / "model_online.safetensors")
    if averaged:
        with view.swapped_in(averager.avg.tensors()), swapped(live_bn, bn_stats[recipe.bn.export_stats]):
            averaged_state = detached_state_dict(accelerator, model)
        if logger is not None:
            save_state_dict(averaged_state, out / "model_averaged.safetensors")
    if logger is not None:
        summary["output_dir"] = str(out.resolve())
        summary["wandb"] = {"mode": logger.mode, "dir": logger.wandb_dir}
        if averaged:
            print(format_table(ev, averaged), flush=True)
            logger.log_table("eval/comparison", ["model", "bn_stats", "top1", "top5", "loss", "seconds"],
                             [["online", "live", ev["top1"], ev["top5"], ev["loss"], ev["seconds"]]]
                             + [["averaged", n, r["top1"], r["top5"], r["loss"], r["seconds"]] for n, r in averaged.items()])
        logger.finish(summary)
    accelerator.wait_for_everyone()
    return summary
