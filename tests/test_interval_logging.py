"""`logging.interval_steps`: per-update records in metrics.jsonl and wandb, beside the epoch records."""

from __future__ import annotations

import json

import pytest
from conftest import read_metrics

from framework.reporting.wandb_file import find_run_files, read_run


def test_interval_records_cover_each_epoch_and_average_to_its_loss(train_in_process, tmp_path, digits_root):
    """44 updates per epoch, a point every 11: four points per epoch whose losses (11 x 32 images each)
    average to the epoch's train loss; wandb gets the same points, plotted against `update`."""
    out = tmp_path / "run"
    train_in_process(["model.name=test_resnet", "schedule.epochs=2", "logging.interval_steps=11",
                      "logging.wandb.mode=offline", f"output.dir={out}"])
    updates = sum(1 for p in (digits_root / "train").rglob("*") if p.is_file()) // 32
    assert updates == 44
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    points = [r for r in lines if "epoch" not in r]
    epochs = read_metrics(out)
    assert [r["update"] for r in points] == [11, 22, 33, 44, 55, 66, 77, 88]
    assert [r["update"] for r in epochs] == [44, 88]
    assert [r.get("epoch") for r in lines] == [None] * 4 + [1] + [None] * 4 + [2]  # in the order they happened
    for e, record in enumerate(epochs):
        mine = points[4 * e: 4 * e + 4]
        assert sum(p["train_step/loss"] for p in mine) / 4 == pytest.approx(record["train/loss"], rel=1e-9)
        assert all(p["train_step/images_per_s"] > 0 and p["train_step/lr"] > 0 for p in mine)
    assert points[-1]["train_step/lr"] == pytest.approx(epochs[-1]["train/lr"])
    history = read_run(find_run_files(out)[0]).history
    logged = [row for row in history if "train_step/loss" in row]
    assert [row["update"] for row in logged] == [p["update"] for p in points]
    assert [row["train_step/loss"] for row in logged] == pytest.approx([p["train_step/loss"] for p in points])
    assert [row["epoch"] for row in history if "eval/online/top1" in row] == [1, 2]


def test_a_resumed_run_keeps_the_interval_records_up_to_its_checkpoint(tmp_path):
    """The updates after the checkpoint are trained again and logged again: their old lines go."""
    from framework.recipe.schema import WandbConfig
    from framework.reporting.tracking import RunLogger

    old = [{"update": 10, "train_step/loss": 1.0}, {"update": 20, "train_step/loss": 0.9},
           {"epoch": 1, "update": 25, "train/loss": 0.95}, {"update": 30, "train_step/loss": 0.8},
           {"epoch": 2, "update": 50, "train/loss": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    RunLogger(tmp_path, {}, WandbConfig(mode="disabled"), "r", records=[old[2]], updates_done=30)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == old[:4]
    RunLogger(tmp_path, {}, WandbConfig(mode="disabled"), "r", records=[], updates_done=0)  # a fresh start
    assert (tmp_path / "metrics.jsonl").read_text() == ""
