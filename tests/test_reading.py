"""The grid's reading (framework/reporting/reading.py): paired differences and the noise rule, on given numbers."""

from __future__ import annotations


def _grid_rows(values: dict):
    """Rows as compare builds them, from per-run numbers: {(strategy, mode, seed): (recompute, online, images/s)}."""
    from pathlib import Path

    from framework.reporting.compare import RunResult, group_runs, summarize

    runs = []
    for (strategy, mode, seed), (recompute, online, ips) in values.items():
        averaged = {"recompute": {"top1": recompute}, "online": {"top1": online}}
        summary = {"eval": {"online": {"top1": recompute}, "averaged": averaged},
                   "throughput": {"train_images_per_s": ips, "averaging_update_ms": 1.0, "bn_recompute_s": 0.5}}
        recipe = {"averaging.strategy": strategy, "data.batch_size": 8, "bn.mode": mode, "seed": seed}
        runs.append(RunResult(Path(f"{strategy}-{mode}-{seed}"), recipe, summary, []))
    return summarize(group_runs(runs, ["averaging.strategy", "bn.mode"]))[1]


def test_the_reading_marks_what_is_inside_the_noise():
    """Paired differences with Student's t at 95%: a steady 3-point cost is beyond the noise with 3 seeds,
    a mean of 0.1 with a spread of 1 is not."""
    from framework.reporting.reading import diff, reading

    assert diff([3.0, 3.1, 2.9]).beyond and not diff([1.1, -0.9, 0.1]).beyond
    assert not diff([3.0]).beyond  # one pair says nothing about noise
    values = {}
    for seed, jitter in enumerate((0.0, 0.4, -0.4)):
        values["swa", "local", seed] = (90 + jitter, 87 + jitter, 1000.0)
        values["swa", "sync", seed] = (90.1 - jitter, 87.1 - jitter, 500.0)  # sync: +0.1 on average, spread 0.8
    text = "\n".join(reading(_grid_rows(values)))
    assert "| `online` minus `recompute` | -3.00 ± 0.00 |" in text
    assert "`online`, copying the live model's statistics (AveragedModel's default), costs up to 3.00 points, beyond the noise in 1 of 1" in text
    assert "| SWA | +0.10 ± 0.80 (noise) |" in text
    assert "`sync` here: averaged top-1 +0.10 points against `local` (mean over swa), inside the noise; training throughput 0.50x local's." in text
