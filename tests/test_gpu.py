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
