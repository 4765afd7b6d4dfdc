"""`pip install .` (not editable) into a fresh virtual environment, then `bnswa train` on a recipe in the
user's own folder: the entry script and the default accelerate and DeepSpeed configs ship in the package.

The fresh environment takes its dependencies from this interpreter's site-packages through a path file
(installing torch again would cost minutes and gigabytes); the package itself is a normal, non-editable
install, and the clone is on no path the run can see."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT, check_ok, clean_env, read_summary

pytestmark = pytest.mark.slow


def test_a_non_editable_install_runs_a_recipe_from_outside_the_clone(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # after the venv's own
    # no OMP_NUM_THREADS: the front door gives the one CPU process every core (torch elastic alone gives 1)
    env = {k: v for k, v in clean_env().items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS")}
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    check_ok(install)
    where = subprocess.run([str(python), "-c", "import sys, framework.entry.train as t; print(t.__file__); print(*sys.path)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert Path(where[0]).is_relative_to(site) and str(ROOT) not in where[1].split(), where

    recipes = tmp_path / "my_recipes"
    recipes.mkdir()
    (recipes / "base.yaml").write_text("model: {name: test_resnet, num_classes: 10}\n"
                                       "data: {source: digits, image_size: 32, batch_size: 32, train_subset: 256}\n"
                                       "schedule: {epochs: 1, warmup_epochs: 0}\nlogging: {wandb: {mode: disabled}}\n")
    (recipes / "x.yaml").write_text("base: base.yaml\nbackend: {type: deepspeed, zero_stage: 1}\n"  # DeepSpeed's config too
                                    "averaging: {strategy: ema}\n")
    run = subprocess.run([str(venv / "bin" / "bnswa"), "train", "my_recipes/x.yaml", "--num-processes", "1",
                          "output.dir=runs/x"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    check_ok(run)
    s = read_summary(tmp_path / "runs" / "x")
    assert (s["status"], s["backend"], s["zero_stage"], s["world_size"]) == ("completed", "deepspeed", 1, 1)
    assert s["threads_per_process"] == len(os.sched_getaffinity(0))
    assert (tmp_path / "runs" / "x" / "model_averaged.safetensors").is_file()
