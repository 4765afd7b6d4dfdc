"""`bnswa train`: the recipe is checked in the calling process before any launcher starts. (On CPU each
process gets its share of the cores: tests/test_install.py's launch checks it.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, clean_env

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


# Inputs that once slipped past the front door (issue 22): a traceback, or a launch that failed later.
LATE_FAILURES = {
    "betas": (["optimizer.name=adamw", "optimizer.betas=[0.9]"], 2, "optimizer.betas = [0.9]: timm's 'adamw' optimizer takes 2 betas"),
    "resume": (["resume=/no/such/folder"], 2, "resume = '/no/such/folder': not found"),
    "batch": (["data.batch_size=100000"], 2, "data.batch_size = 100000: larger than each process's share of the training set (718 images with 2 processes)"),
    "batch-3-processes": (["data.batch_size=700"], 3, "data.batch_size = 700: larger than each process's share of the training set (479 images with 3"),
    "policy": (["data.augment.auto_augment=rand-m9-inc"], 2, "data.augment.auto_augment = 'rand-m9-inc': RandAugment section 'inc' needs a value"),
    "subset": (["data.train_subset=10000000"], 2, "data.train_subset = 10000000: larger than the training split (1437 images)"),
}


def front_door(argv: list[str], monkeypatch, capsys) -> tuple[int, list[str]]:
    """`bnswa train ARGV` in this process, with the launch itself replaced by a failure: nothing may start."""
    import framework.distributed.launcher as launcher
    from framework.__main__ import main

    def no_launch(*args):
        raise AssertionError(f"launched: {args[1][-6:]}")

    monkeypatch.setattr(launcher.os, "execve", no_launch)
    try:
        code = main(["train", *argv])
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("case", LATE_FAILURES, ids=list(LATE_FAILURES))
def test_late_failures_end_at_the_front_door(case, tmp_path, monkeypatch, capsys):
    overrides, processes, expected = LATE_FAILURES[case]
    monkeypatch.chdir(tmp_path)
    code, err = front_door([QUICKSTART, *overrides, f"output.dir={tmp_path / 'run'}", "--num-processes", str(processes)],
                           monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: " + expected), err
    assert list(tmp_path.iterdir()) == []


def test_a_recipe_of_random_bytes_is_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "noise.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    code, err = front_door([str(path), f"output.dir={tmp_path / 'run'}"], monkeypatch, capsys)
    assert code == 2 and err == [f"error: {path}: not a text file (byte 128 is not UTF-8); a recipe is a YAML mapping"]
    assert [p.name for p in tmp_path.iterdir()] == ["noise.yaml"]


def test_resume_names_a_checkpoint_of_another_recipe(tmp_path, monkeypatch, capsys):
    """A checkpoint whose manifest records another model or other averagers is refused before launch."""
    ckpt = tmp_path / "old" / "checkpoints" / "epoch-00001-sample-000000000"
    ckpt.mkdir(parents=True)
    fingerprint = {"model.name": "test_resnet", "model.num_classes": 10, "averaging": ["swa"]}
    (ckpt / "manifest.json").write_text(json.dumps({"tag": ckpt.name, "world_size": 2, "files": {}, "recipe": fingerprint}))
    code, err = front_door([QUICKSTART, f"resume={ckpt}", f"output.dir={tmp_path / 'run'}"], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "was written by another recipe (model.name = 'resnet18' in the recipe, " \
        "'test_resnet' in the checkpoint)" in err[0], err
    code, err = front_door([QUICKSTART, "model.name=test_resnet", "averaging.strategy=ema", f"output.dir={tmp_path / 'old'}"], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: output.dir = '{tmp_path / 'old'}': checkpoint "), err
    assert "averaging = ['ema'] in the recipe, ['swa'] in the checkpoint" in err[0] and "model.name" not in err[0]
    assert not (tmp_path / "run").exists()


def test_validation_writes_no_data(tmp_path, monkeypatch, capsys):
    """The bundled digits are written by the first run, never by validation: a refused recipe (and the fuzz,
    which sets data.root at random) must leave no dataset behind. The defect wrote data.root/digits-v1."""
    cache = tmp_path / "cache"
    code, err = front_door([QUICKSTART, f"data.root={cache}", "data.train_subset=10000000", f"output.dir={tmp_path / 'run'}"],
                           monkeypatch, capsys)
    assert code == 2 and "larger than the training split (1437 images)" in err[0]
    code, err = front_door([QUICKSTART, f"data.root={cache}", "data.val_split=test", f"output.dir={tmp_path / 'run'}"],
                           monkeypatch, capsys)
    assert code == 2 and err == ["error: data.val_split = 'test': the digits have the splits train, val"]
    assert list(tmp_path.iterdir()) == []
