"""What a run reports: per-epoch records, the summary, console lines and cross-rank checks."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys

import torch

from framework.recipe.resolve import recipe_to_dict
from framework.recipe.schema import Recipe


def _reduce(accelerator, values: list[float] | torch.Tensor, op: str = "sum") -> torch.Tensor:
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
    return accelerator.reduce(t.to(accelerator.device), reduction=op).cpu()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def epoch_record(epoch: int, update: int, stats: dict, ev: dict | None, averaged: dict, lr: float, accelerator) -> dict:
    world = accelerator.num_processes
    loss_sum, images, data_wait = _reduce(accelerator, torch.stack([
        stats["loss_sum"].double().cpu(), torch.tensor(float(stats["images"]), dtype=torch.float64),
        torch.tensor(stats["data_wait"], dtype=torch.float64)])).tolist()
    # every process skips the same overflowed steps (the gradients are all-reduced before the scaler looks)
    seconds, peak = _reduce(accelerator, [stats["seconds"], peak_memory_mb(accelerator.device)], "max").tolist()
    steps = max(stats["steps"], 1)
    return {
        "epoch": epoch,
        "update": update,  # optimizer updates so far: wandb's step, shared with the per-update records
        "train/loss": loss_sum / max(images, 1),
        "train/lr": lr,
        "amp/overflow_steps": stats["overflow_steps"],
        **({"eval/online/top1": ev["top1"], "eval/online/top5": ev["top5"], "eval/online/loss": ev["loss"],
            "eval/images": ev["images"]} if ev is not None else {}),  # None: not evaluated this epoch
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


def _results(rs: dict) -> dict:
    return {source: {k: r[k] for k in ("top1", "top5", "loss", "seconds")} for source, r in rs.items()}


def build_summary(records: list[dict], ev: dict, averaged: dict, reports: dict, many: bool, accelerator,
                  recipe: Recipe, precision: str, recipe_hashes: list[str]) -> dict:
    """`averaged` and `reports` by averager name. One averager keeps the single-averager layout
    (`eval.averaged.<source>`, `averaging.*`); several nest by name (`eval.averaged.<name>.<source>`,
    `averaging.averagers.<name>.*`, with the per-process costs of all of them summed in `averaging`)."""
    if many:
        averaging = {"averagers": reports, **{k: sum(r[k] for r in reports.values()) for k in (
            "update_ms", "state_bytes_per_process", "comm_bytes_per_update")},
            "recompute_s": sum(r["recompute_s"] for r in reports.values())}  # a pass per averager
        evaluated = {name: _results(rs) for name, rs in averaged.items()}
    else:
        averaging = next(iter(reports.values()), {})
        evaluated = _results(next(iter(averaged.values()), {}))
    summary = {
        "status": "completed",
        "name": recipe.name,
        "world_size": accelerator.num_processes,
        "backend": recipe.backend.type,
        "zero_stage": recipe.backend.zero_stage if recipe.backend.type == "deepspeed" else None,
        "device": accelerator.device.type,
        "precision": precision,
        "threads_per_process": torch.get_num_threads(),
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
            "averaged": evaluated,
        },
        "memory": {"peak_mb": max(r["memory/peak_mb"] for r in records)},
    }
    if many:
        summary["averagers"] = list(reports)
    return summary


def progress_bar(enabled: bool, total: int, epoch: int):
    if not enabled or os.environ.get("CI", "").lower() in ("1", "true") or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)


def format_record(r: dict) -> str:
    ev = (f"top1 {r['eval/online/top1']:6.2f} | top5 {r['eval/online/top5']:6.2f} | eval loss {r['eval/online/loss']:.4f}"
          if "eval/online/top1" in r else "not evaluated")
    line = (f"epoch {r['epoch']:3d} | loss {r['train/loss']:.4f} | {ev} | lr {r['train/lr']:.2e} "
            f"| {r['throughput/train_images_per_s']:8.1f} img/s | step {1000 * r['throughput/step_time_s']:.1f} ms")
    averaged = [(k[len("eval/averaged/"):-len("/top1")], v) for k, v in r.items()
                if k.startswith("eval/averaged/") and k.endswith("/top1")]
    return line + ("".join(f"\n    averaged[{name}] top1 {v:6.2f}" for name, v in averaged) if averaged else "")


def format_table(online: dict, averaged: dict, why: str = "") -> str:
    """The end-of-run comparison: the live model and the averaged weights under each BN source
    (one row when the model keeps no BN statistics), then why these sources apply."""
    from framework.bn.sources import NO_STATS

    def label(key: str) -> str:  # <source>, or <averager>/<source> with several averagers
        name, _, source = key.rpartition("/")
        model = f"averaged[{name}]" if name else "averaged"
        return f"{model} (no BN statistics)" if source == NO_STATS else f"{model} + {source}"

    rows = [("online (live model)", online)] + [(label(key), r) for key, r in averaged.items()]
    width = max(28, *(len(lbl) for lbl, _ in rows))
    lines = [f"{'model / BN statistics':{width}s} {'top1':>7s} {'top5':>7s} {'loss':>8s}"]
    lines += [f"{lbl:{width}s} {r['top1']:7.2f} {r['top5']:7.2f} {r['loss']:8.4f}" for lbl, r in rows]
    return "\n".join(lines + ([f"BN statistics: {why}"] if why else []))


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
