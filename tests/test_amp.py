"""fp16 loss scaling for real on CPU (torch's CPU autocast and GradScaler): overflows are the scaler's,
counted and not updates; real divergence is still caught; the scaler's state makes resume exact."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import ROOT, assert_console_is_ours, check_ok, launch, read_metrics, read_summary
from safetensors.torch import load_file

from framework.distributed.faults import NonFiniteError

pytestmark = pytest.mark.slow
OVERFLOWING = 2.0**24  # scaled logit gradients of about 2**24 / batch overflow fp16 (max 65504)
FP16 = ["model.name=test_resnet", "backend.precision=fp16", f"backend.loss_scale.init={OVERFLOWING}"]


def test_two_process_fp16_recovers_from_overflows_and_reports_them(tmp_path):
    out = tmp_path / "run"
    proc = launch([str(ROOT / "recipes" / "quickstart.yaml"), *FP16, "schedule.epochs=2", "averaging.start=0.0",
                   "logging.wandb.mode=disabled", f"output.dir={out}"], nproc=2, cwd=tmp_path)
    check_ok(proc)
    assert_console_is_ours(proc)  # the scaler's overflows included
    if "amx_fp16" not in open("/proc/cpuinfo").read():  # fp16 slow on this CPU: said once, before the first epoch
        lines = proc.stdout.splitlines()
        said = [i for i, line in enumerate(lines) if line.startswith("warning: backend.precision = 'fp16' runs ")]
        assert len(said) == 1 and said[0] < next(i for i, line in enumerate(lines) if line.startswith("epoch   1")), lines
    s = read_summary(out)
    assert (s["status"], s["world_size"], s["precision"]) == ("completed", 2, "fp16")
    overflows = s["amp"]["overflow_steps"]
    assert overflows >= 3 and s["amp"]["loss_scale"] == OVERFLOWING / 2**overflows  # halved once per overflow
    records = read_metrics(out)
    assert sum(r["amp/overflow_steps"] for r in records) == overflows and records[0]["amp/overflow_steps"] == overflows
    # Not updates: averaging started at step 1 and was fed only the applied steps
    steps = 2 * 22  # 2 epochs of 1437 training images // (2 processes x 32)
    assert s["averaging"]["updates"] == steps - overflows
    assert s["eval"]["online"]["top1"] >= 60.0
    for kind in ("online", "averaged"):
        assert all(torch.isfinite(t.float()).all() for t in load_file(out / f"model_{kind}.safetensors").values()), kind


def test_fp16_resume_restores_the_loss_scale_and_is_bitwise_exact(train_in_process, tmp_path):
    """Without the scaler's state in the checkpoint, the resumed run starts again at 2**24, overflows
    again, skips other steps and ends with other weights."""
    args = [*FP16, "schedule.epochs=2", "averaging.start=0.3", "data.batch_size=128", "data.train_subset=768"]
    ref = tmp_path / "ref"
    train_in_process([*args, "checkpoint.every=1", f"output.dir={ref}"])
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    first = sorted((ref / "checkpoints").iterdir())[0]
    shutil.copytree(first, resumed / "checkpoints" / first.name)
    s = train_in_process([*args, "checkpoint.every=1", f"output.dir={resumed}", "resume=auto"])
    assert s["amp"] == read_summary(ref)["amp"] and s["amp"]["overflow_steps"] > 0
    assert [r["train/loss"] for r in read_metrics(ref)] == [r["train/loss"] for r in read_metrics(resumed)]
    for kind in ("online", "averaged"):
        x, y = load_file(ref / f"model_{kind}.safetensors"), load_file(resumed / f"model_{kind}.safetensors")
        assert all(torch.equal(x[k], y[k]) for k in x), kind


def test_fp16_divergence_is_still_caught(train_in_process, tmp_path):
    """A loss that is itself non-finite is not an overflow: faults.nonfinite decides."""
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        train_in_process([*FP16, "optimizer.lr=1.0e12", "schedule.warmup_epochs=0", "schedule.epochs=1",
                          "averaging.strategy=none", f"output.dir={tmp_path / 'run'}"])
