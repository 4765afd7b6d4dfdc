"""The run's averagers: each a WeightAverager with the BN-statistics sources that listen to it.

One `averaging` section gives one track, whose outputs keep their single-averager names
(`eval/averaged/<source>/...`, `model_averaged.safetensors`). A list gives one track per entry,
named (`eval/averaged/<name>/<source>/...`, `model_averaged-<name>.safetensors`). Every track
averages the same live weights; each has its own BN sources and its own recompute pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from framework.averaging import WeightAverager, create_rule
from framework.bn.sources import create_sources
from framework.recipe.schema import averager_name, averagers_of


@dataclass
class Track:
    name: str
    strategy: str
    averager: WeightAverager
    sources: dict  # framework.bn.sources, listening to this averager's updates


def create_tracks(recipe, module, view, steps_per_epoch: int) -> tuple[list[Track], str | None, dict]:
    """The tracks, the BN source the exports carry, and what the run reports about the model's normalisation."""
    tracks, export, bn_report = [], None, {}
    total = recipe.schedule.epochs * steps_per_epoch
    for cfg in averagers_of(recipe.averaging):
        start = cfg.start_epoch * steps_per_epoch if cfg.start_epoch is not None else int(cfg.start * total)
        averager = WeightAverager(create_rule(cfg.strategy, getattr(cfg, cfg.strategy)), view.sources,
                                  start_step=max(start, 1), every_steps=cfg.every_steps, offload=cfg.offload)
        sources, export, bn_report = create_sources(module, recipe.bn.export_stats)
        averager.listeners = [s.on_update for s in sources.values()]
        tracks.append(Track(averager_name(cfg), cfg.strategy, averager, sources))
    return tracks, export, bn_report


def several(recipe) -> bool:
    return isinstance(recipe.averaging, list)


def result_key(name: str, source: str, many: bool) -> str:
    """What follows `eval/averaged/` in metric names."""
    return f"{name}/{source}" if many else source


def export_stem(name: str, many: bool) -> str:
    """The averaged export's name: `<stem>.safetensors` and the model folder `<stem>/`."""
    return f"model_averaged-{name}" if many else "model_averaged"


def track_report(track: Track, recompute_seconds: list[float], export: str | None, bn_report: dict) -> dict:
    a = track.averager
    return {"strategy": track.strategy, "updates": a.n, "start_step": a.start_step, "update_ms": a.timer.mean_ms(),
            "recompute_s": sum(recompute_seconds) / max(len(recompute_seconds), 1),
            "state_bytes_per_process": a.avg.nbytes(), "comm_bytes_per_update": a.comm.bytes / max(a.n, 1),
            "export_stats": export if a.started else None, "bn": bn_report}
