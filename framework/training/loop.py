"""The training loop: per epoch, train, evaluate, log. One readable function per step of it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from framework.averaging import WeightAverager
from framework.averaging.tracks import create_tracks, export_stem, result_key, several, track_report
from framework.averaging.views import create_view
from framework.bn import BN_MODES, bn_buffers, swapped
from framework.bn.inputs import create_pass_inputs
from framework.bn.sources import NO_STATS
from framework.checkpoint.engine_state import create_engine_state
from framework.checkpoint.fingerprint import recipe_fingerprint
from framework.checkpoint.resume import capture, resume_run
from framework.checkpoint.store import checkpoint_tag, save_checkpoint
from framework.data.device import create_device_batches
from framework.data.loaders import create_datasets, create_loaders, resolve_run_pipeline
from framework.data.mixup import MixupStream, create_mixup
from framework.data.sampling import seed_process_streams
from framework.distributed.faults import StepControl
from framework.distributed.fsdp import gradient_sync
from framework.recipe.resolve import recipe_to_dict
from framework.recipe.schema import Recipe
from framework.reporting.console import dropping_prints, quiet_libraries
from framework.reporting.intervals import IntervalMeter
from framework.reporting.summary import (
    build_summary,
    check_same_recipe,
    epoch_record,
    format_record,
    format_table,
    gather_digests,
    progress_bar,
)
from framework.training.amp import MixedPrecision, create_precision
from framework.training.best import BestExport
from framework.training.builders import (
    create_accelerator,
    create_grad_clipper,
    create_optimizer,
    create_scheduler,
)
from framework.training.evaluation import AveragedEval, evaluate, harmonized_bn, isolated_rng
from framework.training.export import detached_state_dict
from framework.training.losses import CrossEntropy, create_loss
from framework.training.model_folder import ModelExporter, Weights, hardware
from framework.training.models import create_model
from framework.training.precision_probe import check_precision_speed
from framework.training.speed import apply_model_options


class Interrupted(SystemExit):
    """A stop asked by a signal: the checkpoint is written; exit code 143 like SIGTERM's."""

    def __init__(self, message: str):
        super().__init__(143)
        self.message = message


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    accelerator: object
    clip: Callable[[torch.nn.Module], None] | None  # framework.training.builders.create_grad_clipper
    input_dtype: torch.dtype = torch.float32  # DeepSpeed bf16/fp16 engines take inputs in their dtype
    averagers: list[WeightAverager] = field(default_factory=list)
    steps_per_epoch: int = 1  # optimizer updates per epoch
    bn_buffers: list = field(default_factory=list)  # live BN statistics, put back when a step is refused
    num_updates: int = 0
    amp: MixedPrecision = field(default_factory=lambda: MixedPrecision("fp32", torch.device("cpu")))
    loss_fn: torch.nn.Module = field(default_factory=lambda: CrossEntropy(0.0))
    mixup: MixupStream | None = None
    epoch: int = 0  # the epoch being trained (0-based): Mixup stops at its off_epoch
    accumulate_steps: int = 1  # batches per update

    def after_update(self) -> None:
        """Schedule, then averaging (whose SWALR, once started, overrides the schedule's lr)."""
        self.num_updates += 1
        self.scheduler.step_update(num_updates=self.num_updates)
        for averager in self.averagers:
            averager.maybe_update(self.num_updates)
        self.adjust_lr()

    def base_lr(self) -> float:
        """The rate before layer decay scales each group (what the schedule and SWALR set)."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)

    def adjust_lr(self) -> None:
        """SWALR, once its averager started (validation lets one averager at most set the rate)."""
        for a in self.averagers:
            if a.started and a.rule.sets_lr:
                a.rule.adjust_lr(self.optimizer, self.num_updates - a.start_step, self.steps_per_epoch)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_epoch_stats(device) -> dict:
    return {"loss_sum": torch.zeros((), device=device, dtype=torch.float64), "images": 0, "steps": 0,
            "overflow_steps": 0, "seconds": 0.0, "data_wait": 0.0}


def train_one_epoch(state: TrainState, loader, max_steps: int | None = None, progress=None, stats: dict | None = None,
                    control=None, on_step=None) -> dict:
    """Train over `loader`, adding to `stats` (this process's counts and timings; no host sync per step
    unless `control` checks each step across processes). With `accumulate_steps` k, each optimizer update
    takes k batches (the epoch's last update what is left); `on_step(stats)` is asked after each update
    and returning True stops early. `stats["steps"]` counts batches, so positions are in samples."""
    acc, model, opt, amp = state.accelerator, state.model, state.optimizer, state.amp
    model.train()
    stats = stats or new_epoch_stats(acc.device)
    taken, remaining, micro, group = 0, len(loader), 0, 1
    # A refused or overflowed update puts its forwards' BN statistics back; otherwise no copy per step
    refusable = amp.can_overflow or (control is not None and control.policy == "skip")
    bn_backup = [t.clone() for t in state.bn_buffers] if refusable else []
    _sync(acc.device)
    start = time.perf_counter()
    batches = iter(loader)
    while max_steps is None or taken < max_steps:
        t = time.perf_counter()
        try:
            images, targets = next(batches)
        except StopIteration:
            break
        images = images.to(acc.device, state.input_dtype, non_blocking=True)
        targets = targets.to(acc.device, non_blocking=True)
        stats["data_wait"] += time.perf_counter() - t
        if micro == 0:  # the update's first batch
            group = min(state.accumulate_steps, remaining)
            if bn_backup:
                torch._foreach_copy_(bn_backup, state.bn_buffers)
            opt.zero_grad(set_to_none=True)
            loss_sum, images_seen = torch.zeros((), device=acc.device), 0
        micro, remaining = micro + 1, remaining - 1
        if state.mixup is not None:
            images, targets = state.mixup(images, targets, state.epoch)
        # inner batches skip DDP's gradient all-reduce: it runs once, on the update's last backward
        with gradient_sync(acc, model, micro == group):
            with amp.autocast():
                loss = state.loss_fn(model(images), targets)
            amp.backward(acc, loss / group, last=micro == group)
        loss_sum += loss.detach() / group
        images_seen += images.shape[0]
        stats["steps"] += 1
        taken += 1
        if progress is not None:
            progress.update(1)
        if micro < group:
            continue
        micro = 0
        verdict = amp.unscale(opt, loss_sum)  # gradients are unscaled from here on
        if control is not None:  # one host read per update: the scaler's verdict, non-finite values, stop requests
            checked = control.check(loss_sum, model.parameters(), state.num_updates + 1, state.bn_buffers, verdict)
            overflow = control.overflow
        else:
            checked, overflow = True, amp.overflowed(verdict)
        apply = checked and not overflow
        if apply and state.clip is not None:
            state.clip(model)
        amp.step(opt, apply)  # DeepSpeed's optimizer wrapper steps as a no-op: the engine stepped in backward
        if apply:
            state.after_update()
            stats["loss_sum"] += loss_sum.double() * images_seen
            stats["images"] += images_seen
        else:  # the scaler's overflow, or an update `faults.nonfinite=skip` refused
            stats["overflow_steps"] += int(overflow)
            if bn_backup:
                torch._foreach_copy_(state.bn_buffers, bn_backup)  # every refused forward's statistics go too
        if on_step is not None and on_step(stats):
            break
    if control is not None:
        control.resolve()  # the last update's deferred flags: before evaluation, checkpoints, exports
    _sync(acc.device)
    stats["seconds"] += time.perf_counter() - start
    return stats


def train(recipe: Recipe) -> dict:
    """Run a validated recipe on the current launch. Returns the summary (on every process)."""
    from accelerate.utils import set_seed

    from framework.reporting.tracking import create_logger

    verbose = recipe.logging.verbose
    quiet_libraries(verbose, torch.cuda.is_available())  # framework/reporting/console.py: line by line, why
    with dropping_prints(verbose):
        accelerator, precision = create_accelerator(recipe.backend, recipe.data.batch_size, recipe.optimizer.clip_grad,
                                                     recipe.faults.collective_timeout_s, recipe.optimizer.accumulate_steps)
    recipe_hashes = check_same_recipe(recipe, accelerator)
    device, cuda = accelerator.device, accelerator.device.type == "cuda"
    set_seed(recipe.seed)  # same seed on every rank: identical initial weights
    bn_mode = BN_MODES[recipe.bn.mode]()
    model, weight_notes = create_model(recipe.model, recipe.data.image_size)
    if weight_notes and accelerator.is_main_process:
        print("\n".join(weight_notes), flush=True)
    model = bn_mode.convert(model, cuda)
    if (line := check_precision_speed(model.to(device), recipe, precision, device)) and accelerator.is_main_process:
        print(line, flush=True)  # 16-bit several times slower than fp32 here (a CPU without bf16/fp16 units)
    fsdp = apply_model_options(model, recipe.model, recipe.backend, precision)  # FSDP2: sharded here, not by Accelerate
    seed_process_streams(recipe.seed, accelerator.process_index)  # identical weights above, own streams below
    pretrained = recipe.model.pretrained or recipe.model.pretrained_file is not None
    pipeline = resolve_run_pipeline(recipe.data, model, recipe.model.in_chans, pretrained)
    on_device = create_device_batches(recipe.data, pipeline.mean, pipeline.std, device) if cuda and recipe.data.prefetcher else None
    train_ds, val_ds = create_datasets(recipe.data, model, recipe.model.num_classes, recipe.model.in_chans, recipe.seed,
                                       pretrained=pretrained, device_side=on_device is not None, pipeline=pipeline)
    loaders = create_loaders(recipe.data, train_ds, val_ds, accelerator.process_index, accelerator.num_processes,
                             recipe.seed, pin_memory=cuda, on_device=on_device)
    if len(loaders.train) == 0:
        raise SystemExit(f"data.batch_size = {recipe.data.batch_size}: larger than this process's shard "
                         f"({len(loaders.train_sampler)} images); lower it or use fewer processes")
    optimizer = create_optimizer(recipe.optimizer, model, recipe.data.batch_size * accelerator.num_processes)
    if not fsdp:
        model, optimizer = accelerator.prepare(model, optimizer)
    module = accelerator.unwrap_model(model)  # evaluation and BN passes run without DDP's collectives
    dtype = next(module.parameters()).dtype
    accumulate = recipe.optimizer.accumulate_steps
    updates_per_epoch = -(-len(loaders.train) // accumulate)  # the epoch's last update takes what is left
    scheduler = create_scheduler(recipe.schedule, optimizer, updates_per_epoch)
    view = create_view(accelerator, model)
    tracks, export_source, bn_report = create_tracks(recipe, module, view, updates_per_epoch)
    many = several(recipe)
    live_bn = bn_buffers(module)
    scale = recipe.backend.loss_scale
    engine = model if recipe.backend.type == "deepspeed" else None
    amp = create_precision(precision, engine, device, scale.init, scale.growth_interval, sharded=fsdp)
    clip = create_grad_clipper(recipe.optimizer, recipe.backend.type == "deepspeed")
    state = TrainState(model, optimizer, scheduler, accelerator, clip, dtype, [t.averager for t in tracks],
                       updates_per_epoch, live_bn, amp=amp, accumulate_steps=accumulate, loss_fn=create_loss(recipe.loss, recipe.mixup.active),
                       mixup=create_mixup(recipe.mixup, recipe.loss, recipe.model.num_classes, recipe.seed,
                                          accelerator.process_index))
    pass_inputs = create_pass_inputs(recipe, module, loaders.train, lambda: state.epoch, accelerator.process_index,
                                     accelerator.num_processes, cuda, on_device)
    avg_eval = AveragedEval(module, view, live_bn, bn_mode, pass_inputs, recipe.bn.recompute_batches, device,
                            amp.autocast, dtype)
    evaluate_live = lambda: evaluate(module, loaders.val, device, recipe.model.num_classes, amp.autocast, dtype)  # noqa: E731

    out = Path(recipe.output.dir)
    # Nothing is refused under `raise` without a loss scaler: its flags are read a step later, without a stall
    control = StepControl(recipe.faults.nonfinite, recipe.faults.max_consecutive_skips, device,
                          deferred=not amp.can_overflow)
    control.install_signal_handlers()
    engine_state = create_engine_state(accelerator, model, optimizer)
    resumed = resume_run(recipe, out, state, engine_state, tracks, accelerator)
    logger = create_logger(accelerator, out, recipe_to_dict(recipe), recipe.logging.wandb, recipe.name, resumed["records"],
                           state.num_updates)
    meter = IntervalMeter(recipe.logging.interval_steps, accelerator)
    records, averaged, bn_stats, ev = resumed["records"], {}, {}, None
    ckpt = recipe.checkpoint

    world, batch = accelerator.num_processes, recipe.data.batch_size
    base = {"samples": 0, "steps": 0}  # where this launch entered the epoch (a resume inside it)
    saved_at = [-1]
    fingerprint = recipe_fingerprint(recipe)  # in every manifest: resume is checked against it before launch

    def save(epoch: int, stats: dict | None) -> None:
        control.resolve()  # a non-finite step is never checkpointed
        in_epoch = stats["steps"] if stats else 0
        samples = base["samples"] + (in_epoch - base["steps"]) * batch * world if stats else 0
        position = {"epoch": epoch, "samples_in_epoch": samples, "step_in_epoch": in_epoch, "world_size": world}
        own, shared = capture(state, engine_state, tracks, position, stats, records)
        extra = engine_state.extra_writer(ckpt.engine_copy)
        path = save_checkpoint(out / "checkpoints", checkpoint_tag(epoch, samples), own, accelerator.process_index,
                               world, ckpt.keep, {**position, "recipe": fingerprint}, shared=shared if accelerator.is_main_process else None,
                               write_extra=extra)
        saved_at[0] = state.num_updates
        if logger is not None:
            print(f"checkpoint: {path}", flush=True)

    def on_step(stats: dict) -> bool:
        if control.stop_agreed:
            return True
        point = meter(stats, state.num_updates, state.base_lr())
        if point is not None and logger is not None:
            logger.log(point)
            if bar is not None:
                bar.set_postfix(loss=f"{point['train_step/loss']:.4f}", img_s=f"{point['train_step/images_per_s']:.0f}")
        # optimizer updates over the whole run (an overflowed step is none, so it never saves twice)
        n = state.num_updates
        if ckpt.unit == "steps" and ckpt.every and n % ckpt.every == 0 and n != saved_at[0]:
            save(epoch, stats)
        return False

    def evaluate_all(final: bool):
        """The live model, then each started averager under the BN sources asked for: results and statistics
        by track name and source."""
        wanted = recipe.eval.bn_sources
        averaged, stats = {}, {}
        with isolated_rng(device):  # training draws the same numbers whatever is evaluated here
            with harmonized_bn(bn_mode, live_bn):
                live = evaluate_live()
            for t in tracks:
                if t.averager.started:
                    chosen = {n: s for n, s in t.sources.items() if final or wanted is None or n in wanted or n == NO_STATS}
                    averaged[t.name], stats[t.name] = avg_eval.run(t.name, t.averager.avg.tensors(), chosen, loaders.val,
                                                                   recipe.model.num_classes)
        return live, averaged, stats

    def flat(averaged: dict) -> dict:
        return {result_key(name, source, many): r for name, rs in averaged.items() for source, r in rs.items()}

    best = BestExport(recipe.export.best, out, records) if recipe.export.best else None
    exporter = ModelExporter(recipe, out, pipeline, module) if logger is not None else None
    run_facts = {"world_size": world, "precision": precision, "hardware": hardware(accelerator)}

    def export_best(epoch: int, bn_stats: dict, record: dict) -> None:
        """Collective (ZeRO-3 gathers); the main process writes. The weights and BN statistics just evaluated."""
        if best.model == "online":
            weights = Weights("best", results={"live": ev}, epoch=epoch)
            with harmonized_bn(bn_mode, live_bn):
                state_dict = detached_state_dict(accelerator, model)
        else:
            track = next(t for t in tracks if best.name in (None, t.name))
            weights = Weights("best", track.name, track.strategy, best.source, averaged[track.name], epoch)
            with view.swapped_in(track.averager.avg.tensors()), swapped(live_bn, bn_stats[track.name][best.source]):
                state_dict = detached_state_dict(accelerator, model)
        if logger is not None:
            throughput = {k: record.get(f"throughput/{k}") for k in ("train_images_per_s", "train_images_per_s_per_process")}
            exporter.save(state_dict, "model_best", weights, {**run_facts, "epochs": epoch, "throughput": throughput})
            best.written(epoch)

    for epoch in range(resumed["epoch"], recipe.schedule.epochs):
        loaders.train_sampler.set_epoch(epoch)
        state.epoch = epoch
        stats = None
        base.update(samples=0, steps=0)
        if epoch == resumed["epoch"] and resumed["samples_in_epoch"]:
            loaders.train_sampler.skip(resumed["samples_in_epoch"])
            stats = resumed["epoch_stats"]  # None after a world-size change: this launch's counts start afresh
            base.update(samples=resumed["samples_in_epoch"], steps=stats["steps"] if stats else 0)
        bar = progress_bar(recipe.logging.progress and accelerator.is_main_process, len(loaders.train), epoch + 1)
        meter.start_epoch(stats)
        stats = train_one_epoch(state, loaders.train, progress=bar, stats=stats, control=control, on_step=on_step)
        if bar is not None:
            bar.close()
        loaders.train_sampler.skip(0)
        if control.stop_agreed:
            save(epoch, stats)
            if logger is not None:
                logger.interrupt()
            raise Interrupted(f"stopped by a signal after {stats['steps']} steps of epoch {epoch + 1}; resume with resume=auto")
        lr = state.base_lr()
        final = epoch + 1 == recipe.schedule.epochs
        if final or (epoch + 1) % recipe.eval.every_epochs == 0:
            ev, averaged, bn_stats = evaluate_all(final)
        else:
            ev, averaged = None, {}
        record = epoch_record(epoch + 1, state.num_updates, stats, ev, flat(averaged), lr, accelerator)
        records.append(record)
        if best is not None and best.improved(record):
            export_best(epoch + 1, bn_stats, record)
        scheduler.step(epoch + 1, record.get(recipe.schedule.plateau_metric))  # only plateau reads it (every epoch)
        state.adjust_lr()
        if logger is not None:
            logger.log(record)
            print(format_record(record), flush=True)
        if ckpt.unit == "epochs" and ckpt.every and (epoch + 1) % ckpt.every == 0:
            save(epoch + 1, None)
    if ev is None:  # resumed from a checkpoint taken at the very end
        ev, averaged, bn_stats = evaluate_all(final=True)

    reports = {t.name: {**track_report(t, avg_eval.recompute_seconds.get(t.name, []), export_source, bn_report),
                        "recompute_bn_sha256_per_rank": gather_digests(bn_stats.get(t.name, {}).get("recompute", []))}
               for t in tracks}
    summary = build_summary(records, ev, averaged, reports, many, accelerator, recipe, precision, recipe_hashes)
    summary["amp"] = {"overflow_steps": sum(r["amp/overflow_steps"] for r in records), "loss_scale": amp.loss_scale}
    summary["hardware"], summary["data_workers"] = run_facts["hardware"], loaders.workers
    # Exports gather on every process (ZeRO-3 consolidates onto the main one), which alone writes.
    with harmonized_bn(bn_mode, live_bn):
        online_state = detached_state_dict(accelerator, model)
    if logger is not None:
        exporter.save(online_state, "model_online", Weights("online", results={"live": ev}), summary)
    for t in tracks:
        if t.name in averaged:
            with view.swapped_in(t.averager.avg.tensors()), swapped(live_bn, bn_stats[t.name][export_source]):
                averaged_state = detached_state_dict(accelerator, model)
            if logger is not None:
                weights = Weights("averaged", t.name, t.strategy, export_source, averaged[t.name])
                exporter.save(averaged_state, export_stem(t.name, many), weights, summary)
    if logger is not None:
        summary["output_dir"] = str(out.resolve())
        summary["wandb"] = {"mode": logger.mode, "dir": logger.wandb_dir}
        if averaged:
            print(format_table(ev, flat(averaged), bn_report["why"]), flush=True)
            logger.log_table("eval/comparison", ["model", "bn_stats", "top1", "top5", "loss", "seconds"],
                             [["online", "live", ev["top1"], ev["top5"], ev["loss"], ev["seconds"]]]
                             + [["averaged" if not many else f"averaged[{name}]", n, r["top1"], r["top5"], r["loss"],
                                 r["seconds"]] for name, rs in averaged.items() for n, r in rs.items()])
        logger.finish(summary)
    accelerator.wait_for_everyone()
    return summary
