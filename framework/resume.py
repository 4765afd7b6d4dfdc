"""What a checkpoint holds for a training run, and putting it back.

Every process saves its own state (under `local` BN its buffers differ); loading with another
world size takes rank 0's weights and optimizer state and says so, and the sampler then serves
every sample of the interrupted epoch that no process had seen yet.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from framework.builders import load_scheduler_state_dict, scheduler_state_dict


def capture(state, engine_state, sources: dict, position: dict, epoch_stats: dict | None, records: list[dict]) -> dict:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        **engine_state.state_dict(),  # model, optimizer, engine counters
        "scheduler": scheduler_state_dict(state.scheduler),
        "amp": state.amp.state_dict(),  # the loss scale and its growth counter: resume stays exact
        "averager": state.averager.state_dict() if state.averager is not None else None,
        "sources": {name: s.state_dict() for name, s in sources.items()},
        "rng": rng,
        "position": {**position, "num_updates": state.num_updates},
        "epoch_stats": epoch_stats,
        "records": records,
    }


def restore(saved: dict, state, engine_state, sources: dict, same_world: bool) -> None:
    engine_state.load_state_dict(saved)
    load_scheduler_state_dict(state.scheduler, saved["scheduler"])
    state.amp.load_state_dict(saved["amp"])
    if state.averager is not None and saved["averager"] is not None:
        state.averager.load_state_dict(saved["averager"])
    for name, source in sources.items():
        source.load_state_dict(saved["sources"][name])
    state.num_updates = saved["position"]["num_updates"]
    if same_world:  # another world size has other streams anyway: keep this run's seeds
        rng = saved["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def resume_run(recipe, out, state, engine_state, sources: dict, accelerator) -> dict:
    """Load the checkpoint `recipe.resume` names (auto: the newest complete one). Where training starts."""
    from pathlib import Path

    import torch.distributed as dist

    from framework.checkpoint import CheckpointError, checkpoint_world_size, load_rank_state, resolve_resume

    world = accelerator.num_processes
    fresh = {"epoch": 0, "step_in_epoch": 0, "world_size": world, "epoch_stats": None, "records": []}
    root = out / "checkpoints"  # no links there: checked with the recipe (framework/paths.py)
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
        saved = load_rank_state(path, accelerator.process_index)  # rank 0's when there were fewer processes
    else:  # ZeRO partitions: re-cut from every old process's
        sizes = [t.numel() for t in state.averager.avg.tensors()] if state.averager is not None else []
        saved = engine_state.reshard([load_rank_state(path, r) for r in range(old_world)], sizes)
    pos = saved["position"]
    restore(saved, state, engine_state, sources, same)
    if accelerator.is_main_process:
        how = "re-cut from every old process's partitions" if engine_state.partitioned else "from rank 0"
        note = "" if same else (f"; world size {world} (was {pos['world_size']}): weights and optimizer {how}, "
                                "the rest of the epoch's samples re-sharded")
        print(f"resumed from {choice[0]} at epoch {pos['epoch'] + 1}, step {pos['step_in_epoch']}{note}", flush=True)
    stats = saved["epoch_stats"] if same else None
    if stats is not None:
        stats["loss_sum"] = stats["loss_sum"].to(accelerator.device)
    return {"epoch": pos["epoch"], "step_in_epoch": pos["step_in_epoch"], "world_size": pos["world_size"],
            "epoch_stats": stats, "records": saved["records"]}
