"""Exports as timm users share models (framework/training/model_folder.py) and `bnswa eval` on them.

One small run writes every export: online, averaged (carrying the `online` BN statistics, so that
`--recompute-bn` has something to change) and best. timm alone loads each folder; timm's own data
pipeline, configured from the folder alone, reproduces the run's top-1; `bnswa eval` reproduces it
under a 2-process launch, and with `--recompute-bn` reproduces the run's `recompute` figure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import ROOT, check_ok, clean_env, run_in_process

RUN = ["model.name=test_resnet", "schedule.epochs=2", "averaging.start_epoch=1", "bn.export_stats=online",
       "bn.recompute_inputs=eval", "bn.recompute_batches=null", "export.best=eval/online/top1", "data.batch_size=64"]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_root) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("folders") / "run"
    return out, run_in_process([*RUN, f"output.dir={out}"])


def _bnswa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "framework", *args], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=300)


def _eval_line(proc) -> dict:
    check_ok(proc)
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("eval: "))[6:])


@pytest.mark.parametrize("stem", ["model_online", "model_averaged", "model_best"])
def test_each_export_is_a_folder_timm_loads_with_no_other_argument(run, stem):
    out, summary = run
    folder = out / stem
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    reference = timm.create_model("test_resnet", num_classes=10, checkpoint_path=str(out / f"{stem}.safetensors"))
    for (k, a), b in zip(loaded.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    config = json.loads((folder / "config.json").read_text())
    pcfg = config["pretrained_cfg"]
    assert (config["architecture"], config["num_classes"]) == ("test_resnet", 10)
    assert (pcfg["input_size"], pcfg["mean"], pcfg["std"]) == ([3, 32, 32], [0.5] * 3, [0.5] * 3)
    assert (pcfg["interpolation"], pcfg["crop_pct"]) == ("bilinear", 1.0)
    about, card = config["bnswa"], (folder / "README.md").read_text()
    if stem == "model_averaged":  # says which BN statistics it carries, and the top-1 of every source
        assert (about["weights"], about["bn_stats"]) == ("averaged", "online")
        assert "BN statistics from `online`" in card
        for source, r in summary["eval"]["averaged"].items():
            assert f"| {source} | {r['top1']:.2f} |" in card
    assert f"bnswa train {folder.resolve()}/recipe.yaml output.dir=runs/quickstart-again --num-processes 1" in card
    from framework.recipe.resolve import recipe_to_dict, resolve_recipe

    again = recipe_to_dict(resolve_recipe(folder / "recipe.yaml", ["output.dir=elsewhere"]))
    assert again["model"] == recipe_to_dict(resolve_recipe(QUICKSTART, RUN))["model"]


def test_timms_own_pipeline_from_the_folders_config_reproduces_the_runs_top1(run, digits_root):
    out, summary = run
    model = timm.create_model(f"local-dir:{out / 'model_averaged'}", pretrained=True).eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    data = timm.data.create_dataset("", root=str(digits_root / "val"), input_img_mode="RGB",
                                    transform=timm.data.create_transform(**cfg))
    correct = 0
    with torch.no_grad():
        for images, targets in torch.utils.data.DataLoader(data, batch_size=128):
            correct += (model(images).argmax(1) == targets).sum().item()
    assert 100.0 * correct / len(data) == pytest.approx(summary["eval"]["averaged"]["online"]["top1"], abs=1e-9)


@pytest.mark.slow
def test_bnswa_eval_reproduces_the_run_and_recompute_bn_gives_the_runs_recompute_figure(run):
    out, summary = run
    averaged = summary["eval"]["averaged"]
    recipe = [str(QUICKSTART), "model.name=test_resnet", "bn.recompute_inputs=eval", "bn.recompute_batches=null",
              "data.batch_size=64"]  # the pass normalises each batch by its own statistics: same batches
    saved = _eval_line(_bnswa("eval", str(out / "model_averaged"), *recipe, "--num-processes", "2"))
    assert (saved["images"], saved["world_size"], saved["bn"]) == (360, 2, "as saved")
    assert saved["top1"] == pytest.approx(averaged["online"]["top1"], abs=1e-9)
    fresh = _eval_line(_bnswa("eval", str(out / "model_averaged"), *recipe, "--recompute-bn", "--num-processes", "1"))
    assert fresh["bn"].startswith("recomputed")
    assert fresh["top1"] == pytest.approx(averaged["recompute"]["top1"], abs=1e-9)
    assert fresh["loss"] == pytest.approx(averaged["recompute"]["loss"], rel=1e-5)


def test_bad_input_to_bnswa_eval_is_one_line_and_exit_2(run, tmp_path, capsys):
    from framework.__main__ import main

    out, _ = run
    garbage = tmp_path / "weights.safetensors"
    garbage.write_bytes(b"not weights")
    cases = {
        (str(tmp_path / "none"), str(QUICKSTART)): "no such file or folder",
        (str(tmp_path), str(QUICKSTART)): "a model folder holds config.json and model.safetensors",
        (str(garbage), str(QUICKSTART)): "cannot be read as timm weights",
        (str(out / "model_online.safetensors"), str(QUICKSTART)): "does not fit resnet18 (",
        (str(out / "model_online"), str(QUICKSTART), "model.num_classes=5"): "model.num_classes = 5: the folder's model "
                                                                           "has 10 classes",
        (str(QUICKSTART),): "usage: bnswa eval",
    }
    for args, expected in cases.items():
        assert main(["eval", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, (args, err)
