"""What a checkpoint holds for a training run, and putting it back.

Replicated state (weights, optimizer, averaged copy, schedule) is saved once; each process saves
what is its own (random streams, position, BN statistics, which differ under `local` BN; ZeRO
partitions). Loading with another world size takes rank 0's own part and says so; the sampler then
serves every sample of the interrupted epoch that no process had seen yet, and the schedule is
re-counted in this world's updates at the same fraction of training.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from framework.training.builders import load_scheduler_state_dict, scheduler_state_dict


def capture(state, engine_state, tracks: list, position: dict, epoch_stats: dict | None,
            records: list[dict]) -> tuple[dict, dict]:
    """(this process's own state, the state every process holds alike). The second is written once."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    if state.mixup is not None:
        rng["mixup"] = state.mixup.state_dict()
    engine = engine_state.state_dict()  # model, optimizer, engine counters
    averager = {t.name: t.averager.state_dict() for t in tracks}  # framework/averaging/tracks.py
    own = {"sources": {t.name: {n: s.state_dict() for n, s in t.sources.items()} for t in tracks}, "rng": rng,
           "position": {**position, "num_updates": state.num_updates}, "epoch_stats": epoch_stats}
    shared = {"scheduler": scheduler_state_dict(state.scheduler), "amp": state.amp.state_dict(), "records": records}
    if engine_state.sharded:  # FSDP2: shards go through DCP (framework/checkpoint/fsdp_state.py), the rest is own
        own = engine_state.split({**own, **engine, "averager": averager})
    elif engine_state.partitioned:  # ZeRO: partitions (of the averaged copy too) are each process's own
        own.update(engine, averager=averager)
    else:  # replicated: weights, optimizer and averaged copy once; BN statistics can differ per process
        buffers = engine_state.buffer_names()
        own["model"] = {k: v for k, v in engine["model"].items() if k in buffers}
        shared.update(engine, averager=averager, model={k: v for k, v in engine["model"].items() if k not in buffers})
    return own, shared


def by_track(saved: dict, tracks: list) -> dict:
    """A checkpoint written before several averagers existed holds one averager's state and sources
    unnamed: they belong to the one track. Told apart by shape, not by a key an averager's name could
    equal: by name, every value is an averager's state (a dict); unnamed, the state's count `n` is not."""
    averager = saved.get("averager")
    if averager is None or not all(isinstance(state, dict) for state in averager.values()):
        saved["averager"] = {tracks[0].name: saved["averager"]} if tracks and saved.get("averager") else {}
        saved["sources"] = {tracks[0].name: saved["sources"]} if tracks else {}
    return saved


def restore(saved: dict, state, engine_state, tracks: list, same_world: bool, batch_size: int, world: int) -> None:
    """`batch_size`: images per process per optimizer update (the batch times accumulate_steps)."""
    engine_state.load_state_dict(saved)
    load_scheduler_state_dict(state.scheduler, saved["scheduler"], same_units=same_world)
    state.amp.load_state_dict(saved["amp"])
    for t in tracks:
        if t.name not in saved["averager"]:
            raise SystemExit(f"the checkpoint has no averager {t.name!r} (it has {', '.join(saved['averager']) or 'none'}); "
                             "resume with the averagers it was written with, or resume=never")
        t.averager.load_state_dict(saved["averager"][t.name])
        for name, source in t.sources.items():
            source.load_state_dict(saved["sources"][t.name][name])
    pos = saved["position"]
    if not same_world:  # re-count the updates in this world's units, at the same point of training
        state.num_updates = pos["epoch"] * state.steps_per_epoch + round(pos["samples_in_epoch"] / (batch_size * world))
        state.scheduler.step_update(num_updates=state.num_updates)
        state.adjust_lr()
    else:  # another world size has other streams anyway: it keeps this run's seeds
        state.num_updates = pos["num_updates"]
        rng = saved["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if state.mixup is not None and "mixup" in rng:
            state.mixup.load_state_dict(rng["mixup"])


def resume_run(recipe, out, state, engine_state, tracks: list, accelerator) -> dict:
    """Load the checkpoint `recipe.resume` names (auto: the newest complete one). Where training starts."""
    from pathlib import Path

    import torch.distributed as dist

    from framework.checkpoint.store import (
        CheckpointError,
        checkpoint_world_size,
        load_rank_state,
        resolve_resume,
    )

    world = accelerator.num_processes
    fresh = {"epoch": 0, "samples_in_epoch": 0, "epoch_stats": None, "records": []}
    root = out / "checkpoints"  # no links there: checked with the recipe (framework/checkpoint/paths.py)
    choice = [None]
    if accelerator.is_main_process:
        try:
            path = resolve_resume(recipe.resume, root)
            choice = [str(path) if path else None]
        except CheckpointError as err:
            choice = [f"error: {err}"]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)  # every process loads the one the main process chose
    if choice[0] is None:
        return fresh
    if choice[0].startswith("error: "):
        raise SystemExit(choice[0])
    path = Path(choice[0])
    old_world = checkpoint_world_size(path)
    same = old_world == world
    if same or not engine_state.partitioned:
        saved = by_track(load_rank_state(path, accelerator.process_index), tracks)  # rank 0's with fewer processes
        if engine_state.sharded:  # FSDP2: DCP reads the shards into this world's layout
            saved = engine_state.read(path, saved, {t.name: t.averager for t in tracks})
    else:  # ZeRO partitions: re-cut from every old process's
        sizes = [t.numel() for t in tracks[0].averager.avg.tensors()] if tracks else []
        saved = engine_state.reshard([by_track(load_rank_state(path, r), tracks) for r in range(old_world)], sizes)
    pos = saved["position"]
    restore(saved, state, engine_state, tracks, same, recipe.data.batch_size * recipe.optimizer.accumulate_steps, world)
    if accelerator.is_main_process:
        how = ("re-cut from every old process's partitions" if engine_state.partitioned else
               "resharded by torch.distributed.checkpoint" if engine_state.sharded else "from rank 0")
        note = "" if same else (f"; world size {world} (was {pos['world_size']}): weights and optimizer {how}, "
                                "the rest of the epoch's samples re-sharded")
        print(f"resumed from {choice[0]} at epoch {pos['epoch'] + 1}, sample {pos['samples_in_epoch']}{note}", flush=True)
    stats = saved["epoch_stats"] if same else None
    if stats is not None:
        stats["loss_sum"] = stats["loss_sum"].to(accelerator.device)
    return {"epoch": pos["epoch"], "samples_in_epoch": pos["samples_in_epoch"], "epoch_stats": stats,
            "records": saved["records"]}
