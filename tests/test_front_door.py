"""`bnswa train`: the recipe is checked in the calling process before any launcher starts; on CPU each
process gets its share of the cores (torch elastic alone gives every worker one thread)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, check_ok, clean_env, read_summary

BNSWA = Path(sys.executable).parent / "bnswa"
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")


@pytest.mark.parametrize("cmd", [[str(BNSWA), "train"], [sys.executable, "-m", "framework", "train"]], ids=["bnswa", "python-m"])
def test_bad_input_is_one_line_and_no_launcher_report(tmp_path, cmd):
    out = tmp_path / "run"
    proc = subprocess.run([*cmd, QUICKSTART, "optimizer.lr=-1", f"output.dir={out}"], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: optimizer.lr = -1.0: must be > 0.0"], proc.stderr
    assert "elastic" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_usage_without_a_recipe():
    proc = subprocess.run([str(BNSWA), "train"], env=clean_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage: bnswa train RECIPE.yaml" in proc.stderr


@pytest.mark.slow
def test_one_cpu_process_uses_every_core(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in clean_env().items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([str(BNSWA), "train", QUICKSTART, "--num-processes", "1", "model.name=test_resnet",
                           "schedule.epochs=1", "schedule.warmup_epochs=0", "averaging.strategy=none", "logging.wandb.mode=disabled", f"output.dir={out}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    check_ok(proc)
    s = read_summary(out)
    assert s["world_size"] == 1 and s["threads_per_process"] == len(os.sched_getaffinity(0))
