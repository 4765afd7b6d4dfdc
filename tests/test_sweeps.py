"""Sweeps: what a wandb agent does for one run, reproduced offline (sweeps need the W&B server).

The agent's own code builds the arguments (wandb.sdk.launch.sweeps.utils) and the test sets the
environment it sets (WANDB_SWEEP_ID, WANDB_RUN_ID, WANDB_SWEEP_PARAM_PATH); only the server is
missing, so the agent loop itself is not run.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import yaml
from conftest import ROOT, check_ok, clean_env, free_port, read_summary

from framework.recipe.resolve import resolve_recipe
from framework.reporting.wandb_file import find_run_files, read_run
from framework.training.best import check_best

SWEEPS = sorted((ROOT / "launch" / "sweeps").glob("*.yaml"))


def _first_grid_point(sweep: dict) -> dict:
    return {k: {"value": v["values"][0] if "values" in v else v.get("value", v.get("min"))} for k, v in sweep["parameters"].items()}


def agent_command(sweep: dict, args: dict, run_id: str, sweep_id: str, workdir) -> tuple[list[str], dict]:
    """The command list and environment wandb's agent (_command_run) would use."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils
    from wandb.sdk.lib import config_util

    env = clean_env(WANDB_SWEEP_ID=sweep_id, WANDB_RUN_ID=run_id)
    param_path = os.path.join(str(workdir), "wandb", f"sweep-{sweep_id}", f"config-{run_id}.yaml")
    env["WANDB_SWEEP_PARAM_PATH"] = param_path
    config_util.save_config_file_from_dict(param_path, args)
    sweep_vars = sweep_utils.create_sweep_command_args({"args": args})
    sweep_vars.update(interpreter=["python"], program=[sweep["program"]], env=["/usr/bin/env"])
    command = []
    for chunk in sweep_utils.create_sweep_command(list(sweep["command"])):
        chunk = str(chunk)
        command += sweep_vars.get(chunk[2:-1]) or [] if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return command, env


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_files_name_real_keys_and_valid_recipes(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["command"][:2] == ["accelerate", "launch"] and "${program}" in sweep["command"]
    recipe = next(c for c in sweep["command"] if str(c).startswith("recipes/"))
    args = {k: {"value": v["values"][-1] if "values" in v else v.get("max")} for k, v in sweep["parameters"].items()}
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    for form in ("args", "args_no_hyphens"):  # both forms resolve against the recipe schema
        r = resolve_recipe(ROOT / recipe, sweep_utils.create_sweep_command_args({"args": args})[form])
    errors = []  # the metric is one the run reports (after the last epoch every BN source is evaluated)
    check_best(sweep["metric"]["name"], r.averaging, None, errors)
    assert not errors, errors


@pytest.mark.slow
def test_agent_run_reaches_every_rank_and_the_logged_config(tmp_path):
    sweep = yaml.safe_load((ROOT / "launch" / "sweeps" / "bn_averaging_backend.yaml").read_text())
    args = _first_grid_point(sweep)
    args["backend"] = {"value": sweep["parameters"]["backend"]["values"][2]}  # nested: ZeRO-3, as one argument
    args["bn.mode"] = {"value": "sync"}
    args["schedule.epochs"] = {"value": 1}  # keep the test short; the agent formats it the same way
    args["schedule.warmup_epochs"] = {"value": 0}
    args["model.name"] = {"value": "test_resnet"}
    args["logging.wandb.mode"] = {"value": "offline"}
    args["output.dir"] = {"value": str(tmp_path / "run")}
    command, env = agent_command(sweep, args, run_id="abc123xy", sweep_id="sweep42", workdir=tmp_path)
    assert "--backend={'type': 'deepspeed', 'zero_stage': 3}" in command  # Python str() of a dict
    accelerate = str(ROOT / ".venv" / "bin" / "accelerate") if (ROOT / ".venv").exists() else "accelerate"
    command = [accelerate, *command[1:]]
    command.insert(command.index("--config_file"), f"--main_process_port={free_port()}")
    command[command.index("accelerate_config.yaml")] = str(ROOT / "accelerate_config.yaml")
    command[command.index(sweep["program"])] = str(ROOT / sweep["program"])
    command[command.index("recipes/quickstart.yaml")] = str(ROOT / "recipes" / "quickstart.yaml")
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    check_ok(proc)

    out = tmp_path / "run"
    summary = read_summary(out)
    assert (summary["backend"], summary["zero_stage"], summary["world_size"]) == ("deepspeed", 3, 2)
    assert len(set(summary["recipe_sha256_per_rank"])) == 1  # every rank resolved the same recipe
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert (saved["bn"]["mode"], saved["backend"]["zero_stage"], saved["averaging"]["strategy"]) == ("sync", 3, "swa")
    files = find_run_files(out)
    assert len(files) == 1 and "abc123xy" in files[0].name  # the agent's run id
    deadline = time.time() + 20
    while True:
        run = read_run(files[0])
        if len(run.history) >= 2 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert run.config["bn"]["mode"] == "sync" and run.config["backend"]["zero_stage"] == 3
    metric = sweep["metric"]["name"]
    assert metric in run.history[-1] and metric in run.summary  # the metric the sweep optimises exists
    assert json.loads(json.dumps(run.config["averaging"]))["strategy"] == "swa"
