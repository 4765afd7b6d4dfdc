"""16-bit precision is timed against fp32 before the first epoch (framework/training/precision_probe.py):
the figure is said where 16-bit is several times slower, `backend.slow_precision: refuse` stops the run,
and the probe leaves the model and the random streams as it found them."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from conftest import ROOT

from framework.recipe.resolve import resolve_recipe
from framework.training.precision_probe import SlowPrecision, check_precision_speed, probe_precision

CPU = torch.device("cpu")
FLAGS = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
# fp16 autocast on a CPU is slow without AMX-FP16 (measured here: test_resnet 10x, resnet18 20-30x)
needs_slow_fp16 = pytest.mark.skipif("amx_fp16" in FLAGS, reason="this CPU runs fp16 in hardware (AMX-FP16)")


def _recipe(*overrides):
    return resolve_recipe(ROOT / "recipes" / "quickstart.yaml", ["model.name=test_resnet", *overrides])


def test_the_probe_leaves_weights_statistics_gradients_and_streams_alone():
    model = timm.create_model("test_resnet", num_classes=10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    fp32, half = probe_precision(model, "bf16", CPU, 32, 3)
    assert fp32 > 0 and half > 0 and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN running stats included
    assert all(p.grad is None for p in model.parameters()) and torch.equal(torch.get_rng_state(), rng)


def test_fp32_is_not_probed():
    class Untouchable(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("probed")

    assert check_precision_speed(Untouchable(), _recipe(), "fp32", CPU) is None


@needs_slow_fp16
def test_slow_fp16_is_said_with_its_figure_and_refused_on_request():
    model = timm.create_model("test_resnet", num_classes=10)
    line = check_precision_speed(model, _recipe("backend.precision=fp16"), "fp16", CPU)
    assert line is not None and line.startswith("warning: backend.precision = 'fp16' runs ")
    assert "x slower than fp32 on this CPU (one forward and backward of test_resnet on 8 images: " in line
    assert float(line.split(" runs ")[1].split("x")[0]) >= 3.0
    with pytest.raises(SlowPrecision, match=r"backend.slow_precision = 'refuse': use backend.precision = 'fp32'"):
        check_precision_speed(model, _recipe("backend.precision=fp16", "backend.slow_precision=refuse"), "fp16", CPU)
