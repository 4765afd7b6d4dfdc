"""`export.best`: the best epoch's weights, exported beside the final ones.

The metric is any evaluation in the epoch records (`eval/online/top1`, `eval/averaged/recompute/top1`,
..., loss: lower is better). For an averaged metric the file holds the averaged weights with the BN
statistics of that source, exactly what was evaluated. The best value so far is read back from the
records, so a resumed run keeps it; `model_best.json` says which epoch and value the file holds.
"""

from __future__ import annotations

import json
from pathlib import Path

from framework.bn.sources import BN_SOURCES, NO_STATS
from framework.reporting.tracking import write_atomic

METRICS = ("top1", "top5", "loss")


def parse_metric(metric: str) -> tuple[str, str | None, str | None, str]:
    """('online', None, None, 'top1'), ('averaged', None, <source>, 'top1') for the one averager, or
    ('averaged', <name>, <source>, 'top1') for one of several; raises ValueError when it names nothing."""
    parts = metric.split("/")
    if len(parts) == 3 and parts[:2] == ["eval", "online"] and parts[2] in METRICS:
        return "online", None, None, parts[2]
    sources = (*BN_SOURCES, NO_STATS)
    if len(parts) == 4 and parts[:2] == ["eval", "averaged"] and parts[2] in sources and parts[3] in METRICS:
        return "averaged", None, parts[2], parts[3]
    if len(parts) == 5 and parts[:2] == ["eval", "averaged"] and parts[3] in sources and parts[4] in METRICS:
        return "averaged", parts[2], parts[3], parts[4]
    raise ValueError(metric)


def check_best(metric: str | None, averaging, bn_sources: list[str] | None, errors: list[str]) -> None:
    from framework.recipe.schema import averager_name, averagers_of

    if metric is None:
        return
    try:
        model, name, source, _ = parse_metric(metric)
    except ValueError:
        errors.append(f"export.best = {metric!r}: expected eval/online/<m> or eval/averaged/[<averager>/]<source>/<m> "
                      f"with <m> one of {', '.join(METRICS)} and <source> one of {', '.join((*BN_SOURCES, NO_STATS))}")
        return
    names = [averager_name(a) for a in averagers_of(averaging)]
    many = isinstance(averaging, list)
    if model == "averaged" and not names:
        errors.append(f"export.best = {metric!r}: averaged weights need averaging.strategy other than 'none'")
    elif model == "averaged" and many and name not in names:
        errors.append(f"export.best = {metric!r}: with several averagers name one: eval/averaged/<averager>/{source}/..."
                      f" with <averager> one of {', '.join(names)}")
    elif model == "averaged" and not many and name is not None:
        errors.append(f"export.best = {metric!r}: one averager: eval/averaged/{source}/... names its results")
    elif model == "averaged" and bn_sources is not None and source not in bn_sources and source != NO_STATS:
        errors.append(f"export.best = {metric!r}: {source!r} is not evaluated after each epoch (eval.bn_sources = "
                      f"{bn_sources}); add it there")


class BestExport:
    def __init__(self, metric: str, out: Path, records: list[dict]):
        self.metric, self.out = metric, out
        self.model, self.name, self.source, kind = parse_metric(metric)
        self.lower = kind == "loss"
        seen = [r[metric] for r in records if metric in r]
        self.best = (min(seen) if self.lower else max(seen)) if seen else None

    def improved(self, record: dict) -> bool:
        value = record.get(self.metric)
        if value is None or (self.best is not None and (value >= self.best if self.lower else value <= self.best)):
            return False
        self.best = value
        return True

    def written(self, epoch: int) -> None:
        write_atomic(self.out / "model_best.json",
                          json.dumps({"metric": self.metric, "value": self.best, "epoch": epoch}) + "\n")
