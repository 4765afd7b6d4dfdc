"""GPU paths (NCCL, mixed precision). Skipped without CUDA; run them on a GPU machine."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, check_ok, launch, read_summary

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")


def test_bf16_on_one_gpu(tmp_path):
    out = tmp_path / "run"
    check_ok(launch([QUICKSTART, "backend.precision=bf16", "schedule.epochs=4", "logging.wandb.mode=disabled",
                     f"output.dir={out}"], nproc=1, cwd=tmp_path))
    s = read_summary(out)
    assert (s["device"], s["precision"]) == ("cuda", "bf16")
    assert s["eval"]["online"]["top1"] >= 90.0 and s["memory"]["peak_mb"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_two_processes_fp16(tmp_path):
    out = tmp_path / "run"
    check_ok(launch([QUICKSTART, "backend.precision=fp16", "logging.wandb.mode=disabled", f"output.dir={out}"],
                    nproc=2, cwd=tmp_path))
    s = read_summary(out)
    assert (s["device"], s["world_size"], s["precision"]) == ("cuda", 2, "fp16")
    assert s["eval"]["online"]["top1"] >= 95.0 and s["eval"]["online"]["images"] == 360


def test_fp16_overflows_on_one_gpu_are_skipped_counted_and_survived(tmp_path):
    """The scaler is the framework's on GPU too (Accelerate builds with mixed_precision='no'): an initial
    scale that overflows is halved step by step; those steps are not updates; the run reaches the bar."""
    out = tmp_path / "run"
    check_ok(launch([QUICKSTART, "backend.precision=fp16", "backend.loss_scale.init=16777216.0", "schedule.epochs=4",
                     "averaging.start=0.0", "logging.wandb.mode=disabled", f"output.dir={out}"], nproc=1, cwd=tmp_path))
    s = read_summary(out)
    assert (s["device"], s["precision"]) == ("cuda", "fp16")
    assert s["amp"]["overflow_steps"] >= 3 and s["amp"]["loss_scale"] == 2.0**24 / 2 ** s["amp"]["overflow_steps"]
    assert s["averaging"]["updates"] == 4 * 44 - s["amp"]["overflow_steps"]  # 1437 // 32 = 44 steps per epoch
    assert s["eval"]["online"]["top1"] >= 90.0
